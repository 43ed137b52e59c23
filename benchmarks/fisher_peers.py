"""natgrad's Fisher computations against NNGeometry and curvlinops, side by side.

One run measures, on the same models, data, dtype (float32) and thread count for everybody:

1. K-FAC with the true Fisher, MLP 784-1000-500-250-30-10 (tanh, biases), categorical:
   natgrad ``structure="kfac", fisher_type="true"`` vs NNGeometry ``FIM(..., PMatKFAC,
   variant="classif_logits")`` vs curvlinops ``KFACLinearOperator(fisher_type="type-2",
   separate_weight_and_bias=False)`` (factors computed eagerly with
   ``compute_kronecker_factors()``), and a FLOP floor divided by a measured matmul rate.
2. K-FAC with one Monte-Carlo sample on the same: natgrad vs one plain forward+backward
   (cross-entropy, weight gradients) vs NNGeometry ``FIM_MonteCarlo(trials=1)`` vs curvlinops
   ``fisher_type="mc", mc_samples=1``.
3. The dense true Fisher of an MLP 20-50-50-10 (tanh): natgrad ``structure="dense"`` vs
   NNGeometry ``PMatDense``.
4. Peak memory of every (case, method): a fresh subprocess per pair; the peak resident set
   (VmHWM, reset through /proc/self/clear_refs) minus the resident set just before the call.
5. Numerical agreement of the results, after aligning each peer's scaling convention.

Usage (from the repository root, in the benchmark environment)::

    .venv-bench/bin/python benchmarks/fisher_peers.py --write benchmarks/RESULTS.md
    .venv-bench/bin/python benchmarks/fisher_peers.py --quick      # ~30 s smoke run

The machine is shared: before every timing round the script waits (up to ``--max-wait``
seconds) until the other processes leave the CPUs idle, rotates the order of the methods from
round to round, and discards rounds in which other processes took more than 10% of the CPUs.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_ticks, write_section
from torch import Tensor, nn

THREADS = 2
SEED = 0
CLASSES = 10
KFAC_DIMS = (784, 1000, 500, 250, 30, 10)
DENSE_DIMS = (20, 50, 50, 10)
REL_TOL = 1e-4  # agreement tolerance of two float32 computations of the same matrix


# --------------------------------------------------------------------------------------------
# configuration, models, data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Problem sizes; ``quick`` shrinks them for a smoke run."""

    n_kfac: int = 2048
    n_dense: int = 512
    mm_size: int = 2048
    repeats: int = 5
    quick: bool = False
    max_wait: float = 300.0

    @staticmethod
    def make(quick: bool, repeats: int | None, max_wait: float) -> Config:
        if quick:
            return Config(n_kfac=256, n_dense=64, mm_size=1024, repeats=repeats or 1,
                          quick=True, max_wait=min(max_wait, 2.0))
        return Config(repeats=repeats or 5, max_wait=max_wait)


def mlp(dims: tuple[int, ...], seed: int = SEED) -> nn.Sequential:
    """Linear layers with biases and tanh between them, float32, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).float()


def data(n: int, d_in: int, seed: int = SEED + 1) -> tuple[Tensor, Tensor]:
    """n standard-normal inputs and uniformly random class labels (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def problem(case: str, cfg: Config) -> tuple[nn.Module, Tensor, Tensor]:
    if case == "dense":
        model = mlp(DENSE_DIMS)
        x, y = data(cfg.n_dense, DENSE_DIMS[0])
    else:
        model = mlp(KFAC_DIMS)
        x, y = data(cfg.n_kfac, KFAC_DIMS[0])
    return model, x, y


# --------------------------------------------------------------------------------------------
# the methods: each builder returns a zero-argument callable computing the full result
# --------------------------------------------------------------------------------------------


def _loader(x: Tensor, y: Tensor):
    """NNGeometry takes a DataLoader; one batch holding every example."""
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=len(x))


def natgrad_fn(model: nn.Module, x: Tensor, y: Tensor, fisher_type: str, structure: str):
    import natgrad

    def run():
        gen = torch.Generator().manual_seed(SEED) if fisher_type == "mc" else None
        return natgrad.fisher_matrix(model, [(x, y)], "categorical", fisher_type, structure,
                                     mc_samples=1, generator=gen)

    return run


def nngeometry_fn(model: nn.Module, x: Tensor, y: Tensor, fisher_type: str, structure: str):
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDense, PMatKFAC

    rep = PMatKFAC if structure == "kfac" else PMatDense
    loader = _loader(x, y)

    def run():
        if fisher_type == "mc":
            torch.manual_seed(SEED)  # NNGeometry samples with torch's global RNG
            return FIM_MonteCarlo(model, loader, rep, variant="classif_logits", trials=1)
        return FIM(model, loader, rep, variant="classif_logits")

    return run


