"""Finding the layers of a model that Kronecker factors handle.

A :class:`KFACLayer` is one layer of a module matched by a registered
:class:`~natgrad.layers.LayerKind` (a module may provide several, see ``LayerKind.sublayers``)
together with which of its parameters train. :func:`scan_layers` walks the model once and
sorts every module that owns trainable parameters into handled layers and described others
(unknown kinds, parameters shared between modules — tied weights —, extra parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from natgrad.layers.base import LayerKind, kind_of

__all__ = ["KFACLayer", "find_kfac_layers", "scan_layers"]


@dataclass(frozen=True)
class KFACLayer:
    """A layer handled by Kronecker factors: a = W ā with ā = [h; 1].

    ``has_weight``/``has_bias`` say which of its parameters train; ā carries h only if the
    weight trains and the ones column only if the bias trains. ``kind`` knows the layout.
    ``module_name``: the name of ``module`` in the model when it differs from ``name`` (one
    of several layers of a module, e.g. ``"attn.in_proj"`` of the module ``"attn"``).
    """

    name: str
    module: nn.Module
    has_weight: bool
    has_bias: bool
    kind: LayerKind
    module_name: str | None = None

    @property
    def weight(self) -> Tensor:
        weight = self.kind.weight(self.module)
        assert weight is not None
        return weight

    def trains_now(self) -> tuple[bool, bool]:
        """(weight trains, bias trains) as the parameters' ``requires_grad`` say now; differs
        from (``has_weight``, ``has_bias``) when they were frozen or unfrozen since."""
        weight, bias = self.kind.weight(self.module), self.kind.bias(self.module)
        return (weight is not None and weight.requires_grad,
                bias is not None and bias.requires_grad)

    @property
    def in_dim(self) -> int:
        """Width of ā: the weight's columns (if it trains) plus 1 for the bias."""
        return (self.kind.in_features(self.module) if self.has_weight else 0) + int(
            self.has_bias)

    @property
    def out_dim(self) -> int:
        return self.kind.out_features(self.module)

    @property
    def diagonal_inputs(self) -> bool:
        """Whether Ā is diagonal (one-hot inputs): stored as a vector of size ``in_dim``."""
        return self.kind.diagonal_inputs

    @property
    def param_names(self) -> tuple[str | None, str | None]:
        """Names in ``model.named_parameters()`` of the trainable weight and bias (or None)."""
        owner = self.name if self.module_name is None else self.module_name
        prefix = "" if owner == "<root>" else f"{owner}."
        return (
            f"{prefix}{self.kind.weight_attr}" if self.has_weight else None,
            f"{prefix}{self.kind.bias_attr}" if self.has_bias else None,
        )

    def weight_matrix(self, t: Tensor) -> Tensor:
        """A tensor shaped like the weight as the (out, in) matrix W."""
        return self.kind.to_matrix(self.module, t)

    def weight_tensor(self, M: Tensor) -> Tensor:
        """An (out, in) matrix in the weight's own shape and layout."""
        return self.kind.from_matrix(self.module, M)

    def describe(self) -> str:
        return f"{self.kind.name} {self.out_dim}x{self.in_dim}"


