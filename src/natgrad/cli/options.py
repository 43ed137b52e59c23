"""Command-line options shared by the subcommands, with their argparse value checks.

Every numeric option is checked by its ``type`` (``argparse`` then names the option and exits
with status 2), so bad values are refused before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from natgrad.cli.device import add_device_option
from natgrad.cli.launch import add_launch_options
from natgrad.cli.optimizers import ADAPTIVE, DAMPING_MODES, NGD_STRUCTURES, OPTIMIZERS
from natgrad.cli.tasks import TASKS
from natgrad.cli.user_code import add_user_code_options

__all__ = [
    "PerOptimizer",
    "add_data_options",
    "add_hyperparameter_options",
    "add_output_options",
    "fraction",
    "int_at_least",
    "nonnegative_float",
    "positive_float",
]


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def learning_rate(text: str) -> float | str:
    """A finite number > 0, or "adaptive" (kfac, ekfac: no lr, the adaptive step)."""
    return ADAPTIVE if text == ADAPTIVE else positive_float(text)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (momentum)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def whitening_rank(text: str) -> int | float | str | None:
    """PRONG's low-rank whitening (``natgrad.nn.whiten(model, rank=...)``): "auto", "full"
    (None), a fraction in (0, 1) of each layer's input size, or an integer rank >= 1."""
    if text in ("auto", "full"):
        return "auto" if text == "auto" else None
    problem = f"must be auto, full, a fraction in (0, 1) or an integer >= 1, got {text}"
    try:
        rank = int(text)
    except ValueError:
        value = _float(text)
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(problem) from None
        return value
    if rank < 1:
        raise argparse.ArgumentTypeError(problem)
    return rank


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def structure(text: str) -> str:
    if text not in NGD_STRUCTURES:
        raise argparse.ArgumentTypeError(
            f"invalid choice {text!r} (choose from {', '.join(NGD_STRUCTURES)})")
    return text


def damping_mode(text: str) -> str:
    if text not in DAMPING_MODES:
        raise argparse.ArgumentTypeError(
            f"invalid choice {text!r} (choose from {', '.join(DAMPING_MODES)})")
    return text


class PerOptimizer:
    """``VALUE`` (for every optimizer that uses the setting) or ``OPT=VALUE,OPT=VALUE``."""

    def __init__(self, parse: Callable[[str], Any]) -> None:
        self.parse = parse

    def __call__(self, text: str) -> dict[str, Any]:
        if "=" not in text:
            return {"*": self.parse(text)}
        values: dict[str, Any] = {}
        for item in text.split(","):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in OPTIMIZERS:
                raise argparse.ArgumentTypeError(
                    f"expected VALUE or OPTIMIZER=VALUE,... with optimizers from "
                    f"{', '.join(OPTIMIZERS)}; got {item!r}")
            values[name] = self.parse(value.strip())
        return values


