"""K-FAC: per Linear/Conv2d layer, F_layer ≈ G ⊗ Ā (Martens & Grosse 2015).

Ā = E[ā āᵀ] with ā = [h; 1], averaged over examples and positions; G = E[Σ_s g gᵀ] with
g = ∂ log p(ŷ|f)/∂a, summed over positions and averaged over examples (KFC "expand", Grosse &
Martens 2016). Both are accumulated in one forward pass and one batched backward pass per batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad import _diagonal_inputs as diagonal_inputs
from natgrad._linalg import check_invertible, eig_solve, kron_mv, sym_eig
from natgrad.capture import KFACLayer
from natgrad.fisher.base import ParameterLayout
from natgrad.fisher.kronecker import KroneckerStructuredFisher

__all__ = ["KFACFisher"]


class KFACFisher(KroneckerStructuredFisher):
    """F ≈ diag_l(G_l ⊗ Ā_l), in θ's order.

    ``mv``: (G ⊗ Ā) vec(V) = vec(G V Ā). ``solve``: exactly (G ⊗ Ā + δI)⁻¹ through the factors'
    eigendecompositions G = Q_G diag(s_G) Q_Gᵀ, Ā = Q_A diag(s_A) Q_Aᵀ:
    Q_G [(Q_Gᵀ V Q_A) ⊘ (s_G s_Aᵀ + δ)] Q_Aᵀ — never a dense matrix. ``G`` and ``A`` hold one
    factor per layer of ``layers``; the block of layer l is ``torch.kron(G[l], A[l])`` on
    vec([W | b]) taken row-major (:func:`natgrad.fisher.kronecker.layer_indices` maps it to θ).
    For a layer with one-hot inputs (``nn.Embedding``) ``A[l]`` is the vector f of Ā = diag(f)
    and the block G ⊗ diag(f) (:mod:`natgrad._diagonal_inputs`).

    Example:
        >>> from natgrad.fisher import fisher_matrix
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
        >>> F = fisher_matrix(model, torch.randn(5, 3, dtype=torch.float64), structure="kfac")
        >>> [tuple(G.shape) for G in F.G], [tuple(A.shape) for A in F.A]  # Ā = E[[h; 1][h; 1]ᵀ]
        ([(2, 2)], [(4, 4)])
        >>> v = torch.randn(F.num_params, dtype=torch.float64)
        >>> dense = F.to_dense() + 0.1 * torch.eye(F.num_params, dtype=torch.float64)
        >>> torch.allclose(F.solve(v, 0.1), torch.linalg.solve(dense, v))
        True
    """

    def __init__(
        self, layers: list[KFACLayer], G: list[Tensor], A: list[Tensor], layout: ParameterLayout
    ) -> None:
        super().__init__(layers, layout, G[0].dtype, G[0].device)
        self.G = G
        self.A = A
        self._eigs: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    def eigendecompositions(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """Per layer (s_G, Q_G, s_A, Q_A), computed once and cached; a diagonal Ā (one-hot
        inputs, stored as its diagonal f) is its own eigenvalues, s_A = f, with Q_A = None
        standing for the identity."""
        if self._eigs is None:
            eigs = []
            for layer, G, A in zip(self.layers, self.G, self.A, strict=True):
                s_G, Q_G = sym_eig(G, f"the G factor of {layer.name!r}")
                if A.dim() == 1:
                    eigs.append((s_G, Q_G, A, None))
                    continue
                s_A, Q_A = sym_eig(A, f"the A factor of {layer.name!r}")
                eigs.append((s_G, Q_G, s_A, Q_A))
            self._eigs = eigs
        return self._eigs

    def _block_dense(self, i: int) -> Tensor:
        if self.A[i].dim() == 1:
            return diagonal_inputs.kron_dense(self.G[i], self.A[i])
        return torch.kron(self.G[i], self.A[i])

    def _block_mv(self, i: int, V: Tensor) -> Tensor:
        if self.A[i].dim() == 1:
            return diagonal_inputs.kron_mv(self.G[i], self.A[i], V)
        return kron_mv(self.G[i], self.A[i], V)

    def _block_solve(self, i: int, V: Tensor, damping: float) -> Tensor:
        s_G, Q_G, s_A, Q_A = self.eigendecompositions()[i]
        scale = torch.outer(s_G, s_A)
        check_invertible(scale.min(), scale.max(), damping,
                         f"the K-FAC block of {self.layers[i].name!r}")
        if Q_A is None:  # Q_G [(Q_Gᵀ V) ⊘ (s_G fᵀ + δ)]
            return diagonal_inputs.eigen_apply(Q_G, 1 / (scale + damping), V)
        return eig_solve(Q_G, Q_A, scale, V, damping)

    def _block_trace(self, i: int) -> Tensor:
        return self.G[i].trace() * diagonal_inputs.factor_trace(self.A[i])