def scan_layers(model: nn.Module) -> tuple[list[KFACLayer], list[str]]:
    """The layers owning trainable parameters that a registered kind handles, in θ's order,
    and a description of every other module with trainable parameters (unknown kinds,
    unsupported variants, extra parameters, parameters a kind leaves uncovered, and
    parameters owned by several modules — tied weights: every owner is listed, whichever was
    registered first). Parameters of a child that a layer of its parent covers (the
    ``out_proj`` of a handled ``nn.MultiheadAttention``) belong to the parent's layer.
    """
    named = [(name or "<root>", module) for name, module in model.named_modules()]
    owners: dict[int, list[str]] = {}
    for label, module in named:
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(label)
    layers: list[KFACLayer] = []
    unsupported: list[str] = []
    claimed: set[int] = set()  # parameters covered by a layer of an enclosing module
    inside_attention: set[int] = set()  # children of MultiheadAttention modules not handled
    for label, module in named:
        own = [p for p in module.parameters(recurse=False)
               if p.requires_grad and id(p) not in claimed]
        kind = kind_of(module)
        reason = None if kind is None else kind.unsupported_reason(module)
        subs = [] if kind is None or reason is not None else kind.sublayers(module)
        if any(p is not None and p.requires_grad and id(p) not in owners
               for _, sub in subs for p in (sub.weight(module), sub.bias(module))):
            reason = (f"{type(module).__name__} whose weight is computed from other "
                      "parameters (torch.nn.utils.parametrize, weight_norm, spectral_norm or "
                      "pruning), not a parameter K-FAC can precondition")
            subs = []
        used = [p for _, sub in subs for p in (sub.weight(module), sub.bias(module))
                if p is not None and p.requires_grad and id(p) not in claimed]
        if isinstance(module, nn.MultiheadAttention) and not subs:
            inside_attention.update(id(child) for child in module.children())
        if not own and not used:
            continue
        uncovered = {} if kind is None or reason is not None else kind.uncovered(module)
        left = [p for attr, p in module.named_parameters(recurse=False) if attr in uncovered]
        cls = type(module).__name__
        others = sorted({o for p in own + used if len(owners[id(p)]) > 1
                         for o in owners[id(p)] if o != label})
        if others and isinstance(module, nn.MultiheadAttention):  # nor are its children
            inside_attention.update(id(child) for child in module.children())
        if others:
            unsupported.append(f"{label} ({cls}, shares parameters with {', '.join(others)})")
        elif id(module) in inside_attention:  # MultiheadAttention reads its weights itself
            unsupported.append(f"{label} ({cls} inside MultiheadAttention, whose functional "
                               "forward uses its weights directly: not covered)")
        elif kind is None:
            unsupported.append(f"{label} ({cls})")
        elif reason is not None:
            unsupported.append(f"{label} ({reason})")
        elif {id(p) for p in own} - {id(p) for p in used + left}:
            unsupported.append(f"{label} ({cls} with extra parameters)")
        elif kind.diagonal_inputs and kind.bias(module) is not None and kind.bias(
                module).requires_grad:  # ā = e_x has no ones column
            unsupported.append(f"{label} ({cls}: a kind with diagonal inputs and a bias)")
        else:
            prefix = "" if label == "<root>" else f"{label}."
            for suffix, sub in subs:
                weight, bias = sub.weight(module), sub.bias(module)
                has_weight = weight is not None and weight.requires_grad
                has_bias = bias is not None and bias.requires_grad
                if not (has_weight or has_bias):
                    continue
                name = label if not suffix else f"{prefix}{suffix}"
                layers.append(KFACLayer(
                    name=name, module=module, has_weight=has_weight, has_bias=has_bias,
                    kind=sub, module_name=None if name == label else label))
            claimed.update(id(p) for p in used)
            unsupported.extend(f"{prefix}{attr} ({cls}: {uncovered[attr]})"
                               for attr, p in module.named_parameters(recurse=False)
                               if attr in uncovered and p.requires_grad)
    return layers, unsupported


def find_kfac_layers(model: nn.Module) -> list[KFACLayer]:
    """The layers of :func:`scan_layers`; ``ValueError`` listing every module with trainable
    parameters that Kronecker factors do not cover."""
    layers, unsupported = scan_layers(model)
    if unsupported:
        raise ValueError(
            "Kronecker-factored structures cover these layer kinds only: "
            + ", ".join(sorted({k.name for k in _kinds()}))
            + "; these modules have trainable parameters they do not cover: "
            + "; ".join(unsupported)
            + ". Use structure='dense', 'block_diagonal' or 'diagonal', freeze them, or "
            "register a layer kind (natgrad.layers.register_layer_kind)."
        )
    if not layers:
        raise ValueError("the model has no trainable layer of a kind Kronecker factors cover ("
                         + ", ".join(sorted({k.name for k in _kinds()})) + ")")
    return layers


def _kinds() -> tuple[LayerKind, ...]:
    from natgrad.layers.base import registered_kinds

    return registered_kinds()
