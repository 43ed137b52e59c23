"""The optimizers the CLI offers, their default hyperparameters, and how each is built.

``prong`` is the whitened model (:func:`natgrad.nn.whiten`) trained by SGD with momentum, its
whitening re-estimated by :class:`natgrad.nn.PRONG` every ``prong_period`` steps (momentum
buffers mapped to the new coordinates); ``prong-adam`` is the same with Adam (moments reset
at each re-estimation). ``ngd`` solves with conjugate gradient on exact Fisher-vector products
of the batch ("matrix_free"): the dense Fisher of a real network does not fit in memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from natgrad import distributed
from natgrad.nn import PRONG, whiten
from natgrad.optim import EKFAC, KFAC, NGD

__all__ = [
    "DAMPING_MODES",
    "DEFAULTS",
    "HYPERPARAMETERS",
    "NGD_STRUCTURES",
    "OPTIMIZERS",
    "PRONG_OPTIMIZERS",
    "SampleSource",
    "Training",
    "build_training",
    "defaults_help",
    "resolve_hyperparameters",
    "validate_hyperparameters",
]

OPTIMIZERS = ("sgd", "adam", "ngd", "kfac", "ekfac", "prong", "prong-adam")
PRONG_OPTIMIZERS = ("prong", "prong-adam")
DAMPING_MODES = ("exact", "factored")
NGD_STRUCTURES = ("matrix_free", "dense", "block_diagonal", "diagonal", "kfac", "ekfac")

ADAPTIVE = "adaptive"
"""``--lr adaptive``: KFAC/EKFAC built without lr (α, μ from the exact-Fisher model)."""

HYPERPARAMETERS = ("lr", "momentum", "damping", "weight_decay", "factor_update_period",
                   "inverse_update_period", "damping_mode", "kl_clip", "prong_period",
                   "prong_rank", "num_samples", "epsilon", "structure")
"""Every tunable setting, by its keyword (the option is ``--`` + the name with dashes)."""

_KFAC = {"lr": 0.3, "momentum": 0.9, "damping": 0.3, "weight_decay": 0.0,
         "factor_update_period": 1, "inverse_update_period": 10, "kl_clip": 3e-3}
_PRONG = {"prong_period": 100, "num_samples": 1000, "epsilon": 1.0, "weight_decay": 0.0,
          "prong_rank": "auto"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 0.01, "weight_decay": 0.0},
    "ngd": {"lr": 0.3, "momentum": 0.0, "damping": 1.0, "weight_decay": 0.0,
            "structure": "matrix_free"},
    "kfac": {**_KFAC, "damping_mode": "exact"},
    "ekfac": dict(_KFAC),
    "prong": {"lr": 0.1, "momentum": 0.9, **_PRONG},
    "prong-adam": {"lr": 0.01, **_PRONG},
}
"""Per optimizer: the settings it uses and their defaults (a setting it does not use is an
error when given for that optimizer alone)."""


def option_name(key: str) -> str:
    """The command-line option of a hyperparameter keyword: ``lr`` → ``--lr``."""
    return "--" + key.replace("_", "-")


def defaults_help() -> str:
    """One line per optimizer listing its defaults, for ``--help``."""
    lines = []
    for name, values in DEFAULTS.items():
        items = ", ".join(f"{option_name(k)} {v:g}" if isinstance(v, float) else
                          f"{option_name(k)} {v}" for k, v in values.items())
        lines.append(f"  {name:<11} {items}")
    return ("per-optimizer defaults (tuned on digits-autoencoder with batch 100):\n"
            + "\n".join(lines))


def resolve_hyperparameters(
    optimizer: str, given: dict[str, Any], strict: bool = True
) -> dict[str, Any]:
    """The optimizer's defaults updated with the ``given`` values (``None`` = not given).

    Raises:
        ValueError: with ``strict``, a given setting the optimizer does not use (naming the
            option and the optimizers that use it).
    """
    values = dict(DEFAULTS[optimizer])
    if given.get("lr") == ADAPTIVE and optimizer in ("kfac", "ekfac"):
        # the library's adaptive defaults: μ chosen, δ 1e-2, no KL clip
        values.update(momentum=None, damping=None, kl_clip=0.0)
    for key, value in given.items():
        if value is None:
            continue
        if key not in values:
            if strict:
                users = [o for o, d in DEFAULTS.items() if key in d]
                raise ValueError(f"{option_name(key)} does not apply to {optimizer} "
                                 f"(it applies to: {', '.join(users)})")
            continue
        values[key] = value
    return values


class SampleSource:
    """PRONG's data: each pass yields one batch of ``num_samples`` training examples drawn
    without replacement, from a generator seeded by (``seed``, pass number), so runs and
    resumed runs see the same samples. ``draws`` counts the passes made.

    Under torch.distributed every rank draws the same permutation and yields its own part of
    it: rank r the examples at positions [r·m, (r + 1)·m) with m = ⌈num_samples / world size⌉,
    the share PRONG reads on each rank. The ranks' parts are distinct, so the moments summed
    over the ranks are those of the first world size · m examples of the draw: with
    ``num_samples`` divisible by the ranks, exactly the ``num_samples`` examples a single
    process uses."""

    def __init__(self, x: Tensor, num_samples: int, seed: int, draws: int = 0) -> None:
        self.x = x
        self.num_samples = min(num_samples, x.shape[0])
        self.seed = seed
        self.draws = draws

    def __iter__(self) -> Iterator[Tensor]:
        state = np.random.SeedSequence([self.seed, 1, self.draws]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        self.draws += 1
        order = torch.randperm(self.x.shape[0], generator=generator)
        yield self.x[order[self.share()]]

    def share(self) -> slice:
        """The positions of the draw this rank yields (all of ``num_samples`` when alone)."""
        world = distributed.world_size()
        if world == 1:
            return slice(0, self.num_samples)
        per_rank = math.ceil(self.num_samples / world)
        start = distributed.rank() * per_rank
        return slice(start, start + per_rank)


@dataclass
class Training:
    """What one step needs: the (possibly whitened) model, the optimizer, and PRONG's
    re-estimation (or ``None``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    prong: PRONG | None


def build_training(
    optimizer: str,
    model: nn.Module,
    hp: dict[str, Any],
    likelihood: str,
    generator: torch.Generator,
    prong_data: SampleSource | list[Tensor],
    initial: bool = True,
) -> Training:
    """Build ``optimizer`` for ``model`` with hyperparameters ``hp`` (as resolved).

    ``generator`` drives Monte-Carlo Fisher samples (K-FAC, EK-FAC, NGD); ``prong_data`` is
    PRONG's source of examples, ``initial`` whether PRONG whitens once at construction (not
    when a checkpoint will be loaded). Raises ``ValueError`` for a bad hyperparameter.
    """
    wd = hp.get("weight_decay", 0.0)
    if hp.get("lr") == ADAPTIVE and optimizer not in ("kfac", "ekfac"):
        raise ValueError(f"lr must be a number for {optimizer}: '{ADAPTIVE}' applies to kfac "
                         "and ekfac")
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=wd)
        return Training(model, opt, None)
    if optimizer == "adam":
        return Training(model, torch.optim.Adam(model.parameters(), lr=hp["lr"],
                                                weight_decay=wd), None)
    if optimizer == "ngd":
        opt = NGD(model, lr=hp["lr"], damping=hp["damping"], likelihood=likelihood,
                  structure=hp["structure"], momentum=hp["momentum"], weight_decay=wd,
                  generator=generator)
        return Training(model, opt, None)
    if optimizer in ("kfac", "ekfac"):
        cls = KFAC if optimizer == "kfac" else EKFAC
        mode = {"damping_mode": hp["damping_mode"]} if optimizer == "kfac" else {}
        lr = None if hp["lr"] == ADAPTIVE else hp["lr"]
        opt = cls(model, lr=lr, damping=hp["damping"], likelihood=likelihood,
                  momentum=hp["momentum"], weight_decay=wd,
                  factor_update_period=hp["factor_update_period"],
                  inverse_update_period=hp["inverse_update_period"],
                  kl_clip=hp.get("kl_clip") or None, generator=generator, **mode)
        return Training(model, opt, None)
    if optimizer not in PRONG_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    model = whiten(model, rank=hp.get("prong_rank"))
    if optimizer == "prong":
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=wd)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=wd)
    prong = PRONG(model, prong_data, period=hp["prong_period"], num_samples=hp["num_samples"],
                  epsilon=hp["epsilon"], optimizer=opt,
                  optimizer_state="transform" if optimizer == "prong" else "reset",
                  initial=initial)
    return Training(model, opt, prong)


_NAME = re.compile(r"^([a-z_]+) must")


def validate_hyperparameters(optimizer: str, hp: dict[str, Any], likelihood: str) -> None:
    """Construct the optimizer on a tiny stand-in model so that every hyperparameter is
    checked before any data is loaded. Raises ``ValueError`` naming the option."""
    proxy = nn.Sequential(nn.Linear(2, 2))
    try:
        build_training(optimizer, proxy, hp, likelihood, torch.Generator(), [], initial=False)
    except ValueError as err:
        message = str(err)
        match = _NAME.match(message)
        if match:
            key = {"period": "prong_period"}.get(match.group(1), match.group(1))
            message = f"{option_name(key)}: {message}"
        raise ValueError(message) from None
