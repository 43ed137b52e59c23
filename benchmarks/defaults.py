"""natgrad's defaults against AdamW (issue 14, ``make bench-defaults``).

On each task every method starts from the same initialisation and sees the same batches, and
the methods run **in lockstep** (step i of every method, then step i + 1), so that a change in
the machine's load falls on all of them alike; each step is timed on its own.

- ``kfac``, ``ekfac``: ``KFAC(model, likelihood=...)`` / ``EKFAC(model, likelihood=...)`` with no
  hyperparameter, the standard loop (``loss.backward(); opt.step()``: adaptive α and μ; the
  damping stays at its initial value);
- ``kfac-closure``, ``ekfac-closure``: the same with ``opt.step(closure)`` (adds the
  Levenberg–Marquardt damping; one more forward pass every ``damping_adaptation_period`` steps);
- ``adamw-<lr>``: ``torch.optim.AdamW(lr=...)`` for lr ∈ {3e-4, 1e-3, 3e-3, 1e-2}, otherwise
  PyTorch's defaults; ``adamw-1e-3`` is *default AdamW*, the one with the lowest final training
  loss is *tuned AdamW*.

Measured per task and method: the final training loss (on up to 10,000 training examples, in
eval mode; 64 training windows for the language model), whether it is finite and below the
initial loss, the training seconds (steps only), and the seconds until the training-batch loss
(trailing mean over 20 steps) first reaches tuned AdamW's final trailing mean.

The tasks (``--tasks``): the digits MLP and CNN, the Fashion-MNIST deep autoencoder at batch
1000, a Fashion-MNIST CNN, a ResNet-8 with BatchNorm and ``ReLU(inplace=True)`` on Fashion-MNIST,
and the GPT-style language model of ``benchmarks/lm.py`` (issue 13) for fewer steps. Tasks whose
data are missing are reported as skipped.

Usage: ``python benchmarks/defaults.py [--tasks a,b] [--steps N] [--write benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ForeignLoad, command_line, machine_info, write_section

from natgrad.cli.tasks import batch_targets, get_task
from natgrad.data import DataError
from natgrad.optim import EKFAC, KFAC

HEADING = "## No-tuning defaults: KFAC(model) and EKFAC(model) against AdamW (issue 14)"
TASKS = ("digits-mlp", "digits-cnn", "fashion-autoencoder", "fashion-cnn", "fashion-resnet8",
         "lm")
NATGRAD = ("kfac", "ekfac", "kfac-closure", "ekfac-closure")
ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_ADAMW = "adamw-0.001"
STEPS = {"digits-mlp": 300, "digits-cnn": 300, "fashion-autoencoder": 200, "fashion-cnn": 200,
         "fashion-resnet8": 150, "lm": 60}
"""Steps per task (the same for every method)."""
BATCH = {"fashion-autoencoder": 1000, "fashion-resnet8": 128}
"""Batch sizes that differ from the CLI task's default."""
WINDOW = 20


@dataclass
class Problem:
    """One task: a freshly initialised model, its batches, loss and likelihood."""

    name: str
    description: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    likelihood: str
    train_eval: tuple[Tensor, Tensor]


@dataclass
class Trace:
    """One method's run on one task."""

    method: str
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # cumulative training seconds
    final: float = math.nan
    stopped: str = ""


