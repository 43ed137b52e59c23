"""The dense Fisher: the whole (P, P) matrix F = (1/N) Σₙ Jₙᵀ D(fₙ) Jₙ = Mᵀ M / N."""

from __future__ import annotations

from torch import Tensor

from natgrad._linalg import check_invertible, sym_eig, sym_eig_solve
from natgrad.fisher.base import FisherMatrix, ParameterLayout

__all__ = ["DenseFisher"]


class DenseFisher(FisherMatrix):
    """F as one (P, P) matrix; ``solve`` uses its (cached) eigendecomposition F = Q diag(s) Qᵀ:
    (F + δI)⁻¹ v = Q [(Qᵀ v) ⊘ (s + δ)].
    """

    def __init__(self, matrix: Tensor, layout: ParameterLayout) -> None:
        super().__init__(layout, matrix.dtype, matrix.device)
        self.matrix = matrix
        self._eig: tuple[Tensor, Tensor] | None = None

    def to_dense(self) -> Tensor:
        return self.matrix.clone()

    def _mv(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        if self._eig is None:
            self._eig = sym_eig(self.matrix, "the dense Fisher")
        s, Q = self._eig
        check_invertible(s[0], s[-1], damping, "the dense Fisher")
        return sym_eig_solve(s, Q, v, damping)

    def trace(self) -> Tensor:
        return self.matrix.diagonal().sum()
