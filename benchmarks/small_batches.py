"""The no-hyperparameter defaults at tiny batch sizes (issue 14's "no default may diverge").

A 16-64-4 ReLU MLP learns a linear 4-class rule (labels argmax(x W)) from batches of 1, 2, 4
and 16 fresh Gaussian examples for 150 steps; `KFAC(model)` and `EKFAC(model)` with no
hyperparameter against `torch.optim.Adam(lr=1e-3)`, 3 seeds each (same initialisation and data
per seed). Reported: the held-out cross-entropy on 512 examples after the last step (always
predicting the class frequencies scores about 1.39). One thread, ~1 minute.

    .venv-bench/bin/python benchmarks/small_batches.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import command_line, machine_info, write_section
from torch import nn

import natgrad

HEADING = "## No-tuning defaults at tiny batches (issue 14)"
BATCHES = (1, 2, 4, 16)
SEEDS = (0, 1, 2)
STEPS = 150
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "Adam (lr 1e-3)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "KFAC(model)": lambda m: natgrad.optim.KFAC(m),
    "EKFAC(model)": lambda m: natgrad.optim.EKFAC(m),
}


def held_out_loss(batch: int, seed: int, make: Callable[[nn.Module], torch.optim.Optimizer]
                  ) -> float:
    """Train for :data:`STEPS` steps at ``batch`` examples per step; the held-out loss."""
    W = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    test_x = torch.randn(512, 16, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = make(model)
    g = torch.Generator().manual_seed(seed + 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # natgrad's small-batch warning
        for _ in range(STEPS):
            x = torch.randn(batch, 16, generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), (x @ W).argmax(1)).backward()
            opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(test_x), (test_x @ W).argmax(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for batch in BATCHES:
        for name, make in OPTIMIZERS.items():
            losses = [held_out_loss(batch, seed, make) for seed in SEEDS]
            rows.append(f"| {batch} | {name} | " + " | ".join(f"{v:.3f}" for v in losses) + " |")
            print(rows[-1], flush=True)
    body = "\n".join([
        f"Command: `{command_line('small_batches.py')}`", "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine_info().items()) + ".", "",
        f"A 16-64-4 ReLU MLP, labels argmax(x W) of 4 classes, fresh Gaussian batches, {STEPS} "
        "steps; held-out cross-entropy on 512 examples after the last step (predicting the "
        "class frequencies: about 1.39), one column per seed.", "",
        "| batch | optimizer | " + " | ".join(f"seed {s}" for s in SEEDS) + " |",
        "|---:|---|" + "---:|" * len(SEEDS),
        *rows,
    ])
    print(body)
    if args.write:
        write_section(args.write, HEADING, body)


if __name__ == "__main__":
    main()
