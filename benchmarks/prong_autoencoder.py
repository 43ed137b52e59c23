"""PRONG (Natural Neural Networks) + SGD against plain SGD on the deep autoencoder.

Model: 784-1000-500-250-30-250-500-1000-784 (tanh, linear code layer, one logit per pixel),
loss = sigmoid cross-entropy summed over pixels, mean over the batch; Fashion-MNIST, batch 100.
PRONG: ``natgrad.nn.whiten(model)`` and ``natgrad.nn.PRONG(model, data, period=100,
num_samples=1000, epsilon=ε, whitening="pca", optimizer=sgd, optimizer_state="transform")``
(default ε = 1; ``--explore`` compares ε ∈ {0.01, 0.1, 1} at several learning rates)
(momentum buffers are mapped into the new coordinates at each re-estimation), stepped after
every ``sgd.step()``; the re-estimation samples are 1000 fresh random training examples.

Protocol (one process, every run seeded identically, same batch sequence for all):

1. Every grid point (SGD: learning rates at momentum 0.9; PRONG + SGD: the same learning rates
   at the chosen ε) trains for ``select`` updates (default 600, one epoch). Runs advance
   round-robin, 100 updates at a time, the order rotated every round, so that the noise of
   the shared machine hits all alike.
2. The best SGD and the best PRONG grid point (lowest training loss after ``select``
   updates) continue, still interleaved, to the full ``budget`` (default 3000 updates).

Training loss: the mean per-example loss on a fixed subset of 10,000 training examples, every
100 updates (not timed). Cost (a): the wall time of each 100-update chunk (forward, backward,
SGD update and — for PRONG — the re-estimation that falls in the chunk), median over the
chunks of all runs of a kind; an epoch (600 updates at batch 100) is 6 chunks. Speed (b): the
first evaluation at which PRONG's training loss is at or below the loss plain SGD ends with
after the full budget, as a fraction of that budget.

For the record the script also times ``natgrad.nn.PRONGPreconditioner`` (the same update
applied to the gradients of the plain model: K-FAC with G = I) during the selection phase.

Usage (repository root, benchmark environment)::

    .venv-bench/bin/python benchmarks/prong_autoencoder.py --write benchmarks/RESULTS.md
    .venv-bench/bin/python benchmarks/prong_autoencoder.py --quick      # ~30 s smoke run
    .venv-bench/bin/python benchmarks/prong_autoencoder.py --explore --write benchmarks/RESULTS.md
        # supplement: PRONG at other ε / learning rates / optimizer-state policies (~5 min)
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ForeignLoad, command_line, machine_info, write_section
from torch import Tensor, nn

import natgrad
from natgrad.data import load_idx_folder
from natgrad.models import AUTOENCODER_SIZES, autoencoder

THREADS = 2
_threads: list[int] = []  # --threads, when given


def threads() -> int:
    """Torch threads for the timed runs: ``--threads`` or :data:`THREADS`."""
    return _threads[0] if _threads else THREADS
SEED = 0
HEADING = "## PRONG + SGD vs SGD: deep autoencoder, ε = {eps:g} (issue 4)"
EXPLORE_HEADING = "## PRONG + SGD: ε, learning rate, optimizer-state policy (issue 4, supplement)"
EXPLORE = (  # (lr, ε, optimizer_state) around the default choice ε = 0.1, "transform"
    (1e-4, 0.1, "transform"), (3e-4, 0.1, "transform"), (3e-4, 0.1, "reset"),
    (1e-4, 0.01, "transform"), (3e-4, 0.01, "transform"), (1e-3, 1.0, "transform"),
    (3e-3, 1.0, "transform"),
)


# --------------------------------------------------------------------------------------------
# reporting helpers (the shared ones live in benchmarks/_common.py)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# configuration, data, runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    batch: int = 100
    period: int = 100
    num_samples: int = 1000
    epsilon: float = 1.0  # chosen with --explore (see RESULTS.md); 0.1 needs lr ≈ 3e-4
    momentum: float = 0.9
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    select: int = 600
    budget: int = 3000
    chunk: int = 100  # updates per round-robin turn and between evaluations
    eval_size: int = 10000
    sizes: tuple[int, ...] = AUTOENCODER_SIZES
    time_preconditioner: bool = True
    preconditioner_steps: int = 300  # updates timed for PRONGPreconditioner (timing only)
    quick: bool = False
    rank: float | str | None = None  # whiten(model, rank=...): None = full U; 0.125 = in/8
    # per layer; "auto" = natgrad's default (full below 128 inputs, else at most 2 sqrt(in))


def quick_config() -> Config:
    """Smoke run: every 4th pixel, a 196-100-50-16 autoencoder, 300 updates."""
    return Config(period=50, num_samples=500, lrs=(0.01, 0.03), select=100, budget=300,
                  chunk=50, eval_size=2000, sizes=(196, 100, 50, 16), preconditioner_steps=100,
                  quick=True)


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """Sigmoid cross-entropy summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