def curvlinops_fn(model: nn.Module, x: Tensor, y: Tensor, fisher_type: str, structure: str):
    from curvlinops import KFACLinearOperator

    assert structure == "kfac"
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        op = KFACLinearOperator(
            model, nn.CrossEntropyLoss(), params, [(x, y)],
            fisher_type="type-2" if fisher_type == "true" else "mc", mc_samples=1,
            kfac_approx="expand", separate_weight_and_bias=False, seed=SEED,
            check_deterministic=False, num_data=len(x), num_per_example_loss_terms=1,
        )
        op.compute_kronecker_factors()  # otherwise deferred to the first matrix product
        return op

    return run


def fwd_bwd_fn(model: nn.Module, x: Tensor, y: Tensor, fisher_type: str, structure: str):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return [p.grad for p in model.parameters()]

    return run


BUILDERS: dict[str, Callable] = {
    "natgrad": natgrad_fn,
    "NNGeometry": nngeometry_fn,
    "curvlinops": curvlinops_fn,
    "forward+backward": fwd_bwd_fn,
}

# case -> (fisher_type, structure, methods)
CASES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "kfac_true": ("true", "kfac", ("natgrad", "NNGeometry", "curvlinops")),
    "kfac_mc": ("mc", "kfac", ("natgrad", "forward+backward", "NNGeometry", "curvlinops")),
    "dense": ("true", "dense", ("natgrad", "NNGeometry")),
}
CASE_TITLES = {
    "kfac_true": "K-FAC, true Fisher",
    "kfac_mc": "K-FAC, 1 MC sample",
    "dense": "dense true Fisher",
}


