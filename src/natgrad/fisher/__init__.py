"""Fisher information matrices of networks: ``fisher_matrix`` and one module per structure."""

from natgrad.fisher.base import FisherMatrix, ParameterLayout
from natgrad.fisher.block_diagonal import BlockDiagonalFisher
from natgrad.fisher.compute import STRUCTURES, fisher_matrix
from natgrad.fisher.data import ModelInputs
from natgrad.fisher.dense import DenseFisher
from natgrad.fisher.diagonal import DiagonalFisher
from natgrad.fisher.ekfac import EKFACFisher
from natgrad.fisher.kfac import KFACFisher
from natgrad.fisher.matrix_free import MatrixFreeFisher

__all__ = [
    "STRUCTURES",
    "BlockDiagonalFisher",
    "DenseFisher",
    "DiagonalFisher",
    "EKFACFisher",
    "FisherMatrix",
    "KFACFisher",
    "MatrixFreeFisher",
    "ModelInputs",
    "ParameterLayout",
    "fisher_matrix",
]