class Data:
    """Training inputs, the batch sequence shared by all runs, and a fixed eval subset."""

    def __init__(self, cfg: Config) -> None:
        x = load_idx_folder().x_train
        if cfg.sizes[0] != x.shape[1]:  # quick mode: a subsample of the pixels
            x = x[:, :: x.shape[1] // cfg.sizes[0]][:, : cfg.sizes[0]]
        self.x = x.contiguous()
        g = torch.Generator().manual_seed(SEED)
        self.eval_x = self.x[torch.randperm(len(x), generator=g)[: cfg.eval_size]]
        self.batch = cfg.batch
        self.per_epoch = len(x) // cfg.batch
        self.orders: dict[int, Tensor] = {}

    def get(self, step: int) -> Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch not in self.orders:
            g = torch.Generator().manual_seed(SEED + 1 + epoch)
            self.orders[epoch] = torch.randperm(len(self.x), generator=g)
        return self.x[self.orders[epoch][j * self.batch:(j + 1) * self.batch]]


class FreshSamples:
    """An iterable giving, at every pass, one batch of ``n`` random training inputs (the
    PRONG re-estimation data)."""

    def __init__(self, x: Tensor, n: int, seed: int) -> None:
        self.x, self.n = x, n
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        yield self.x[torch.randint(len(self.x), (self.n,), generator=self.g)]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor) -> float:
    total = 0.0
    for i in range(0, len(x), 1000):
        xb = x[i:i + 1000]
        total += float(F.binary_cross_entropy_with_logits(model(xb), xb, reduction="sum"))
    return total / len(x)


@dataclass
class Run:
    kind: str  # "SGD", "PRONG + SGD", "PRONGPreconditioner + SGD"
    lr: float
    model: nn.Module
    opt: torch.optim.Optimizer
    prong: object | None = None
    steps: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    diverged: bool = False
    timing_only: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}, lr {self.lr:g}{self.note}"

    def final(self) -> float:
        return self.curve[-1][1]


def make_run(kind: str, lr: float, cfg: Config, data: Data,
             optimizer_state: str = "transform") -> Run:
    torch.manual_seed(SEED)
    model = autoencoder(cfg.sizes)
    prong: object | None = None
    if kind == "PRONG + SGD":
        model = natgrad.nn.whiten(model, rank=cfg.rank)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
        prong = natgrad.nn.PRONG(
            model, FreshSamples(data.x, cfg.num_samples, SEED + 7), period=cfg.period,
            num_samples=cfg.num_samples, epsilon=cfg.epsilon, whitening="pca",
            optimizer=opt, optimizer_state=optimizer_state)
    elif kind == "PRONGPreconditioner + SGD":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
        prong = natgrad.nn.PRONGPreconditioner(
            model, FreshSamples(data.x, cfg.num_samples, SEED + 7), period=cfg.period,
            num_samples=cfg.num_samples, epsilon=cfg.epsilon)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    run = Run(kind, lr, model, opt, prong, timing_only=kind.startswith("PRONGPre"))
    run.curve.append((0, evaluate(model, data.eval_x)))
    return run


def advance(run: Run, n: int, data: Data) -> None:
    """n updates, timed as one chunk; then the evaluation (untimed)."""
    if run.diverged:
        return
    model, opt, prong = run.model, run.opt, run.prong
    precondition = isinstance(prong, natgrad.nn.PRONGPreconditioner)
    t0 = time.perf_counter()
    for _ in range(n):
        x = data.get(run.steps)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), x)
        loss.backward()
        if precondition:
            prong.step()  # type: ignore[union-attr]
            opt.step()
        else:
            opt.step()
            if prong is not None:
                prong.step()  # type: ignore[union-attr]
        run.steps += 1
    run.chunk_times.append(time.perf_counter() - t0)
    value = evaluate(model, data.eval_x) if not run.timing_only else float("nan")
    run.curve.append((run.steps, value))
    if not run.timing_only and not math.isfinite(value):
        run.diverged = True


