"""``whiten`` and ``unwhiten``: between plain Linear/Conv2d layers and whitened ones, with the
network's function unchanged both ways.

whiten: V = W, d = b, U = I, c = 0. unwhiten: W = V U, b = d − W c (Conv2d: per kernel tap).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from natgrad.nn.layers import WhitenedConv2d, WhitenedLayer, WhitenedLinear

__all__ = ["unwhiten", "whiten"]


def _layer_rank(rank: int | float | None, in_dim: int) -> int | None:
    """An int is the rank itself; a float f in (0, 1] means max(1, round(f · in))."""
    if rank is None or isinstance(rank, int):
        return rank  # type: ignore[return-value]
    if not (isinstance(rank, float) and 0 < rank <= 1):
        raise ValueError(f"rank must be None, an integer >= 1 or a fraction in (0, 1], "
                         f"got {rank!r}")
    return max(1, round(rank * in_dim))


def _whitened(module: nn.Module, name: str, rank: int | float | None = None) -> WhitenedLayer:
    kw = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        layer: WhitenedLayer = WhitenedLinear(
            module.in_features, module.out_features, module.bias is not None, **kw,
            rank=_layer_rank(rank, module.in_features))
    else:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            raise ValueError(f"cannot whiten {name!r}: Conv2d with groups={module.groups} "
                             "(only groups=1)")
        if module.padding_mode != "zeros":
            raise ValueError(f"cannot whiten {name!r}: padding_mode={module.padding_mode!r} "
                             "(only 'zeros')")
        layer = WhitenedConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.bias is not None, **kw,
            rank=_layer_rank(rank, module.in_channels))
    with torch.no_grad():
        layer.V.copy_(module.weight)
        if layer.d is not None:
            layer.d.copy_(module.bias)
    layer.V.requires_grad_(module.weight.requires_grad)
    if layer.d is not None:
        layer.d.requires_grad_(module.bias.requires_grad)
    layer.train(module.training)
    return layer


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def whiten(
    model: nn.Module, layers: Iterable[str] | None = None, rank: int | float | None = None
) -> nn.Module:
    """Replace Linear/Conv2d layers (all, or those named in ``layers``) by whitened layers
    computing exactly the same function (U = I, c = 0). Modifies ``model`` in place and
    returns it (or the new layer, if ``model`` itself is a Linear/Conv2d).

    ``rank``: ``None`` (U dense, in × in), an integer k or a fraction f of each layer's input
    size (k = max(1, round(f · in))): U is then stored as r I + B diag(σ − r) Bᵀ with k columns
    in B, so that applying it costs 2k instead of ``in`` multiply-adds per input feature; PRONG
    whitens the k leading directions of each layer exactly and scales the rest by one factor.
    A rank ≥ ``in`` means full.

    Raises:
        ValueError: a named layer that does not exist or is not a Linear/Conv2d, a grouped or
            non-zero-padded convolution, a bad ``rank``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> net = whiten(net)
        >>> type(net[0]).__name__
        'WhitenedLinear'
    """
    candidates = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    if layers is None:
        chosen = list(candidates)
    else:
        chosen = list(layers)
        missing = [n for n in chosen if n not in candidates]
        if missing:
            raise ValueError(f"cannot whiten {missing}: not Linear/Conv2d layers of the model; "
                             f"choose among {sorted(candidates)}")
    replacements = {name: _whitened(candidates[name], name, rank)  # validate all first
                    for name in chosen}
    for name, layer in replacements.items():
        model = _replace(model, name, layer)
    return model


def unwhiten(model: nn.Module) -> nn.Module:
    """Fold every whitened layer back into a plain Linear/Conv2d (W = V U, b = d − W c), so a
    trained model ships without natgrad. Modifies ``model`` in place and returns it.

    Example:
        >>> net = whiten(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        >>> type(unwhiten(net)[0]).__name__
        'Linear'
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, WhitenedLayer):
            continue
        W, b = module.canonical()
        kw = {"device": W.device, "dtype": W.dtype}
        if isinstance(module, WhitenedLinear):
            plain: nn.Module = nn.Linear(module.in_features, module.out_features,
                                         b is not None, **kw)
        else:
            assert isinstance(module, WhitenedConv2d)
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                              module.stride, module.padding, module.dilation,
                              bias=b is not None, **kw)
        with torch.no_grad():
            plain.weight.copy_(W)
            if b is not None:
                plain.bias.copy_(b)
        plain.weight.requires_grad_(module.V.requires_grad)
        if module.d is not None:
            plain.bias.requires_grad_(module.d.requires_grad)
        plain.train(module.training)
        model = _replace(model, name, plain)
    return model
