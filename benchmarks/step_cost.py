"""Cost of one training step on the deep autoencoder: SGD, Adam, natgrad K-FAC / EK-FAC, ASDL.

Model: 784-1000-500-250-30-250-500-1000-784 (tanh, linear code layer, one logit per pixel),
loss = sigmoid cross-entropy summed over pixels and averaged over the batch (Bernoulli
likelihood), real Fashion-MNIST batches of 1000. Curvature schedule for every second-order
method: factors every 10 steps, eigendecompositions (natgrad) / inverses (ASDL) every 100.

A step is ``zero_grad`` + forward + backward + update, timed with ``time.perf_counter`` (CPU,
synchronous). The methods run round-robin in chunks of 10 steps (one factor period) with the
order rotated every round, so that the noise of the shared machine hits all alike. Steps are
classified as *plain*, *factor* (factor update, no eigendecomposition) and *eig* (factors +
eigendecompositions/inverses); the amortized cost of a 100-step cycle is
``0.90·median(plain) + 0.09·median(factor) + 0.01·median(eig)``; the plain mean over all
measured (whole) cycles is reported too.

ASDL (``asdfghjkl``): ``KfacGradientMaker`` with ``PreconditioningConfig(curvature_upd_interval
=10, preconditioner_upd_interval=100, ema_decay=0.05, damping=…, data_size=B)`` and its
``forward_and_backward()`` protocol, followed by ``torch.optim.SGD`` (momentum) like natgrad's
K-FAC. ASDL's Monte-Carlo Fisher exists for softmax cross-entropy and MSE only; for this
Bernoulli model the benchmark swaps in a 5-line ``_fisher_loop`` that samples ŷ ~ Bern(σ(z))
and back-propagates the summed sigmoid cross-entropy of ŷ through ASDL's own machinery — the
same one-sample MC Fisher as natgrad's default, at the cost ASDL's MC Fisher has. ASDL damps
in the factored Tikhonov form, so natgrad's ``damping_mode="factored"`` is timed as well.

FLOP floor of natgrad's K-FAC step (amortized over the cycle; in' = in + 1):
  forward+backward   6·B·Σ in·out
  preconditioning    4·Σ out·in'·(out + in')        (Q_Gᵀ V Q_A, then Q_G (·) Q_Aᵀ)
  factor step / 10   2·B·Σ_{l≥2} in·out (MC backward to the pre-activations)
                     + 2·B·Σ (in'² + out²) (Ā and G products)
  eig step / 100     Σ measured eigh time of each actual factor (also shown: 9 n³ FLOPs)
divided by the float32 matmul rate measured in the same run (the median over rounds).

Usage (repository root, benchmark environment)::

    .venv-bench/bin/python benchmarks/step_cost.py --write benchmarks/RESULTS.md
    .venv-bench/bin/python benchmarks/step_cost.py --quick          # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ForeignLoad, command_line, machine_info, write_section
from torch import Tensor, nn

import natgrad
from natgrad.data import load_idx_folder
from natgrad.models import AUTOENCODER_SIZES, autoencoder

THREADS = 2
SEED = 0
FACTORED = "natgrad K-FAC, damping_mode=\"factored\""
QUIET = 0.15  # a round is quiet when other processes used less than this of the CPUs
HEADING = "## Step cost: deep autoencoder (issue 3)"


# --------------------------------------------------------------------------------------------
# machine and reporting helpers
# --------------------------------------------------------------------------------------------


def ms(t: float) -> str:
    return f"{1e3 * t:.1f}"


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    batch: int = 1000
    factor_period: int = 10
    eig_period: int = 100
    cycles: int = 3  # measured 100-step cycles per method
    warmup: int = 10  # steps per method before measuring (includes the first eig step)
    damping: float = 1.0
    lr: float = 0.01
    sizes: tuple[int, ...] = AUTOENCODER_SIZES
    quick: bool = False

    @property
    def chunk(self) -> int:
        return self.factor_period

    @property
    def measured_steps(self) -> int:
        return self.cycles * self.eig_period


def quick_config() -> Config:
    """Smoke run: every 4th pixel (196 inputs), a 196-100-50-16 autoencoder, short periods."""
    return Config(batch=250, factor_period=2, eig_period=6, cycles=2, warmup=2,
                  sizes=(196, 100, 50, 16), quick=True)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """Sigmoid cross-entropy summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def make_model(cfg: Config) -> nn.Sequential:
    torch.manual_seed(SEED)
    return autoencoder(cfg.sizes)