def round_robin(runs: list[Run], until: int, cfg: Config, data: Data, loads: list[float],
                phase: str) -> None:
    load = ForeignLoad()
    r = 0

    def live(run: Run) -> bool:
        stop = min(until, cfg.preconditioner_steps) if run.timing_only else until
        return run.steps < stop and not run.diverged

    while any(live(run) for run in runs):
        load.start()
        active = [run for run in runs if live(run)]
        shift = r % len(active)
        for run in active[shift:] + active[:shift]:
            advance(run, cfg.chunk, data)
        loads.append(load.stop())
        r += 1
        status = ", ".join(f"{run.label}: {run.final():.1f} ({run.chunk_times[-1]:.1f} s)"
                           for run in active)
        print(f"{phase} step {active[0].steps}: {status}; others used "
              f"{100 * loads[-1]:.0f}% CPU", file=sys.stderr, flush=True)


def run_all(cfg: Config) -> dict:
    torch.set_num_threads(threads())
    data = Data(cfg)
    runs = [make_run(kind, lr, cfg, data) for lr in cfg.lrs for kind in ("SGD", "PRONG + SGD")]
    if cfg.time_preconditioner:
        runs.append(make_run("PRONGPreconditioner + SGD", cfg.lrs[0], cfg, data))
    loads: list[float] = []
    round_robin(runs, cfg.select, cfg, data, loads, "selection")

    def best(kind: str) -> Run:
        cands = [r for r in runs if r.kind == kind and not r.diverged]
        if not cands:
            raise RuntimeError(f"every {kind} grid point diverged")
        return min(cands, key=lambda r: r.final())

    sgd, prong = best("SGD"), best("PRONG + SGD")
    round_robin([sgd, prong], cfg.budget, cfg, data, loads, "full budget")

    # (a) cost
    def chunk_median(kind: str) -> float:
        return statistics.median(t for r in runs if r.kind == kind for t in r.chunk_times)

    paired = [p / s for p, s in zip(prong.chunk_times, sgd.chunk_times, strict=False)]
    chunks_per_epoch = (len(data.x) // cfg.batch) / cfg.chunk
    cost = {
        "sgd_chunk": chunk_median("SGD"),
        "prong_chunk": chunk_median("PRONG + SGD"),
        "paired_ratio": statistics.median(paired),
        "chunks_per_epoch": chunks_per_epoch,
    }
    if cfg.time_preconditioner:
        cost["precond_chunk"] = chunk_median("PRONGPreconditioner + SGD")
    cost["ratio"] = cost["prong_chunk"] / cost["sgd_chunk"]

    # (b) updates to reach plain SGD's final loss
    target = sgd.final()
    reach = next((s for s, v in prong.curve if v <= target), None)
    return {"cfg": cfg, "runs": runs, "sgd": sgd, "prong": prong, "cost": cost,
            "target": target, "reach": reach, "loads": loads,
            "reestimations": prong.prong.reestimations}  # type: ignore[union-attr]


def explore(cfg: Config, cmd: str) -> str:
    """PRONG + SGD for ``cfg.select`` updates at the settings of ``EXPLORE``, interleaved."""
    torch.set_num_threads(threads())
    data = Data(cfg)
    runs = []
    for lr, eps, state in EXPLORE:
        run = make_run("PRONG + SGD", lr, replace(cfg, epsilon=eps), data, state)
        run.note = f", ε {eps:g}, {state}"
        runs.append(run)
    loads: list[float] = []
    round_robin(runs, cfg.select, cfg, data, loads, "explore")
    steps = [s for s, _ in runs[0].curve]
    out = [f"Command: `{cmd}`", "",
           f"PRONG + SGD (momentum {cfg.momentum}, batch {cfg.batch}, period {cfg.period}, "
           f"{cfg.num_samples} samples, PCA) for {cfg.select} updates at several ε, learning "
           "rates and optimizer-state policies (momentum buffers transformed into the new "
           "coordinates, or reset), to see which matter. Training loss on the fixed "
           f"{cfg.eval_size}-example subset.", "",
           "| run | " + " | ".join(str(s) for s in steps) + " |",
           "|---|" + "---:|" * len(steps)]
    for run in runs:
        vals = [v for _, v in run.curve] + [float("nan")] * (len(steps) - len(run.curve))
        out.append(f"| {run.label} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(out) + "\n"


def flop_counts(cfg: Config) -> dict[str, float]:
    """FLOPs per update of SGD and of PRONG's whitened layers, and per re-estimation."""
    sizes = list(cfg.sizes) + list(reversed(cfg.sizes))[1:]
    dims = list(itertools.pairwise(sizes))
    B, N = cfg.batch, cfg.num_samples
    io = sum(i * o for i, o in dims)
    io_rest = sum(i * o for i, o in dims[1:])  # no input gradient for the first layer
    def width(i: int) -> int:  # multiply-adds per row to apply U: i (full) or 2k (rank k)
        k = layer_rank(cfg, i)
        return i if k is None or k >= i else 2 * k

    ii = sum(i * width(i) for i, _ in dims)
    ii_rest = sum(i * width(i) for i, _ in dims[1:])
    return {
        "sgd": 2 * B * (2 * io + io_rest),
        "whitened extra": 2 * B * (ii + ii_rest),
        "preconditioner extra": 2 * sum(o * i * i for i, o in dims),
        "re-estimation forward": 2 * N * (io + ii),
        "re-estimation moments (float32 products for rows ≥ 128 wide, else float64)":
        2 * N * sum(i * i for i, _ in dims),  # any rank
        "re-estimation eigh (9n³, float64)" if cfg.rank is None else
        "re-estimation top-k eigenpairs (at least 6 products n²m and a residual n²k, "
        "m = k + max(10, k // 2), float64; 9n³ for full layers)":
        sum(9 * i**3 if (k := layer_rank(cfg, i)) is None or k >= i else _top_k_flops(i, k)
            for i, _ in dims),
    }


def layer_rank(cfg: Config, in_dim: int) -> int | None:
    """The k that ``whiten(model, rank=cfg.rank)`` gives a layer of ``in_dim`` inputs."""
    if cfg.rank is None:
        return None
    if cfg.rank == "auto":
        return natgrad.nn.convert.auto_rank(in_dim)
    return max(1, round(float(cfg.rank) * in_dim))


def _top_k_flops(n: int, k: int) -> int:
    """natgrad.nn.whitening.top_eigenpairs when its first check passes: S Ω, 4 iterations
    and Qᵀ S Q (6 products n² m), the residual S Q_k (n² k); 9n³ when it takes the full
    eigendecomposition (k ≥ n, or m > n / 4). More when the check needs 8 more iterations or
    falls back to the full eigendecomposition (no spectral gap)."""
    m = k + max(10, k // 2)
    if k >= n or 4 * m > n:
        return 9 * n**3
    return 2 * n * n * (6 * m + k)


def profile_prong(cfg: Config, data_cfg: Data, lr: float) -> str:
    """Where a PRONG + SGD chunk's time goes (torch.profiler, one chunk incl. re-estimation)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    run = make_run("PRONG + SGD", lr, cfg, data_cfg)
    model, opt, prong = run.model, run.opt, run.prong
    advance(run, cfg.chunk // 2, data_cfg)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(cfg.chunk):
            x = data_cfg.get(run.steps)
            with record_function("## forward"):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), x)
            with record_function("## backward"):
                loss.backward()
            with record_function("## sgd.step"):
                opt.step()
            with record_function("## prong.step (re-estimation)"):
                prong.step()  # type: ignore[union-attr]
            run.steps += 1
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"Profile of one PRONG + SGD chunk ({cfg.chunk} updates, one re-estimation), "
             f"torch.profiler CPU time {total / 1e3:.0f} ms:", "",
             "| phase | ms | % |", "|---|---:|---:|"]
    for e in sorted((e for e in events if e.key.startswith("## ")),
                    key=lambda e: -e.cpu_time_total):
        lines.append(f"| {e.key[3:]} | {e.cpu_time_total / 1e3:.0f} | "
                     f"{100 * e.cpu_time_total / total:.0f}% |")
    lines += ["", "| op (self time) | calls | ms | % |", "|---|---:|---:|---:|"]
    for e in sorted((e for e in events if not e.key.startswith("## ")),
                    key=lambda e: -e.self_cpu_time_total)[:10]:
        lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.0f} | "
                     f"{100 * e.self_cpu_time_total / total:.0f}% |")
    return "\n".join(lines)


def render(res: dict, prof: str | None, cmd: str) -> str:
    cfg: Config = res["cfg"]
    cost, sgd, prong = res["cost"], res["sgd"], res["prong"]
    info = machine_info()
    loads = res["loads"]
    out = [f"Command: `{cmd}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".", "",
           f"Batch {cfg.batch}; PRONG period {cfg.period}, {cfg.num_samples} samples, "
           f"ε = {cfg.epsilon:g}, "
           + ("PCA whitening" if cfg.rank is None else
              "natgrad's default `whiten(model)` (rank=\"auto\": layers with fewer than 128 "
              "inputs whitened in full, wider ones in at most ⌈2√in⌉ leading directions — "
              "those the randomized iteration resolves to the tolerance of "
              "natgrad.nn.whitening.top_eigenpairs, at least half, else exactly ⌈2√in⌉ by the "
              "full eigendecomposition — the rest scaled by one factor)"
              if cfg.rank == "auto" else
              f"low-rank whitening `whiten(model, rank={cfg.rank:g})` (the leading "
              f"round({cfg.rank:g}·in) directions of each layer's input whitened to within "
              "the tolerance of natgrad.nn.whitening.top_eigenpairs, the rest scaled by one "
              "factor)")
           + ", momentum buffers transformed at "
           f"re-estimation; SGD momentum {cfg.momentum}; learning-rate grid "
           f"{list(cfg.lrs)} for both, selected on the training loss after {cfg.select} "
           f"updates; then {cfg.budget} updates for the selected pair. Training loss = mean "
           f"per-example summed sigmoid cross-entropy on a fixed {cfg.eval_size}-example "
           f"training subset. Other processes used {100 * statistics.median(loads):.0f}% of "
           f"the CPUs (median over rounds, max {100 * max(loads):.0f}%).", "",
           f"| run | loss after {cfg.select} | loss after {cfg.budget} | "
           f"median s / {cfg.chunk} updates |", "|---|---:|---:|---:|"]
    for r in res["runs"]:
        if r.timing_only:
            continue
        at_select = next((v for s, v in r.curve if s == cfg.select), float("nan"))
        end = f"{r.final():.2f}" if r.steps >= cfg.budget else "–"
        if r.diverged:
            end = "diverged"
        mark = " (selected)" if r is sgd or r is prong else ""
        out.append(f"| {r.label}{mark} | {at_select:.2f} | {end} | "
                   f"{statistics.median(r.chunk_times):.2f} |")
    out += ["", "Training-loss curves of the selected runs (every "
            f"{cfg.chunk} updates until {cfg.budget}):", "",
            "| updates | " + " | ".join(str(s) for s, _ in sgd.curve[:: max(1, len(sgd.curve)
                                                                          // 10)]) + " |",
            "|---|" + "---:|" * len(sgd.curve[:: max(1, len(sgd.curve) // 10)])]
    for r in (sgd, prong):
        pts = r.curve[:: max(1, len(sgd.curve) // 10)]
        out.append(f"| {r.label} | " + " | ".join(f"{v:.1f}" for _, v in pts) + " |")
    epoch_sgd = cost["sgd_chunk"] * cost["chunks_per_epoch"]
    epoch_prong = cost["prong_chunk"] * cost["chunks_per_epoch"]
    reach = res["reach"]
    frac = reach / cfg.budget if reach is not None else float("inf")
    out += ["", "| measure | SGD | PRONG + SGD | ratio |", "|---|---:|---:|---:|",
            f"| epoch = {cost['chunks_per_epoch']:.0f} × {cfg.chunk} updates (s, median "
            f"chunk × {cost['chunks_per_epoch']:.0f}, re-estimations included) | "
            f"{epoch_sgd:.1f} | {epoch_prong:.1f} | {cost['ratio']:.2f} |",
            f"| same, median of per-round paired ratios (selected runs) | | | "
            f"{cost['paired_ratio']:.2f} |",
            f"| updates to reach SGD's final loss {res['target']:.2f} | {cfg.budget} | "
            f"{reach if reach is not None else 'not reached'} | "
            f"{frac:.2f} |"]
    if "precond_chunk" in cost:
        epoch_pre = cost["precond_chunk"] * cost["chunks_per_epoch"]
        out.append(f"| for the record: natgrad.nn.PRONGPreconditioner + SGD on the plain model "
                   f"(same update), epoch s | | {epoch_pre:.1f} | "
                   f"{cost['precond_chunk'] / cost['sgd_chunk']:.2f} |")
    ok_a = cost["ratio"] <= 1.5
    ok_b = frac <= 0.5
    out += ["", "| goal | measured | bound | result |", "|---|---:|---:|---|",
            f"| (a) PRONG epoch / SGD epoch | {cost['ratio']:.2f} | ≤ 1.5 | "
            f"{'PASS' if ok_a else 'FAIL'} |",
            f"| (b) PRONG updates to SGD's final loss / SGD's updates | {frac:.2f} | ≤ 0.5 | "
            f"{'PASS' if ok_b else 'FAIL'} |"]
    fl = flop_counts(cfg)
    re_est = sum(v for k, v in fl.items() if k.startswith("re-est"))
    per = cfg.period
    out += ["", f"FLOPs per update: SGD {fl['sgd'] / 1e9:.2f} GFLOP; PRONG's whitened layers add "
            f"{fl['whitened extra'] / 1e9:.2f} GFLOP (x − c, then U, forward and backward: "
            f"{(fl['sgd'] + fl['whitened extra']) / fl['sgd']:.2f}× SGD before any "
            f"re-estimation); a re-estimation costs {re_est / 1e9:.1f} GFLOP ("
            + ", ".join(f"{k[len('re-estimation '):]} {v / 1e9:.1f}" for k, v in fl.items()
                        if k.startswith("re-est"))
            + f"), i.e. {re_est / per / 1e9:.2f} GFLOP per update at period {per}; FLOP ratio "
            f"of a PRONG epoch {(fl['sgd'] + fl['whitened extra'] + re_est / per) / fl['sgd']:.2f}"
            f"× (float64 and eigh run below the float32 matmul rate, so the time ratio is "
            f"higher). The plain-model preconditioner form adds "
            f"{fl['preconditioner extra'] / 1e9:.2f} GFLOP per update instead (∇W·P)."]
    if cfg.rank == "auto":
        kept = [f"{name} ({layer.U_basis.shape[0]} inputs): {resolved(layer)} of {layer.rank}"
                if layer.rank is not None else
                f"{name} ({layer.c.shape[0]} inputs): full"
                for name, layer in prong.model.named_modules()
                if isinstance(layer, natgrad.nn.WhitenedLayer)]
        out += ["", "Directions whitened at the selected PRONG run's last re-estimation: "
                + "; ".join(kept) + "."]
    if prof:
        out += ["", prof]
    return "\n".join(out) + "\n"


def resolved(layer: nn.Module) -> int:
    """k': the nonzero columns of a low-rank whitened layer's basis."""
    return int((layer.U_basis.abs().sum(0) > 0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--epsilon", type=float, default=None, help="PRONG ε (default 1)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning-rate grid")
    parser.add_argument("--budget", type=int, default=None, help="updates of the full runs")
    parser.add_argument("--rank", type=lambda t: t if t == "auto" else float(t), default=None,
                        help="low-rank whitening: fraction of each layer's input size, or "
                        "'auto' (natgrad's default)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads (default {THREADS}; 1 when pinned to one core)")
    parser.add_argument("--explore", action="store_true", help="instead of the benchmark, "
                        "train PRONG at other ε / lr / optimizer-state settings (~5 min)")
    parser.add_argument("--write", type=Path, help="append/replace this script's section "
                        "of a RESULTS.md")
    args = parser.parse_args()
    if args.threads is not None:
        _threads.append(args.threads)
    cfg = quick_config() if args.quick else Config()
    overrides = {k: v for k, v in (("epsilon", args.epsilon), ("budget", args.budget),
                                   ("rank", args.rank),
                                   ("lrs", tuple(args.lrs) if args.lrs else None))
                 if v is not None}
    cfg = Config(**{**cfg.__dict__, **overrides})
    if args.explore:
        text = explore(cfg, command_line("prong_autoencoder.py"))
        print(text)
        if args.write and not cfg.quick:
            write_section(args.write, EXPLORE_HEADING, text)
        return
    res = run_all(cfg)
    prof = None
    if not args.no_profile:
        print("profiling a PRONG chunk ...", file=sys.stderr, flush=True)
        prof = profile_prong(cfg, Data(cfg), res["prong"].lr)
    text = render(res, prof, command_line("prong_autoencoder.py"))
    print(text)
    if args.write and not cfg.quick:
        heading = HEADING.format(eps=cfg.epsilon)
        if cfg.rank == "auto":
            heading = heading.replace(" (issue 4)", ", default rank auto (issue 16)")
        elif cfg.rank is not None:
            heading = heading.replace(" (issue 4)", f", low rank {cfg.rank:g} (issue 4)")
        write_section(args.write, heading, text)


if __name__ == "__main__":
    main()
