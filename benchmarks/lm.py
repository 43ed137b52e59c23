"""Byte-level language model: K-FAC and EK-FAC against AdamW on a GPT-style decoder (issue 13).

Model (:func:`build_model`): a GPT-style decoder from ``torch.nn`` — token embedding and
learned positions (``nn.Embedding``), ``layers`` × ``nn.TransformerEncoderLayer(norm_first=True,
batch_first=True, activation="gelu", dropout=0)`` with a causal mask (pre-norm LayerNorm,
``nn.MultiheadAttention``, a 4·d feed-forward), a final LayerNorm and a head tied to the token
embedding; default 4 layers, d_model 256, 4 heads, context 128, vocabulary 256 (bytes).
The logits come flattened to (N·T, 256), one row per position (``flat_logits``).

Data (:func:`load_text`): the ``.py`` files at the top level of the running Python's standard
library (``sysconfig.get_paths()["stdlib"]``), in sorted order, concatenated as bytes; the last
10% is held out for validation. Training batches are ``batch`` windows of ``context + 1`` bytes
at random offsets from one seeded generator (the same offsets, in the same order, for every
method); the validation loss is the mean next-byte cross-entropy (nats) over ``val_sequences``
fixed, evenly spaced windows of the held-out part, every ``eval_every`` steps (not timed).

Methods (same initialisation, same data order, the same warm-up + cosine learning-rate factor
on every method's lr: linear warm-up over the first ``warmup`` of the run, then cosine to 0.1;
the run's progress is step/steps with ``--steps``, else training seconds / budget):

- ``adamw-3e-4``, ``adamw-1e-3``, ``adamw-3e-3``: ``torch.optim.AdamW`` (β 0.9/0.95, weight
  decay 0.1 on every parameter);
- ``kfac``, ``ekfac``: natgrad's KFAC / EKFAC optimizers (options ``--kfac-*``); parameters
  K-FAC does not cover get the Adam-style fallback (β 0.9/0.95, lr × ``lr_scale`` =
  ``--fallback-lr``, default the middle AdamW lr 1e-3), and weight decay λ with η·λ equal to
  AdamW's at 1e-3;
- ``kfac-pre``, ``ekfac-pre``: ``KFACPreconditioner`` / ``EKFACPreconditioner`` rewriting the
  gradients of the covered layers before ``torch.optim.AdamW`` (the best AdamW lr of this run,
  else 1e-3).

Reported per method: steps, training seconds, final and best validation loss, the seconds to
reach the best AdamW's final validation loss (and that over AdamW's seconds), per-step wall time
(mean = amortized over factor and eigendecomposition steps; median) and its ratio to the
AdamW steps of the same run, and for the natgrad methods the share of parameters under a
curvature block, per kind of module (from the optimizer's layer list and its fallback list,
after the first forward pass). ``--write`` replaces this script's section of RESULTS.md and
writes the plot (validation loss against steps and against seconds).

Usage (repository root)::

    .venv-bench/bin/python benchmarks/lm.py --write benchmarks/RESULTS.md       # 20 min/method
    .venv-bench/bin/python benchmarks/lm.py --minutes 1 --methods adamw-1e-3,kfac
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, command_line, machine_info, write_section

import natgrad
from natgrad.optim import AdamFallback

__all__ = ["GPT", "METHODS", "Config", "build_model", "coverage", "load_text", "main",
           "run_method"]

HEADING = "## Language model: GPT-style decoder on the standard library's bytes (issue 13)"
ADAMW_LRS = (3e-4, 1e-3, 3e-3)
METHODS = ("adamw-3e-4", "adamw-1e-3", "adamw-3e-3", "kfac", "ekfac", "kfac-pre", "ekfac-pre")
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1


# -- data and model ----------------------------------------------------------------------------
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files at the top level of the standard library (or ``root``), sorted."""
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return sorted(p for p in folder.glob("*.py") if p.is_file())


def load_text(root: str | Path | None = None, held_out: float = 0.1) -> tuple[Tensor, Tensor]:
    """(train, validation) byte tensors (uint8): the files of :func:`stdlib_files`
    concatenated, the last ``held_out`` fraction for validation."""
    data = b"".join(p.read_bytes() for p in stdlib_files(root))
    if len(data) < 1000:
        raise ValueError(f"too little text under {root or 'the standard library'}: "
                         f"{len(data)} bytes")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = int(len(tokens) * (1 - held_out))
    return tokens[:split].clone(), tokens[split:].clone()