# -- models and tasks --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the identity (or a strided 1×1 conv-BN), then ReLU;
    every ReLU in place."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def resnet8(classes: int = 10, width: int = 16) -> nn.Sequential:
    """ResNet-8 for 1-channel images: a conv-BN-ReLU stem, three basic blocks (width, 2·width,
    4·width channels; strides 1, 2, 2), global average pooling and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


def _image_problem(name: str, steps: int, seed: int) -> Problem:
    task_name = "fashion-cnn" if name == "fashion-resnet8" else name
    task = get_task(task_name)
    data = task.load()
    torch.manual_seed(seed)
    if name == "fashion-resnet8":
        model = resnet8()
        description = "Fashion-MNIST, ResNet-8 (BatchNorm, ReLU(inplace=True))"
    else:
        model = task.build_model(data.image_shape)
        description = task.description
    batch = BATCH.get(name, task.batch_size)
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    batches: list[tuple[Tensor, Tensor]] = []
    while len(batches) < steps:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(batches) < steps and idx.numel() == batch:
                x = data.x_train[idx]
                batches.append((x, batch_targets(task, x, data.y_train[idx])))
    x_eval = data.x_train[:10000]
    return Problem(name, f"{description}, batch {batch}", model, batches, task.loss,
                   task.likelihood, (x_eval, batch_targets(task, x_eval, data.y_train[:10000])))


def _lm_problem(steps: int, seed: int) -> Problem:
    import lm  # benchmarks/lm.py: the issue-13 model and data

    train, _ = lm.load_text()
    cfg = lm.Config()
    model = lm.build_model(cfg.layers, cfg.d_model, cfg.heads, cfg.context, seed)
    offsets = lm.batch_offsets(len(train), cfg.context, cfg.batch, steps, seed)
    batches = [lm.windows(train, starts, cfg.context) for starts in offsets]
    return Problem("lm", f"GPT-style decoder of benchmarks/lm.py ({cfg.layers} layers, d_model "
                   f"{cfg.d_model}, context {cfg.context}, tied head), stdlib bytes, batch "
                   f"{cfg.batch}", model, batches, F.cross_entropy, "categorical",
                   lm.validation_set(train, cfg.context, 64))


def problem(name: str, steps: int, seed: int = 0) -> Problem:
    """The task ``name`` with ``steps`` batches, its model initialised from ``seed``."""
    return _lm_problem(steps, seed) if name == "lm" else _image_problem(name, steps, seed)


# -- running -----------------------------------------------------------------------------------
@torch.no_grad()
def training_loss(model: nn.Module, p: Problem, chunk: int = 1000) -> float:
    """Mean loss on ``p.train_eval`` in eval mode (chunked; the model's mode is restored)."""
    x, y = p.train_eval
    was = model.training
    model.eval()
    total, count = 0.0, 0
    per_row = y.shape[0] // x.shape[0]  # target rows per input row (T for the LM's flat y)
    step = chunk if p.name != "lm" else 16
    for i in range(0, x.shape[0], step):
        xb = x[i:i + step]
        yb = y[i * per_row:(i + xb.shape[0]) * per_row]
        total += float(p.loss(model(xb), yb)) * xb.shape[0]
        count += xb.shape[0]
    model.train(was)
    return total / count


def _optimizer(method: str, model: nn.Module, likelihood: str) -> torch.optim.Optimizer:
    if method.startswith("adamw-"):
        return torch.optim.AdamW(model.parameters(), lr=float(method.split("-", 1)[1]))
    cls = EKFAC if method.startswith("ekfac") else KFAC
    return cls(model, likelihood=likelihood)


def run(p: Problem, methods: Sequence[str], log: Callable[[str], None] = print
        ) -> dict[str, Trace]:
    """Train every method from ``p``'s initialisation on ``p.batches`` in lockstep."""
    states = {}
    for method in methods:
        model = copy.deepcopy(p.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states[method] = (model, _optimizer(method, model, p.likelihood), Trace(method))
    for i, (x, y) in enumerate(p.batches):
        for method, (model, opt, trace) in states.items():
            if trace.stopped:
                continue

            def closure(model: nn.Module = model, opt: torch.optim.Optimizer = opt,
                        x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad(set_to_none=True)
                loss = p.loss(model(x), y)
                loss.backward()
                return loss

            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if method.endswith("closure"):
                        loss = opt.step(closure)
                    else:
                        loss = closure()
                        opt.step()
            except (RuntimeError, ValueError) as err:  # reported, not hidden
                trace.stopped = f"step {i}: {type(err).__name__}: {err}"[:200]
                log(f"{p.name} {method}: {trace.stopped}")
                continue
            trace.times.append((trace.times[-1] if trace.times else 0.0)
                               + time.perf_counter() - start)
            value = float(loss.detach())
            trace.losses.append(value)
            if not math.isfinite(value):
                trace.stopped = f"non-finite loss at step {i}"
                log(f"{p.name} {method}: {trace.stopped}")
        if (i + 1) % 50 == 0:
            log(f"{p.name} step {i + 1}: " + ", ".join(
                f"{m} {smooth(t.losses)[-1]:.4g}" for m, (_, _, t) in states.items()
                if t.losses))
    for model, _, trace in states.values():
        trace.final = training_loss(model, p) if not trace.stopped else math.nan
    return {m: t for m, (_, _, t) in states.items()}


def smooth(values: Sequence[float], window: int = WINDOW) -> list[float]:
    """Trailing mean of the batch losses over ``window`` steps."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def tuned(traces: dict[str, Trace]) -> str:
    """The AdamW run with the lowest finite final training loss."""
    candidates = [m for m in traces if m.startswith("adamw-") and math.isfinite(traces[m].final)]
    return min(candidates, key=lambda m: traces[m].final)


def reach_seconds(trace: Trace, target: float) -> float | None:
    """Training seconds until the trailing-mean batch loss first is ≤ ``target``."""
    for t, v in zip(trace.times, smooth(trace.losses), strict=True):
        if v <= target:
            return t
    return None


# -- report ------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    problem: Problem
    initial: float
    traces: dict[str, Trace]


def summarise(res: TaskResult) -> list[dict[str, object]]:
    """One row per natgrad method: the three goals' quantities."""
    traces = res.traces
    best = tuned(traces)
    target = smooth(traces[best].losses)[-1]
    adam_seconds = traces[best].times[-1]
    rows = []
    for method in (m for m in traces if not m.startswith("adamw-")):
        t = traces[method]
        hit = reach_seconds(t, target) if not t.stopped else None
        rows.append({
            "method": method, "final": t.final,
            "ok": math.isfinite(t.final) and t.final < res.initial,
            "beats_default": math.isfinite(t.final) and t.final < traces[DEFAULT_ADAMW].final,
            "reach": hit, "ratio": None if hit is None else hit / adam_seconds,
            "step_ratio": (t.times[-1] / len(t.times)) / (adam_seconds / len(traces[best].times))
            if t.times else math.nan,
        })
    return rows


def render(results: list[TaskResult], skipped: dict[str, str], command: str,
           plot: str | None, load: float) -> str:
    lines = [f"Command: `{command}`", ""]
    info = machine_info()
    lines.append("Machine: " + "; ".join(f"{k} {v}" for k, v in info.items())
                 + f"; other processes used {100 * load:.0f}% of the CPUs during the run.")
    lines += ["", "Every method on a task starts from the same initialisation and sees the same "
              "batches; the methods run in lockstep and each step is timed alone. natgrad gets "
              "**no hyperparameter** (`KFAC(model, likelihood=...)`, `EKFAC(model, likelihood="
              "...)`); AdamW is PyTorch's with lr 1e-3 (default) and the best of {3e-4, 1e-3, "
              "3e-3, 1e-2} (tuned). Final loss: on up to 10,000 training examples (64 training "
              "windows for the LM), eval mode. *Reach*: training seconds until natgrad's batch "
              "loss (trailing mean over 20 steps) is at tuned AdamW's final one, as a fraction "
              "of tuned AdamW's seconds for its whole run.", ""]
    lines += ["| task | steps | initial | default AdamW | tuned AdamW (lr) | method | final | "
              "finite, < initial | beats default AdamW | reach / tuned AdamW's time | "
              "step / AdamW step |", "|---|---:|---:|---:|---|---|---:|---|---|---:|---:|"]
    tally = {m: [0, 0, 0, 0] for m in NATGRAD}  # ok, beats default, reach <= 1, tasks
    ae_ratio: dict[str, float | None] = {}
    for res in results:
        traces = res.traces
        best = tuned(traces)
        for row in summarise(res):
            m = str(row["method"])
            ratio = row["ratio"]
            tally[m][0] += bool(row["ok"])
            tally[m][1] += bool(row["beats_default"])
            tally[m][2] += ratio is not None and float(ratio) <= 1.0  # type: ignore[arg-type]
            tally[m][3] += 1
            if res.problem.name == "fashion-autoencoder":
                ae_ratio[m] = ratio  # type: ignore[assignment]
            stop = f" ({traces[m].stopped})" if traces[m].stopped else ""
            lines.append(
                f"| {res.problem.name} | {len(res.problem.batches)} | {res.initial:.4g} | "
                f"{traces[DEFAULT_ADAMW].final:.4g} | {traces[best].final:.4g} "
                f"({best.split('-', 1)[1]}) | {m}{stop} | {row['final']:.4g} | "
                f"{'yes' if row['ok'] else 'NO'} | {'yes' if row['beats_default'] else 'no'} | "
                f"{'not reached' if ratio is None else f'{ratio:.2f}'} | "
                f"{row['step_ratio']:.2f} |")
    lines += ["", "| goal | " + " | ".join(NATGRAD) + " |",
              "|---|" + "---:|" * len(NATGRAD)]
    lines.append("| finite and below the initial loss (6 of 6) | "
                 + " | ".join(f"{v[0]} of {v[3]}" for v in tally.values()) + " |")
    lines.append("| below default AdamW's final loss (6 of 6) | "
                 + " | ".join(f"{v[1]} of {v[3]}" for v in tally.values()) + " |")
    lines.append("| tuned AdamW's final loss in ≤ its time (≥ 4 of 6) | "
                 + " | ".join(f"{v[2]} of {v[3]}" for v in tally.values()) + " |")
    lines.append("| autoencoder: reach ≤ 0.5× tuned AdamW's time | " + " | ".join(
        "—" if m not in ae_ratio else ("not reached" if ae_ratio[m] is None
                                       else f"{ae_ratio[m]:.2f}") for m in NATGRAD) + " |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]
    lines += ["", "Tasks: " + "; ".join(f"**{r.problem.name}**: {r.problem.description}"
                                        for r in results) + "."]
    if plot:
        lines += ["", f"![training loss against seconds]({plot})"]
    return "\n".join(lines)


def plot_results(results: list[TaskResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results, strict=False):
        best = tuned(res.traces)
        for method, t in res.traces.items():
            if not t.losses:
                continue
            if method.startswith("adamw-") and method not in (best, DEFAULT_ADAMW):
                continue
            label = (f"AdamW {method.split('-', 1)[1]}"
                     + (" (tuned)" if method == best else "") if method.startswith("adamw-")
                     else method)
            ax.plot(t.times, smooth(t.losses), label=label,
                    linestyle="--" if method.startswith("adamw-") else "-")
        ax.set_title(res.problem.name)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("training loss (mean of 20 batches)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[TaskResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per task (default: each task's own, see STEPS)")
    parser.add_argument("--methods", default=",".join(NATGRAD),
                        help="natgrad methods (AdamW's grid always runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="replace this script's section of this "
                        "Markdown file (benchmarks/RESULTS.md)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="figure path (default: defaults.png beside --write)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [*args.methods.split(","), *(f"adamw-{lr:g}" for lr in ADAMW_GRID)]
    results, skipped = [], {}
    load = ForeignLoad()
    load.start()
    for name in args.tasks.split(","):
        try:
            p = problem(name, args.steps or STEPS[name], args.seed)
        except (DataError, FileNotFoundError) as err:
            skipped[name] = str(err)
            print(f"{name}: skipped ({err})", flush=True)
            continue
        res = TaskResult(p, training_loss(p.model, p), run(p, methods,
                                                           lambda s: print(s, flush=True)))
        results.append(res)
        for row in summarise(res):
            print(name, row, flush=True)
    foreign = load.stop()
    plot = None
    if args.write is not None or args.plot is not None:
        path = args.plot or args.write.parent / "defaults.png"  # type: ignore[union-attr]
        plot_results(results, path)
        plot = path.name if args.write is not None and path.parent == args.write.parent \
            else str(path)
    text = render(results, skipped, command_line("defaults.py"), plot, foreign)
    print(text)
    if args.write is not None:
        write_section(args.write, HEADING, text)
    return results


if __name__ == "__main__":
    main()
