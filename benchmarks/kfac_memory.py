"""Peak memory of K-FAC's factor step against the Σ (in'² + out²) floor of its factors.

Each measurement runs in a fresh subprocess (the model, data and a warmed-up optimizer built
first), then resets the peak resident set (``/proc/self/clear_refs`` ← 5), reads VmRSS, runs one
full training step (zero_grad, forward, loss.backward(), optimizer.step()) and reads the peak
(VmHWM): *peak extra* = VmHWM − VmRSS before, every byte the step touched at its worst moment
(tensors, autograd graph, allocator slack). glibc runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so
freed blocks go back to the OS and the resident set follows the live tensors. (tracemalloc
misses torch's allocations and torch.profiler's memory view misses non-tensor memory, hence the
resident set.) K-FAC's statistics cost the factor step's extra minus that of the same
optimizer's plain step (same graph, same preconditioning, no statistics); the floor is the size
of one set of factors, Σ_l (in'_l² + out_l²) floats.

    .venv-bench/bin/python benchmarks/kfac_memory.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from _common import command_line, machine_info, write_section
from torch import nn

THREADS = 2
AUTOENCODER = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
BATCH = 1000
BOUND = 4.0


def model_of(dims: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def floor_bytes(dims: tuple[int, ...]) -> int:
    return 4 * sum((a + 1) ** 2 + b ** 2 for a, b in itertools.pairwise(dims))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child(kind: str) -> dict:
    """In the subprocess: warm up, then measure one step of ``kind``."""
    from natgrad.optim import KFAC

    torch.set_num_threads(THREADS)
    model = model_of(AUTOENCODER)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, AUTOENCODER[0], generator=g)
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = KFAC(model, lr=0.01, damping=1.0, likelihood="bernoulli", momentum=0.9,
                   factor_update_period=10, inverse_update_period=100)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), x, reduction="sum")
        (loss / BATCH).backward()
        opt.step()

    for _ in range(12 if kind == "kfac_plain" else 10):  # steps 0..9 / 0..11: the next is
        step()                                         # a factor step (10) / a plain one (12)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    return {"kind": kind, "before_kb": before, "extra_kb": peak - before}


def measure(kind: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(THREADS))
    out = subprocess.run([sys.executable, __file__, "--_child", kind], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--_child")
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(args._child)))
        return
    kinds = ("sgd", "kfac_plain", "kfac_factor")
    runs = {k: [measure(k)["extra_kb"] / 1024 for _ in range(args.repeats)] for k in kinds}
    med = {k: statistics.median(v) for k, v in runs.items()}
    floor = floor_bytes(AUTOENCODER) / 2**20
    stats = med["kfac_factor"] - med["kfac_plain"]
    ratio = stats / floor
    body = "\n".join([
        f"Command: `{command_line('kfac_memory.py')}`", "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine_info().items()) + ".", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        f"Model: the deep autoencoder {'-'.join(map(str, AUTOENCODER))} (tanh), batch {BATCH}, "
        "float32; `KFAC(model, lr=0.01, damping=1, likelihood=\"bernoulli\", momentum=0.9, "
        "factor_update_period=10, inverse_update_period=100)` (one-sample MC Fisher). "
        f"Medians of {args.repeats} subprocesses each.", "",
        "| step | peak extra MiB |", "|---|---:|",
        *(f"| {k} | {med[k]:.1f} |" for k in kinds), "",
        "| quantity | MiB |", "|---|---:|",
        f"| floor Σ (in'² + out²) · 4 B | {floor:.1f} |",
        f"| factor step − plain step (the statistics) | {stats:.1f} |", "",
        "| target | measured | bound | verdict |", "|---|---:|---:|---|",
        f"| K-FAC statistics' peak / floor | {ratio:.2f} | ≤ {BOUND} | "
        f"**{'PASS' if ratio <= BOUND else 'FAIL'}** |",
    ])
    print(body)
    if args.write:
        write_section(args.write, "## K-FAC factor step memory (issue 16)", body)


if __name__ == "__main__":
    main()
