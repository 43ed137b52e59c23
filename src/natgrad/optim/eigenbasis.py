"""Exact damping in the Kronecker eigenbasis, on the parts W and b of [∇W | ∇b].

(G ⊗ Ā + δI)⁻¹ vec(V) = Q_G [(Q_Gᵀ V Q_A) ⊙ C] Q_Aᵀ with C = 1 ⊘ (Λ + δ), Λ = s_G s_Aᵀ (K-FAC)
or S (EK-FAC). Q_A's rows are split at the bias, Q_A = [Q_h; q_bᵀ], so that V = [W | b] is never
formed:

    V Q_A = W Q_h + b q_bᵀ,        R Q_Aᵀ = [R Q_hᵀ | R q_b],

and the eigenbasis dimension in' is padded with zero columns of Q_A (and zeros of C) to a
multiple of 16, so that every product runs on aligned sizes; the padded columns of V Q_A are zero
and add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.optim._accumulate import Accumulate, accumulate

__all__ = ["PaddedBasis", "precondition"]

_MULTIPLE = 16


@dataclass(frozen=True)
class PaddedBasis:
    """Ā's eigenbasis split at the bias and padded: ``Q_h`` (in, P) for the weight's inputs
    (None if the weight is frozen), ``q_b`` (P,) for the bias (None without one), and
    ``scale`` = C (out, P), zero in the padded columns."""

    Q_h: Tensor | None
    q_b: Tensor | None
    scale: Tensor

    @classmethod
    def build(cls, Q_A: Tensor, eigenvalues: Tensor, damping: float, has_weight: bool,
              has_bias: bool) -> PaddedBasis:
        """From Q_A (in', in') and Λ (out, in'): C = 1 ⊘ (Λ + δ), both padded to P columns."""
        width = Q_A.shape[1]
        padded = -(-width // _MULTIPLE) * _MULTIPLE
        Q = Q_A.new_zeros(Q_A.shape[0], padded)
        Q[:, :width] = Q_A
        scale = eigenvalues.new_zeros(eigenvalues.shape[0], padded)
        scale[:, :width] = 1 / (eigenvalues + damping)
        n = Q.shape[0] - int(has_bias)
        return cls(Q[:n] if has_weight else None, Q[n] if has_bias else None, scale)


def precondition(
    Q_G: Tensor, basis: PaddedBasis, W: Tensor | None, b: Tensor | None,
    into_W: Accumulate | None = None, into_b: Accumulate | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Q_G [(Q_Gᵀ (W Q_h + b q_bᵀ)) ⊙ C] [Q_hᵀ | q_b] for a weight part W (out, in) and a bias
    part b (out,) (absent parts stay None). ``into_W`` / ``into_b`` accumulate a part into a
    tensor of Q_G's dtype (T ← β T + α·part; the weight's inside the last product)."""
    if W is not None:
        T = W @ basis.Q_h
        if b is not None:
            T.addr_(b, basis.q_b)
    else:
        T = torch.outer(b, basis.q_b)  # type: ignore[arg-type]
    T = Q_G @ ((Q_G.T @ T).mul_(basis.scale))
    dW = db = None
    if W is not None:
        Q_h = basis.Q_h.T  # type: ignore[union-attr]
        if into_W is None:
            dW = T @ Q_h
        else:
            target, beta, alpha = into_W
            dW = target.addmm_(T, Q_h, beta=beta, alpha=alpha)
    if b is not None:
        db = accumulate(T @ basis.q_b, into_b)
    return dW, db