_HYPER: tuple[tuple[str, Callable[[str], Any], str, str], ...] = (
    ("lr", learning_rate, "LR",
     "learning rate η (> 0), or 'adaptive' (kfac, ekfac: step size and momentum chosen every "
     "step from the exact Fisher's quadratic model, the library's default; --momentum and "
     "--damping then default to chosen and 1e-2, --kl-clip to off)"),
    ("momentum", fraction, "MU", "momentum μ in [0, 1) (sgd, ngd, kfac, ekfac, prong)"),
    ("damping", nonnegative_float, "DELTA",
     "damping δ in (F + δI)⁻¹ (ngd, kfac, ekfac; >= 0)"),
    ("weight_decay", nonnegative_float, "L2", "weight decay λ (>= 0)"),
    ("factor_update_period", int_at_least(1), "T",
     "update K-FAC's factors every T steps (kfac, ekfac)"),
    ("inverse_update_period", int_at_least(1), "T",
     "refresh the factors' eigendecompositions every T steps (kfac, ekfac)"),
    ("damping_mode", damping_mode, "MODE",
     "kfac's damping: exact (in the Kronecker eigenbasis) or factored (Tikhonov, split "
     "between the factors; cheaper per step)"),
    ("kl_clip", nonnegative_float, "KAPPA",
     "scale K-FAC steps so that η²⟨(F̂ + δI)⁻¹∇L, ∇L⟩ (twice their predicted KL change, "
     "docs/math.md §10) stays <= KAPPA (kfac, ekfac; 0 = off)"),
    ("prong_period", int_at_least(1), "T",
     "re-estimate the whitening every T steps (prong, prong-adam)"),
    ("num_samples", int_at_least(2), "N",
     "examples per whitening re-estimation (prong, prong-adam; >= 2)"),
    ("prong_rank", whitening_rank, "K",
     "low-rank whitening (prong, prong-adam): whiten the leading K directions of each layer "
     "(K an integer, or a fraction of the layer's input size), 'full', or 'auto' (the "
     "default: full below 128 inputs, else at most 2 sqrt(in) directions)"),
    ("epsilon", positive_float, "EPS",
     "ε added to the covariance eigenvalues (prong, prong-adam; > 0)"),
    ("structure", structure, "S",
     f"Fisher structure of ngd's solve ({', '.join(NGD_STRUCTURES)})"),
)


def add_hyperparameter_options(parser: argparse.ArgumentParser, per_optimizer: bool) -> None:
    """The optimizer settings; with ``per_optimizer`` each also accepts OPT=VALUE lists.
    Unset options are ``None`` (the optimizer's default applies)."""
    group = parser.add_argument_group(
        "optimizer settings" + (" (VALUE for all, or OPT=VALUE,OPT=VALUE)" if per_optimizer
                                else " (default: per optimizer, see below)"))
    for key, parse, metavar, text in _HYPER:
        group.add_argument("--" + key.replace("_", "-"), dest=key, metavar=metavar,
                           type=PerOptimizer(parse) if per_optimizer else parse,
                           default=None, help=text)


def hyperparameters_given(args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer settings given on the command line (``None`` for those not given)."""
    return {key: getattr(args, key) for key, *_ in _HYPER}


def add_data_options(parser: argparse.ArgumentParser, default_task: str | None) -> None:
    """--task, --data-dir, --model, --data and --device."""
    parser.add_argument("--task", choices=list(TASKS), default=None,
                        help=f"benchmark task (default: {default_task or 'digits-autoencoder'})")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder with the four MNIST-format IDX files, for the fashion-* "
                             "tasks (default: /usr/share/datasets/fashion-mnist)")
    add_user_code_options(parser)
    add_device_option(parser)


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    """--seed, --steps/--epochs, --batch-size, --eval-every, --threads."""
    parser.add_argument("--seed", type=int_at_least(0), default=None,
                        help="seed of the initialisation, data order and sampling (default 0)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int_at_least(1), default=None,
                        help="number of optimizer steps (default 500)")
    length.add_argument("--epochs", type=int_at_least(1), default=None,
                        help="number of passes over the training set instead of --steps")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None,
                        help="examples per step (default 100 for digits, 250 for fashion)")
    parser.add_argument("--eval-every", type=int_at_least(1), default=None,
                        help="evaluate train/test loss every N steps (default 25)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: 1 for digits-* tasks, whose tiny "
                             "matrix products only lose time to threading; torch's choice "
                             "otherwise)")
    from natgrad.cli.schedule import add_loop_options  # it uses this module's value checks

    add_loop_options(parser)


def add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--out, --overwrite, --resume, --progress-every, --nproc-per-node."""
    parser.add_argument("--out", default=None, metavar="DIR", help=f"output folder {what}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the results in an existing output folder")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run(s) in the output folder from the checkpoint")
    parser.add_argument("--progress-every", type=positive_float, default=30.0,
                        metavar="SECONDS",
                        help="when standard error is not a terminal (a log file, a batch job), "
                             "print a progress line every SECONDS (default 30)")
    add_launch_options(parser)
