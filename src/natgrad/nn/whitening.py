"""Pure math of PRONG's re-estimation: whitening matrices from moments, and the change of
coordinates that keeps a layer's function.

From n rows with sum s and second moment Σ x xᵀ: c = s / n (centred) or 0, Σ = E[x xᵀ] − c cᵀ
= E Λ Eᵀ; U = (Λ + εI)^{-1/2} Eᵀ (PCA) or E (Λ + εI)^{-1/2} Eᵀ (ZCA), so UᵀU = (Σ + εI)⁻¹ for
both, and U⁻¹ = E (Λ + εI)^{1/2} (PCA) or E (Λ + εI)^{1/2} Eᵀ (ZCA) without inverting U.

Low rank k (E_k: the eigenvectors of the k largest eigenvalues): U = r I + E_k diag(σ − r) E_kᵀ
with σ = (Λ_k + ε)^{-1/2} and r = (λ̄ + ε)^{-1/2}, λ̄ the mean of the other eigenvalues; so U
whitens the k leading directions exactly and scales the rest by r, and
U⁻¹ = r⁻¹ I + E_k diag(σ⁻¹ − r⁻¹) E_kᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad._linalg import sym_eig

__all__ = ["Whitening", "whitening_from_moments"]


@dataclass(frozen=True)
class Whitening:
    """c (in,), Σ (in, in), U and U⁻¹ (in, in), all float64; for low rank k also
    ``basis`` E_k (in, k), ``scale`` σ (k,) and ``rest`` r (scalar)."""

    c: Tensor
    cov: Tensor
    U: Tensor
    U_inv: Tensor
    basis: Tensor | None = None
    scale: Tensor | None = None
    rest: Tensor | None = None


def whitening_from_moments(
    count: int, total: Tensor | None, outer: Tensor | None, epsilon: float, centred: bool,
    mode: str, name: str = "layer", rank: int | None = None,
) -> Whitening:
    """The whitening of rows with ``count``, Σ x = ``total`` and Σ x xᵀ = ``outer``.

    Args:
        count, total, outer: n, Σ x (in,) and Σ x xᵀ (in, in) of the rows x (float64).
        epsilon: ε added to the covariance's eigenvalues.
        centred: c = Σ x / n if True, else c = 0 (Σ is then the uncentred second moment).
        mode: "pca" (U = (Λ + εI)^{-1/2} Eᵀ) or "zca" (U = E (Λ + εI)^{-1/2} Eᵀ).
        name: the layer's name, for messages.
        rank: k for the low-rank form of the module docstring (``mode`` is then ignored);
            ``None``: full.

    Both modes satisfy Uᵀ U = (Σ + εI)⁻¹ (U² = Σ⁻¹ holds for the symmetric ZCA root only).

    Raises:
        ValueError: naming ``name``, if the layer received no input or the moments are not
            finite.

    Example:
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> w = whitening_from_moments(100, x.sum(0), x.T @ x, 1e-3, True, "pca")
        >>> eye = torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(w.U.T @ w.U, torch.linalg.inv(w.cov + 1e-3 * eye))
        True
        >>> torch.allclose(w.U @ w.U_inv, eye)
        True
    """
    if count < 1 or total is None or outer is None:
        raise ValueError(f"{name!r} received no input during the statistics pass")
    if not (torch.isfinite(total).all() and torch.isfinite(outer).all()):
        raise ValueError(f"the input statistics of {name!r} are not finite")
    second = outer / count
    c = total / count if centred else torch.zeros_like(total)
    cov = second - torch.outer(c, c)
    cov = 0.5 * (cov + cov.T)
    lam, E = sym_eig(cov, f"the input covariance of {name!r}")
    lam = lam.clamp(min=0)
    if rank is not None and rank < lam.shape[0]:
        return _low_rank(c, cov, lam, E, epsilon, rank)
    root = (lam + epsilon).sqrt()
    if mode == "pca":
        U, U_inv = E.T / root.unsqueeze(1), E * root
    else:
        U, U_inv = (E / root) @ E.T, (E * root) @ E.T
    return Whitening(c=c, cov=cov, U=U, U_inv=U_inv)


def _low_rank(c: Tensor, cov: Tensor, lam: Tensor, E: Tensor, epsilon: float,
              rank: int) -> Whitening:
    """U = r I + E_k diag(σ − r) E_kᵀ from eigenvalues ``lam`` in ascending order."""
    basis = E[:, -rank:]
    scale = (lam[-rank:] + epsilon).rsqrt()
    rest = (lam[:-rank].mean() + epsilon).rsqrt()
    eye = torch.eye(E.shape[0], dtype=E.dtype, device=E.device)
    U = rest * eye + (basis * (scale - rest)) @ basis.T
    U_inv = eye / rest + (basis * (1 / scale - 1 / rest)) @ basis.T
    return Whitening(c=c, cov=cov, U=U, U_inv=U_inv, basis=basis, scale=scale, rest=rest)
