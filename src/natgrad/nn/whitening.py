"""Pure math of PRONG's re-estimation: whitening matrices from moments, and the change of
coordinates that keeps a layer's function.

From n rows with sum s and second moment Σ x xᵀ: c = s / n (centred) or 0, Σ = E[x xᵀ] − c cᵀ
= E Λ Eᵀ; U = (Λ + εI)^{-1/2} Eᵀ (PCA) or E (Λ + εI)^{-1/2} Eᵀ (ZCA), so UᵀU = (Σ + εI)⁻¹ for
both, and U⁻¹ = E (Λ + εI)^{1/2} (PCA) or E (Λ + εI)^{1/2} Eᵀ (ZCA) without inverting U.

Low rank k (E_k: the eigenvectors of the k largest eigenvalues): U = r I + E_k diag(σ − r) E_kᵀ
with σ = (Λ_k + ε)^{-1/2} and r = (λ̄ + ε)^{-1/2}, λ̄ the mean of the other eigenvalues; so U
whitens the k leading directions (U Σ U = diag(Λ_k/(Λ_k + ε)) on them) and scales the rest by
r, and U⁻¹ = r⁻¹ I + E_k diag(σ⁻¹ − r⁻¹) E_kᵀ. E_k comes from :func:`top_eigenpairs`: exact
(full eigendecomposition) or randomized, the randomized result kept only when the cross terms
of U Σ U between the k directions and the rest are ≤ ``WHITENING_TOLERANCE`` = 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad._linalg import EigenDecompositionError, sym_eig

__all__ = ["Whitening", "low_rank_times", "top_eigenpairs", "whitening_from_moments"]


@dataclass(frozen=True)
class Whitening:
    """c (in,) and Σ (in, in), float64, with U and U⁻¹ (in, in) for full whitening or, for
    low rank k, ``basis`` E_k (in, k), ``scale`` σ (k,) and ``rest`` r (U, U⁻¹ ``None``)."""

    c: Tensor
    cov: Tensor
    U: Tensor | None
    U_inv: Tensor | None
    basis: Tensor | None = None
    scale: Tensor | None = None
    rest: Tensor | None = None

    def times_inverse(self, X: Tensor) -> Tensor:
        """X U⁻¹ for X of shape (..., in): dense, or X/r + (X E_k) diag(σ⁻¹ − r⁻¹) E_kᵀ."""
        if self.U_inv is not None:
            return X @ self.U_inv
        assert self.basis is not None and self.scale is not None and self.rest is not None
        return low_rank_times(X, self.basis, 1 / self.scale, 1 / self.rest)


def low_rank_times(X: Tensor, basis: Tensor, scale: Tensor, rest: Tensor) -> Tensor:
    """X M for M = r I + B diag(σ − r) Bᵀ (symmetric), along X's last dimension:
    r X + (X B) diag(σ − r) Bᵀ, in X's dtype. With σ⁻¹ and r⁻¹ it gives X M⁻¹ (B orthonormal)."""
    B, sigma, r = (t.to(X.dtype) for t in (basis, scale, rest))
    rows = X.reshape(-1, X.shape[-1])
    return torch.addmm(rows * r, (rows @ B) * (sigma - r), B.T).reshape(X.shape)