def build(case: str, method: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable:
    fisher_type, structure, _ = CASES[case]
    return BUILDERS[method](model, x, y, fisher_type, structure)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def machine_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds while this process sleeps."""
    total0, busy0 = cpu_ticks()
    time.sleep(interval)
    total1, busy1 = cpu_ticks()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait until other processes leave the CPUs idle (or ``max_wait`` passes); busy fraction."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = machine_busy()
    return busy


class Interference:
    """Share of all CPUs that *other* processes used while a block ran: busy ticks of the
    whole machine minus this process's CPU time (both threads), over wall time × CPUs."""

    def __enter__(self) -> Interference:
        self._ticks = cpu_ticks()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        total0, busy0 = self._ticks
        total1, busy1 = cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        others = (busy1 - busy0) / hz - (time.process_time() - self._cpu)
        ncpu = os.cpu_count() or 1
        span = max((total1 - total0) / hz, (time.perf_counter() - self._wall) * ncpu)
        self.share = max(0.0, others / max(span, 1e-9))


@dataclass
class Timing:
    first: float = 0.0  # the warm-up call (first call in this process)
    times: list[float] = field(default_factory=list)  # clean rounds only

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


@dataclass
class RoundLog:
    """What the machine looked like during the timing rounds."""

    clean: int = 0
    discarded: int = 0
    shares: list[float] = field(default_factory=list)  # others' CPU share per kept round
    rates: list[float] = field(default_factory=list)  # matmul FLOP/s, one per kept round


def time_methods(fns: dict[str, Callable], cfg: Config, log: RoundLog, max_share: float = 0.1):
    """One warm-up call each, then rounds until ``repeats`` clean ones (at most 3×repeats).

    Each round waits for a quiet machine, times a large matmul and every method once (the order
    rotates from round to round). A round in which other processes took more than
    ``max_share`` of the CPUs is discarded, unless no clean round can be had: then the last
    rounds are kept and counted in ``log.discarded`` as contaminated.
    """
    timings = {name: Timing() for name in fns}
    results = {}
    for name, fn in fns.items():
        gc.collect()
        t0 = time.perf_counter()
        results[name] = fn()
        timings[name].first = time.perf_counter() - t0
    names = list(fns)
    kept: list[tuple[float, float, dict[str, float]]] = []
    dirty: list[tuple[float, float, dict[str, float]]] = []
    for r in range(3 * cfg.repeats):
        if len(kept) == cfg.repeats:
            break
        wait_quiet(cfg.max_wait)
        order = names[r % len(names):] + names[:r % len(names)]
        row: dict[str, float] = {}
        with Interference() as probe:
            rate = matmul_rate(cfg.mm_size, repeats=3)
            for name in order:
                gc.collect()
                t0 = time.perf_counter()
                out = fns[name]()
                row[name] = time.perf_counter() - t0
                del out
        (kept if probe.share <= max_share else dirty).append((probe.share, rate, row))
    if len(kept) < cfg.repeats:  # the machine never calmed down: fill with the least busy
        dirty.sort(key=lambda item: item[0])
        extra = dirty[:cfg.repeats - len(kept)]
        log.discarded += len(extra)
        kept += extra
    log.clean += sum(1 for share, _, _ in kept if share <= max_share)
    rates = []
    for share, rate, row in kept:
        log.shares.append(share)
        log.rates.append(rate)
        rates.append(rate)
        for name, t in row.items():
            timings[name].times.append(t)
    return timings, results, rates


def matmul_rate(n: int, repeats: int = 10) -> float:
    """Median FLOP/s of a float32 (n×n)·(n×n) torch.mm (2n³ FLOPs)."""
    g = torch.Generator().manual_seed(SEED)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def kfac_flops(dims: tuple[int, ...], n: int, rows: int) -> dict[str, float]:
    """FLOPs K-FAC must do on an MLP: forward, backward of ``rows`` rows to the
    pre-activations (layers ≥ 2 only), Ā = Σ ā āᵀ and G = Σ g gᵀ (full gemm, no symmetry)."""
    pairs = list(itertools.pairwise(dims))
    return {
        "forward": 2 * n * sum(i * o for i, o in pairs),
        "backward": 2 * rows * n * sum(i * o for i, o in pairs[1:]),
        "A": 2 * n * sum((i + 1) ** 2 for i, _ in pairs),
        "G": 2 * rows * n * sum(o * o for _, o in pairs),
    }


def factor_bytes(dims: tuple[int, ...]) -> int:
    """Bytes of the float32 K-FAC factors: Σ (in+1)² + out² (the bias joins Ā)."""
    return 4 * sum((i + 1) ** 2 + o * o for i, o in itertools.pairwise(dims))


# --------------------------------------------------------------------------------------------
# memory: one fresh subprocess per (case, method)
# --------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def memory_child(case: str, method: str, cfg: Config) -> dict:
    """Runs inside the subprocess: warm up on a few examples, then measure the full call."""
    torch.set_num_threads(THREADS)
    model, x, y = problem(case, cfg)
    build(case, method, model, x[:32], y[:32])()  # load code paths, thread pools, caches
    gc.collect()
    reset = _reset_peak()
    before_rss = _status_kb("VmRSS")
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = build(case, method, model, x, y)
    result = fn()
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    return {
        "case": case, "method": method, "baseline_kb": before_rss, "peak_kb": peak,
        "delta_kb": peak - before_rss, "hwm_reset": reset,
        "stale_peak": (not reset) and peak <= before_max,
    }


def measure_memory(case: str, method: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    # Fixed mmap threshold: blocks ≥ 64 KiB are mmapped and returned to the OS when freed, so
    # the resident set follows the live tensors instead of glibc's retained heap.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, __file__, "--_child", f"{case}:{method}"]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"case": case, "method": method, "error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# agreement checks
# --------------------------------------------------------------------------------------------


def rel(a: Tensor, b: Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_kfac(ours, nng, cl, exact: bool) -> list[tuple[str, float, str]]:
    """Per-factor relative differences (worst layer) after aligning the scaling conventions.

    NNGeometry ``classif_logits`` backpropagates m = C−1 Cholesky rows of D and stores
    Ā·√m and G/√m (its ``get_kfac_blocks`` divides by N/√m and √m·N): we compare Ā_nng/√m with
    Ā and √m·G_nng with G (the product G ⊗ Ā is unchanged). With ``FIM_MonteCarlo`` m = 1.
    curvlinops with ``CrossEntropyLoss(reduction="mean")`` rescales to Ā = Σ ā āᵀ/N and
    G = Σ g gᵀ/N, natgrad's convention: compared as they are.
    """
    m = (CLASSES - 1) if exact else 1
    s = math.sqrt(m)
    checks = []
    for label, A_of, G_of in (
        ("NNGeometry", lambda n: nng.data[n][0] / s, lambda n: nng.data[n][1] * s),
        ("curvlinops", lambda n: cl._input_covariances[n], lambda n: cl._gradient_covariances[n]),
    ):
        dA = max(rel(A_of(lay.name), A) for lay, A in zip(ours.layers, ours.A, strict=True))
        checks.append((f"Ā factors, natgrad vs {label}", dA, "PASS" if dA < REL_TOL else "FAIL"))
        if exact:
            dG = max(rel(G_of(lay.name), G) for lay, G in zip(ours.layers, ours.G, strict=True))
            checks.append((f"G factors, natgrad vs {label}", dG,
                           "PASS" if dG < REL_TOL else "FAIL"))
    return checks


def check_kfac_mv(ours, nng, cl) -> list[tuple[str, float, str]]:
    """F v for one random v through each library's own product (θ's order throughout)."""
    from nngeometry.object.vector import PVector

    v = torch.randn(ours.num_params, generator=torch.Generator().manual_seed(SEED))
    Fv = ours.mv(v)
    nng_v = nng.mv(PVector(nng.generator.layer_collection, vector_repr=v)).to_torch()
    cl_v = cl @ v
    out = []
    for label, other in (("NNGeometry", nng_v), ("curvlinops", cl_v)):
        d = rel(other, Fv)
        out.append((f"K-FAC F·v, natgrad vs {label}", d, "PASS" if d < REL_TOL else "FAIL"))
    return out


def check_mc(ours_mc, nng_mc, cl_mc, ours_true) -> list[tuple[str, float, str]]:
    """Ā does not depend on the samples: it must agree exactly. G is a one-sample MC estimate
    of the true G: reported as the relative distance to natgrad's true-Fisher G (info only;
    every library draws its own samples)."""
    checks = check_kfac(ours_mc, nng_mc, cl_mc, exact=False)
    for label, G_of in (
        ("natgrad", lambda i, n: ours_mc.G[i]),
        ("NNGeometry", lambda i, n: nng_mc.data[n][1]),
        ("curvlinops", lambda i, n: cl_mc._gradient_covariances[n]),
    ):
        d = max(rel(G_of(i, lay.name), ours_true.G[i]) for i, lay in enumerate(ours_true.layers))
        checks.append((f"MC G of {label} vs true G (worst layer)", d, "info"))
    return checks


def check_dense(ours, nng) -> list[tuple[str, float, str]]:
    """NNGeometry's PMatDense is (1/N) Σ over m = C−1 Cholesky rows: the same matrix."""
    d = rel(nng.to_torch(), ours.to_dense())
    return [("dense F, natgrad vs NNGeometry", d, "PASS" if d < REL_TOL else "FAIL")]


# --------------------------------------------------------------------------------------------
# where natgrad's K-FAC time goes
# --------------------------------------------------------------------------------------------


def natgrad_breakdown(model: nn.Module, x: Tensor, y: Tensor, fisher_type: str, cfg: Config):
    """Times natgrad's own K-FAC pieces (natgrad.capture / likelihoods), medians over clean
    rounds (same interference rule as the main timings).

    Also, not natgrad code: the batched backward through torch.func.vjp + vmap and by hand for
    this tanh MLP (one (K·N)-row matmul per layer), and G as one general matmul.
    """
    from torch.func import vjp, vmap

    import natgrad
    from natgrad._linalg import gram
    from natgrad.capture import (
        LayerCapture,
        expand_grads,
        expand_inputs,
        find_kfac_layers,
        output_gradients,
    )
    from natgrad.likelihoods import cotangent_rows, get_likelihood

    lik = get_likelihood("categorical")
    layers = find_kfac_layers(model)
    lins = [lay.module for lay in layers]

    def one_round() -> dict[str, float]:
        row: dict[str, float] = {}

        def tick(key: str, t0: float) -> float:
            t = time.perf_counter()
            row[key] = t - t0
            return t

        gc.collect()
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(SEED) if fisher_type == "mc" else None
        natgrad.fisher_matrix(model, [(x, y)], "categorical", fisher_type, "kfac", 1, gen)
        t = tick("whole `fisher_matrix` call (for reference)", t)
        gc.collect()
        t = time.perf_counter()
        with torch.enable_grad(), LayerCapture(layers) as cap:
            f = model(x)
        cap.check()
        t = tick("forward with capture hooks", t)
        rows = cotangent_rows(lik, f, fisher_type, y, 1, torch.Generator().manual_seed(SEED))
        t = tick("cotangent rows (√D or samples)", t)
        grads = output_gradients(f, [cap.output(lay) for lay in layers], rows)
        t = tick("backward to the pre-activations (`output_gradients`)", t)
        a = [expand_inputs(lay, cap.input(lay)) for lay in layers]
        t = tick("ā = [h; 1] (concat copies)", t)
        g = [expand_grads(lay, gg).reshape(-1, lay.out_dim) for lay, gg in
             zip(layers, grads, strict=True)]
        t = tick("g reshape", t)
        A = [gram(ar.reshape(-1, ar.shape[-1])) for ar in a]
        t = tick("Ā Gram products (`natgrad._linalg.gram`: block triangles)", t)
        G = [gram(gr) for gr in g]
        t = tick("G Gram products (`natgrad._linalg.gram`: block triangles)", t)
        for gr in g:
            gr.T @ gr
        t = tick("alt: G as one general matmul each (Xᵀ X)", t)
        del A, G, a, grads
        probes = [torch.zeros(len(x), lin.out_features) for lin in lins]

        def with_probes(*ps: Tensor) -> Tensor:
            it = iter(ps)
            hs = [lin.register_forward_hook(lambda m, i, o: o + next(it)) for lin in lins]
            try:
                return model(x)
            finally:
                for h in hs:
                    h.remove()

        gc.collect()
        t = time.perf_counter()
        with torch.no_grad():
            _, pull = vjp(with_probes, *probes)
        vmap(pull)(rows)
        t = tick("alt: forward + torch.func vjp/vmap backward", t)
        hs_in: list[Tensor] = []
        hooks = [lin.register_forward_hook(lambda m, i, o, acc=hs_in: acc.append(i[0]))
                 for lin in lins]
        with torch.no_grad():
            model(x)
            for h in hooks:
                h.remove()
            k = rows.shape[0]
            gl = rows.reshape(-1, rows.shape[-1])
            for i in range(len(lins) - 1, 0, -1):
                h = hs_in[i]
                gl = (gl @ lins[i].weight).view(k, len(x), -1).mul_(1 - h * h)
                gl = gl.view(-1, h.shape[-1])
        tick("alt: forward + hand-written backward (K·N-row matmuls)", t)
        return row

    one_round()  # warm-up
    kept: list[dict[str, float]] = []
    dirty: list[tuple[float, dict[str, float]]] = []
    for _ in range(3 * cfg.repeats):
        if len(kept) == cfg.repeats:
            break
        wait_quiet(cfg.max_wait)
        with Interference() as probe:
            row = one_round()
        if probe.share <= 0.1:
            kept.append(row)
        else:
            dirty.append((probe.share, row))
    dirty.sort(key=lambda item: item[0])
    kept += [row for _, row in dirty[:cfg.repeats - len(kept)]]
    return {key: statistics.median(r[key] for r in kept) for key in kept[0]}


def natgrad_rows() -> int:
    """How many cotangent rows natgrad backpropagates per example for the categorical true
    Fisher (C, or C − 1 = rank D)."""
    from natgrad.likelihoods import cotangent_rows, get_likelihood

    f = torch.randn(4, CLASSES)
    return cotangent_rows(get_likelihood("categorical"), f, "true", None, 1, None).shape[0]


def vmap_fallbacks(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """The ops that natgrad's batched backward runs through the legacy vmap's slow fallback."""
    import warnings

    import natgrad

    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            natgrad.fisher_matrix(model, [(x[:8], y[:8])], "categorical", "true", "kfac")
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)
    found = (re.search(r"batching rule for (aten::\w+)", str(w.message)) for w in caught)
    ops = {m.group(1) for m in found if m}
    return sorted(ops)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = ", ".join(x for x in ("avx2", "fma", "avx512f") if x in have)
                    break
    except OSError:
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "CPU": f"{cpu} ({flags})",
        "logical cores": str(os.cpu_count()),
        "torch threads": str(THREADS),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "natgrad": version("natgrad"),
        "nngeometry": version("nngeometry"),
        "curvlinops-for-pytorch": version("curvlinops-for-pytorch"),
    }


def _ms(t: float) -> str:
    return f"{t * 1e3:.1f}"


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def render(report: dict) -> str:
    cfg = Config(**report["config"])
    tm = report["timings"]
    lines = [
        "Generated by `benchmarks/fisher_peers.py` (this section only; do not edit by hand):",
        "",
        "```", report["command"], "```", "",
        "### Machine", "",
        "| | |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["machine"].items()]
    rounds = report["rounds"]
    rates = [r / 1e9 for r in rounds["rates"]]
    lines += [
        f"| other processes' CPU share in the kept timing rounds | median "
        f"{statistics.median(rounds['shares']):.1%}, max {max(rounds['shares']):.1%} "
        f"({rounds['clean']} clean rounds, {rounds['discarded']} contaminated rounds kept "
        "for lack of clean ones) |",
        f"| float32 matmul rate | {report['mm_rate'] / 1e9:.1f} GFLOP/s: median over the kept "
        f"rounds (range {min(rates):.0f}–{max(rates):.0f}) of a {cfg.mm_size}×{cfg.mm_size} by "
        f"{cfg.mm_size}×{cfg.mm_size} torch.mm, median of 3 per round |",
        "",
        "### Setup", "",
        f"- K-FAC cases: MLP {'-'.join(map(str, KFAC_DIMS))}, tanh, biases, float32, "
        f"N = {cfg.n_kfac} standard-normal inputs, random labels (seed {SEED}), one batch.",
        f"- Dense case: MLP {'-'.join(map(str, DENSE_DIMS))}, tanh, N = {cfg.n_dense}.",
        f"- `torch.set_num_threads({THREADS})` for everybody; one warm-up call each (its time is "
        f"the *first call* column), then {cfg.repeats} kept timing rounds per case. A round "
        "waits for the other processes to leave the CPUs idle, times the matmul and every method "
        "once (order rotated per round), and is discarded if other processes took more than "
        "10% of the CPUs meanwhile (this 2-core machine is shared). Medians over the kept "
        "rounds; *best* is the fastest kept round.",
        "- natgrad: `natgrad.fisher_matrix(model, [(x, y)], \"categorical\", fisher_type, "
        "structure)`.",
        "- NNGeometry: `FIM(model, loader, PMatKFAC|PMatDense, variant=\"classif_logits\")` and "
        "`FIM_MonteCarlo(..., variant=\"classif_logits\", trials=1)`; `loader` is a DataLoader "
        "with one batch of all N examples (its collation, ~10-20 ms at N=2048, is inside the "
        "timing: it is NNGeometry's interface).",
        "- curvlinops: `KFACLinearOperator(model, CrossEntropyLoss(), params, [(x, y)], "
        "fisher_type=\"type-2\"|\"mc\", mc_samples=1, kfac_approx=\"expand\", "
        "separate_weight_and_bias=False, check_deterministic=False, num_data=N, "
        "num_per_example_loss_terms=1)` followed by `compute_kronecker_factors()` (both "
        "timed); without that call the factors are computed lazily at the first product.",
        "- forward+backward: `model.zero_grad(set_to_none=True); "
        "cross_entropy(model(x), y).backward()` (weight gradients).",
        "- What the peers do (read from their installed source): NNGeometry runs one backward "
        "per row (C − 1 = 9 for the true Fisher) from a summed output, with the inputs set to "
        "`requires_grad`, so each backward also goes through the first layer to the input; "
        "curvlinops `type-2` builds the C × C Hessian roots in a per-example Python loop and "
        "runs C = 10 backward passes that also form the weight gradients; its `mc` runs one.",
        "- Environment: `python3 -m venv .venv-bench; pip install torch==2.13.0 numpy "
        "curvlinops-for-pytorch; pip install --no-deps nngeometry; pip install torch==2.13.0 "
        "-e .` (curvlinops depends on backpack-for-pytorch, which pulled the torchvision CPU "
        "wheel; torch stayed at the CPU build).",
        "",
        "### Time", "",
        "| case | method | median ms | best ms | first call ms |",
        "|---|---|---:|---:|---:|",
    ]
    for case, methods in tm.items():
        for method, t in methods.items():
            lines.append(f"| {CASE_TITLES[case]} | {method} | {_ms(t['median'])} | "
                         f"{_ms(t['best'])} | {_ms(t['first'])} |")
    fl = report["flops"]
    lines += [
        "",
        "FLOP floor of K-FAC with the true Fisher, counted with C = 10 backpropagated rows "
        "(forward 2·N·Σ in·out, backward to the pre-activations 2·C·N·Σ_{l≥2} in·out, "
        "Ā 2·N·Σ (in+1)², G 2·C·N·Σ out², every product a full gemm): "
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in fl["terms"].items())
        + f" GFLOP; total {fl['total'] / 1e9:.2f} GFLOP → "
        f"{_ms(fl['floor_s'])} ms at the measured matmul rate (the target's floor). "
        f"D has rank C − 1, and natgrad (like NNGeometry) backpropagates "
        f"{fl['rows_used']} rows: counted with those, {fl['total_used'] / 1e9:.2f} GFLOP → "
        f"{_ms(fl['floor_used_s'])} ms. natgrad's median does "
        f"{fl['total_used'] / tm['kfac_true']['natgrad']['median'] / 1e9:.1f} GFLOP/s of "
        "that work.",
        "",
        "### Targets", "",
        "*ratio* is the median over the kept rounds of the ratio within one round (the methods "
        "of a round ran back to back, so the host's speed drifts between rounds cancel; the "
        "floor uses that round's matmul rate); *of medians* divides the medians of the time "
        "table.", "",
        "| target | medians | ratio | of medians | bound | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {row['measured']} | {row['ratio']:.2f}× | "
                     f"{row['of_medians']:.2f}× | ≤ {row['bound']}× | "
                     f"**{'PASS' if row['ok'] else 'FAIL'}** |")
    lines += [
        "",
        "### Peak memory", "",
        "Each (case, method) runs in a fresh subprocess with the same model and data: a warm-up "
        "on 32 examples (loads code, thread pools), then the peak resident set is reset "
        "(`/proc/self/clear_refs` ← 5), the resident set before the call is read (VmRSS), the "
        "full call runs, and the peak (VmHWM) is read. *Peak extra* = VmHWM − VmRSS before: "
        "every byte the call touched at its worst moment (tensors, autograd graph, Python "
        "objects, allocator slack), the result included. glibc runs with "
        "`MALLOC_MMAP_THRESHOLD_=65536` so freed blocks go back to the OS and the resident set "
        "tracks live memory. `tracemalloc` would miss torch's allocations; torch.profiler's "
        "memory view misses non-tensor memory, hence the resident set.", "",
        "| case | method | peak extra MiB | baseline MiB |", "|---|---|---:|---:|",
    ]
    if not report["memory"]:
        lines.append("| skipped (`--no-memory`) | | | |")
    elif cfg.quick:
        lines[-3] += " `--quick` measures the true-Fisher K-FAC case only."
    for m in report["memory"]:
        if "error" in m:
            lines.append(f"| {CASE_TITLES[m['case']]} | {m['method']} | error | "
                         f"{m['error'][-120:]} |")
            continue
        flag = "" if m["hwm_reset"] else " (ru_maxrss)"
        lines.append(f"| {CASE_TITLES[m['case']]} | {m['method']} | {_mb(m['delta_kb'])}{flag} "
                     f"| {_mb(m['baseline_kb'])} |")
    fb = report["factor_bytes"]
    nat = next((m for m in report["memory"] if m["case"] == "kfac_true"
                and m["method"] == "natgrad" and "delta_kb" in m), None)
    if nat is not None:
        rows_bytes = 4 * (fl["rows_used"] * cfg.n_kfac * sum(KFAC_DIMS[1:]))
        input_bytes = 4 * cfg.n_kfac * sum(d + 1 for d in KFAC_DIMS[:-1])
        lines += [
            "",
            f"Floor: the K-FAC factors themselves, 4 · Σ ((in+1)² + out²) = {fb / 2**20:.1f} MiB. "
            f"natgrad's true-Fisher K-FAC peaks at {nat['delta_kb'] * 1024 / fb:.1f}× that "
            f"floor. For scale: all K·N backpropagated rows g at once (what one batched backward "
            f"holds, K = {fl['rows_used']}) are 4 · K · N · Σ out = "
            f"{rows_bytes / 2**20:.1f} MiB, the recorded inputs "
            f"ā 4 · N · Σ (in+1) = {input_bytes / 2**20:.1f} MiB.",
        ]
    lines += ["", "### Agreement", "",
              "| check | relative Frobenius difference | verdict |", "|---|---:|---|"]
    for name, d, verdict in report["checks"]:
        lines.append(f"| {name} | {d:.2e} | {verdict} |")
    lines += [
        "",
        "Alignment: curvlinops (CrossEntropyLoss, mean reduction) already uses natgrad's "
        "convention Ā = Σ ā āᵀ / N, G = Σ g gᵀ / N, bias column last in Ā; its `type-2` uses the "
        "same D = diag(p) − p pᵀ. NNGeometry's `classif_logits` backpropagates m = C − 1 = 9 "
        "rows (the Cholesky factor of D, Tanabe & Sagae 1992) and stores Ā·√m and G/√m; we "
        "compare Ā_nng/√m and √m·G_nng (G ⊗ Ā is unaffected); for `FIM_MonteCarlo` m = 1. "
        f"PASS means below {REL_TOL:g}. The Monte-Carlo G factors cannot agree across libraries "
        "(each draws its own labels); their Ā must (it does not depend on the samples), and "
        "each MC G is listed against the true-Fisher G only for information.",
    ]
    if report.get("breakdown"):
        lines += ["", "### Where natgrad's K-FAC time goes", "",
                  "natgrad's own pieces (`natgrad.capture`, `natgrad.likelihoods`, the steps of "
                  "`fisher_matrix`), timed one after the other in the same rounds as a whole "
                  "call, medians over clean rounds. The *alt* rows are not natgrad code: the "
                  "same backward (forward included) through `torch.func.vjp` + `vmap` and by "
                  "hand (one (K·N)-row matmul per layer), and the G products as one general "
                  "matmul each (what natgrad's block-triangle Gram products save), to show what "
                  "each piece could cost.", "",
                  f"| piece | true Fisher ({fl['rows_used']} rows) ms | 1 MC sample ms |",
                  "|---|---:|---:|"]
        bt, bm = report["breakdown"].get("true", {}), report["breakdown"].get("mc", {})
        for key in bt:
            lines.append(f"| {key} | {_ms(bt[key])} | {_ms(bm.get(key, float('nan')))} |")
        if report.get("vmap_fallbacks"):
            lines += ["", "Ops of the batched backward that fall back to the legacy vmap's "
                      "per-row loop (`is_grads_batched=True` uses `torch._vmap_internals`): "
                      + ", ".join(f"`{op}`" for op in report["vmap_fallbacks"]) + "."]
    return "\n".join(lines) + "\n"


HEADING = "## Fisher computations: natgrad vs NNGeometry vs curvlinops"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    cfg = Config.make(args.quick, args.repeats, args.max_wait)
    torch.set_num_threads(THREADS)
    log = RoundLog()
    timings: dict[str, dict[str, Timing]] = {}
    results: dict[str, dict] = {}
    case_rates: dict[str, list[float]] = {}
    for case, (_, _, methods) in CASES.items():
        print(f"timing {case} ...", file=sys.stderr, flush=True)
        model, x, y = problem(case, cfg)
        fns = {m: build(case, m, model, x, y) for m in methods}
        timings[case], results[case], case_rates[case] = time_methods(fns, cfg, log)
        for m, t in timings[case].items():
            print(f"  {m:18s} median {_ms(t.median)} ms  best {_ms(t.best)} ms  "
                  f"first {_ms(t.first)} ms", file=sys.stderr, flush=True)
    rate = statistics.median(log.rates)

    checks = check_kfac(results["kfac_true"]["natgrad"], results["kfac_true"]["NNGeometry"],
                        results["kfac_true"]["curvlinops"], exact=True)
    checks += check_kfac_mv(results["kfac_true"]["natgrad"], results["kfac_true"]["NNGeometry"],
                            results["kfac_true"]["curvlinops"])
    checks += check_mc(results["kfac_mc"]["natgrad"], results["kfac_mc"]["NNGeometry"],
                       results["kfac_mc"]["curvlinops"], results["kfac_true"]["natgrad"])
    checks += check_dense(results["dense"]["natgrad"], results["dense"]["NNGeometry"])
    del results
    gc.collect()

    terms = kfac_flops(KFAC_DIMS, cfg.n_kfac, CLASSES)
    total = sum(terms.values())
    rows_used = natgrad_rows()
    total_used = sum(kfac_flops(KFAC_DIMS, cfg.n_kfac, rows_used).values())
    flops = {"terms": terms, "total": total, "floor_s": total / rate, "rows_used": rows_used,
             "total_used": total_used, "floor_used_s": total_used / rate}

    def med(case: str, m: str) -> float:
        return timings[case][m].median

    def target(name: str, case: str, num: str, den: str | None, bound: float) -> dict:
        """Verdict on the median of per-round ratios: the methods of one round ran back to
        back, so host-level speed changes between rounds (the matmul rate moves too) cancel."""
        nums = timings[case][num].times
        if den is None:  # the FLOP floor of each round, from that round's matmul rate
            dens = [total / r for r in case_rates[case]]
            t_den, label = flops["floor_s"], "FLOP floor"
        else:
            dens = timings[case][den].times
            t_den, label = med(case, den), den
        paired = statistics.median(a / b for a, b in zip(nums, dens, strict=True))
        return {"target": name, "bound": bound, "ratio": paired, "ok": paired <= bound,
                "of_medians": med(case, num) / t_den,
                "measured": f"{_ms(med(case, num))} / {_ms(t_den)} ms ({label})"}

    targets = [
        target("K-FAC true: natgrad / NNGeometry", "kfac_true", "natgrad", "NNGeometry", 0.8),
        target("K-FAC true: natgrad / curvlinops", "kfac_true", "natgrad", "curvlinops", 0.5),
        target("K-FAC true: natgrad / FLOP floor", "kfac_true", "natgrad", None, 2.0),
        target("K-FAC MC: natgrad / forward+backward", "kfac_mc", "natgrad",
               "forward+backward", 1.7),
        target("K-FAC MC: natgrad / NNGeometry MC", "kfac_mc", "natgrad", "NNGeometry", 0.75),
        target("K-FAC MC: natgrad / curvlinops MC", "kfac_mc", "natgrad", "curvlinops", 0.75),
        target("dense: natgrad / NNGeometry", "dense", "natgrad", "NNGeometry", 0.5),
    ]
    for row in targets:
        print(f"  {row['target']:42s} {row['ratio']:.2f}x (<= {row['bound']}) "
              f"{'PASS' if row['ok'] else 'FAIL'}", file=sys.stderr)

    breakdown = {}
    fallbacks: list[str] = []
    if not args.no_breakdown:
        print("natgrad breakdown ...", file=sys.stderr, flush=True)
        try:
            model, x, y = problem("kfac_true", cfg)
            breakdown = {ft: natgrad_breakdown(model, x, y, ft, cfg) for ft in ("true", "mc")}
            fallbacks = vmap_fallbacks(model, x, y)
        except Exception as err:  # natgrad internals change under us: keep the main report
            print(f"  breakdown skipped: {err!r}", file=sys.stderr)

    memory = []
    if not args.no_memory:
        print("memory (one subprocess per case and method) ...", file=sys.stderr, flush=True)
        pairs = [(case, m) for case, (_, _, methods) in CASES.items() for m in methods
                 if not cfg.quick or case == "kfac_true"]  # quick: one case, to stay ~30 s
        # The resident set of one process does not depend on what runs next to it: three at
        # a time, after the timings.
        with ThreadPoolExecutor(max_workers=3) as pool:
            memory = list(pool.map(lambda cm: measure_memory(*cm, args), pairs))

    return {
        "command": " ".join([".venv-bench/bin/python", "benchmarks/fisher_peers.py",
                             *sys.argv[1:]]),
        "config": asdict(cfg), "machine": machine_info(), "rounds": asdict(log), "mm_rate": rate,
        "timings": {c: {m: {"median": t.median, "best": t.best, "first": t.first}
                        for m, t in ts.items()} for c, ts in timings.items()},
        "flops": flops, "targets": targets, "checks": checks, "memory": memory,
        "factor_bytes": factor_bytes(KFAC_DIMS), "breakdown": breakdown,
        "vmap_fallbacks": fallbacks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path,
                        help="append/replace this script's section of a RESULTS.md")
    parser.add_argument("--json", type=Path, help="also dump the raw numbers as JSON")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--max-wait", type=float, default=300.0,
                        help="seconds to wait for an idle machine before each timing round")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip timing natgrad's pieces")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        case, method = args._child.split(":")
        cfg = Config.make(args.quick, args.repeats, args.max_wait)
        print(json.dumps(memory_child(case, method, cfg)))
        return
    report = run(args)
    text = render(report)
    print(f"{HEADING}\n\n{text}")
    if args.write:
        write_section(args.write, HEADING, text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
