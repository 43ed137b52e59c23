"""PRONG: Projected Natural Gradient Descent (Desjardins et al. 2015), with any optimizer.

Every ``period`` calls of :meth:`PRONG.step`, the inputs of every whitened layer are collected
in a forward pass over ``num_samples`` examples (eval mode but batch norms on batch statistics,
no grad, float64; see :mod:`natgrad.nn.statistics`), and
each layer is re-expressed with c = mean(h), U from the eigendecomposition of cov(h) + εI, and
V, d updated so that the network's function is unchanged (DESIGN.md §2):
W = V U_old, b = d − W c_old; V ← W U_new⁻¹, d ← b + W c_new.

Base-optimizer state lives in V's coordinates; ``optimizer_state`` says what happens to it:
"reset" (default: the state of V and d is cleared, e.g. momentum and Adam moments restart),
"transform" (SGD momentum buffers m are mapped like updates, m_V ← m_V U_old U_new⁻¹,
m_d ← m_d + m_V U_old (c_new − c_old); any other state is cleared) or "keep" (left as is).

PRONG+ (a batch norm right after a whitened layer, found automatically in ``nn.Sequential``):
the layer is centred even without bias, d does not move, and the batch norm's running mean
absorbs the shift: running_mean ← running_mean − W (c_new − c_old), so train and eval outputs
are unchanged.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from natgrad import distributed
from natgrad.capture import InputMoments
from natgrad.nn.layers import WhitenedLayer
from natgrad.nn.statistics import collect_moments
from natgrad.nn.whitening import Whitening, whitening_from_moments

__all__ = ["PRONG", "following_batchnorms"]


def following_batchnorms(
    model: nn.Module, kinds: tuple[type[nn.Module], ...] = (WhitenedLayer,)
) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Layers of ``kinds`` directly followed by a BatchNorm in an ``nn.Sequential``:
    name → BN."""
    found: dict[str, nn.modules.batchnorm._BatchNorm] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, first), (_, second) in itertools.pairwise(children):
            if isinstance(first, kinds) and isinstance(
                second, nn.modules.batchnorm._BatchNorm
            ):
                found[f"{prefix}.{name}" if prefix else name] = second
    return found


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _taps_times(V: Tensor, times: Callable[[Tensor], Tensor]) -> Tensor:
    """V_t M for every kernel tap t of V (out, in[, kh, kw]), given X ↦ X M on (..., in)."""
    if V.dim() == 2:
        return times(V)
    return times(V.movedim(1, -1)).movedim(-1, 1)


def _tap_sum_apply(W: Tensor, v: Tensor) -> Tensor:
    """Σ_t W_t v: (out, in[, kh, kw]) × (in,) → (out,)."""
    return W.flatten(2).sum(2) @ v if W.dim() == 4 else W @ v


def _check_epsilon(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"epsilon must be finite and > 0, got {value!r}")
    return float(value)


