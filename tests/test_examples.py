"""Every script in examples/ runs with --tiny, exits 0 and prints what it claims.

Each example runs in its own interpreter as a user would start it (``python examples/X.py
--tiny``, through ``runpy`` so that torch's thread count can be read afterwards), without
``OMP_NUM_THREADS`` and with torch set to 2 threads beforehand: each example must limit torch to
one thread itself (its models are tiny; extra threads only cost on a shared machine). All
examples start at once (a module-scoped fixture) so that the interpreters' start-up overlaps;
each test then checks one example's output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sklearn  # noqa: F401 - the examples train on scikit-learn's digits (dev extra)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"

# What each example must print (regular expressions, searched in its stdout).
EXPECTED = {
    "fisher_structures.py": [
        r"dense +0\.000e\+00 +0\.000e\+00 +1\.0000",
        *[rf"{s} +{NUMBER} +{NUMBER} +{NUMBER}"
          for s in ("block_diagonal", "kfac", "ekfac", "diagonal", "empirical")],
        r"mc, 1 sample\(s\)", r"mc, 100 sample\(s\)",
        r"EK-FAC error <= K-FAC error: True",
    ],
    "kfac_training_loop.py": [
        rf"K-FAC epoch  2  train loss {NUMBER}  test accuracy {NUMBER}",
        rf"SGD   epoch  2  train loss {NUMBER}  test accuracy {NUMBER}",
        rf"final train loss: K-FAC {NUMBER}, SGD {NUMBER}",
    ],
    "kfac_with_adam.py": [
        rf"K-FAC \+ Adam epoch  2  train loss {NUMBER}",
        rf"Adam         epoch  2  train loss {NUMBER}",
        r"KFACPreconditioner\(damping=0\.1.*\n  0: Linear 64x65 -> KFAC\n  2: Linear 10x65 -> KFAC",
        rf"final train loss: K-FAC \+ Adam {NUMBER}, Adam {NUMBER}",
    ],
    "prong_mlp.py": [
        rf"PRONG \+ SGD epoch  2  train loss {NUMBER}",
        r"  0: WhitenedLinear, centred\n  2: WhitenedLinear, centred",
        r"re-estimations: 3",
        r"exported modules: Linear, Tanh; parameters: \['0\.weight', '0\.bias', '2\.weight'",
        rf"exported model computes the same outputs: max \|difference\| = {NUMBER}",
    ],
    "user_model.py": [
        rf"kfac: 40 steps, {NUMBER} s \({NUMBER} ms/step\), train loss {NUMBER}, test loss "
        rf"{NUMBER}, test accuracy {NUMBER}",
        r"# natgrad fisher: custom", r"\| kfac \| " + rf"{NUMBER} \| {NUMBER} \| {NUMBER}",
    ],
    "resume_checkpoint.py": [
        r"saved after step 5, resumed from checkpoint\.pt",
        r"resumed run equals the uninterrupted run bitwise: True",
    ],
}


_AS_A_USER = """import runpy, sys, torch
torch.set_num_threads(2)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"torch threads at exit: {torch.get_num_threads()}")
"""


def test_every_example_is_checked_and_short() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED)
    for name in scripts:
        lines = (EXAMPLES / name).read_text().count("\n")
        assert lines < 100, f"{name} has {lines} lines"


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, subprocess.Popen]]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NATGRAD_EXAMPLES_TINY")}
    started = {
        name: subprocess.Popen([sys.executable, "-c", _AS_A_USER, str(EXAMPLES / name),
                                "--tiny"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name in sorted(EXPECTED)
    }
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_and_prints_its_claims(runs: dict[str, subprocess.Popen],
                                            name: str) -> None:
    stdout, stderr = runs[name].communicate(timeout=300)
    assert runs[name].returncode == 0, f"{name} failed:\n{stdout}\n{stderr}"
    for pattern in EXPECTED[name]:
        assert re.search(pattern, stdout), f"{name}: no /{pattern}/ in\n{stdout}"
    assert "torch threads at exit: 1" in stdout, f"{name} does not limit torch's threads"
    if name == "prong_mlp.py":
        match = re.search(rf"max \|difference\| = ({NUMBER})", stdout)
        assert match is not None and float(match.group(1)) <= 1e-4
