"""``whiten`` and ``unwhiten``: between plain Linear/Conv2d layers and whitened ones, with the
network's function unchanged both ways.

whiten: V = W, d = b, U = I, c = 0. unwhiten: W = V U, b = d − W c (Conv2d: per kernel tap).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from natgrad.nn.layers import WhitenedConv2d, WhitenedLayer, WhitenedLinear

__all__ = ["unwhiten", "whiten"]


AUTO_FULL_BELOW = 128
"""``rank="auto"``: layers with fewer inputs than this are whitened in full."""


def auto_rank(in_dim: int) -> int | None:
    """``rank="auto"``: None (full U) below :data:`AUTO_FULL_BELOW` inputs, else at most
    k = ⌈2 √in⌉ directions (1000 inputs: 64), so that applying U costs 2k·in instead of in²
    multiply-adds per row and a re-estimation O(in² k) instead of an O(in³)
    eigendecomposition."""
    return None if in_dim < AUTO_FULL_BELOW else math.ceil(2 * math.sqrt(in_dim))


def _layer_rank(rank: int | float | str | None, in_dim: int) -> tuple[int | None, bool]:
    """(k, at most): an int is the rank itself; a float f in (0, 1] means
    max(1, round(f · in)); "auto" is :func:`auto_rank`, whitening at most k directions."""
    if rank == "auto":
        return auto_rank(in_dim), True
    if rank is None or (isinstance(rank, int) and not isinstance(rank, bool)):
        return rank, False  # type: ignore[return-value]
    if not (isinstance(rank, float) and 0 < rank <= 1):
        raise ValueError(f"rank must be \"auto\", None, an integer >= 1 or a fraction in "
                         f"(0, 1], got {rank!r}")
    return max(1, round(rank * in_dim)), False


def _whitened(module: nn.Module, name: str,
              rank: int | float | str | None = "auto") -> WhitenedLayer:
    kw = {"device": module.weight.device, "dtype": module.weight.dtype}
    in_dim = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    k, at_most = _layer_rank(rank, in_dim)
    if isinstance(module, nn.Linear):
        layer: WhitenedLayer = WhitenedLinear(
            module.in_features, module.out_features, module.bias is not None, **kw, rank=k)
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
            module.padding, module.dilation, module.bias is not None, **kw, rank=k)
    layer.rank_at_most = at_most and layer.rank is not None
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


def _aliases(model: nn.Module, accept: Callable[[nn.Module], bool]) -> dict[str, list[str]]:
    """Every module ``accept``ed, by its first name → all the names it is registered under (a
    module reused at two places has two)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if accept(module):
            names.setdefault(id(module), []).append(name)
    return {found[0]: found for found in names.values()}


def _tied(model: nn.Module, name: str) -> list[str]:
    """Names of the other modules holding the weight or bias of module ``name`` (tied or
    shared parameters), e.g. an ``nn.Embedding`` tied to a Linear output head."""
    module = model.get_submodule(name)
    own = {id(p) for p in module.parameters(recurse=False)}
    return sorted({other or "<root>" for other, m in model.named_modules(remove_duplicate=False)
                   if m is not module
                   and own & {id(p) for p in m.parameters(recurse=False)}})