@dataclass
class Method:
    """A training step and the kind of the next step ("plain", "factor", "eig")."""

    name: str
    step: Callable[[Tensor], float]
    kind: Callable[[], str]
    model: nn.Module
    extra: dict = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: {
        "plain": [], "factor": [], "eig": []})
    all_times: list[float] = field(default_factory=list)
    records: list[tuple[int, str, float]] = field(default_factory=list)  # (round, kind, s)
    last_loss: float = float("nan")


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Tensor], float]:
    """One training step of ``model`` with ``opt`` on the reconstruction loss of a batch."""

    def step(x: Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _torch_method(name: str, cfg: Config,
                  opt_factory: Callable[[nn.Module], torch.optim.Optimizer]) -> Method:
    model = make_model(cfg)
    return Method(name, _plain_step(model, opt_factory(model)), lambda: "plain", model)


def _natgrad_method(name: str, cls: type, cfg: Config, **kw: object) -> Method:
    model = make_model(cfg)
    opt = cls(model, lr=cfg.lr, damping=cfg.damping, likelihood="bernoulli", momentum=0.9,
              factor_update_period=cfg.factor_period, inverse_update_period=cfg.eig_period,
              ema_decay=0.95, **kw)

    def kind() -> str:
        s = opt.preconditioner.curvature.steps
        if s % cfg.eig_period == 0:
            return "eig"
        return "factor" if s % cfg.factor_period == 0 else "plain"

    return Method(name, _plain_step(model, opt), kind, model, extra={"opt": opt})


def _asdl_method(cfg: Config) -> Method:
    import contextlib
    import types

    import asdl.precondition.natural_gradient as asdl_ng
    from asdl import FISHER_MC, KfacGradientMaker, PreconditioningConfig
    from asdl.fisher import FisherMCCrossEntropy

    # ASDL wraps its inverse updates in torch.cuda.nvtx ranges, which raise on a CPU build.
    asdl_ng.nvtx = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())

    class BernoulliMCFisher(FisherMCCrossEntropy):
        """ASDL's MC Fisher loop with ŷ ~ Bern(σ(z)) (ASDL ships softmax and Gaussian only)."""

        def _fisher_loop(self, closure: Callable) -> None:
            logits = self._logits
            with torch.no_grad():
                y_hat = torch.bernoulli(torch.sigmoid(logits))
            closure(lambda: F.binary_cross_entropy_with_logits(logits, y_hat, reduction="sum"))

    def asdl_loss(logits: Tensor, target: Tensor, reduction: str = "batch_mean") -> Tensor:
        # ASDL forces reduction="sum" on curvature steps and then divides the gradients by
        # data_size (= B); on plain steps it back-propagates the loss as returned.
        total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        return total if reduction == "sum" else total / logits.shape[0]

    model = make_model(cfg)
    config = PreconditioningConfig(
        data_size=cfg.batch, damping=cfg.damping, ema_decay=0.05,
        curvature_upd_interval=cfg.factor_period, preconditioner_upd_interval=cfg.eig_period,
    )
    gm = KfacGradientMaker(model, config, fisher_type=FISHER_MC)
    gm.fisher_maker.__class__ = BernoulliMCFisher
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)

    def step(x: Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(asdl_loss, dummy, x)
        _, loss = gm.forward_and_backward()
        opt.step()
        return float(loss.detach())

    def kind() -> str:
        s = gm.state["step"]
        if s % cfg.eig_period == 0:
            return "eig"
        return "factor" if s % cfg.factor_period == 0 else "plain"

    return Method("ASDL K-FAC (MC, Cholesky inverses)", step, kind, model, extra={"gm": gm})


def make_methods(cfg: Config) -> list[Method]:
    return [
        _torch_method("SGD (momentum 0.9)", cfg,
                      lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)),
        _torch_method("Adam", cfg, lambda m: torch.optim.Adam(m.parameters(), lr=1e-4)),
        _natgrad_method("natgrad K-FAC", natgrad.optim.KFAC, cfg),
        _natgrad_method("natgrad EK-FAC", natgrad.optim.EKFAC, cfg,
                        scale_update_period=cfg.factor_period),
        _asdl_method(cfg),
        _natgrad_method(FACTORED, natgrad.optim.KFAC, cfg, damping_mode="factored"),
    ]


