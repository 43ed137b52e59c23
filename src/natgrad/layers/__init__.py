"""Layer kinds: one small adapter per kind of layer that Kronecker factors handle.

Built in: ``nn.Linear`` and its subclasses, ``nn.Conv2d`` (groups = 1), transformers'
``Conv1D``, ``nn.Embedding`` (diagonal input factor) and the projections of
``nn.MultiheadAttention`` (:mod:`natgrad.layers.attention`). Register your own with
:func:`register_layer_kind` (see :class:`LayerKind`).
"""

from natgrad.layers.attention import MultiheadAttentionKind
from natgrad.layers.base import LayerKind, kind_of, register_layer_kind, registered_kinds
from natgrad.layers.conv import Conv2dKind
from natgrad.layers.embedding import EmbeddingKind
from natgrad.layers.linear import Conv1DKind, LinearKind

__all__ = [
    "Conv1DKind",
    "Conv2dKind",
    "EmbeddingKind",
    "LayerKind",
    "LinearKind",
    "MultiheadAttentionKind",
    "kind_of",
    "register_layer_kind",
    "registered_kinds",
]

for _kind in (LinearKind(), Conv1DKind(), Conv2dKind(), EmbeddingKind(),
              MultiheadAttentionKind()):
    register_layer_kind(_kind)
