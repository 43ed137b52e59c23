"""Training-loop settings of ``natgrad train``/``compare``: the learning-rate schedule with
warm-up, gradient-norm clipping and periodic checkpoints.

Learning rate of step k (k = 0, 1, …, T − 1 with T = ``--steps``), for every parameter group
with base rate η (the optimizer's ``--lr``):

    η_k = η · w_k · s_k,   w_k = min(1, (k + 1) / W)        (linear warm-up over W steps)

    s_k = 1                                            constant
    s_k = m + (1 − m) · ½ (1 + cos(π t)),  t = clip((k − W) / (T − W), 0, 1)    cosine (to m)
    s_k = γ^⌊k / S⌋                                    step (× γ every S steps)

with W = ``--warmup-steps``, m = ``--lr-min`` (a fraction of η), γ = ``--lr-gamma``,
S = ``--lr-step-every`` (Loshchilov & Hutter 2017 for the cosine; Goyal et al. 2017 for the
warm-up). η_k is a function of k alone, so a resumed run continues the schedule exactly (a
cosine stretches to a larger ``--steps`` given at ``--resume``). The rate is written into each
``param_group["lr"]`` before the step: K-FAC's KL clip and momentum see the scheduled rate.

Clipping (``--clip-grad-norm C``) rescales the gradient ∇L to ‖∇L‖₂ ≤ C
(``torch.nn.utils.clip_grad_norm_``) after ``backward`` and before ``optimizer.step()``; for
K-FAC/EK-FAC/NGD this is the raw gradient, before preconditioning (``--kl-clip`` bounds the
preconditioned step).

``--checkpoint-every N`` saves ``checkpoint.pt`` every N steps as well as at each evaluation;
``--keep-last K`` also keeps the K most recent saves as ``checkpoints/step-NNNNNNN.pt``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from natgrad.cli.options import int_at_least, nonnegative_float, positive_float
from natgrad.cli.records import (
    CHECKPOINT,
    LOOP_MAY_CHANGE,
    METRICS,
    RunFileError,
    atomic_write,
    read_metrics,
)

__all__ = ["SCHEDULES", "LoopSettings", "add_loop_options", "keep_copy", "loop_settings",
           "lr_factor"]

SCHEDULES = ("constant", "cosine", "step")
HISTORY = "checkpoints"


@dataclass(frozen=True)
class LoopSettings:
    """The loop settings of one run (saved in config.json as ``loop``)."""

    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_min: float = 0.0
    lr_step_every: int | None = None
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = None
    checkpoint_every: int | None = None
    keep_last: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        if self.lr_schedule == "step" and self.lr_step_every is None:
            raise ValueError("--lr-schedule step needs --lr-step-every N (multiply the rate "
                             "by --lr-gamma every N steps)")
        if self.lr_schedule != "step" and self.lr_step_every is not None:
            raise ValueError("--lr-step-every applies to --lr-schedule step only")
        if self.lr_schedule != "cosine" and self.lr_min:
            raise ValueError("--lr-min applies to --lr-schedule cosine only")
        if not 0 <= self.lr_min <= 1:
            raise ValueError(f"--lr-min must lie in [0, 1] (a fraction of --lr), got "
                             f"{self.lr_min}")
        if self.keep_last and self.checkpoint_every is None:
            raise ValueError("--keep-last needs --checkpoint-every N")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LoopSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


def lr_factor(step: int, total: int, s: LoopSettings) -> float:
    """w_k · s_k of the module docstring for step ``step`` (0-based) of ``total``."""
    warm = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
    if s.lr_schedule == "cosine":
        span = max(total - s.warmup_steps, 1)
        t = min(max((step - s.warmup_steps) / span, 0.0), 1.0)
        return warm * (s.lr_min + (1 - s.lr_min) * 0.5 * (1 + math.cos(math.pi * t)))
    if s.lr_schedule == "step":
        assert s.lr_step_every is not None
        return warm * s.lr_gamma ** (step // s.lr_step_every)
    return warm


def _fraction(text: str) -> float:
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    """The schedule, clipping, checkpoint and TensorBoard options (all default ``None``:
    unset, see :func:`loop_settings`)."""
    group = parser.add_argument_group("training loop (the same for every optimizer)")
    group.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                       help="learning-rate schedule after the warm-up (default constant)")
    group.add_argument("--warmup-steps", type=int_at_least(0), default=None, metavar="W",
                       help="raise the rate linearly over the first W steps (default 0)")
    group.add_argument("--lr-min", type=_fraction, default=None, metavar="M",
                       help="cosine: final rate as a fraction of --lr (default 0)")
    group.add_argument("--lr-step-every", type=int_at_least(1), default=None, metavar="S",
                       help="step: multiply the rate by --lr-gamma every S steps")
    group.add_argument("--lr-gamma", type=positive_float, default=None, metavar="G",
                       help="step: the factor (default 0.1)")
    group.add_argument("--clip-grad-norm", type=positive_float, default=None, metavar="C",
                       help="rescale the gradient to norm <= C before each step (default off)")
    group.add_argument("--checkpoint-every", type=int_at_least(1), default=None, metavar="N",
                       help="also save checkpoint.pt every N steps (default: at evaluations)")
    group.add_argument("--keep-last", type=int_at_least(0), default=None, metavar="K",
                       help="keep the K most recent periodic checkpoints as "
                            "checkpoints/step-NNNNNNN.pt (default 0)")
    group.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                       default=None, help="do not write TensorBoard event files (written "
                                          "next to metrics.csv when tensorboard is installed)")


def loop_settings(args: argparse.Namespace, saved: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The loop settings of ``args`` over ``saved`` (a resumed run's, which may only change
    the checkpoint and TensorBoard options) or the defaults; raises ``ValueError``."""
    given = {f.name: getattr(args, f.name, None) for f in fields(LoopSettings)}
    given = {k: v for k, v in given.items() if v is not None}
    if saved is None:
        return asdict(LoopSettings(**given))
    base = asdict(LoopSettings.from_dict(saved))
    for key, value in given.items():
        if key not in LOOP_MAY_CHANGE and value != base[key]:
            raise ValueError(f"--{key.replace('_', '-')} {value} differs from the saved run's "
                             f"{base[key]}; a resumed run keeps its schedule")
    return asdict(LoopSettings(**{**base, **given}))


