"""Dense layers: ``nn.Linear`` (and subclasses) and transformers' ``Conv1D``.

Both compute a = h Wᵀ + b over any leading dimensions (examples, sequence positions), so the
rows h are the input itself and the pre-activation gradients g the output gradients.
``Conv1D`` (GPT-2) stores its weight transposed, (in, out): W = weightᵀ. It is recognised by
its class name and module, so transformers is never imported here.
"""

from __future__ import annotations

from torch import Tensor, nn

from natgrad.layers.base import LayerKind

__all__ = ["Conv1DKind", "LinearKind"]


class LinearKind(LayerKind):
    """``nn.Linear`` and its subclasses: weight (out, in), a = h Wᵀ + b."""

    name = "Linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)


class Conv1DKind(LayerKind):
    """transformers' ``Conv1D``: weight (in, out), a = h · weight + b, so W = weightᵀ."""

    name = "Conv1D"

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
                   for c in cls.__mro__)

    def out_features(self, module: nn.Module) -> int:
        return module.weight.shape[1]

    def in_features(self, module: nn.Module) -> int:
        return module.weight.shape[0]

    def to_matrix(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.T

    def from_matrix(self, module: nn.Module, M: Tensor) -> Tensor:
        return M.T
