"""The step of the parameters K-FAC does not cover, in :class:`~natgrad.optim.kfac.KFAC` and
:class:`~natgrad.optim.ekfac.EKFAC`.

Norm scales and shifts, embeddings, tied weights and layers moved to the fallback at run time
have no Kronecker block. They get either

- ``fallback="sgd"`` (the default): the optimizer's own SGD step, m ← μ m + ∇ + λθ,
  θ ← θ − η m (its group's lr η, momentum μ and weight decay λ: exactly ``torch.optim.SGD``);
- ``fallback="adam"`` or ``fallback=AdamFallback(...)``: an Adam-style diagonal scaling with
  decoupled weight decay (Kingma & Ba 2015; Loshchilov & Hutter 2019), per parameter:

      t ← t + 1
      m ← β₁ m + (1 − β₁) g,            v ← β₂ v + (1 − β₂) g²
      θ ← (1 − η_f λ) θ − η_f m̂ ⊘ (√v̂ + ε),   m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)

  with g = ∇θ L, η_f = ``lr_scale`` × its group's lr (so schedulers and param groups apply),
  λ its group's ``weight_decay``; its group's ``momentum`` is not used (β₁ plays that role).
  This is ``torch.optim.AdamW``'s step (``amsgrad=False``), the same floating-point operations
  in the same order. m, v (``exp_avg``, ``exp_avg_sq``, the parameter's dtype) and t
  (``step``) live in the optimizer's ``state`` and start at zero the first time a parameter
  takes this step (also when its layer moves to the fallback after training started; its
  K-FAC momentum buffer is then dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["ADAM_STATE_KEYS", "AdamFallback", "adam_step", "check_adam_state", "parse_fallback"]

ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class AdamFallback:
    """Adam-style diagonal step for the parameters K-FAC does not cover (validated on
    creation; see the module docstring for the formula).

    Args:
        betas: (β₁, β₂), each in [0, 1).
        eps: ε > 0, added to √v̂.
        lr_scale: η_f / η, the fallback's learning rate relative to its group's lr (> 0).
            K-FAC's lr is often far larger than a good Adam lr (Adam moves every coordinate
            by about η_f per step), so set it when the two differ, e.g. lr=0.3 with
            ``AdamFallback(lr_scale=1e-2)``.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"AdamFallback betas must be a pair (β1, β2), got {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
                    0 <= beta < 1):
                raise ValueError(f"AdamFallback betas[{i}] must lie in [0, 1), got {beta!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        for name in ("eps", "lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"AdamFallback {name} must be a finite number > 0, "
                                 f"got {value!r}")
            object.__setattr__(self, name, float(value))

    def describe(self) -> str:
        """What a fallback parameter gets, for ``repr``."""
        scale = "" if self.lr_scale == 1 else f" x {self.lr_scale:g}"
        return (f"Adam-style diagonal step (fallback, not preconditioned: betas={self.betas}, "
                f"eps={self.eps:g}, its group's lr{scale}, decoupled weight decay)")


def parse_fallback(value: object) -> AdamFallback | None:
    """``None`` for ``"sgd"``, an :class:`AdamFallback` for ``"adam"`` (default betas, eps)
    or an ``AdamFallback`` itself; ``ValueError`` otherwise."""
    if isinstance(value, AdamFallback):
        return value
    if value == "sgd":
        return None
    if value == "adam":
        return AdamFallback()
    raise ValueError(f"fallback must be 'sgd', 'adam' or an AdamFallback(...), got {value!r}")


def adam_step(param: Tensor, grad: Tensor, state: dict[str, Any], lr: float,
              weight_decay: float, config: AdamFallback) -> None:
    """One step of the module docstring's rule on ``param`` in place, with η_f = ``lr`` and
    λ = ``weight_decay``; ``state`` holds ``step`` t (int), ``exp_avg`` m and ``exp_avg_sq``
    v (created as zeros if absent). The operations are ``torch.optim.AdamW``'s
    single-tensor ones, in its order: θ ← (1 − η_f λ) θ first."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = grad.new_zeros(param.shape, dtype=param.dtype)
        state["exp_avg_sq"] = grad.new_zeros(param.shape, dtype=param.dtype)
    beta1, beta2 = config.betas
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    state["step"] = step = int(state["step"]) + 1
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (v.sqrt() / bias_correction2 ** 0.5).add_(config.eps)
    param.addcdiv_(m, denom, value=-lr / bias_correction1)


def check_adam_state(entry: dict[str, Any], param: Tensor, where: str, allowed: bool,
                     why_not: str) -> None:
    """``ValueError`` unless a saved per-parameter Adam state (the ``ADAM_STATE_KEYS`` present
    in ``entry``) is complete and fits ``param``: ``step`` an integer ≥ 1, ``exp_avg`` and
    ``exp_avg_sq`` floating tensors of the parameter's shape. ``allowed=False``: any Adam
    entry is refused with ``why_not``."""
    keys = [k for k in ADAM_STATE_KEYS if k in entry]
    if not keys:
        return
    if not allowed:
        raise ValueError(f"the state holds an Adam fallback state {keys} for {where}, but "
                         f"{why_not}")
    missing = [k for k in ADAM_STATE_KEYS if k not in entry]
    if missing:
        raise ValueError(f"the state's Adam fallback state for {where} lacks {missing}")
    step = entry["step"]
    if isinstance(step, Tensor) and step.numel() == 1 and float(step) == int(step):
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"the state's Adam step for {where} must be an integer >= 1, "
                         f"got {entry['step']!r}")
    for key in ("exp_avg", "exp_avg_sq"):
        value = entry[key]
        if not (isinstance(value, Tensor) and value.is_floating_point()
                and value.shape == param.shape):
            got = (f"shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, Tensor)
                   else type(value).__name__)
            raise ValueError(f"the state's {key} for {where} has {got}; a floating tensor "
                             f"of shape {tuple(param.shape)} is expected")
