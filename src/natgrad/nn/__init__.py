"""Natural Neural Networks: whitened layers, whiten/unwhiten and PRONG."""

from natgrad.nn.convert import unwhiten, whiten
from natgrad.nn.layers import WhitenedConv2d, WhitenedLayer, WhitenedLinear
from natgrad.nn.preconditioner import PRONGPreconditioner
from natgrad.nn.prong import PRONG

__all__ = [
    "PRONG",
    "PRONGPreconditioner",
    "WhitenedConv2d",
    "WhitenedLayer",
    "WhitenedLinear",
    "unwhiten",
    "whiten",
]
