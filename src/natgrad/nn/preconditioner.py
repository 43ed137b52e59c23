"""PRONG as a preconditioner on ordinary Linear/Conv2d layers: K-FAC with G = I.

Right after a re-estimation, one SGD step of size η on a whitened layer's (V, d) equals, in
canonical coordinates, Δ[W | b] = −η ∇_{[W|b]} Ā_ε⁻¹ with Ā_ε = [[Σ + εI + c cᵀ, c], [cᵀ, 1]]
(DESIGN.md §2) — and, U and c being fixed between re-estimations, every later step too. This
preconditioner applies that map to the gradients of plain layers, so PRONG can be compared or
combined with K-FAC and EK-FAC on the same model. With P = (Σ + εI)⁻¹:
∇W ← (∇W − ∇b cᵀ) P (Conv2d: per kernel tap), ∇b ← ∇b − Σ_t ∇W_t c; without a trainable bias
the statistics are uncentred and ∇W ← ∇W P, unless a batch norm follows the layer (PRONG+:
centred, the batch norm absorbing the shift, so ∇W ← ∇W P with P from the centred Σ).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from natgrad import distributed
from natgrad.capture import KFACLayer, scan_layers
from natgrad.nn.prong import _check_epsilon, _check_int, following_batchnorms
from natgrad.nn.statistics import collect_moments
from natgrad.nn.whitening import whitening_from_moments

__all__ = ["PRONGPreconditioner"]


class PRONGPreconditioner:
    """Rewrites the gradients of a model's Linear/Conv2d layers as ∇_{[W|b]} Ā_ε⁻¹, with the
    input statistics re-estimated every ``period`` steps from ``num_samples`` examples of
    ``data`` (eval mode, no grad, float64). Other modules keep their gradients.

    With c = mean(h), Σ = cov(h) and P = (Σ + εI)⁻¹, Ā_ε = [[Σ + εI + c cᵀ, c], [cᵀ, 1]] and
    ∇_{[W|b]} Ā_ε⁻¹ is: ∇W ← (∇W − ∇b cᵀ) P, ∇b ← ∇b − (∇W − ∇b cᵀ) P c (Conv2d: P per kernel
    tap, the sum over taps in the bias term). This is the update PRONG + SGD makes in canonical
    coordinates: K-FAC with G = I.

    Args:
        model: the network (or its DDP wrapper) with plain Linear/Conv2d layers.
        data: iterable of batches ((inputs, targets), (inputs,) or inputs), re-iterated at
            every re-estimation.
        period: re-estimate every ``period`` calls of :meth:`step` (and once at construction).
        num_samples: examples per re-estimation (≥ 2); under torch.distributed the global
            count, each rank reading ⌈num_samples / world size⌉ of its own data.
        epsilon: ε > 0.

    Raises:
        ValueError: bad ``period``/``num_samples``/``epsilon``, no trainable Linear/Conv2d
            layer, fewer than 2 examples, or a layer that received no input in the first
            statistics pass (freeze unused layers) or whose first statistics are not finite.
            At later re-estimations such a layer keeps its previous statistics, with a
            ``RuntimeWarning`` naming it (:meth:`reestimate`).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> pre = PRONGPreconditioner(net, [torch.randn(64, 3)], period=10, num_samples=64)
        >>> net(torch.randn(8, 3)).sum().backward()
        >>> pre.step()
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable | Tensor,
        period: int = 100,
        num_samples: int = 1000,
        epsilon: float = 1e-3,
    ) -> None:
        self.period = _check_int("period", period, 1)
        self.num_samples = _check_int("num_samples", num_samples, 2)
        self.epsilon = _check_epsilon(epsilon)
        model = distributed.unwrap(model)
        self.model = model
        self.data = data
        layers, self.unsupported = scan_layers(model)
        # its statistics hook the layer module itself: not the projections of attention;
        # PRONG whitens dense inputs: one-hot inputs (nn.Embedding) keep their gradients
        self.unsupported += [f"{layer.name} ({type(layer.module).__name__} projection: not "
                             "whitened by PRONG)" for layer in layers if layer.module_name]
        self.unsupported += [f"{layer.name} ({layer.kind.name}: one-hot inputs, not whitened)"
                             for layer in layers if layer.diagonal_inputs]
        self.layers = [layer for layer in layers
                       if layer.module_name is None and not layer.diagonal_inputs]
        if not self.layers:
            raise ValueError("the model has no trainable Linear or Conv2d layers")
        self.batchnorms = following_batchnorms(model, (nn.Linear, nn.Conv2d))
        self.steps = 0
        self.stats: dict[str, tuple[Tensor, Tensor]] = {}
        self.reestimate()

    def _centred(self, layer: KFACLayer) -> bool:
        """Centred with a trainable bias to absorb the shift, or a batch norm right after
        (PRONG+); uncentred otherwise."""
        return layer.has_weight and (layer.has_bias or layer.name in self.batchnorms)

    @torch.no_grad()
    def reestimate(self) -> None:
        """Estimate c and P = (Σ + εI)⁻¹ of every layer's input rows.

        All layers are estimated before any is stored. A layer that has no statistics yet
        (at construction) and received no input, or whose statistics are not finite, raises
        ``ValueError`` naming it and nothing is stored; at later re-estimations such a layer
        keeps its previous statistics, with a ``RuntimeWarning`` naming it.
        """
        modules = {layer.name: layer.module for layer in self.layers}
        moments = collect_moments(self.model, modules, self.data, self.num_samples)
        new: dict[str, tuple[Tensor, Tensor]] = {}
        failed: dict[str, str] = {}
        for layer in self.layers:
            try:
                white = whitening_from_moments(
                    moments.count[layer.name], moments.sum.get(layer.name),
                    moments.outer.get(layer.name),
                    self.epsilon, self._centred(layer), "pca", layer.name,
                )
            except (ValueError, RuntimeError) as err:
                failed[layer.name] = str(err)
                continue
            dtype = layer.module.weight.dtype
            new[layer.name] = (white.c.to(dtype), (white.U.T @ white.U).to(dtype))
        fatal = [name for name in failed if name not in self.stats]
        if fatal:
            raise ValueError(
                f"PRONGPreconditioner cannot estimate the input statistics of {fatal}: "
                + "; ".join(failed[name] for name in fatal)
                + ". Freeze layers the forward pass does not use (requires_grad_(False)) or "
                "feed data that reaches them")
        for name, err in failed.items():
            warnings.warn(f"PRONGPreconditioner keeps the previous statistics of {name!r}: "
                          f"{err}", RuntimeWarning, stacklevel=2)
        self.stats.update(new)

    @torch.no_grad()
    def step(self) -> None:
        """Precondition the gradients in place; re-estimate first when ``period`` steps have
        passed since the last estimate (so the statistics match the current parameters)."""
        if self.steps and self.steps % self.period == 0:
            self.reestimate()
        for layer in self.layers:
            self._precondition(layer)
        self.steps += 1

    def _precondition(self, layer: KFACLayer) -> None:
        if layer.name not in self.stats:  # no statistics loaded: gradient left unchanged
            return
        module = layer.module
        c, P = self.stats[layer.name]
        weight = module.weight if layer.has_weight else None
        bias = module.bias if layer.has_bias else None
        if weight is None or weight.grad is None:
            return
        gW = weight.grad
        taps = gW.dim() == 4
        if bias is not None and bias.grad is not None:
            gb = bias.grad
            shifted = gW - (gb[:, None, None, None] * c[None, :, None, None] if taps
                            else torch.outer(gb, c))
            new_W = torch.einsum("oikl,ij->ojkl", shifted, P) if taps else shifted @ P
            summed = new_W.flatten(2).sum(2) if taps else new_W
            bias.grad.copy_(gb - summed @ c)
        else:
            new_W = torch.einsum("oikl,ij->ojkl", gW, P) if taps else gW @ P
        weight.grad.copy_(new_W)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.stats = dict(state["stats"])
