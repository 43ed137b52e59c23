"""natgrad's defaults against AdamW (issue 14, ``make bench-defaults``).

Every method starts from the same initialisation and sees the same batches:

- ``kfac``, ``ekfac``: ``KFAC(model)`` / ``EKFAC(model)`` with no hyperparameter, the standard
  loop (``loss.backward(); opt.step()``: adaptive α, μ; the damping stays at its default);
- ``kfac-closure``, ``ekfac-closure``: the same with ``opt.step(closure)`` (adds the
  Levenberg–Marquardt damping; one more forward pass every ``damping_adaptation_period`` steps);
- ``adamw``: ``torch.optim.AdamW(lr=1e-3)``; ``adamw-tuned``: the best final training loss
  over lr ∈ {3e-4, 1e-3, 3e-3, 1e-2}.

Reported per task: the final loss on (up to 10000 of) the training examples, whether it is
finite and below the initial loss, wall-clock seconds, and the seconds natgrad's defaults take
until their batch loss (trailing mean over 20 steps) reaches tuned AdamW's final one.

Usage: ``python benchmarks/defaults.py [--steps 300] [--tasks digits-mlp,digits-cnn]``. Tasks
whose data is missing are reported as skipped. The language-model task comes from
``benchmarks/lm.py`` (:data:`EXTRA_TASKS` is the hook: a name → callable returning
(model, batches, loss function, likelihood)).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.cli.tasks import batch_targets, get_task
from natgrad.data import DataError
from natgrad.optim import EKFAC, KFAC

TASKS = ("digits-mlp", "digits-cnn", "digits-autoencoder", "fashion-autoencoder", "fashion-cnn")
"""The issue also lists a ResNet-8 with BatchNorm on Fashion-MNIST and the language model:
they join through :data:`EXTRA_TASKS` when their builders exist."""
EXTRA_TASKS: dict[str, Callable[[int], tuple[nn.Module, list, Callable, str]]] = {}
ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2)


def _problem(name: str, steps: int, seed: int) -> tuple[nn.Module, list, Callable, str, Any]:
    if name in EXTRA_TASKS:
        model, batches, loss_fn, likelihood = EXTRA_TASKS[name](steps)
        return model, batches, loss_fn, likelihood, None
    task = get_task(name)
    data = task.load()
    torch.manual_seed(seed)
    model = task.build_model(data.image_shape)
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    batches = []
    while len(batches) < steps:
        for idx in torch.randperm(n, generator=g).split(task.batch_size):
            if len(batches) < steps and idx.numel() == task.batch_size:
                x = data.x_train[idx]
                batches.append((x, batch_targets(task, x, data.y_train[idx])))
    full = (data.x_train[:10000], batch_targets(task, data.x_train[:10000],
                                                data.y_train[:10000]))
    return model, batches, task.loss, task.likelihood, full


def _train(method: str, model: nn.Module, batches: list, loss_fn: Callable, likelihood: str,
           lr: float | None) -> tuple[list[float], list[float]]:
    """Batch losses and cumulative seconds per step."""
    if method.startswith("adamw"):
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        cls = EKFAC if method.startswith("ekfac") else KFAC
        opt = cls(model, likelihood=likelihood)
    closure_mode = method.endswith("closure")
    losses, seconds, start = [], [], time.perf_counter()
    for x, y in batches:
        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        if closure_mode:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - start)
    return losses, seconds


@torch.no_grad()
def _full_loss(model: nn.Module, loss_fn: Callable, full: Any, batches: list) -> float:
    x, y = full if full is not None else batches[-1]
    model.eval()
    value = float(loss_fn(model(x), y))
    model.train()
    return value


def run(name: str, steps: int, seed: int = 0) -> dict[str, dict[str, float]]:
    model, batches, loss_fn, likelihood, full = _problem(name, steps, seed)
    initial = _full_loss(model, loss_fn, full, batches)
    results: dict[str, dict[str, float]] = {}
    runs = [("kfac", None), ("ekfac", None), ("kfac-closure", None), ("ekfac-closure", None)]
    runs += [(f"adamw-{lr:g}", lr) for lr in ADAMW_GRID]
    for method, lr in runs:
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses, seconds = _train(method, m, batches, loss_fn, likelihood, lr)
        final = _full_loss(m, loss_fn, full, batches)
        results[method] = {"final": final, "seconds": seconds[-1], "initial": initial,
                           "ok": float(math.isfinite(final) and final < initial),
                           "curve": losses, "times": seconds}  # type: ignore[dict-item]
    tuned = min((k for k in results if k.startswith("adamw")),
                key=lambda k: results[k]["final"] if math.isfinite(results[k]["final"])
                else math.inf)
    results["adamw-tuned"] = dict(results[tuned], lr=float(tuned.split("-")[1]))
    target = _smooth(results[tuned]["curve"])[-1]  # type: ignore[arg-type]
    for method in ("kfac", "ekfac", "kfac-closure", "ekfac-closure"):
        r = results[method]
        smooth = _smooth(r["curve"])  # type: ignore[arg-type]
        hit = next((t for t, v in zip(r["times"], smooth, strict=True)  # type: ignore[call-overload]
                    if v <= target), None)
        r["reach"] = math.nan if hit is None else hit
    return results


def _smooth(values: list[float], window: int = 20) -> list[float]:
    """Trailing mean of the batch losses over ``window`` steps."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", default="digits-mlp,digits-cnn")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| task | method | final train loss | below initial | seconds | s to tuned AdamW |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        try:
            results = run(name, args.steps)
        except (DataError, FileNotFoundError) as err:
            print(f"| {name} | skipped: {err} | | | |")
            continue
        for method, r in results.items():
            extra = f" (lr {r['lr']:g})" if "lr" in r else ""
            reach = f"{r['reach']:.1f}" if "reach" in r else ""
            print(f"| {name} | {method}{extra} | {r['final']:.4g} | {bool(r['ok'])} | "
                  f"{r['seconds']:.1f} | {reach} |")
        print(f"| {name} | initial | {results['kfac']['initial']:.4f} | | | |", flush=True)


if __name__ == "__main__":
    main()
