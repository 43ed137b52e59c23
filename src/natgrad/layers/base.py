"""The layer-kind protocol: what Kronecker factors need to know about one kind of layer.

A layer whose pre-activation is linear in its weight, a = W ā (ā = [h; 1] with the bias), is
described by

- ``input_rows(module, h)``: the rows h of every position, shape (*lead, in), where ``lead``
  are the leading dimensions of the layer's output (examples and positions, in any order);
- ``output_rows(module, g)``: the output gradients g = ∂(·)/∂a reshaped to match,
  (K, *a.shape) → (K, *lead, out);
- ``to_matrix(module, t)`` / ``from_matrix(module, M)``: the weight's layout, between a tensor
  shaped like the weight and the (out, in) matrix W of a = W h + b;

plus which attributes hold the weight and the bias.

Diagonal input factors (``diagonal_inputs = True``, e.g. ``nn.Embedding``): when ā is always
one-hot, ā = e_x, or zero, Ā = E[ā āᵀ] is the diagonal matrix of the frequencies of x. Such
a kind's ``input_rows`` returns the integer indices x, shape (*lead, 1), instead of rows
(a negative index means ā = 0, e.g. a padding position), and the layer must have no bias.
Factors then store Ā as a vector and never form one-hot rows or a dense Ā
(see :mod:`natgrad._diagonal_inputs`). natgrad finds the layers of a model by
asking each registered kind, newest first (:func:`register_layer_kind`), whether it
``matches`` a module.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LayerKind", "kind_of", "register_layer_kind", "registered_kinds"]


class LayerKind:
    """Base class of the adapters; subclasses override what differs from a dense layer
    a = h Wᵀ + b with the weight stored (out, in) as ``module.weight``."""

    name: str = "layer"
    weight_attr: str = "weight"
    bias_attr: str = "bias"
    diagonal_inputs: bool = False
    """Whether ā is one-hot (or zero): ``input_rows`` then returns indices (*lead, 1)."""

    def matches(self, module: nn.Module) -> bool:
        """Whether this kind handles ``module``."""
        raise NotImplementedError

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this matching module cannot be handled (e.g. grouped convolution), or None."""
        return None

    def weight(self, module: nn.Module) -> nn.Parameter | None:
        return getattr(module, self.weight_attr, None)

    def bias(self, module: nn.Module) -> nn.Parameter | None:
        return getattr(module, self.bias_attr, None)

    def out_features(self, module: nn.Module) -> int:
        """Rows of W (the width of the pre-activation a)."""
        weight = self.weight(module)
        assert weight is not None
        return weight.shape[0]

    def in_features(self, module: nn.Module) -> int:
        """Columns of W (the width of one row h, without the ones column)."""
        weight = self.weight(module)
        assert weight is not None
        return weight[0].numel()

    def input_rows(self, module: nn.Module, h: Tensor) -> Tensor:
        """(*lead, in): the rows h, one per example and position (with ``diagonal_inputs``:
        (*lead, 1) integer indices x of ā = e_x, negative where ā = 0)."""
        return h

    def output_rows(self, module: nn.Module, g: Tensor) -> Tensor:
        """(K, *a.shape) → (K, *lead, out), matching :meth:`input_rows`."""
        return g

    def to_matrix(self, module: nn.Module, t: Tensor) -> Tensor:
        """A tensor shaped like the weight as the (out, in) matrix W (a view where possible)."""
        return t.reshape(self.out_features(module), -1)

    def from_matrix(self, module: nn.Module, M: Tensor) -> Tensor:
        """The inverse of :meth:`to_matrix`: (out, in) → the weight's shape."""
        weight = self.weight(module)
        assert weight is not None
        return M.reshape(weight.shape)


_KINDS: list[LayerKind] = []


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Register an adapter; kinds registered later are asked first (so a user's kind can
    take over a module type natgrad already handles). Returns ``kind``."""
    _KINDS.insert(0, kind)
    return kind


def registered_kinds() -> tuple[LayerKind, ...]:
    """The registered kinds, in the order they are asked."""
    return tuple(_KINDS)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The first registered kind that matches ``module``, or None."""
    return next((kind for kind in _KINDS if kind.matches(module)), None)