class GPT(nn.Module):
    """GPT-style decoder: embeddings (tokens + learned positions), pre-norm
    ``nn.TransformerEncoderLayer`` blocks under a causal mask, a final LayerNorm, and a head
    tied to the token embedding. ``forward(tokens (N, T))`` returns logits (N·T, vocab) if
    ``flat_logits`` else (N, T, vocab)."""

    def __init__(self, vocab: int = 256, layers: int = 4, d_model: int = 256, heads: int = 4,
                 context: int = 128, flat_logits: bool = True) -> None:
        super().__init__()
        self.context, self.flat_logits = context, flat_logits
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        if self.context < T:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}")
        h = self.tokens(tokens) + self.positions(torch.arange(T, device=tokens.device))
        mask = self.causal[:T, :T]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        logits = self.head(self.norm(h))
        return logits.reshape(-1, logits.shape[-1]) if self.flat_logits else logits


def build_model(layers: int = 4, d_model: int = 256, heads: int = 4, context: int = 128,
                seed: int = 0, vocab: int = 256, flat_logits: bool = True) -> GPT:
    """The benchmark's decoder, initialised from ``seed``."""
    torch.manual_seed(seed)
    return GPT(vocab, layers, d_model, heads, context, flat_logits)


def batch_offsets(n_tokens: int, context: int, batch: int, steps: int, seed: int) -> Tensor:
    """(steps, batch) random window starts, the same for every method."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - context - 1, (steps, batch), generator=g)


def windows(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs (B, T) and next-byte targets (B·T,) of the windows at ``starts``."""
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index].long()
    return chunk[:, :-1], chunk[:, 1:].reshape(-1)


def validation_set(val: Tensor, context: int, count: int) -> tuple[Tensor, Tensor]:
    """``count`` evenly spaced windows of the held-out bytes."""
    starts = torch.linspace(0, len(val) - context - 2, count).long()
    return windows(val, starts, context)


@torch.no_grad()
def evaluate(model: GPT, x: Tensor, y: Tensor, chunk: int = 16) -> float:
    """Mean next-byte cross-entropy (nats) on (x, y), in eval mode."""
    model.eval()
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i:i + chunk]).reshape(-1, 256)
        total += float(F.cross_entropy(logits, y[i * x.shape[1]:(i + chunk) * x.shape[1]],
                                       reduction="sum"))
    model.train()
    return total / y.numel()


# -- methods -----------------------------------------------------------------------------------
@dataclass
class Config:
    """One benchmark run's settings (saved with the results)."""

    layers: int = 4
    d_model: int = 256
    heads: int = 4
    context: int = 128
    batch: int = 32
    minutes: float = 20.0
    steps: int | None = None
    eval_every: int = 25
    val_sequences: int = 64
    warmup: float = 0.05
    seed: int = 0
    threads: int = 2
    kfac_lr: float = 0.1
    kfac_damping: float = 1e-2
    kfac_kl_clip: float | None = 1e-3
    kfac_momentum: float = 0.9
    fallback_lr: float = 1e-3  # the Adam fallback's lr (K-FAC lr × lr_scale)
    factor_period: int = 10
    inverse_period: int = 50
    pre_damping: float = 1e-2
    pre_lr: float | None = None  # None: the best AdamW lr of this run, else 1e-3
    methods: tuple[str, ...] = METHODS


