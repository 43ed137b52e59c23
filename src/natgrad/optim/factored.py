"""Factored Tikhonov damping: (G + γ_G I)⁻¹ [∇W | ∇b] (Ā + γ_A I)⁻¹ with cached inverses.

Ā carries the bias as its last row and column (ā = [h; 1]), so its damped inverse is kept in
blocks, (Ā + γI)⁻¹ = [[P, q], [qᵀ, r]], found from the Schur complement of the bias entry:
with Ā = [[A_hh, m], [mᵀ, a]] and c = a + γ,

    S = A_hh + γI − m mᵀ / c,   P = S⁻¹,   q = −P m / c,   r = (1 − mᵀ q) / c,

which is what a Cholesky factorization of Ā + γI with the bias pivoted first computes, but on
the weight's own (aligned) size. The preconditioned gradient never forms [∇W | ∇b] either:

    X = G⁻¹ ∇W,  y = G⁻¹ ∇b,   [∇W | ∇b] ↦ [X P + y qᵀ | X q + r y].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.optim._accumulate import Accumulate, accumulate

__all__ = ["InverseBlocks", "cholesky_inverse", "damped_inverse_blocks", "precondition"]


@dataclass(frozen=True)
class InverseBlocks:
    """A damped inverse [[P, q], [qᵀ, r]] split at the bias (the last row and column).

    ``P`` acts on the weight's inputs (None if the weight is frozen), ``q`` couples them to
    the bias and ``r`` is the bias's own entry (both None without a bias; ``q`` also None
    without a weight). A factor without a bias (G, or Ā of a bias-free layer) is all ``P``.
    """

    P: Tensor | None
    q: Tensor | None
    r: Tensor | None

    @classmethod
    def from_inverse(cls, inverse: Tensor, has_weight: bool, has_bias: bool) -> InverseBlocks:
        """Split a full inverse whose last row and column belong to the bias (if any)."""
        if not has_bias:
            return cls(inverse, None, None)
        n = inverse.shape[0] - 1
        if not has_weight:
            return cls(None, None, inverse[n, n].clone())
        return cls(inverse[:n, :n].contiguous(), inverse[:n, n].contiguous(),
                   inverse[n, n].clone())

    def is_finite(self) -> bool:
        """Whether all blocks are finite; for P its diagonal decides, since P is positive
        definite: |P_ij| ≤ √(P_ii P_jj)."""
        parts = (None if self.P is None else self.P.diagonal(), self.q, self.r)
        return all(bool(torch.isfinite(t).all()) for t in parts if t is not None)


def cholesky_inverse(M: Tensor, shift: float | Tensor, overwrite: bool = False) -> Tensor | None:
    """(M + shift·I)⁻¹ = (L Lᵀ)⁻¹ by Cholesky; None if M + shift·I is not positive definite in
    floating point or the inverse is not finite (its diagonal decides: |X_ij| ≤ √(X_ii X_jj)
    for a positive definite X). ``overwrite`` lets it add the shift to M in place."""
    damped = M if overwrite else M.clone()
    damped.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(L)
    return inverse if bool(torch.isfinite(inverse.diagonal()).all()) else None


def damped_inverse_blocks(
    M: Tensor, shift: float, has_weight: bool, has_bias: bool
) -> InverseBlocks | None:
    """(M + shift·I)⁻¹ in blocks (bias last), by Cholesky of the Schur complement S when the
    factor has both a weight and a bias part; None where Cholesky fails (see module docstring).
    """
    if not (has_weight and has_bias):
        inverse = cholesky_inverse(M, shift)
        return None if inverse is None else InverseBlocks.from_inverse(inverse, has_weight,
                                                                       has_bias)
    n = M.shape[0] - 1
    c = M[n, n] + shift
    if not bool(c > 0):
        return None
    m = M[:n, n]
    P = cholesky_inverse(M[:n, :n] - torch.outer(m, m / c), shift, overwrite=True)
    if P is None:
        return None
    q = -(P @ m) / c
    blocks = InverseBlocks(P, q, (1 - m @ q) / c)
    return blocks if blocks.is_finite() else None


def precondition(
    G_inv: Tensor, A_inv: InverseBlocks, W: Tensor | None, b: Tensor | None,
    into_W: Accumulate | None = None, into_b: Accumulate | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """G⁻¹ [W | b] A⁻¹ for a weight part W (out, in) and a bias part b (out,), as the parts
    [X P + y qᵀ | X q + r y] with X = G⁻¹ W, y = G⁻¹ b (absent parts stay None).

    ``into_W`` / ``into_b`` accumulate a part into a tensor of G⁻¹'s dtype instead
    (T ← β T + α·part; for the weight inside the product X P, so that, e.g., a momentum buffer
    costs no extra pass over memory)."""
    X = None if W is None else G_inv @ W
    y = None if b is None else G_inv @ b
    dW = db = None
    if X is not None:
        if into_W is None:
            dW, alpha = X @ A_inv.P, 1.0
        else:
            target, beta, alpha = into_W
            dW = target.addmm_(X, A_inv.P, beta=beta, alpha=alpha)
        if y is not None:
            dW.addr_(y, A_inv.q, alpha=alpha)
    if y is not None:
        db = y * A_inv.r
        if X is not None:
            db.addmv_(X, A_inv.q)
        db = accumulate(db, into_b)
    return dW, db
