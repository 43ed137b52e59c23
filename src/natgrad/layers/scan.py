"""Finding the layers of a model that Kronecker factors handle.

A :class:`KFACLayer` is one module matched by a registered :class:`~natgrad.layers.LayerKind`
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
    """

    name: str
    module: nn.Module
    has_weight: bool
    has_bias: bool
    kind: LayerKind

    @property
    def weight(self) -> Tensor:
        weight = self.kind.weight(self.module)
        assert weight is not None
        return weight

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
        prefix = "" if self.name == "<root>" else f"{self.name}."
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
    unsupported variants, extra parameters, and parameters owned by several modules — tied
    weights: every owner is listed, whichever was registered first).
    """
    owned: list[tuple[str, nn.Module, list[nn.Parameter]]] = []
    owners: dict[int, list[str]] = {}
    inside_attention = {id(child) for module in model.modules()
                        if isinstance(module, nn.MultiheadAttention)
                        for child in module.children()}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = name or "<root>"
        owned.append((label, module, own))
        for p in own:
            owners.setdefault(id(p), []).append(label)
    layers: list[KFACLayer] = []
    unsupported: list[str] = []
    for label, module, own in owned:
        others = sorted({o for p in own for o in owners[id(p)] if o != label})
        kind = kind_of(module)
        reason = None if kind is None else kind.unsupported_reason(module)
        cls = type(module).__name__
        if others:
            unsupported.append(f"{label} ({cls}, shares parameters with {', '.join(others)})")
        elif id(module) in inside_attention:  # MultiheadAttention reads its weights itself
            unsupported.append(f"{label} ({cls} inside MultiheadAttention, whose functional "
                               "forward uses its weights directly: not covered)")
        elif kind is None:
            unsupported.append(f"{label} ({cls})")
        elif reason is not None:
            unsupported.append(f"{label} ({reason})")
        elif {id(p) for p in own} - {id(kind.weight(module)), id(kind.bias(module))}:
            unsupported.append(f"{label} ({cls} with extra parameters)")
        elif kind.diagonal_inputs and kind.bias(module) is not None and kind.bias(
                module).requires_grad:  # ā = e_x has no ones column
            unsupported.append(f"{label} ({cls}: a kind with diagonal inputs and a bias)")
        else:
            weight, bias = kind.weight(module), kind.bias(module)
            layers.append(KFACLayer(
                name=label, module=module,
                has_weight=weight is not None and weight.requires_grad,
                has_bias=bias is not None and bias.requires_grad, kind=kind,
            ))
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
