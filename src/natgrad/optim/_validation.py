"""Hyperparameter checks shared by natgrad's optimizers: ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "check_choice", "check_nonnegative", "check_own_parameters", "check_positive", "grads_finite",
]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float; ``ValueError`` unless finite and ≥ 0."""
    number = _number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def check_positive(name: str, value: object) -> float:
    """``value`` as a float; ``ValueError`` unless finite and > 0."""
    number = _number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; ``ValueError`` listing them otherwise."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def check_own_parameters(groups: Iterable[dict], names: dict[int, str], owner: str) -> None:
    """``ValueError`` if a parameter of ``groups`` is not among the model's (``names``: id →
    name of ``model.named_parameters()``), naming its group, position and shape."""
    for i, group in enumerate(groups):
        for j, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(
                    f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)}) is not a "
                    f"parameter of the model given to {owner}: pass the model's own parameters "
                    "(e.g. model.named_parameters() filtered by name)"
                )


def grads_finite(params: Iterable[Tensor]) -> bool:
    """Whether every existing ``.grad`` among ``params`` is finite.

    Fast path: one sum per gradient, one check per (device, dtype) — a sum is finite
    whenever all its terms are, unless it overflows; a non-finite sum is settled element by
    element, so the answer is exact either way.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        if bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
            continue
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return False
    return True
