"""The recipes in examples/recipes/ — natgrad's K-FAC inside Hugging Face ``Trainer`` and
PyTorch Lightning — run as a user would start them, with ``--tiny``. They need the ``recipes``
extra (also in ``dev``, so ``make test`` runs them); without those packages they are skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def run(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(RECIPES / script), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_kfac_in_hugging_face_trainer() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run("hf_trainer_kfac.py")
    match = re.search(rf"K-FAC in Trainer: (\d+) steps, eval loss {NUMBER} -> {NUMBER}", out)
    assert match is not None, out
    steps, first, last = int(match.group(1)), float(match.group(2)), float(match.group(3))
    assert last < 0.5 * first  # it learns
    # K-FAC, built on the Hugging Face model itself, saw every training forward pass (one
    # curvature update per Trainer step, none from evaluation) and preconditions its Linear
    # layers
    updates = re.search(r"preconditioned layers: (\d+); curvature updates: (\d+)", out)
    assert updates is not None and int(updates.group(1)) >= 6 and int(updates.group(2)) == steps


def test_kfac_in_lightning() -> None:
    pytest.importorskip("lightning")
    out = run("lightning_kfac.py")
    match = re.search(rf"K-FAC in Lightning: (\d+) steps, train loss {NUMBER} -> {NUMBER}; "
                      r"curvature updates: (\d+)", out)
    assert match is not None, out
    steps, before, after, updates = (int(match.group(1)), float(match.group(2)),
                                     float(match.group(3)), int(match.group(4)))
    assert steps == updates == 30 and after < 0.2 * before
