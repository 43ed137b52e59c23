"""Data-parallel K-FAC on the deep autoencoder: bytes each rank sends, and time per step at 1
and 2 ranks (gloo on CPU).

Model: 784-1000-500-250-30-250-500-1000-784 (tanh, Bernoulli logits), natgrad
``KFAC(DistributedDataParallel(model), likelihood="bernoulli", factor_update_period=10,
inverse_update_period=…)``, real Fashion-MNIST, global batch 1000 split evenly over the ranks.
Ranks are started with ``torch.multiprocessing`` (spawn), ``MASTER_ADDR=127.0.0.1``, gloo.

Bytes are *measured*, not guessed: in every rank ``torch.distributed.all_reduce``,
``broadcast`` and ``all_gather_object`` (what natgrad calls) are wrapped to record the payload
of every call, and the DDP gradient all-reduce is counted with a DDP communication hook (the
stock ``allreduce_hook`` behind a counter). "Payload" is the tensor size of the collective;
what a rank actually puts on the wire for an all-reduce depends on the algorithm
(a ring all-reduce sends 2(W−1)/W × payload per rank, = payload at W = 2); for a broadcast only
the source sends, (W−1) × payload with a flat tree. Payloads are listed per step kind: plain,
factor step (factors every 10 steps) and eig step (eigendecompositions, spread over the ranks
by cost and broadcast from their owner). The step time uses a shorter eigendecomposition period
than the amortization (which uses 100) so that eig steps are reached quickly; the cost of one
step of a given kind does not depend on the period.

The machine has 2 cores: with 2 ranks × 1 thread the compute of a step is split in two, but
the same two cores also ran one rank × 2 threads, so no speed-up of compute can show here;
what the comparison shows is the communication and synchronisation overhead. The configurations
are run in rotated order, ``--repeats`` times, and medians over steps and repeats reported.

Usage (repository root, benchmark environment)::

    .venv-bench/bin/python benchmarks/distributed.py --write benchmarks/RESULTS.md
    .venv-bench/bin/python benchmarks/distributed.py --quick      # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import command_line, cpu_ticks, machine_info, write_section
from torch import Tensor, nn

import natgrad
from natgrad.data import load_idx_folder
from natgrad.models import AUTOENCODER_SIZES, autoencoder

SEED = 0
HEADING = "## Distributed K-FAC: bytes and time per step (issue 6)"


# --------------------------------------------------------------------------------------------
# helpers (the shared ones live in benchmarks/_common.py)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    global_batch: int = 1000
    factor_period: int = 10
    eig_period: int = 100  # for the amortization
    eig_period_run: int = 20  # in the timed runs, to reach eig steps quickly
    steps: int = 61  # step 0 (first factors and eigendecompositions) is not timed
    sgd_steps: int = 21
    repeats: int = 3
    damping: float = 1.0
    lr: float = 0.01
    sizes: tuple[int, ...] = AUTOENCODER_SIZES
    quick: bool = False


def quick_config() -> Config:
    """Smoke run: every 4th pixel, a 196-100-50-16 autoencoder, few steps."""
    return Config(global_batch=200, factor_period=2, eig_period=6, eig_period_run=4, steps=9,
                  sgd_steps=5, repeats=1, sizes=(196, 100, 50, 16), quick=True)


@dataclass(frozen=True)
class Job:
    label: str
    method: str  # "kfac" or "sgd"
    world: int
    threads: int


# --------------------------------------------------------------------------------------------
# the rank worker
# --------------------------------------------------------------------------------------------


class Counter:
    """Payload bytes and calls of the collectives of this rank, per step kind."""

    def __init__(self) -> None:
        self.kind = "setup"
        self.in_ddp_hook = False  # DDP's stock hook calls dist.all_reduce itself
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.sent: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    def add(self, op: str, nbytes: int, sent: int, seconds: float = 0.0) -> None:
        key = (self.kind, op)
        self.bytes[key] += nbytes
        self.sent[key] += sent
        self.calls[key] += 1
        self.seconds[key] += seconds


def _install_counters(counter: Counter, world: int) -> None:
    """Wrap the torch.distributed collectives natgrad calls (looked up at call time)."""
    orig_all_reduce, orig_broadcast = dist.all_reduce, dist.broadcast
    orig_gather_object = dist.all_gather_object

    def all_reduce(tensor: Tensor, *args: object, **kwargs: object) -> object:
        if counter.in_ddp_hook:
            return orig_all_reduce(tensor, *args, **kwargs)
        n = tensor.numel() * tensor.element_size()
        t0 = time.perf_counter()
        out = orig_all_reduce(tensor, *args, **kwargs)
        counter.add("natgrad all_reduce", n, 2 * (world - 1) * n // world,
                    time.perf_counter() - t0)
        return out

    def broadcast(tensor: Tensor, src: int, *args: object, **kwargs: object) -> object:
        n = tensor.numel() * tensor.element_size()
        t0 = time.perf_counter()
        out = orig_broadcast(tensor, src, *args, **kwargs)
        counter.add("natgrad broadcast", n, (world - 1) * n if dist.get_rank() == src else 0,
                    time.perf_counter() - t0)
        return out

    def all_gather_object(objects: list, obj: object, *args: object, **kwargs: object) -> object:
        n = len(repr(obj))
        counter.add("natgrad all_gather_object", n, n)
        return orig_gather_object(objects, obj, *args, **kwargs)

    dist.all_reduce = all_reduce  # type: ignore[assignment]
    dist.broadcast = broadcast  # type: ignore[assignment]
    dist.all_gather_object = all_gather_object  # type: ignore[assignment]


def _ddp_counting_hook(counter: Counter, world: int):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    # no annotations: DDP checks them, and ``from __future__ import annotations`` makes them
    # strings
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        buf = bucket.buffer()
        n = buf.numel() * buf.element_size()
        counter.add("DDP gradient all_reduce", n, 2 * (world - 1) * n // world)
        counter.in_ddp_hook = True
        try:
            return allreduce_hook(None, bucket)
        finally:
            counter.in_ddp_hook = False

    return hook


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def _worker(rank: int, job: Job, cfg: Config, port: int, out: str) -> None:
    torch.set_num_threads(job.threads)
    world = job.world
    counter = Counter()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        _install_counters(counter, world)
    try:
        x_all = load_idx_folder().x_train
        if cfg.sizes[0] != x_all.shape[1]:
            x_all = x_all[:, :: x_all.shape[1] // cfg.sizes[0]][:, : cfg.sizes[0]]
        g = torch.Generator().manual_seed(SEED)
        order = torch.randperm(len(x_all), generator=g)
        share = cfg.global_batch // world
        torch.manual_seed(SEED)
        model = autoencoder(cfg.sizes)
        wrapped: nn.Module = model
        if world > 1:
            ddp = nn.parallel.DistributedDataParallel(model)
            ddp.register_comm_hook(None, _ddp_counting_hook(counter, world))
            wrapped = ddp
        if job.method == "kfac":
            opt = natgrad.optim.KFAC(
                wrapped, lr=cfg.lr, damping=cfg.damping, likelihood="bernoulli", momentum=0.9,
                factor_update_period=cfg.factor_period,
                inverse_update_period=cfg.eig_period_run)
            steps = cfg.steps
        else:
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
            steps = cfg.sgd_steps
        times: dict[str, list[float]] = defaultdict(list)
        losses = []
        for step in range(steps):
            if job.method == "kfac":
                s = opt.preconditioner.curvature.steps
                kind = ("eig" if s % cfg.eig_period_run == 0 else
                        "factor" if s % cfg.factor_period == 0 else "plain")
            else:
                kind = "plain"
            counter.kind = kind if step > 0 else "first step"
            j = step % (len(x_all) // cfg.global_batch)
            rows = order[j * cfg.global_batch:(j + 1) * cfg.global_batch]
            x = x_all[rows[rank * share:(rank + 1) * share]]
            if world > 1:
                dist.barrier()  # every rank starts the step together
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = _loss(wrapped(x), x)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if step > 0:
                times[kind].append(dt)
            losses.append(float(loss.detach()))
        result = {"times": dict(times), "bytes": dict(counter.bytes),
                  "sent": dict(counter.sent), "calls": dict(counter.calls),
                  "seconds": dict(counter.seconds), "losses": losses,
                  "params": sum(p.numel() for p in model.parameters())}
        if job.method == "kfac":
            result["eigs"] = opt.preconditioner.curvature.eigendecompositions_computed
        torch.save(result, f"{out}.rank{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def launch(job: Job, cfg: Config, tmp: str) -> list[dict]:
    out = os.path.join(tmp, f"{job.method}-{job.world}-{job.threads}")
    mp.start_processes(_worker, args=(job, cfg, _free_port(), out), nprocs=job.world,
                       join=True, start_method="spawn")
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(job.world)]


# --------------------------------------------------------------------------------------------
# analysis and report
# --------------------------------------------------------------------------------------------


def expected_bytes(cfg: Config) -> dict[str, float]:
    """The payloads one would write down from the sizes (float32 unless said)."""
    sizes = list(cfg.sizes) + list(reversed(cfg.sizes))[1:]
    dims = list(itertools.pairwise(sizes))
    P = sum(o * (i + 1) for i, o in dims)
    factors = sum((i + 1) ** 2 + o**2 for i, o in dims)
    eig = sum((i + 1) ** 2 + (i + 1) + o**2 + o for i, o in dims)
    return {"ddp": 4 * P, "factors_fp32": 4 * factors + 4 * (1 + len(dims)),
            "factors_fp64": 8 * factors + 8 * (1 + len(dims)), "eig_all": 4 * eig}


def run(cfg: Config) -> dict:
    jobs = [Job("K-FAC, 1 rank × 1 thread", "kfac", 1, 1),
            Job("K-FAC, 1 rank × 2 threads", "kfac", 1, 2),
            Job("K-FAC, 2 ranks × 1 thread (DDP + natgrad)", "kfac", 2, 1),
            Job("SGD, 1 rank × 1 thread", "sgd", 1, 1),
            Job("SGD, 1 rank × 2 threads", "sgd", 1, 2),
            Job("SGD, 2 ranks × 1 thread (DDP)", "sgd", 2, 1)]
    results: dict[Job, list[list[dict]]] = {job: [] for job in jobs}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg.repeats):
            shift = r % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                t0, b0 = cpu_ticks()
                w0 = time.perf_counter()
                results[job].append(launch(job, cfg, tmp))
                t1, b1 = cpu_ticks()
                loads.append((b1 - b0) / max(1, t1 - t0))
                print(f"repeat {r + 1}/{cfg.repeats}: {job.label} done in "
                      f"{time.perf_counter() - w0:.0f} s (all CPUs {100 * loads[-1]:.0f}% busy)",
                      file=sys.stderr, flush=True)
    return {"cfg": cfg, "jobs": jobs, "results": results, "loads": loads}


def summarize(res: dict) -> dict:
    cfg: Config = res["cfg"]
    pf = (cfg.factor_period - 1) / cfg.factor_period
    ff = 1 / cfg.factor_period - 1 / cfg.eig_period
    fe = 1 / cfg.eig_period
    rows = {}
    for job, reps in res["results"].items():
        rank0 = [rep[0] for rep in reps]
        med = {}
        for kind in ("plain", "factor", "eig"):
            vals = [t for r0 in rank0 for t in r0["times"].get(kind, [])]
            med[kind] = statistics.median(vals) if vals else float("nan")
        amort = med["plain"] if job.method == "sgd" else (
            pf * med["plain"] + ff * med["factor"] + fe * med["eig"])
        rows[job] = {**med, "amortized": amort, "eigs": [r.get("eigs") for r in reps[0]],
                     "loss": rank0[0]["losses"][-1]}
    return rows


def render(res: dict, cmd: str) -> str:
    cfg: Config = res["cfg"]
    rows = summarize(res)
    jobs = res["jobs"]
    two = next(j for j in jobs if j.method == "kfac" and j.world == 2)
    rep = res["results"][two][0]
    exp = expected_bytes(cfg)
    info = machine_info(threads=False)
    out = [f"Command: `{cmd}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".", "",
           f"Global batch {cfg.global_batch} (split evenly over the ranks), factors every "
           f"{cfg.factor_period} steps; eigendecompositions every {cfg.eig_period_run} steps in "
           f"the timed runs, amortized below as every {cfg.eig_period}. {cfg.repeats} repeats "
           f"of every configuration in rotated order; the machine's CPUs were "
           f"{100 * statistics.median(res['loads']):.0f}% busy in total (median over runs; "
           "2 ranks × 1 thread or 1 rank × 2 threads fill both cores).", "",
           "### Bytes per step, measured (2 ranks)", "",
           "| step kind | collective | rank | calls | payload (MB) | sent by the rank "
           "(MB, ring all-reduce / flat broadcast) |", "|---|---|---:|---:|---:|---:|"]
    for kind in ("first step", "plain", "factor", "eig"):
        keys = sorted({k for r in rep for k in r["bytes"] if k[0] == kind})
        for key in keys:
            for rank, r in enumerate(rep):
                if key not in r["bytes"]:
                    continue
                # per step: divide by the number of steps of that kind on this rank
                n_steps = max(1, len(r["times"].get(kind, []))) if kind != "first step" else 1
                out.append(f"| {kind} | {key[1]} | {rank} | {r['calls'][key] / n_steps:.0f} | "
                           f"{r['bytes'][key] / n_steps / 1e6:.2f} | "
                           f"{r['sent'][key] / n_steps / 1e6:.2f} |")
    P = rep[0]["params"]
    out += ["", f"Expected from the sizes: DDP gradient all-reduce 4·P = {exp['ddp'] / 1e6:.2f} MB "
            f"(P = {P:,}); factor all-reduce Σ(in'² + out²) = {exp['factors_fp32'] / 1e6:.2f} MB "
            f"in float32 ({exp['factors_fp64'] / 1e6:.2f} MB if packed as float64); eig "
            f"broadcasts Σ(n² + n)·4 = {exp['eig_all'] / 1e6:.2f} MB over all factors, split "
            "between the owners.", ""]
    # amortized bytes sent per step, per rank
    for rank, r in enumerate(rep):
        per_kind = defaultdict(float)
        for (kind, _), v in r["sent"].items():
            if kind in ("plain", "factor", "eig"):
                per_kind[kind] += v / max(1, len(r["times"].get(kind, [])))
        pf = (cfg.factor_period - 1) / cfg.factor_period
        ff = 1 / cfg.factor_period - 1 / cfg.eig_period
        amort = pf * per_kind["plain"] + ff * per_kind["factor"] + per_kind["eig"] / cfg.eig_period
        out.append(f"- rank {rank}: sends {per_kind['plain'] / 1e6:.2f} MB on a plain step, "
                   f"{per_kind['factor'] / 1e6:.2f} MB on a factor step, "
                   f"{per_kind['eig'] / 1e6:.2f} MB on an eig step; amortized "
                   f"{amort / 1e6:.2f} MB per step ({amort / max(1, per_kind['plain']):.2f}× "
                   "the DDP gradient all-reduce alone).")
    secs = defaultdict(float)
    for (kind, op), v in rep[0]["seconds"].items():
        if kind in ("factor", "eig") and op.startswith("natgrad"):
            secs[(kind, op)] += v / max(1, len(rep[0]["times"].get(kind, [])))
    out += ["", "### Time per step (ms, rank 0, medians)", "",
            "| configuration | plain step | factor step | eig step | amortized (factors /10, "
            "eig /100) | final loss |", "|---|---:|---:|---:|---:|---:|"]
    for job in jobs:
        row = rows[job]

        def cell(k: str, row: dict = row) -> str:
            return "–" if row[k] != row[k] else f"{1e3 * row[k]:.0f}"

        out.append(f"| {job.label} | {cell('plain')} | {cell('factor')} | {cell('eig')} | "
                   f"**{1e3 * row['amortized']:.0f}** | {row['loss']:.1f} |")
    k1 = next(j for j in jobs if j.method == "kfac" and j.world == 1 and j.threads == 1)
    k12 = next(j for j in jobs if j.method == "kfac" and j.world == 1 and j.threads == 2)
    s2 = next(j for j in jobs if j.method == "sgd" and j.world == 2)
    s12 = next(j for j in jobs if j.method == "sgd" and j.world == 1 and j.threads == 2)
    eig_counts = rows[two]["eigs"]
    out += ["", "Time inside natgrad's collectives on rank 0 (gloo, blocking): "
            + ", ".join(f"{op} on {kind} steps {1e3 * v:.0f} ms"
                        for (kind, op), v in sorted(secs.items())) + ". "
            f"Eigendecompositions computed per rank over the run: {eig_counts} "
            "(each factor once, on its owner).", "",
            f"2 ranks × 1 thread vs 1 rank × 2 threads (the same two cores): K-FAC amortized "
            f"{rows[two]['amortized'] / rows[k12]['amortized']:.2f}×, SGD "
            f"{rows[s2]['amortized'] / rows[s12]['amortized']:.2f}×; vs 1 rank × 1 thread "
            f"(the same per-rank compute, twice the per-rank batch): K-FAC "
            f"{rows[two]['amortized'] / rows[k1]['amortized']:.2f}×. With two cores the two "
            "ranks share the cores that one rank with two threads would use, so no compute "
            "speed-up can show here; the difference is the price of the all-reduces, the eig "
            "broadcasts and the synchronisation (with more machines, the per-rank compute would "
            "halve while the bytes above stay the same)."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration")
    parser.add_argument("--write", type=Path, help="append/replace this script's section "
                        "of a RESULTS.md")
    args = parser.parse_args()
    cfg = quick_config() if args.quick else Config()
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    text = render(run(cfg), command_line("distributed.py"))
    print(text)
    if args.write and not cfg.quick:
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
