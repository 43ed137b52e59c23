"""Hyperparameter checks shared by natgrad's optimizers: ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from natgrad._model_check import check_model

__all__ = [
    "check_choice", "check_generator_state", "check_model", "check_ngd_state", "check_nonnegative",
    "check_optimizer_state",
    "check_own_parameters", "check_positive", "grads_finite", "tensors_finite",
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
    return tensors_finite(p.grad for p in params if p.grad is not None)


def tensors_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is finite (the fast path of :func:`grads_finite`)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for grads in groups.values():
        if bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
            continue
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return False
    return True


def check_optimizer_state(
    optimizer: Optimizer, state: object, owner: str,
    buffer_shape: Callable[[int, int, Tensor], tuple[int, ...] | None],
    keys: tuple[str, ...] = ("momentum_buffer",),
) -> None:
    """``ValueError`` naming the first mismatch between a torch optimizer ``state`` (without
    natgrad's entry) and ``optimizer``, checked before anything is loaded: the number of
    parameter groups and of parameters in each, each group's ``lr`` (> 0) and ``damping``,
    ``momentum``, ``weight_decay`` (≥ 0), and each parameter's entries (``keys``, by default its
    ``momentum_buffer``): a floating tensor of shape ``buffer_shape(group, position,
    parameter)`` (``None``: none allowed)."""
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise ValueError(f"not an optimizer state: {owner}.load_state_dict() expects the dict "
                         "of state_dict() with 'state' and 'param_groups'")
    saved, groups = state["param_groups"], optimizer.param_groups
    if len(saved) != len(groups):
        raise ValueError(f"the state has {len(saved)} parameter group(s), this {owner} has "
                         f"{len(groups)}: build the optimizer with the same param_groups")
    expected: dict[object, tuple[str, tuple[int, ...] | None]] = {}
    for i, (old, new) in enumerate(zip(saved, groups, strict=True)):
        if len(old["params"]) != len(new["params"]):
            raise ValueError(f"parameter group {i} of the state has {len(old['params'])} "
                             f"parameters, this {owner}'s has {len(new['params'])}")
        for key, check in (("lr", check_positive), ("damping", check_nonnegative),
                           ("momentum", check_nonnegative), ("weight_decay", check_nonnegative)):
            if key in old:
                check(f"param_groups[{i}][{key!r}] of the state", old[key])
        for j, (index, p) in enumerate(zip(old["params"], new["params"], strict=True)):
            expected[index] = (f"parameter {j} of group {i} (shape {tuple(p.shape)})",
                               buffer_shape(i, j, p))
    for index, entry in state["state"].items():
        if index not in expected:
            raise ValueError(f"the state holds values for a parameter index {index!r} that no "
                             "parameter group lists")
        where, shape = expected[index]
        for key, value in entry.items():
            if key not in keys or shape is None:
                raise ValueError(f"the state's {key!r} for {where} is not one {owner} keeps: "
                                 "it was saved by another optimizer")
            if not (isinstance(value, Tensor) and value.is_floating_point()
                    and tuple(value.shape) == shape):
                got = (f"shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, Tensor)
                       else type(value).__name__)
                what = key.replace("_", " ")
                raise ValueError(f"the state's {what} for {where} has {got}; "
                                 f"{owner} expects a floating tensor of shape {shape}: the "
                                 "state belongs to a model with other layer sizes")


def check_generator_state(value: object, generator: torch.Generator | None, where: str) -> None:
    """``ValueError`` unless ``value`` is None or a state ``generator`` accepts (tried on a
    scratch generator of the same device, so ``generator`` itself is untouched)."""
    if value is None or generator is None:
        return
    try:
        torch.Generator(device=generator.device).set_state(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{where}: the saved generator state does not fit this generator "
                         f"({err})") from None


def check_ngd_state(optimizer: Optimizer, state_dict: object, generator: torch.Generator | None
                    ) -> tuple[dict, dict | None]:
    """NGD's state split into torch's part and natgrad's entry (None if absent), after checking
    both (see :func:`check_optimizer_state`; the momentum buffer is one flat (P,) tensor kept
    with the first parameter); ``ValueError`` naming the first mismatch."""
    state = dict(state_dict) if isinstance(state_dict, dict) else state_dict
    extra = state.pop("natgrad", None) if isinstance(state, dict) else None
    if isinstance(extra, dict) and "curvature" in extra:
        raise ValueError("the state holds K-FAC curvature: it was saved by KFAC or EKFAC, not NGD")
    size = sum(p.numel() for p in optimizer.param_groups[0]["params"])
    check_optimizer_state(optimizer, state, "NGD",
                          lambda i, j, p: (size,) if (i, j) == (0, 0) else None)
    if extra is not None:
        if not isinstance(extra, dict) or not isinstance(extra.get("skipped_steps"), int):
            raise ValueError("the state's 'natgrad' entry needs an integer skipped_steps")
        check_generator_state(extra.get("generator"), generator, "the state's generator")
    return state, extra  # type: ignore[return-value]