@dataclass
class Outcome:
    """What one method's run measured."""

    method: str
    settings: str
    steps: int = 0
    seconds: float = 0.0
    step_times: list[float] = field(default_factory=list)
    step_kinds: list[str] = field(default_factory=list)  # "plain", "factor" or "eig"
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, seconds, val
    coverage: dict[str, tuple[int, int]] | None = None  # kind -> (covered, total) params
    foreign_load: float = 0.0
    skipped: int = 0


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the run, then cosine from 1 to 0.1 at the end."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def coverage(model: nn.Module, preconditioner: natgrad.optim.KFACPreconditioner
             ) -> dict[str, tuple[int, int]]:
    """Per kind of module (a covered layer's kind, else the owning module's class, shared
    parameters as "tied"): (parameters under a curvature block, all trainable parameters).
    Each parameter counts once (tied weights included)."""
    covered = {n for layer in preconditioner.layers for n in layer.param_names if n}
    covered_kind = {n: layer.kind.name for layer in preconditioner.layers
                    for n in layer.param_names if n}
    owners: dict[int, list[str]] = {}
    inside_attention = {id(child) for module in model.modules()
                        if isinstance(module, nn.MultiheadAttention)
                        for child in module.modules()}
    for module in model.modules():
        label = ("MultiheadAttention" if id(module) in inside_attention
                 else type(module).__name__)
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(label)
    table: dict[str, list[int]] = {}
    for name, p in model.named_parameters():  # deduplicated
        if not p.requires_grad:
            continue
        if name in covered:
            kind = covered_kind[name]
        elif len(owners[id(p)]) > 1:
            kind = "tied (" + " + ".join(owners[id(p)]) + ")"
        else:
            kind = owners[id(p)][0]
        entry = table.setdefault(kind, [0, 0])
        entry[1] += p.numel()
        entry[0] += p.numel() if name in covered else 0
    return {k: (v[0], v[1]) for k, v in table.items()}


def _make(method: str, model: GPT, cfg: Config, adamw_lr: float
          ) -> tuple[list[torch.optim.Optimizer], Callable[[], None], object, str]:
    """(optimizers whose groups follow the schedule, the step, the natgrad object, settings)."""
    if method.startswith("adamw-"):
        lr = float(method.split("-", 1)[1])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS,
                                weight_decay=WEIGHT_DECAY)
        return [opt], opt.step, None, f"lr {lr:g}, β {BETAS}, wd {WEIGHT_DECAY}"
    curvature = {"factor_update_period": cfg.factor_period,
                 "inverse_update_period": cfg.inverse_period}
    if method in ("kfac", "ekfac"):
        cls = natgrad.optim.KFAC if method == "kfac" else natgrad.optim.EKFAC
        wd = WEIGHT_DECAY * 1e-3 / cfg.kfac_lr  # η·λ as AdamW's at lr 1e-3
        fallback = AdamFallback(betas=BETAS, lr_scale=cfg.fallback_lr / cfg.kfac_lr)
        opt = cls(model, lr=cfg.kfac_lr, damping=cfg.kfac_damping, momentum=cfg.kfac_momentum,
                  weight_decay=wd, kl_clip=cfg.kfac_kl_clip, fallback=fallback,
                  generator=torch.Generator().manual_seed(cfg.seed), **curvature)
        settings = (f"lr {cfg.kfac_lr:g}, damping {cfg.kfac_damping:g}, kl_clip "
                    f"{cfg.kfac_kl_clip}, momentum {cfg.kfac_momentum:g}, wd {wd:.3g}, "
                    f"periods {cfg.factor_period}/{cfg.inverse_period}, fallback Adam "
                    f"(β {BETAS}, lr × {cfg.fallback_lr / cfg.kfac_lr:g})")
        return [opt], opt.step, opt.preconditioner, settings
    cls_pre = {"kfac-pre": natgrad.optim.KFACPreconditioner,
               "ekfac-pre": natgrad.optim.EKFACPreconditioner}[method]
    pre = cls_pre(model, damping=cfg.pre_damping,
                  generator=torch.Generator().manual_seed(cfg.seed), **curvature)
    opt = torch.optim.AdamW(model.parameters(), lr=adamw_lr, betas=BETAS,
                            weight_decay=WEIGHT_DECAY)

    def step() -> None:
        if pre.step():
            opt.step()

    settings = (f"damping {cfg.pre_damping:g}, periods {cfg.factor_period}/"
                f"{cfg.inverse_period}, then AdamW lr {adamw_lr:g}")
    return [opt], step, pre, settings


