"""The layer-kind protocol: what Kronecker factors need to know about one kind of layer.

A layer whose pre-activation is linear in its weight, a = W ā (ā = [h; 1] with the bias), is
described by

- ``input_rows(module, h)``: the rows h of every position, shape (*lead, in), where ``lead``
  are the leading dimensions of the layer's output (examples and positions, in any order);
- ``output_rows(module, g)``: the output gradients g = ∂(·)/∂a reshaped to match,
  (K, *a.shape) → (K, *lead, out);
- ``to_matrix(module, t)`` / ``from_matrix(module, M)``: the weight's layout, between a tensor
  shaped like the weight and the (out, in) matrix W of a = W h + b;

plus which attributes hold the weight and the bias (dotted paths from the module, e.g.
``"out_proj.weight"``; ``bias_attr = None``: no bias).

Diagonal input factors (``diagonal_inputs = True``, e.g. ``nn.Embedding``): when ā is always
one-hot, ā = e_x, or zero, Ā = E[ā āᵀ] is the diagonal matrix of the frequencies of x. Such
a kind's ``input_rows`` returns the integer indices x, shape (*lead, 1), instead of rows
(a negative index means ā = 0, e.g. a padding position), and the layer must have no bias.
Factors then store Ā as a vector and never form one-hot rows or a dense Ā
(see :mod:`natgrad._diagonal_inputs`). natgrad finds the layers of a model by
asking each registered kind, newest first (:func:`register_layer_kind`), whether it
``matches`` a module.

Modules that hold several projections, or whose projections are not module calls that a
forward hook can see (``nn.MultiheadAttention``, :mod:`natgrad.layers.attention`), use the
optional parts of the protocol:

- ``sublayers(module)``: the layers the module provides, as (name suffix, kind) pairs
  (default: the module itself, ``[("", self)]``); ``uncovered(module)``: its own parameters
  that these layers knowingly leave to the fallback;
- ``hook_module(module)``: the module whose forward hook sees the layer's input h as its
  first argument and its pre-activation a as its output (default: the module itself);
- ``attach(module)``: called before natgrad registers that hook (e.g. to route the
  computation through ``hook_module``); returns a callable that undoes it, or None;
- ``not_called_reason(module)``: why ``hook_module`` was not called in a pass, when the kind
  knows (reported when the layer takes the fallback).

Only :mod:`natgrad.capture` registers hooks; it calls ``attach`` and removes what it returned
when the hooks are removed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["LayerKind", "kind_of", "register_layer_kind", "registered_kinds"]


class LayerKind:
    """Base class of the adapters; subclasses override what differs from a dense layer
    a = h Wᵀ + b with the weight stored (out, in) as ``module.weight``."""

    name: str = "layer"
    weight_attr: str = "weight"
    bias_attr: str | None = "bias"
    diagonal_inputs: bool = False
    """Whether ā is one-hot (or zero): ``input_rows`` then returns indices (*lead, 1)."""
    supports_reduce: bool = True
    """Whether ``kfac_approx="reduce"`` applies (else the layer's factors use expand: see
    :mod:`natgrad.layers.sharing`)."""

    def matches(self, module: nn.Module) -> bool:
        """Whether this kind handles ``module``."""
        raise NotImplementedError

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this matching module cannot be handled (e.g. grouped convolution), or None."""
        return None

    def weight(self, module: nn.Module) -> nn.Parameter | None:
        return _attribute(module, self.weight_attr)

    def bias(self, module: nn.Module) -> nn.Parameter | None:
        return _attribute(module, self.bias_attr)

    def sublayers(self, module: nn.Module) -> list[tuple[str, LayerKind]]:
        """The Kronecker-factored layers ``module`` provides: (name suffix, kind) pairs, in
        θ's order, each kind's attributes relative to ``module``. Default: the module is one
        layer of this kind."""
        return [("", self)]

    def uncovered(self, module: nn.Module) -> dict[str, str]:
        """Own parameters of ``module`` (attribute → why) that its layers leave to the
        fallback on purpose; any other parameter they do not use makes the module
        unsupported (an extra parameter could change a = W ā)."""
        return {}

    def hook_module(self, module: nn.Module) -> nn.Module:
        """The module whose forward hook sees (h as its first argument, a as its output);
        valid after :meth:`attach`."""
        return module

    def attach(self, module: nn.Module) -> Callable[[], None] | None:
        """Prepare ``module`` for natgrad's hooks on :meth:`hook_module`; return what undoes
        it (called when those hooks are removed), or None."""
        return None

    def not_called_reason(self, module: nn.Module) -> str | None:
        """Why :meth:`hook_module` was not called in a forward pass that used ``module``, when
        the kind knows (shown when the layer takes the fallback), else None."""
        return None

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


def _attribute(module: nn.Module, path: str | None) -> nn.Parameter | None:
    """``module.<path>`` for a dotted path, None if any step is missing (or no path)."""
    found: object = module
    for part in () if path is None else path.split("."):
        found = getattr(found, part, None)
    return None if path is None else found  # type: ignore[return-value]


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