def keep_copy(checkpoint: Path, step: int, keep_last: int) -> None:
    """Copy ``checkpoint`` to checkpoints/step-NNNNNNN.pt beside it and delete all but the
    ``keep_last`` most recent copies."""
    if keep_last <= 0:
        return
    folder = checkpoint.parent / HISTORY
    folder.mkdir(exist_ok=True)
    target = folder / f"step-{step:07d}.pt"
    with open(checkpoint, "rb") as source:  # a new temporary file, renamed into place
        atomic_write(target, lambda f: shutil.copyfileobj(source, f))
    for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
        old.unlink()


def clear_history(out: Path) -> None:
    """Remove the periodic copies of an earlier run in ``out`` (a fresh run, not a resume)."""
    folder = out / HISTORY
    if folder.is_dir():
        for old in folder.glob("step-*.pt*"):
            old.unlink()


def refuse_lost_checkpoint(out: Path) -> None:
    """For ``--resume`` of a folder without ``checkpoint.pt``: :class:`RunFileError` if the run
    in ``out`` had got past its start (metrics.csv rows after step 0, or kept copies in
    checkpoints/), naming the missing file and the copies to resume from. Only a run stopped
    before its first checkpoint may start again from step 0 (which clears those copies)."""
    kept = sorted(p.name for p in (out / HISTORY).glob("step-*.pt")) if (
        out / HISTORY).is_dir() else []
    last = _last_recorded_step(out / METRICS)
    if not kept and not last:
        return
    done = []
    if last:
        done.append(f"{METRICS} records {'results' if last < 0 else f'steps up to {last}'}")
    if kept:
        done.append(f"{HISTORY}/ keeps {', '.join(kept)}")
    fix = (f"copy the save to continue from over it (e.g. cp {out / HISTORY / kept[-1]} "
           f"{out / CHECKPOINT})" if kept else f"restore {CHECKPOINT}")
    raise RunFileError(f"--resume: {out / CHECKPOINT} is missing, but the run in {out} got "
                       f"past its start ({'; '.join(done)}); {fix}, or start again with "
                       "--overwrite; nothing was changed")


def _last_recorded_step(path: Path) -> int:
    """The last step in the metrics file ``path`` (0 if it is missing or ends at step 0; -1
    if it exists but cannot be read: it may hold results)."""
    if not path.exists():
        return 0
    try:
        rows = read_metrics(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return -1
    return max((int(row["step"] or 0) for row in rows), default=0)
