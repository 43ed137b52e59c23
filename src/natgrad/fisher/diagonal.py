"""The diagonal Fisher: F_ii = (1/N) Σₙ Σₖ (Jₙᵀ r_{nk})_i², computed without forming F."""

from __future__ import annotations

from torch import Tensor

from natgrad._linalg import check_invertible
from natgrad.fisher.base import FisherMatrix, ParameterLayout

__all__ = ["DiagonalFisher"]


class DiagonalFisher(FisherMatrix):
    """F ≈ diag(d): mv is d ⊙ v and solve is v ⊘ (d + δ)."""

    def __init__(self, diagonal: Tensor, layout: ParameterLayout) -> None:
        super().__init__(layout, diagonal.dtype, diagonal.device)
        self.diagonal = diagonal

    def to_dense(self) -> Tensor:
        return self.diagonal.diag()

    def _mv(self, v: Tensor) -> Tensor:
        return self.diagonal * v

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        check_invertible(self.diagonal.min(), self.diagonal.max(), damping, "the diagonal Fisher")
        return v / (self.diagonal + damping)

    def trace(self) -> Tensor:
        return self.diagonal.sum()
