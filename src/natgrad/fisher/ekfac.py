"""EK-FAC: K-FAC's eigenbasis with re-fitted eigenvalues (George et al. 2018).

With Q = Q_G ⊗ Q_A from K-FAC's factors, F_layer ≈ Q diag(vec S) Qᵀ where
S_ij = (1/N) Σₙ Σₖ [(Q_Gᵀ Γ_{nk} Q_A)_ij]² and Γ_{nk} = Σ_s g_{nks} ā_{ns}ᵀ is the per-example
gradient of the layer's V = [W | b] for cotangent row k. S is the best diagonal in that basis,
so the Frobenius error to the exact block is never larger than K-FAC's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad import _diagonal_inputs as diagonal_inputs
from natgrad._linalg import check_invertible, eig_solve
from natgrad.capture import KFACLayer
from natgrad.fisher.base import ParameterLayout
from natgrad.fisher.kronecker import KroneckerStructuredFisher

__all__ = ["EKFACFisher", "projected_second_moment"]


def projected_second_moment(a: Tensor, g: Tensor, Q_A: Tensor, Q_G: Tensor) -> Tensor:
    """Σₙ Σₖ (Q_Gᵀ Γ_{nk} Q_A)² with Γ_{nk} = Σ_s g_{nks} ā_{ns}ᵀ: shape (out, in').

    a: (N, S, in'), g: (K, N, S, out). With one position (S = 1) the square factorizes:
    Σₙ (Σₖ g̃_{nk}²) (ã_n²)ᵀ, a single matrix product.
    """
    a_rot = a @ Q_A  # (N, S, in')
    g_rot = g @ Q_G  # (K, N, S, out)
    if a.shape[1] == 1:
        return g_rot.square().sum(0)[:, 0].T @ a_rot[:, 0].square()
    out_dim, in_dim = Q_G.shape[0], Q_A.shape[0]
    total = torch.zeros(out_dim, in_dim, dtype=a.dtype, device=a.device)
    chunk = max(1, (1 << 24) // max(1, g.shape[0] * out_dim * in_dim))
    for start in range(0, a.shape[0], chunk):
        gamma = torch.einsum("knso,nsi->knoi", g_rot[:, start:start + chunk],
                             a_rot[start:start + chunk])
        total += gamma.square().sum((0, 1))
    return total


class EKFACFisher(KroneckerStructuredFisher):
    """F ≈ diag_l(Q_l diag(vec S_l) Q_lᵀ), Q_l = Q_G ⊗ Q_A, in θ's order.

    ``mv``: Q_G [(Q_Gᵀ V Q_A) ⊙ S] Q_Aᵀ; ``solve``: Q_G [(Q_Gᵀ V Q_A) ⊘ (S + δ)] Q_Aᵀ;
    ``trace``: Σ S. ``Q_A[l]`` is None (the identity) for a layer with one-hot inputs
    (``nn.Embedding``): its basis is Q_G ⊗ I (:mod:`natgrad._diagonal_inputs`).
    """

    def __init__(
        self,
        layers: list[KFACLayer],
        Q_G: list[Tensor],
        Q_A: list[Tensor | None],
        scales: list[Tensor],
        layout: ParameterLayout,
    ) -> None:
        super().__init__(layers, layout, scales[0].dtype, scales[0].device)
        self.Q_G = Q_G
        self.Q_A = Q_A
        self.scales = scales

    def _block_dense(self, i: int) -> Tensor:
        Q_G, Q_A = self.Q_G[i], self.Q_A[i]
        if Q_A is None:  # Q_G ⊗ I (kron wants both operands laid out alike)
            Q_G = Q_G.contiguous()
            Q_A = torch.eye(self.scales[i].shape[1], dtype=self.dtype, device=self.device)
        Q = torch.kron(Q_G, Q_A)
        return (Q * self.scales[i].flatten()) @ Q.T

    def _block_mv(self, i: int, V: Tensor) -> Tensor:
        Q_G, Q_A = self.Q_G[i], self.Q_A[i]
        if Q_A is None:
            return diagonal_inputs.eigen_apply(Q_G, self.scales[i], V)
        return Q_G @ ((Q_G.T @ V @ Q_A) * self.scales[i]) @ Q_A.T

    def _block_solve(self, i: int, V: Tensor, damping: float) -> Tensor:
        S = self.scales[i]
        check_invertible(S.min(), S.max(), damping, f"the EK-FAC block of {self.layers[i].name!r}")
        if self.Q_A[i] is None:
            return diagonal_inputs.eigen_apply(self.Q_G[i], 1 / (S + damping), V)
        return eig_solve(self.Q_G[i], self.Q_A[i], S, V, damping)

    def _block_trace(self, i: int) -> Tensor:
        return self.scales[i].sum()