class PRONG:
    """Re-estimates the whitening of a whitened model every ``period`` steps.

    Args:
        model: a model with whitened layers (see :func:`natgrad.nn.whiten`).
        data: iterable of batches ((inputs, targets), (inputs,) or inputs tensors), re-iterated
            at every re-estimation (a shuffling DataLoader gives fresh samples).
        period: T, re-estimate every T calls of :meth:`step`.
        num_samples: N_s examples per re-estimation (≥ 2); under torch.distributed each rank
            takes ⌈N_s / world size⌉ from its own data and the moments are summed over ranks.
        epsilon: ε > 0 added to the covariance's eigenvalues.
        whitening: "pca" (U = (Λ+ε)^{-1/2} Eᵀ) or "zca" (U = E (Λ+ε)^{-1/2} Eᵀ); layers
            whitened with a ``rank`` (:func:`natgrad.nn.whiten`) always get the low-rank
            form r I + E_k diag((Λ_k+ε)^{-1/2} − r) E_kᵀ (:mod:`natgrad.nn.whitening`).
        optimizer: the base optimizer of V and d, whose state is handled per
            ``optimizer_state`` ("reset", "transform" or "keep").
        initial: re-estimate once at construction (default), so training starts whitened.

    Raises:
        ValueError: epsilon ≤ 0, period < 1, num_samples < 2, unknown modes, no whitened layer.

    Example:
        >>> from natgrad.nn import whiten
        >>> net = whiten(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        >>> prong = PRONG(net, [torch.randn(64, 3)], period=10, num_samples=64)
        >>> prong.reestimations
        1
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable | Tensor,
        period: int = 100,
        num_samples: int = 1000,
        epsilon: float = 1e-3,
        whitening: str = "pca",
        optimizer: torch.optim.Optimizer | None = None,
        optimizer_state: str = "reset",
        initial: bool = True,
    ) -> None:
        self.period = _check_int("period", period, 1)
        self.num_samples = _check_int("num_samples", num_samples, 2)
        if whitening not in ("pca", "zca"):
            raise ValueError(f"whitening must be 'pca' or 'zca', got {whitening!r}")
        if optimizer_state not in ("reset", "transform", "keep"):
            raise ValueError("optimizer_state must be 'reset', 'transform' or 'keep', "
                             f"got {optimizer_state!r}")
        model = distributed.unwrap(model)
        self.model = model
        self.data = data
        self.epsilon = _check_epsilon(epsilon)
        self.whitening = whitening
        self.optimizer = optimizer
        self.optimizer_state = optimizer_state
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, WhitenedLayer)}
        if not self.layers:
            raise ValueError("the model has no whitened layers: call natgrad.nn.whiten(model) "
                             "first")
        self.batchnorms = following_batchnorms(model)
        self.steps = 0
        self.reestimations = 0
        if initial:
            self.reestimate()

    def step(self) -> bool:
        """Count one training step; re-estimate every ``period`` steps. Returns whether it
        re-estimated."""
        self.steps += 1
        if self.steps % self.period:
            return False
        self.reestimate()
        return True

    def _centred(self, name: str, layer: WhitenedLayer) -> bool:
        """Whether the layer's input is centred (c = mean): only where a trainable bias d (or
        a following batch norm) absorbs W c. With a frozen d, centring would move the layer's
        plain bias b = d − W c whenever W trains; uncentred, b = d stays fixed, as in
        :class:`~natgrad.nn.PRONGPreconditioner`."""
        return (layer.d is not None and layer.d.requires_grad) or name in self.batchnorms

    def collect(self) -> InputMoments:
        """Moments of every whitened layer's input rows over ``num_samples`` examples (see
        :func:`natgrad.nn.statistics.collect_moments`)."""
        return collect_moments(self.model, self.layers, self.data, self.num_samples)

    @torch.no_grad()
    def reestimate(self) -> list[str]:
        """Re-estimate c and U of every whitened layer, keeping the network's function.

        A layer whose statistics are not finite is left unchanged, with a warning naming it.
        Returns the names of the layers updated.
        """
        moments = self.collect()
        updated = []
        for name, layer in self.layers.items():
            try:
                new = whitening_from_moments(
                    moments.count[name], moments.sum.get(name), moments.outer.get(name),
                    self.epsilon,
                    self._centred(name, layer), self.whitening, name, layer.rank,
                    layer.rank_at_most, torch.finfo(layer.V.dtype).eps,
                )
            except (ValueError, RuntimeError) as err:
                warnings.warn(f"PRONG skipped layer {name!r}: {err}", RuntimeWarning,
                              stacklevel=2)
                continue
            self._apply(name, layer, new)
            updated.append(name)
        self.reestimations += 1
        return updated

    def _apply(self, name: str, layer: WhitenedLayer, new: Whitening) -> None:
        """W = V U_old, b = d − W c_old; V ← W U_new⁻¹, d ← b + W c_new (float64)."""
        c_old = layer.c.double()
        W = _taps_times(layer.V.double(), layer.times_whitening)
        shift = _tap_sum_apply(W, new.c - c_old)  # W (c_new − c_old)
        self._handle_optimizer_state(layer, new, new.c - c_old)
        layer.V.copy_(_taps_times(W, new.times_inverse))
        layer.set_whitening(new.U, new.basis, new.scale, new.rest)
        layer.c.copy_(new.c)
        batchnorm = self.batchnorms.get(name)
        if batchnorm is not None:
            if batchnorm.running_mean is not None:
                batchnorm.running_mean.sub_(shift.to(batchnorm.running_mean.dtype))
        elif layer.d is not None:
            layer.d.add_(shift.to(layer.d.dtype))

    def _handle_optimizer_state(self, layer: WhitenedLayer, new: Whitening, dc: Tensor) -> None:
        """Called before the layer changes: momentum m_V ← m_V U_old U_new⁻¹,
        m_d ← m_d + Σ_t (m_V U_old)_t (c_new − c_old) ("transform"), or reset / keep."""
        opt = self.optimizer
        if opt is None or self.optimizer_state == "keep":
            return
        params = [p for p in (layer.V, layer.d) if p is not None]
        if self.optimizer_state == "reset":
            for p in params:
                opt.state.pop(p, None)
            return
        buf_V = opt.state.get(layer.V, {}).get("momentum_buffer")
        buf_d = opt.state.get(layer.d, {}).get("momentum_buffer") if layer.d is not None else None
        for p in params:
            opt.state.pop(p, None)
        if buf_V is not None:
            canonical = _taps_times(buf_V.double(), layer.times_whitening)  # m_V U_old
            moved_V = _taps_times(canonical, new.times_inverse)
            opt.state[layer.V]["momentum_buffer"] = moved_V.to(buf_V.dtype)
            if buf_d is not None:
                moved = buf_d.double() + _tap_sum_apply(canonical, dc)
                opt.state[layer.d]["momentum_buffer"] = moved.to(buf_d.dtype)
        elif buf_d is not None:
            opt.state[layer.d]["momentum_buffer"] = buf_d

    def state_dict(self) -> dict[str, int]:
        """The step and re-estimation counters (U and c live in the model's state_dict)."""
        return {"steps": self.steps, "reestimations": self.reestimations}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])
        self.reestimations = int(state["reestimations"])

    def __repr__(self) -> str:
        lines = [f"PRONG(period={self.period}, num_samples={self.num_samples}, "
                 f"epsilon={self.epsilon:g}, whitening={self.whitening!r}, "
                 f"optimizer_state={self.optimizer_state!r})"]
        for name, layer in self.layers.items():
            kind = "PRONG+ (batch norm absorbs the shift)" if name in self.batchnorms else (
                "centred" if self._centred(name, layer) else "uncentred (no trainable bias)")
            lines.append(f"  {name}: {type(layer).__name__}, {kind}")
        return "\n".join(lines)