def whiten(
    model: nn.Module, layers: Iterable[str] | None = None,
    rank: int | float | str | None = "auto",
) -> nn.Module:
    """Replace Linear/Conv2d layers (all, or those named in ``layers``) by whitened layers
    computing exactly the same function (U = I, c = 0). Modifies ``model`` in place and
    returns it (or the new layer, if ``model`` itself is a Linear/Conv2d).

    ``rank``: ``"auto"`` (the default: layers with fewer than 128 inputs full, wider ones at
    most ⌈2 √in⌉ directions, see :func:`auto_rank`), ``None`` (U dense, in × in), an integer
    k or a fraction f of each layer's input size (k = max(1, round(f · in))): U is then stored
    as r I + B diag(σ − r) Bᵀ with k columns in B, so that applying it costs 2k instead of
    ``in`` multiply-adds per input feature; PRONG whitens the k leading directions of each
    layer and scales the rest by one factor (:func:`natgrad.nn.whitening.top_eigenpairs`,
    exact k; with ``"auto"`` the k' ≤ k leading directions its randomized iteration resolves
    to the whitening tolerance, without an O(in³) eigendecomposition). A rank ≥ ``in`` means
    full.

    Shared modules and tied weights: a layer registered under several names (the same module
    object reused) is replaced by one whitened layer under all of them, so it stays shared. A
    layer whose weight or bias is also held by another module (two Linears sharing one weight,
    an ``nn.Embedding`` tied to a Linear output head) is refused: the whitened layer would get
    its own V and d and the tie would be silently broken.

    Raises:
        ValueError: a named layer that does not exist or is not a Linear/Conv2d, a grouped or
            non-zero-padded convolution, a bad ``rank``, a layer with tied weights (naming the
            modules it shares them with and the ``layers=`` list that leaves it out). The model
            is unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> net = whiten(net)
        >>> type(net[0]).__name__
        'WhitenedLinear'
    """
    aliases = _aliases(model, lambda m: type(m) in (nn.Linear, nn.Conv2d))
    first = {alias: name for name, names in aliases.items() for alias in names}
    read = _weights_read_by_parent(model, aliases)
    if layers is None:
        chosen = [name for name in aliases if name not in read]
        if read:
            warnings.warn(
                f"whiten() left {sorted(read)} plain: their parent ({read[sorted(read)[0]]}) "
                "reads their .weight directly (torch's fast path), which a whitened layer does "
                "not have", RuntimeWarning, stacklevel=2)
    else:
        missing = [n for n in layers if n not in first]
        if missing:
            raise ValueError(f"cannot whiten {missing}: not Linear/Conv2d layers of the model; "
                             f"choose among {sorted(first)}")
        chosen = list(dict.fromkeys(first[n] for n in layers))
        refused = [name for name in chosen if name in read]
        if refused:
            raise ValueError(
                f"cannot whiten {refused}: their parent ({read[refused[0]]}) reads their "
                ".weight directly (torch's fast path in eval mode), which a whitened layer "
                "does not have; the model is unchanged")
    tied = {name: others for name in chosen if (others := _tied(model, name))}
    if tied:
        what = "; ".join(f"{name!r} shares its parameters with {others}"
                         for name, others in tied.items())
        rest = [name for name in chosen if name not in tied]
        raise ValueError(f"cannot whiten tied weights: {what}. A whitened layer has its own "
                         "V and d, so whitening would untie them; leave these layers out: "
                         f"whiten(model, layers={rest})")
    replacements = {name: _whitened(model.get_submodule(name), name, rank)  # validate first
                    for name in chosen}
    for name, layer in replacements.items():
        for alias in aliases[name]:
            model = _replace(model, alias, layer)
    return model


_READS_CHILD_WEIGHTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
"""Stock modules whose forward reads their Linear children's ``.weight`` and ``.bias``
(``torch._transformer_encoder_layer_fwd``'s fast path, taken in eval mode without gradients)."""


def _weights_read_by_parent(model: nn.Module, aliases: dict[str, list[str]]) -> dict[str, str]:
    """The layers (by first name) whose parent module reads their weight directly, with the
    parent's class name."""
    read: dict[str, str] = {}
    for name, names in aliases.items():
        for alias in names:
            parent = model.get_submodule(alias.rpartition(".")[0]) if "." in alias else model
            if isinstance(parent, _READS_CHILD_WEIGHTS) and alias != "":
                read[name] = type(parent).__name__
    return read


def unwhiten(model: nn.Module) -> nn.Module:
    """Fold every whitened layer back into a plain Linear/Conv2d (W = V U, b = d − W c), so a
    trained model ships without natgrad. Modifies ``model`` in place and returns it.

    Example:
        >>> net = whiten(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        >>> type(unwhiten(net)[0]).__name__
        'Linear'
    """
    for names in _aliases(model, lambda m: isinstance(m, WhitenedLayer)).values():
        plain = _plain(model.get_submodule(names[0]))
        for name in names:  # a shared layer stays shared
            model = _replace(model, name, plain)
    return model


def _plain(module: WhitenedLayer) -> nn.Module:
    """The Linear/Conv2d with W = V U, b = d − W c, ``requires_grad`` and mode of ``module``."""
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
    return plain
