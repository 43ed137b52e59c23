"""natgrad: natural-gradient training for PyTorch."""

from natgrad import layers, likelihoods, nn, optim
from natgrad.fisher import FisherMatrix, fisher_matrix
from natgrad.likelihoods import get_likelihood

__all__ = [
    "FisherMatrix", "fisher_matrix", "get_likelihood", "layers", "likelihoods", "nn", "optim",
]
__version__ = "0.1.0"
