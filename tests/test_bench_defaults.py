"""The no-tuning benchmark (benchmarks/defaults.py, ``make bench-defaults``): its ResNet-8 is
the stated model, its goals are computed from the traces as the issue states them, and its
main path runs end to end on a short run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import defaults

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resnet8_has_batchnorm_inplace_relu_and_eight_weight_layers() -> None:
    model = defaults.resnet8()
    weighted = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
                and not (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    assert len(weighted) == 8  # stem, 3 blocks × 2 convs, classifier (shortcuts aside)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(r.inplace for r in relus)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_reach_is_the_first_time_the_trailing_mean_is_at_the_target() -> None:
    trace = defaults.Trace("kfac", losses=[4.0, 2.0, 1.0, 1.0], times=[1.0, 2.0, 3.0, 4.0])
    assert defaults.smooth(trace.losses, window=2) == [4.0, 3.0, 1.5, 1.0]
    # window 20: the means are 4, 3, 7/3, 2
    assert defaults.reach_seconds(trace, 2.5) == pytest.approx(3.0)
    assert defaults.reach_seconds(trace, 2.0) == pytest.approx(4.0)
    assert defaults.reach_seconds(trace, 1.5) is None


def test_tuned_adamw_is_the_lowest_finite_final_loss() -> None:
    traces = {m: defaults.Trace(m, final=v) for m, v in
              [("kfac", 0.1), ("adamw-0.001", 0.5), ("adamw-0.01", math.nan),
               ("adamw-0.003", 0.3)]}
    assert defaults.tuned(traces) == "adamw-0.003"


def test_short_run_reports_every_goal(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    results = defaults.main(["--tasks", "digits-mlp", "--steps", "4", "--threads", "1",
                             "--methods", "kfac,ekfac", "--write", str(out)])
    traces = results[0].traces
    assert set(traces) == {"kfac", "ekfac", *(f"adamw-{lr:g}" for lr in defaults.ADAMW_GRID)}
    assert all(len(t.losses) == 4 and len(t.times) == 4 for t in traces.values())
    assert all(math.isfinite(t.final) for t in traces.values())
    text = out.read_text()
    assert defaults.HEADING in text and "| digits-mlp | 4 |" in text
    assert "finite and below the initial loss" in text and (tmp_path / "defaults.png").exists()