def whitening_from_moments(
    count: int, total: Tensor | None, outer: Tensor | None, epsilon: float, centred: bool,
    mode: str, name: str = "layer", rank: int | None = None, at_most: bool = False,
    precision: float | None = None,
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
        at_most: the low-rank form whitens only the k' ≤ k leading directions that the
            randomized solver resolves (:func:`top_eigenpairs`); the basis is padded with
            zero columns (σ = r there) to k.
        precision: the machine epsilon u of the layer's dtype; the low-rank form then
            whitens only directions with r/σ_i ≤ :func:`max_ratio` (u) (see
            :func:`_within_precision`). ``None``: no bound.

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
    if rank is not None and rank < cov.shape[0]:
        return _low_rank(c, cov, epsilon, rank, name, at_most, precision)
    lam, E = sym_eig(cov, f"the input covariance of {name!r}")
    lam = lam.clamp(min=0)
    root = (lam + epsilon).sqrt()
    if mode == "pca":
        U, U_inv = E.T / root.unsqueeze(1), E * root
    else:
        U, U_inv = (E / root) @ E.T, (E * root) @ E.T
    return Whitening(c=c, cov=cov, U=U, U_inv=U_inv)


FUNCTION_TOLERANCE = 1e-5
"""The relative change of a low-rank layer's function that the rounding of its whitening may
cause (:func:`max_ratio`)."""


def max_ratio(precision: float) -> float:
    """The largest r/σ_i a low-rank U may hold in a dtype of machine epsilon u:
    max(τ_f, 10 u) / u, τ_f = :data:`FUNCTION_TOLERANCE` (float32: 83; bfloat16: 10)."""
    return max(FUNCTION_TOLERANCE, 10 * precision) / precision


def _within_precision(cov: Tensor, lam: Tensor, basis: Tensor, epsilon: float,
                      precision: float) -> tuple[Tensor, Tensor]:
    """The pairs (ascending ``lam``) left after dropping the largest while
    r/σ_top = √((λ_top + ε)/(λ̄ + ε)) > :func:`max_ratio` (λ̄ the mean of the other
    eigenvalues, dropped ones included).

    Along a whitened direction the layer computes r x_i + (σ_i − r) x_i in its own dtype, an
    error u r |x_i| that V = W U⁻¹ multiplies by 1/σ_i: relative to the output, u r/σ_i. An
    uncentred input (no trainable bias: c = 0) with a mean offset has λ₁ ~ ‖mean‖², and the
    float32 function changed by 3e-4 at offset 10 and 0.29 at 1e4 (a red team); a dropped
    direction is scaled by r with the rest, which rounds like the plain layer."""
    bound = max_ratio(precision) ** 2
    kept = lam.shape[0]
    while kept and float((lam[kept - 1].clamp(min=0) + epsilon)
                         / (_rest_mean(cov, lam[:kept]) + epsilon)) > bound:
        kept -= 1
    return lam[:kept], basis[:, :kept]


def _low_rank(c: Tensor, cov: Tensor, epsilon: float, rank: int, name: str,
              at_most: bool = False, precision: float | None = None) -> Whitening:
    """U = r I + E_k diag(σ − r) E_kᵀ, r from the mean of the other eigenvalues (via the
    trace: (tr Σ − Σ λ_k) / (n − k)); E_k accepted from the randomized solver only when it
    whitens to ``WHITENING_TOLERANCE`` (:func:`top_eigenpairs` with ``shift`` = ε); with
    ``at_most``, k' ≤ k columns of it, padded with zero columns; with ``precision``, without
    the directions :func:`_within_precision` drops (zero columns too)."""
    lam, basis = top_eigenpairs(cov, rank, f"the input covariance of {name!r}",
                                shift=epsilon, at_most=at_most)
    lam = lam.clamp(min=0)
    if precision is not None:
        lam, basis = _within_precision(cov, lam, basis, epsilon, precision)
    rest = (_rest_mean(cov, lam) + epsilon).rsqrt()
    missing = rank - lam.shape[0]
    scale = (lam + epsilon).rsqrt()
    if missing:
        basis = torch.cat([basis.new_zeros(basis.shape[0], missing), basis], dim=1)
        scale = torch.cat([rest.expand(missing), scale])
    return Whitening(c=c, cov=cov, U=None, U_inv=None, basis=basis, scale=scale, rest=rest)


def _rest_mean(S: Tensor, lam: Tensor) -> Tensor:
    """λ̄ = (tr S − Σ λ_k) / (n − k) ≥ 0, the mean of the eigenvalues not in ``lam``."""
    return ((S.trace() - lam.clamp(min=0).sum()) / (S.shape[0] - lam.shape[0])).clamp(min=0)


WHITENING_TOLERANCE = 1e-3
"""τ: the randomized top-k result is kept only if every cross term of U Σ Uᵀ between the k
whitened directions and the rest is ≤ τ (see :func:`top_eigenpairs`)."""


def top_eigenpairs(
    S: Tensor, k: int, name: str = "matrix", oversample: int | None = None,
    iterations: int = 4, shift: float = 0.0, tolerance: float = WHITENING_TOLERANCE,
    at_most: bool = False,
) -> tuple[Tensor, Tensor]:
    """The k largest eigenvalues (ascending) of a symmetric PSD (n, n) S and their
    orthonormal eigenvectors (n, k); with ``at_most``, the k' ≤ k largest that the randomized
    iteration resolves to the tolerance below.

    For m = k + p ≤ n / 4 (p = ``oversample``, default max(10, k // 2)): randomized subspace
    iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4): Q = orth(S Ω), q = ``iterations``
    times Q ← orth(S Q), then the Rayleigh–Ritz step eig(Qᵀ S Q) — O(n² m) per iteration
    instead of O(n³). Ω is drawn from a fixed seed, so the result is deterministic and the
    global RNG untouched.

    The Ritz pairs (θ_i, q_i) are kept only if they whiten S: with σ_i = (θ_i + s)^{-1/2},
    r = (θ̄ + s)^{-1/2} (s = ``shift``, θ̄ = (tr S − Σ θ_i)/(n − k)) and the residuals
    ρ_i = S q_i − θ_i q_i (orthogonal to every q_j), U = r I + Q_k diag(σ − r) Q_kᵀ gives
    U S U = diag(θ/(θ + s)) on span(Q_k), r² S on its complement, and cross terms σ_i r ρ_i;
    the pairs are kept when max_i σ_i r ‖ρ_i‖ ≤ τ = ``tolerance``. This is checked after q
    iterations and, if it was then ≤ τ^{1/3} (the error falls like ρ^q), again after 3q.
    Otherwise (no spectral gap after the k-th eigenvalue: the iteration converges as
    (λ_{m+1}/λ_k)^q), for small n, or if the iteration fails: the full eigendecomposition —
    except with ``at_most``, where the leading Ritz pairs that pass the check are kept if they
    are at least half of k (the largest k' for which the k' largest all have σ_i r ‖ρ_i‖ ≤ τ,
    r recomputed from θ̄ over the other n − k') and no O(n³) eigendecomposition is made: the
    Ritz residuals are orthogonal to all m Ritz vectors, so the cross terms of U S U between
    the k' directions and the rest are still σ_i r ρ_i. Fewer than k/2 resolved (a spectrum
    without a gap, where the leading directions matter most): the full eigendecomposition
    and exactly k.
    """
    n = S.shape[0]
    m = k + (max(10, k // 2) if oversample is None else oversample)
    if 4 * m <= n:
        generator = torch.Generator(device=S.device).manual_seed(0)
        omega = torch.randn(n, m, dtype=S.dtype, device=S.device, generator=generator)
        Q = torch.linalg.qr(S @ omega).Q
        ritz: tuple[Tensor, Tensor, Tensor] | None = None
        for rounds, promising in ((iterations, tolerance ** (1 / 3)), (2 * iterations, 0.0)):
            for _ in range(rounds):
                Q = torch.linalg.qr(S @ Q).Q
            try:
                w, Z = sym_eig(Q.T @ S @ Q, name)
            except EigenDecompositionError:
                break
            lam, vectors = w[-k:], Q @ Z[:, -k:]
            norms = _residual_norms(S, lam, vectors)
            ritz = lam, vectors, norms
            residual = float(_residual_terms(S, lam, norms, shift).max())
            if residual <= tolerance:
                return lam, vectors
            if not residual <= promising:  # 2q more iterations cannot reach τ
                break
        if at_most and ritz is not None:
            resolved = _resolved_prefix(S, *ritz, shift, tolerance)
            if 2 * resolved[0].shape[0] >= k:
                return resolved
    w, E = sym_eig(S, name)
    return w[-k:], E[:, -k:]


def _residual_norms(S: Tensor, lam: Tensor, vectors: Tensor) -> Tensor:
    """‖ρ_i‖ = ‖S q_i − θ_i q_i‖ per Ritz pair."""
    return (S @ vectors - vectors * lam).norm(dim=0)


def _residual_terms(S: Tensor, lam: Tensor, norms: Tensor, shift: float) -> Tensor:
    """σ_i r ‖ρ_i‖ per pair (``norms``: :func:`_residual_norms`), σ_i = (θ_i + s)^{-1/2},
    r = (θ̄ + s)^{-1/2}: the cross terms of U S U between span(Q_k) and its complement
    (:func:`top_eigenpairs`)."""
    return norms * ((lam.clamp(min=0) + shift) * (_rest_mean(S, lam) + shift)).rsqrt()


def _resolved_prefix(S: Tensor, lam: Tensor, vectors: Tensor, norms: Tensor, shift: float,
                     tolerance: float) -> tuple[Tensor, Tensor]:
    """The largest k' such that the k' largest Ritz pairs (``lam`` ascending, residual
    ``norms``) all pass the whitening check with r taken over the other n − k' (θ̄ depends on
    k', so each k' is checked on its own; the residual norms ‖ρ_i‖ do not), and those pairs."""
    n, k = S.shape[0], lam.shape[0]
    residual = norms.flip(0)  # largest first
    top = lam.clamp(min=0).flip(0)
    kept = torch.arange(1, k + 1, device=lam.device)
    rest = ((S.trace() - top.cumsum(0)) / (n - kept)).clamp(min=0)  # θ̄ for k' = 1 … k
    sigma = (top + shift).rsqrt()
    # passes[j]: the j + 1 largest pairs pass with r for k' = j + 1
    terms = residual[None, :] * sigma[None, :] * (rest[:, None] + shift).rsqrt()
    within = torch.ones(k, k, dtype=torch.bool, device=lam.device).tril()
    passes = ((terms <= tolerance) | ~within).all(1)
    good = torch.nonzero(passes).flatten()
    count = int(good.max()) + 1 if good.numel() else 0
    return lam[k - count:], vectors[:, k - count:]