def run_method(method: str, cfg: Config, train: Tensor, val_xy: tuple[Tensor, Tensor],
               adamw_lr: float = 1e-3, log: Callable[[str], None] = print) -> Outcome:
    """Train one method from the shared initialisation for ``cfg.minutes`` of training time
    (or ``cfg.steps`` steps), evaluating every ``cfg.eval_every`` steps."""
    model = build_model(cfg.layers, cfg.d_model, cfg.heads, cfg.context, cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallback notices: in the coverage
        opts, step, natgrad_obj, settings = _make(method, model, cfg, adamw_lr)
    out = Outcome(method, settings)
    budget = cfg.minutes * 60
    max_steps = cfg.steps if cfg.steps is not None else 10**9
    offsets = batch_offsets(len(train), cfg.context, cfg.batch, min(max_steps, 100_000),
                            cfg.seed)
    bases = [[g["lr"] for g in o.param_groups] for o in opts]
    load = ForeignLoad()
    load.start()
    out.curve.append((0, 0.0, evaluate(model, *val_xy)))
    while out.steps < max_steps and out.seconds < budget and out.steps < len(offsets):
        progress = (out.steps / max_steps) if cfg.steps is not None else out.seconds / budget
        factor = lr_factor(progress, cfg.warmup)
        for o, base in zip(opts, bases, strict=True):
            for g, lr in zip(o.param_groups, base, strict=True):
                g["lr"] = lr * factor
        x, y = windows(train, offsets[out.steps], cfg.context)
        start = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step()
        elapsed = time.perf_counter() - start
        out.step_times.append(elapsed)
        out.step_kinds.append(step_kind(out.steps, cfg) if natgrad_obj is not None else "plain")
        out.seconds += elapsed
        out.steps += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            log(f"{method}: non-finite loss at step {out.steps}; stopping")
            break
        if out.steps % cfg.eval_every == 0:
            out.curve.append((out.steps, out.seconds, evaluate(model, *val_xy)))
            log(f"{method}: step {out.steps} {out.seconds:.0f}s train {value:.3f} "
                f"val {out.curve[-1][2]:.3f}")
    if out.curve[-1][0] != out.steps:
        out.curve.append((out.steps, out.seconds, evaluate(model, *val_xy)))
    out.foreign_load = load.stop()
    if natgrad_obj is not None:
        out.coverage = coverage(model, natgrad_obj)  # type: ignore[arg-type]
        out.skipped = int(getattr(natgrad_obj, "skipped_steps", 0))
    return out


def step_kind(index: int, cfg: Config) -> str:
    """What a natgrad method's step ``index`` (from 0) does besides the plain step: "eig"
    (factors and eigendecompositions), "factor" (factor and EK-FAC scale update) or "plain"."""
    if index % cfg.inverse_period == 0:
        return "eig"
    return "factor" if index % cfg.factor_period == 0 else "plain"


def cycle_cost(o: Outcome, cfg: Config) -> float:
    """Amortized step time over one eigendecomposition period from the medians of the plain,
    factor and eig steps: (n_p·plain + n_f·factor + eig) / inverse_period, with
    n_f = ⌈inverse/factor⌉ − 1 factor steps; NaN if a kind was not measured."""
    medians = {}
    for kind in ("plain", "factor", "eig"):
        times = [t for t, k in zip(o.step_times, o.step_kinds, strict=True) if k == kind]
        medians[kind] = statistics.median(times) if times else math.nan
    period = cfg.inverse_period
    n_factor = len(range(0, period, cfg.factor_period)) - 1
    n_plain = period - 1 - n_factor
    if n_factor == 0:
        medians["factor"] = 0.0
    return (n_plain * medians["plain"] + n_factor * medians["factor"] + medians["eig"]) / period


# -- the experiment ------------------------------------------------------------------------------
def time_to(curve: Sequence[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at the first evaluation with validation loss ≤ ``target``."""
    return next((s for _, s, v in curve if v <= target), None)


def run(cfg: Config, log: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(cfg.threads)
    train, val = load_text()
    val_xy = validation_set(val, cfg.context, cfg.val_sequences)
    outcomes: dict[str, Outcome] = {}
    for method in cfg.methods:
        adamw = {m: o for m, o in outcomes.items() if m.startswith("adamw-")}
        best_lr = (float(min(adamw, key=lambda m: adamw[m].curve[-1][2]).split("-", 1)[1])
                   if adamw else 1e-3)
        lr = cfg.pre_lr if cfg.pre_lr is not None else best_lr
        log(f"== {method}")
        outcomes[method] = run_method(method, cfg, train, val_xy, lr, log)
    return {"config": cfg, "outcomes": outcomes, "train_bytes": len(train),
            "val_bytes": len(val), "files": len(stdlib_files())}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


def render(res: dict, command: str, plot: str | None) -> str:
    cfg: Config = res["config"]
    outcomes: dict[str, Outcome] = res["outcomes"]
    adamw = {m: o for m, o in outcomes.items() if m.startswith("adamw-")}
    best = min(adamw.values(), key=lambda o: o.curve[-1][2]) if adamw else None
    adam_step = (statistics.fmean(t for o in adamw.values() for t in o.step_times)
                 if adamw else float("nan"))
    target = best.curve[-1][2] if best else float("nan")
    budget = (f"{cfg.steps} steps" if cfg.steps is not None else
              f"{cfg.minutes:g} min of training time")
    smoke = (cfg.steps is not None or cfg.minutes < 20 or cfg.layers != 4 or cfg.d_model != 256
             or cfg.batch != 32 or cfg.context != 128)
    lines = [
        *(["**Smoke run** (smaller budget or model than the issue's 20 minutes per method on "
           "the 4-layer d 256 model): the format and the costs, not the benchmark's result.",
           ""] if smoke else []),
        f"Command: `{command}`", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items()), "",
        f"Model: GPT-style decoder, {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} "
        f"heads, context {cfg.context}, tied embedding/head, pre-norm "
        f"(`nn.TransformerEncoderLayer`), {sum(p.numel() for p in build_model(cfg.layers, cfg.d_model, cfg.heads, cfg.context).parameters()):,} "  # noqa: E501
        f"parameters. Data: {res['files']} top-level stdlib `.py` files, {res['train_bytes']:,} "
        f"training / {res['val_bytes']:,} validation bytes; batch {cfg.batch} sequences; "
        f"validation on {cfg.val_sequences} fixed windows every {cfg.eval_every} steps. "
        f"Budget per method: {budget}; warm-up {cfg.warmup:g} of the run, then cosine to 0.1. "
        "Step time = zero_grad + forward + backward + update (evaluation not counted); "
        "mean = over the steps taken; for natgrad the medians of plain, factor-update and "
        "eigendecomposition steps, and the cycle cost (plain·n_p + factor·n_f + eig) / "
        f"{cfg.inverse_period} of one eigendecomposition period (factors every "
        f"{cfg.factor_period} steps), both against the mean AdamW step of this run.", "",
        "| method | settings | steps | train s | final val | best val | s to AdamW's final "
        "| × AdamW's s | mean step ms | median ms | plain / factor / eig ms | mean × AdamW "
        "| cycle × AdamW | covered | other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes.values():
        final, best_val = o.curve[-1][2], min(v for _, _, v in o.curve)
        reach = time_to(o.curve, target)
        ratio = "–" if reach is None or best is None else f"{reach / best.seconds:.2f}"
        mean, median = statistics.fmean(o.step_times), statistics.median(o.step_times)
        cov = "–"
        if o.coverage:
            cov = f"{sum(c for c, _ in o.coverage.values()) / sum(t for _, t in o.coverage.values()):.1%}"  # noqa: E501
        name = f"**{o.method}**" if o is best else o.method
        kinds, cycle = "–", "–"
        if o.coverage is not None:
            kinds = " / ".join(
                _ms(statistics.median(ts)) if ts else "–"
                for ts in ([t for t, k in zip(o.step_times, o.step_kinds, strict=True)
                            if k == kind] for kind in ("plain", "factor", "eig")))
            c = cycle_cost(o, cfg)
            cycle = "–" if math.isnan(c) else f"{c / adam_step:.2f}"
        lines.append(
            f"| {name} | {o.settings} | {o.steps} | {o.seconds:.0f} | {final:.3f} | "
            f"{best_val:.3f} | {'–' if reach is None else f'{reach:.0f}'} | {ratio} | "
            f"{_ms(mean)} | {_ms(median)} | {kinds} | {mean / adam_step:.2f} | {cycle} | "
            f"{cov} | {o.foreign_load:.0%} |")
    covs = {m: o.coverage for m, o in outcomes.items() if o.coverage}
    if covs:
        method, cov = next(iter(covs.items()))
        total = sum(t for _, t in cov.values())
        lines += ["", f"Parameters under a curvature block, per kind ({method}; the same for "
                  "every natgrad method unless noted):", "",
                  "| kind | parameters | share of all | under a curvature block |",
                  "|---|---:|---:|---:|"]
        for kind, (c, t) in sorted(cov.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {kind} | {t:,} | {t / total:.1%} | {c / t:.0%} |")
        differ = [m for m, c in covs.items() if c != cov]
        if differ:
            lines.append(f"\nCoverage differs for: {', '.join(differ)}")
    natgrad_runs = [o for m, o in outcomes.items() if not m.startswith("adamw-")]
    if best and natgrad_runs:
        lines += ["", "| goal | best natgrad method | measured | bound | result |",
                  "|---|---|---:|---:|---|"]
        reach = {o.method: time_to(o.curve, target) for o in natgrad_runs}
        fastest = min(natgrad_runs, key=lambda o: reach[o.method] or math.inf)
        r = reach[fastest.method]
        value = math.inf if r is None else r / best.seconds
        lines.append(f"| wall-clock to AdamW's final val loss {target:.3f} | {fastest.method} | "
                     f"{value:.2f} | ≤ 0.7 | {'PASS' if value <= 0.7 else 'FAIL'} |")
        def amortized(o: Outcome) -> float:
            c = cycle_cost(o, cfg)
            return statistics.fmean(o.step_times) if math.isnan(c) else c

        cheapest = min(natgrad_runs, key=amortized)
        cost = amortized(cheapest) / adam_step
        lines.append(f"| amortized step cost × AdamW (cycle, else mean) | {cheapest.method} | "
                     f"{cost:.2f} | ≤ 1.5 | {'PASS' if cost <= 1.5 else 'FAIL'} |")
        share = max(sum(c for c, _ in o.coverage.values()) / sum(t for _, t in o.coverage.values())
                    for o in natgrad_runs if o.coverage)
        lines.append(f"| parameters under a curvature block | all | {share:.1%} | ≥ 95% | "
                     f"{'PASS' if share >= 0.95 else 'FAIL'} |")
    if plot:
        lines += ["", f"![validation loss against steps and seconds]({plot})"]
    skipped = {o.method: o.skipped for o in outcomes.values() if o.skipped}
    if skipped:
        lines.append(f"\nSkipped (non-finite) steps: {skipped}")
    return "\n".join(lines) + "\n"


def plot_curves(outcomes: dict[str, Outcome], path: Path) -> None:
    """Validation loss against steps (left) and training seconds (right), matplotlib Agg."""
    from matplotlib.figure import Figure

    from natgrad.cli.plots import save_figure

    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for o in outcomes.values():
        steps, seconds, loss = zip(*o.curve, strict=True)
        style = "--" if o.method.startswith("adamw-") else "-"
        line = axes[0].plot(steps, loss, style, label=o.method, lw=1.5)[0]
        axes[1].plot(seconds, loss, style, color=line.get_color(), lw=1.5)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel("validation loss (nats/byte)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("GPT-style byte LM on the standard library: validation loss")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    for name in ("layers", "d_model", "heads", "context", "batch", "eval_every",
                 "val_sequences", "seed", "threads", "factor_period", "inverse_period"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    for name in ("minutes", "warmup", "kfac_lr", "kfac_damping", "kfac_momentum",
                 "fallback_lr", "pre_damping"):
        parser.add_argument("--" + name.replace("_", "-"), type=float,
                            default=getattr(defaults, name))
    parser.add_argument("--steps", type=int, default=None, help="steps per method (overrides "
                        "the time budget)")
    parser.add_argument("--kfac-kl-clip", type=float, default=defaults.kfac_kl_clip,
                        help="κ (0: no clipping)")
    parser.add_argument("--pre-lr", type=float, default=None,
                        help="AdamW lr under the preconditioners (default: best AdamW lr)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--write", type=Path, help="replace this script's section of this "
                        "RESULTS.md (and write the plot next to it)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="plot path (default with --write: benchmarks/lm.png)")
    parser.add_argument("--json", type=Path, help="dump every curve and step time here")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    values = {k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)}
    values["methods"] = methods
    values["kfac_kl_clip"] = args.kfac_kl_clip or None
    return Config(**values), args


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    res = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    plot = args.plot or (args.write.parent / "lm.png" if args.write else None)
    if plot is not None:
        plot_curves(res["outcomes"], plot)
    text = render(res, command_line("lm.py") if argv is None else
                  "benchmarks/lm.py " + " ".join(argv), plot.name if plot else None)
    print(f"{HEADING}\n\n{text}")
    if args.json:
        args.json.write_text(json.dumps({m: asdict(o) for m, o in res["outcomes"].items()}))
    if args.write:
        write_section(args.write, HEADING, text)
    return res


if __name__ == "__main__":
    main()
