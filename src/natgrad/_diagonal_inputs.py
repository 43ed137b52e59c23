"""Kronecker blocks whose input factor is diagonal: layers fed one-hot rows (``nn.Embedding``).

A layer whose input ā is one-hot, ā = e_x (x a token of a vocabulary of size v), or zero (a
padding position), has Ā = E[ā āᵀ] = diag(f): f_j the fraction of positions holding token j.
Such a layer's statistics carry the indices x, shape (N, S, 1), never the one-hot rows (a
negative index stands for ā = 0); its K-FAC block is G ⊗ diag(f) on vec(W) row-major with W
of shape (out, v). Everything here works on G (out, out) and vectors or (out, v) matrices:
nothing of size v², no one-hot (N·S, v) tensor, no eigendecomposition of Ā (its
eigenvectors are the identity, its eigenvalues f):

    (G ⊗ diag(f) + δI)⁻¹ vec(V) = Q_G [(Q_Gᵀ V) ⊘ (s_G fᵀ + δ)],     G = Q_G diag(s_G) Q_Gᵀ,

and EK-FAC's scales in the basis Q_G ⊗ I are S = Σₙₖ (Q_Gᵀ Γₙₖ)² / N with
Γₙₖ = Σ_s g_{nks} e_{x_{ns}}ᵀ (George et al. 2018). Factored Tikhonov damping shifts f
elementwise: (diag(f) + π√δ I)⁻¹ = diag(1 ⊘ (f + π√δ)).
"""

from __future__ import annotations

import torch
from torch import Tensor

Accumulate = tuple[Tensor, float, float]
"""(T, β, α): accumulate a result d in place as T ← β T + α d (as in natgrad.optim)."""

__all__ = [
    "eigen_apply",
    "empty_input_factor",
    "factor_diagonal",
    "factor_trace",
    "factored_precondition",
    "input_counts",
    "kron_dense",
    "kron_mv",
    "projected_second_moment",
]


def input_counts(indices: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Σ ā āᵀ for one-hot rows ā = e_x, as its diagonal: c_j = #{positions with x = j}.

    indices: integers of any shape (negative: ā = 0, not counted). Returns (size,) of
    ``dtype``; Ā = c / (number of positions, padding included).
    """
    flat = indices.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=size).to(dtype)


def empty_input_factor(size: int, diagonal: bool, like: Tensor) -> Tensor:
    """A zero input factor: (size,) for diagonal inputs, else (size, size), like ``like``."""
    return like.new_zeros(size) if diagonal else like.new_zeros(size, size)


def factor_diagonal(A: Tensor) -> Tensor:
    """The diagonal of an input factor: A itself when stored as a vector, else A's diagonal."""
    return A if A.dim() == 1 else A.diagonal()


def factor_trace(A: Tensor) -> Tensor:
    """tr A of an input factor stored as a vector (diagonal) or a matrix."""
    return A.sum() if A.dim() == 1 else A.trace()


def kron_mv(G: Tensor, f: Tensor, V: Tensor) -> Tensor:
    """(G ⊗ diag(f)) vec(V) as a matrix: G V diag(f) = (G V) ⊙ fᵀ. G (o, o), f (v,), V (o, v)."""
    return (G @ V) * f


def kron_dense(G: Tensor, f: Tensor) -> Tensor:
    """G ⊗ diag(f) as an (o·v, o·v) matrix (for ``to_dense`` of small layers only)."""
    return torch.kron(G, torch.diag(f))


def projected_second_moment(indices: Tensor, g: Tensor, Q_G: Tensor, size: int) -> Tensor:
    """Σₙ Σₖ (Q_Gᵀ Γₙₖ)² with Γₙₖ = Σ_s g_{nks} e_{x_{ns}}ᵀ: shape (out, size).

    indices: (N, S, 1) tokens x (negative: no input), g: (K, N, S, out). The rotated gradients
    Q_Gᵀ g of the positions of one example holding one token are summed (an ``index_add`` over
    the (example, token) pairs that occur), squared, summed over k, and added into the token's
    column: memory of the order of g itself, never (N, out, size).
    """
    K, N, S, out = g.shape
    x = indices.reshape(N * S)
    g_rot = (g @ Q_G).reshape(K, N * S, out)
    valid = x >= 0
    keys = (torch.arange(N, device=x.device).repeat_interleave(S) * size + x)[valid]
    pairs, inverse = torch.unique(keys, return_inverse=True)
    sums = g_rot.new_zeros(K, pairs.shape[0], out).index_add_(1, inverse, g_rot[:, valid])
    total = g_rot.new_zeros(size, out).index_add_(0, pairs % size, sums.square().sum(0))
    return total.T


def eigen_apply(
    Q_G: Tensor, scale: Tensor, W: Tensor, into_W: Accumulate | None = None
) -> Tensor:
    """Q_G [(Q_Gᵀ W) ⊙ C] for W (out, v) and C (out, v), in the block's eigenbasis Q_G ⊗ I:
    the exact damped solve with C = 1 ⊘ (Λ + δ), the product with the block with C = Λ
    (Λ = s_G fᵀ for K-FAC, S for EK-FAC). ``into_W`` accumulates the result."""
    T = (Q_G.T @ W).mul_(scale)
    if into_W is None:
        return Q_G @ T
    target, beta, alpha = into_W
    return target.addmm_(Q_G, T, beta=beta, alpha=alpha)


def factored_precondition(
    G_inv: Tensor, A_inv: Tensor, W: Tensor, into_W: Accumulate | None = None
) -> Tensor:
    """(G + γ_G I)⁻¹ W (diag(f) + γ_A I)⁻¹ = (G_inv W) ⊙ A_invᵀ with A_inv = 1 ⊘ (f + γ_A)."""
    result = (G_inv @ W).mul_(A_inv)
    if into_W is None:
        return result
    target, beta, alpha = into_W
    return target.mul_(beta).add_(result, alpha=alpha)