# --------------------------------------------------------------------------------------------
# FLOP floor
# --------------------------------------------------------------------------------------------


def layer_dims(cfg: Config) -> list[tuple[int, int]]:
    sizes = list(cfg.sizes) + list(reversed(cfg.sizes))[1:]
    return list(itertools.pairwise(sizes))


def floor_flops(cfg: Config) -> dict[str, float]:
    """FLOPs per step of natgrad's K-FAC step (factor and eig terms amortized)."""
    B, dims = cfg.batch, layer_dims(cfg)
    fb = 6 * B * sum(i * o for i, o in dims)
    pre = 4 * sum(o * (i + 1) * (o + i + 1) for i, o in dims)
    mc_back = 2 * B * sum(i * o for i, o in dims[1:])
    factors = 2 * B * sum((i + 1) ** 2 + o ** 2 for i, o in dims)
    eig9 = 9 * sum((i + 1) ** 3 + o ** 3 for i, o in dims)
    return {"forward+backward": fb, "preconditioning": pre,
            "factor step (MC backward + Ā, G) / period": (mc_back + factors) / cfg.factor_period,
            "eigendecompositions 9n³ / period": eig9 / cfg.eig_period}


def matmul_rate(n: int = 1000, reps: int = 5) -> float:
    """float32 GFLOP/s of (B×n)·(n×n) products like the model's, median of ``reps``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b.T
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts)


def precondition_times(opt: natgrad.optim.KFAC, damping: float) -> tuple[float, float, float]:
    """Seconds to precondition every layer's current gradient three ways, on the same
    gradients and factors: natgrad's exact damping (Q_G [(Q_Gᵀ V Q_A) ⊘ (s_G s_Aᵀ + δ)] Q_Aᵀ,
    4 products); natgrad's factored damping (Ā's damped inverse in blocks at the bias,
    [X P + y qᵀ | X q + r y] with X = G⁻¹ ∇W, y = G⁻¹ ∇b); ASDL's form (G⁻¹ ∇W A_h⁻¹ with the
    weight's block of Ā only, and G⁻¹ ∇b)."""
    from natgrad.optim import factored
    from natgrad.optim.preconditioner import layer_parts

    pre = opt.preconditioner
    cur = pre.curvature
    named = dict(pre.model.named_parameters())
    grads = {n: named[n].grad for layer in pre.layers for n in layer.param_names
             if n is not None}
    parts = [layer_parts(layer, grads) for layer in pre.layers]
    invs = []
    for layer in pre.layers:
        st = cur.state[layer.name]
        root = damping**0.5
        P_A = (st["Q_A"] / (st["s_A"] + root)) @ st["Q_A"].T
        P_G = (st["Q_G"] / (st["s_G"] + root)) @ st["Q_G"].T
        n = P_A.shape[0] - 1
        invs.append((P_G, factored.InverseBlocks.from_inverse(P_A, True, True),
                     P_A[:n, :n].contiguous()))
    t0 = time.perf_counter()
    for layer, (W, b) in zip(pre.layers, parts, strict=True):
        cur.precondition_parts(layer, W, b, damping)
    t1 = time.perf_counter()
    for (P_G, blocks, _), (W, b) in zip(invs, parts, strict=True):
        factored.precondition(P_G, blocks, W, b)
    t2 = time.perf_counter()
    for (P_G, _, P_h), (W, b) in zip(invs, parts, strict=True):
        P_G @ W @ P_h
        P_G @ b
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def eigh_time(factors: list[Tensor]) -> float:
    """Seconds to eigendecompose every factor once (torch.linalg.eigh, as natgrad does)."""
    t0 = time.perf_counter()
    for A in factors:
        torch.linalg.eigh(0.5 * (A + A.T))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def batches(cfg: Config) -> Callable[[int], Tensor]:
    data = load_idx_folder()
    x = data.x_train
    if cfg.sizes[0] != x.shape[1]:  # quick mode: a subsample of the pixels
        x = x[:, :: x.shape[1] // cfg.sizes[0]][:, : cfg.sizes[0]]
    g = torch.Generator().manual_seed(SEED)
    order = torch.randperm(x.shape[0], generator=g)
    per_epoch = x.shape[0] // cfg.batch

    def get(i: int) -> Tensor:
        j = i % per_epoch
        return x[order[j * cfg.batch:(j + 1) * cfg.batch]].contiguous()

    return get


def run(cfg: Config) -> dict:
    torch.set_num_threads(THREADS)
    get = batches(cfg)
    methods = make_methods(cfg)
    steps_done = dict.fromkeys(range(len(methods)), 0)

    def run_steps(k: int, n: int, record: bool, rnd: int = -1) -> None:
        m = methods[k]
        for _ in range(n):
            kind = m.kind()
            x = get(steps_done[k])
            t0 = time.perf_counter()
            m.last_loss = m.step(x)
            dt = time.perf_counter() - t0
            steps_done[k] += 1
            if record:
                m.times[kind].append(dt)
                m.all_times.append(dt)
                m.records.append((rnd, kind, dt))

    print("warm-up ...", file=sys.stderr, flush=True)
    for k in range(len(methods)):
        run_steps(k, cfg.warmup, record=False)

    kfac_opt = methods[2].extra["opt"]
    factors = [st[f] for st in kfac_opt.preconditioner.curvature.state.values() for f in ("A", "G")]
    rates, eighs, loads, pre4, pre2, pre_asdl = [], [], [], [], [], []
    rounds = cfg.measured_steps // cfg.chunk
    load = ForeignLoad()
    for r in range(rounds):
        load.start()
        order = [(k + r) % len(methods) for k in range(len(methods))]
        for k in order:
            run_steps(k, cfg.chunk, record=True, rnd=r)
        rates.append(matmul_rate())
        t4, t2, t_asdl = precondition_times(kfac_opt, cfg.damping)
        pre4.append(t4)
        pre2.append(t2)
        pre_asdl.append(t_asdl)
        if r % max(1, rounds // cfg.cycles // 2) == 0:  # a few eigh timings per cycle
            eighs.append(eigh_time(factors))
        loads.append(load.stop())
        last = ", ".join(f"{m.name.split(' (')[0]} "
                         f"{ms(statistics.median(m.all_times[-cfg.chunk:]))} ms" for m in methods)
        print(f"round {r + 1}/{rounds}: other processes used {100 * loads[-1]:.0f}% of the "
              f"CPUs; {last}", file=sys.stderr, flush=True)

    # Quiet rounds: other processes used < QUIET of the CPUs. If there are enough of them, the
    # plain/factor medians and the matmul rate come from those (eig steps, 1 per cycle, from
    # all rounds); the all-rounds figures are reported next to them.
    quiet = {r for r, v in enumerate(loads) if v < QUIET}
    use_quiet = len(quiet) >= max(3, len(loads) // 4)
    rate = statistics.median([v for r, v in enumerate(rates) if r in quiet] if use_quiet
                             else rates)
    eig_s = statistics.median(eighs)
    flops = floor_flops(cfg)
    compute_flops = sum(v for k, v in flops.items() if not k.startswith("eig"))
    floor_s = compute_flops / rate + eig_s / cfg.eig_period
    floor9_s = sum(flops.values()) / rate

    rows = []
    pf = (cfg.factor_period - 1) / cfg.factor_period  # fraction of plain steps
    ff = 1 / cfg.factor_period - 1 / cfg.eig_period
    fe = 1 / cfg.eig_period
    def medians(m: Method, rounds_ok: set[int] | None) -> dict[str, float]:
        out = {}
        for kind in ("plain", "factor", "eig"):
            vals = [dt for r, k, dt in m.records if k == kind
                    and (rounds_ok is None or r in rounds_ok or kind == "eig")]
            out[kind] = statistics.median(vals) if vals else float("nan")
        return out

    def amortized(med: dict[str, float]) -> float:
        if med["factor"] != med["factor"]:
            return med["plain"]
        return pf * med["plain"] + ff * med["factor"] + fe * med["eig"]

    for m in methods:
        med = medians(m, quiet if use_quiet else None)
        amort = amortized(med)
        rows.append({"method": m.name, **med, "amortized": amort,
                     "amortized_all": amortized(medians(m, None)),
                     "cycle_mean": statistics.fmean(m.all_times), "n": len(m.all_times),
                     "loss": m.last_loss})
    adam, adam_all = rows[1]["amortized"], rows[1]["amortized_all"]
    for row in rows:
        row["vs_adam"] = row["amortized"] / adam
        row["vs_adam_all"] = row["amortized_all"] / adam_all
        row["vs_floor"] = row["amortized"] / floor_s
    by = {row["method"]: row for row in rows}
    kfac, ekfac, asdl = by["natgrad K-FAC"], by["natgrad EK-FAC"], rows[4]
    goals = [
        ("natgrad K-FAC / Adam step", kfac["vs_adam"], 2.5),
        ("natgrad EK-FAC / Adam step", ekfac["vs_adam"], 3.0),
        ("natgrad K-FAC (default, exact damping) / ASDL K-FAC",
         kfac["amortized"] / asdl["amortized"], 1.0),
        ("natgrad K-FAC / its FLOP floor", kfac["amortized"] / floor_s, 1.3),
    ]
    if FACTORED in by:  # the same damping form as ASDL's
        goals.insert(3, ("natgrad K-FAC, damping_mode=\"factored\" (ASDL's damping form) / "
                         "ASDL K-FAC", by[FACTORED]["amortized"] / asdl["amortized"], 1.0))
    return {"cfg": cfg, "rows": rows, "goals": goals, "rate": rate, "eig_s": eig_s,
            **{key: statistics.median([v for r, v in enumerate(vals) if r in quiet]
                                      if use_quiet else vals)
               for key, vals in (("pre4", pre4), ("pre2", pre2), ("pre_asdl", pre_asdl))},
            "flops": flops, "floor_s": floor_s, "floor9_s": floor9_s, "loads": loads,
            "quiet": len(quiet) if use_quiet else 0,
            "records": {m.name: m.records for m in methods},
            "skipped": {m.name: m.extra["opt"].skipped_steps for m in methods
                        if "opt" in m.extra}}


def profile_kfac(cfg: Config, steps: int) -> str:
    """torch.profiler of natgrad K-FAC over ``steps`` steps after warm-up: phases and ops."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(THREADS)
    get = batches(cfg)
    model = make_model(cfg)
    opt = natgrad.optim.KFAC(model, lr=cfg.lr, damping=cfg.damping, likelihood="bernoulli",
                             momentum=0.9, factor_update_period=cfg.factor_period,
                             inverse_update_period=cfg.eig_period)

    def step(i: int) -> None:
        x = get(i)
        with record_function("## zero_grad"):
            opt.zero_grad(set_to_none=True)
        with record_function("## forward (+ MC backward on factor steps)"):
            loss = loss_fn(model(x), x)
        with record_function("## backward"):
            loss.backward()
        with record_function("## optimizer.step"):
            opt.step()

    for i in range(cfg.factor_period):  # includes the first eig step
        step(i)

    # Sub-phases inside optimizer.step: wrap natgrad's internals (instance attributes and the
    # module-level helpers, looked up at call time) in record_function ranges; undone below.
    import natgrad.optim.kfac as kfac_mod
    import natgrad.optim.preconditioner as pre_mod

    def labelled(label: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapper

    cur = opt.preconditioner.curvature
    cur.update = labelled("### curvature.update (factor EMA; eigh on eig steps)", cur.update)
    cur.precondition_parts = labelled("### curvature.precondition (4 products per layer)",
                                      cur.precondition_parts)
    cur.pending_finite = labelled("### finiteness checks", cur.pending_finite)
    opt._apply = labelled("### momentum + parameter update", opt._apply)
    saved = {}
    for mod, name, label in [
        (kfac_mod, "grads_finite", "### finiteness checks"),
        (pre_mod, "grads_finite", "### finiteness checks"),
        (pre_mod, "layer_parts", "### [∇W | ∇b] packing and unpacking"),
        (pre_mod, "named_parts", "### [∇W | ∇b] packing and unpacking"),
    ]:
        if hasattr(mod, name):
            saved[(mod, name)] = getattr(mod, name)
            setattr(mod, name, labelled(label, getattr(mod, name)))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(cfg.factor_period, cfg.factor_period + steps):
                step(i)
        for i in range(cfg.factor_period + steps, cfg.eig_period):
            step(i)
        with profile(activities=[ProfilerActivity.CPU]) as prof_eig:
            step(cfg.eig_period)
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"natgrad K-FAC, {steps} steps (steps {cfg.factor_period}..."
             f"{cfg.factor_period + steps - 1}: {steps // cfg.factor_period} factor steps, "
             "no eig step), torch.profiler CPU time:", "",
             "| phase | total ms | % of profiled time |", "|---|---:|---:|"]
    phases = sorted((e for e in events if e.key.startswith("## ")),
                    key=lambda e: -e.cpu_time_total)
    subs = sorted((e for e in events if e.key.startswith("### ")),
                  key=lambda e: -e.cpu_time_total)
    for e in phases + subs:
        name = e.key[3:] if e.key.startswith("## ") else f"↳ in optimizer.step: {e.key[4:]}"
        lines.append(f"| {name} | {e.cpu_time_total / 1e3:.0f} | "
                     f"{100 * e.cpu_time_total / total:.0f}% |")
    lines += ["", "| op (self time) | calls | self ms | % |", "|---|---:|---:|---:|"]
    ops = sorted((e for e in events if not e.key.startswith("##")),
                 key=lambda e: -e.self_cpu_time_total)[:12]
    for e in ops:
        lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.0f} | "
                     f"{100 * e.self_cpu_time_total / total:.0f}% |")
    # the eig step alone
    ev = prof_eig.key_averages()
    tot = sum(e.self_cpu_time_total for e in ev)
    top = sorted((e for e in ev if not e.key.startswith("##")),
                 key=lambda e: -e.self_cpu_time_total)[:4]
    top_phases = sorted((e for e in ev if e.key.startswith("##")),
                        key=lambda e: -e.cpu_time_total)
    lines += ["", f"eig step (step {cfg.eig_period}) profiled alone: {tot / 1e3:.0f} ms, of which "
              + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms ({e.count} calls)"
                          for e in top) + "; by phase: "
              + ", ".join(f"{e.key.lstrip('#').strip()} {e.cpu_time_total / 1e3:.0f} ms"
                          for e in top_phases) + "."]
    return "\n".join(lines)


def methods_text(cfg: Config) -> str:
    return (
        f"Methods: SGD (lr {cfg.lr:g}, momentum 0.9) and Adam (lr 1e-4) from torch.optim; "
        f"natgrad `KFAC(model, lr={cfg.lr:g}, damping={cfg.damping:g}, "
        f"likelihood=\"bernoulli\", momentum=0.9, factor_update_period={cfg.factor_period}, "
        f"inverse_update_period={cfg.eig_period}, ema_decay=0.95)` and `EKFAC(…the same…, "
        f"scale_update_period={cfg.factor_period})`: default one-sample MC Fisher, exact "
        "damping in the Kronecker eigenbasis (4 products per layer and step, Ā's eigenbasis "
        "split at the bias and padded to a multiple of 16 columns); the row "
        "`damping_mode=\"factored\"` is the same K-FAC with factored Tikhonov damping, which "
        "natgrad applies with damped inverses from Cholesky, cached between refreshes, Ā's in "
        "blocks at the bias (Schur complement of the bias entry), so that [∇W | ∇b] is never "
        "formed (2 products per layer and step on the weight's size, like ASDL, plus a "
        "rank-one update and a matrix-vector product for the bias coupling); ASDL "
        "`KfacGradientMaker(model, "
        f"PreconditioningConfig(curvature_upd_interval={cfg.factor_period}, "
        f"preconditioner_upd_interval={cfg.eig_period}, ema_decay=0.05, "
        f"damping={cfg.damping:g}, data_size={cfg.batch}), fisher_type=\"fisher_mc\")` + "
        f"`torch.optim.SGD(lr={cfg.lr:g}, momentum=0.9)`. ASDL samples MC targets only for "
        "softmax cross-entropy and MSE; its sampling loop is replaced here by ŷ ~ Bern(σ(z)) "
        "with the summed sigmoid cross-entropy, i.e. the same one-sample MC Fisher as "
        "natgrad's, at the cost of ASDL's own MC path. Against natgrad's default (exact "
        "damping), ASDL's step is cheaper by design in two ways: factored Tikhonov damping "
        "(π-split) applied with explicit Cholesky inverses (2 matrix products per layer and "
        "step instead of 4, and an inverse instead of an eigendecomposition every 100 steps), "
        "and the bias preconditioned by G alone (no ones column in Ā); natgrad's factored "
        "row does the same work as ASDL plus the bias coupling. Both compute Ā and G on factor "
        "steps; natgrad's Gram products compute about one triangle (recursive blocks). "
        "Learning rates and damping keep every run finite (final losses in the table); step "
        "costs do not depend on them.")


def render(res: dict, prof: str | None, cmd: str) -> str:
    cfg: Config = res["cfg"]
    out = [f"Command: `{cmd}`", ""]
    info = machine_info()
    out.append("Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".")
    loads = res["loads"]
    out += [f"Batch {cfg.batch}, factors every {cfg.factor_period} steps, eigendecompositions "
            f"/ inverses every {cfg.eig_period}; {cfg.cycles} measured cycles "
            f"({cfg.measured_steps} steps) per method after {cfg.warmup} warm-up steps, "
            f"round-robin in chunks of {cfg.chunk} steps. Other processes used "
            f"{100 * statistics.median(loads):.0f}% of the CPUs (median over rounds, "
            f"max {100 * max(loads):.0f}%). Times are medians in ms"
            + (f" over the {res['quiet']} quiet rounds (other processes < {100 * QUIET:.0f}% "
               "of the CPUs; eig steps, one per cycle, from all rounds); the last two columns "
               "use all rounds." if res["quiet"] else
               " over all rounds (too few quiet rounds to filter).") + "", "",
            methods_text(cfg), "",
            "| method | plain step | factor step | eig/inverse step | amortized (cycle) | "
            "× Adam | × K-FAC floor | amortized, all rounds | × Adam, all rounds | final loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["rows"]:
        def cell(k: str, row: dict = row) -> str:
            v = row[k]
            return "–" if v != v else ms(v)
        out.append(f"| {row['method']} | {cell('plain')} | {cell('factor')} | {cell('eig')} | "
                   f"**{ms(row['amortized'])}** | {row['vs_adam']:.2f} | "
                   f"{row['vs_floor']:.2f} | {ms(row['amortized_all'])} | "
                   f"{row['vs_adam_all']:.2f} | {row['loss']:.1f} |")
    fl = res["flops"]
    out += ["", f"FLOP floor of natgrad's K-FAC step at the measured float32 matmul rate "
            f"{res['rate'] / 1e9:.0f} GFLOP/s:", "",
            "| term | GFLOP / step | ms |", "|---|---:|---:|"]
    for k, v in fl.items():
        if k.startswith("eig"):
            out.append(f"| eigendecompositions: measured eigh of the 16 actual factors "
                       f"{ms(res['eig_s'])} ms / {cfg.eig_period} (9n³ would be "
                       f"{v / 1e9:.2f} GFLOP) | – | {ms(res['eig_s'] / cfg.eig_period)} |")
        else:
            out.append(f"| {k} | {v / 1e9:.2f} | {ms(v / res['rate'])} |")
    out.append(f"| **floor** | | **{ms(res['floor_s'])}** (9n³ version: "
               f"{ms(res['floor9_s'])}) |")
    out += ["", f"Preconditioning alone, all layers, same gradients and factors, interleaved: "
            f"natgrad's exact-damped eigenbasis solve (4 products per layer) {ms(res['pre4'])} "
            f"ms; natgrad's factored form (Ā's damped inverse in blocks at the bias, 2 products "
            f"on the weight's size plus the bias coupling) {ms(res['pre2'])} ms; ASDL's form "
            f"(weight block of Ā only, bias by G alone) {ms(res['pre_asdl'])} ms.",
            "", "| goal | measured | bound | result |", "|---|---:|---:|---|"]
    for name, val, bound in res["goals"]:
        out.append(f"| {name} | {val:.2f} | ≤ {bound} | {'PASS' if val <= bound else 'FAIL'} |")
    if any(res["skipped"].values()):
        out.append(f"\nSkipped (non-finite) steps: {res['skipped']}")
    if prof:
        out += ["", prof]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run (smaller batch "
                        "and periods)")
    parser.add_argument("--cycles", type=int, default=None, help="measured 100-step cycles")
    parser.add_argument("--profile", type=int, default=20, metavar="STEPS",
                        help="profile natgrad K-FAC over this many steps (0: skip)")
    parser.add_argument("--json", type=Path, help="dump the per-step times and loads")
    parser.add_argument("--write", type=Path, help="append/replace this script's section "
                        "of a RESULTS.md")
    args = parser.parse_args()
    cfg = quick_config() if args.quick else Config()
    if args.cycles:
        cfg = Config(**{**cfg.__dict__, "cycles": args.cycles})
    res = run(cfg)
    if args.json:
        args.json.write_text(json.dumps({"loads": res["loads"], "records": res["records"]}))
    prof = None
    if args.profile:
        print("profiling natgrad K-FAC ...", file=sys.stderr, flush=True)
        prof = profile_kfac(cfg, min(args.profile, cfg.eig_period - 2 * cfg.factor_period))
    text = render(res, prof, command_line("step_cost.py"))
    print(text)
    if args.write and not cfg.quick:
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
