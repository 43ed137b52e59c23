"""Pure tensor math: symmetric eigendecompositions, Kronecker products and damped solves.

Conventions: a Kronecker-factored block acts on a layer's parameters arranged as the matrix
V = [W | b] of shape (out, in'), flattened row-major, so that (G ⊗ A) vec(V) = vec(G V Aᵀ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "EigenDecompositionError",
    "check_damping",
    "check_invertible",
    "conjugate_gradient",
    "eig_solve",
    "gram",
    "kron_mv",
    "sym_eig",
    "sym_eig_solve",
]


class EigenDecompositionError(RuntimeError):
    """An eigendecomposition failed to converge or returned non-finite values."""


def check_damping(damping: float) -> float:
    """Return ``damping`` as a float, raising ``ValueError`` unless it is finite and ≥ 0."""
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise ValueError(f"damping must be a number, got {damping!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
    return value


def sym_eig(A: Tensor, name: str = "matrix") -> tuple[Tensor, Tensor]:
    """Eigendecomposition A = Q diag(s) Qᵀ of a symmetric (d, d) matrix: returns (s, Q).

    Attempts, in order, until one converges with finite s and Q (LAPACK and cuSOLVER can raise,
    and float32 can return NaN without raising, on factors with many exactly-zero rows, e.g.
    Ā of a padded 3×3 convolution over a 1×1 feature map):

    1. ``eigh`` of ½(A + Aᵀ) in A's precision (at least float32);
    2. the same in float64;
    3. float64 ``eigh`` of ½(A + Aᵀ) + τI with τ = 10⁻⁸·tr(A)/d (10⁻⁸ if that is not positive),
       then s ← s − τ: the shift leaves the eigenvectors and, up to rounding of order
       ε‖A‖, the eigenvalues unchanged, and gives the zero rows a non-zero diagonal.

    Raises :class:`EigenDecompositionError` naming ``name`` if A is not finite or every attempt
    fails. The result has A's dtype.
    """
    if not torch.isfinite(A).all():
        raise EigenDecompositionError(f"{name} contains NaN or inf; cannot eigendecompose it")
    work = A if A.dtype in (torch.float32, torch.float64) else A.float()
    error: Exception | None = None
    for matrix, shift in _eigh_attempts(0.5 * (work + work.T)):
        try:
            s, Q = torch.linalg.eigh(matrix)
        except RuntimeError as err:
            error = err
            continue
        if bool(torch.isfinite(s).all()) and bool(torch.isfinite(Q).all()):
            return (s - shift).to(A.dtype), Q.to(A.dtype)
    reason = f"failed: {error}" if error is not None else "returned non-finite values"
    raise EigenDecompositionError(
        f"eigendecomposition of {name} ({tuple(A.shape)}) {reason}, also in float64 with a "
        "shift of the diagonal"
    )


def _eigh_attempts(sym: Tensor) -> Iterator[tuple[Tensor, float]]:
    """The matrices :func:`sym_eig` tries, each with the shift τ to subtract afterwards."""
    yield sym, 0.0
    double = sym.double()
    if sym.dtype != torch.float64:
        yield double, 0.0
    mean = float(double.diagonal().mean()) if sym.shape[0] else 0.0
    tau = 1e-8 * mean if math.isfinite(mean) and mean > 0 else 1e-8
    yield double + tau * torch.eye(sym.shape[0], dtype=torch.float64, device=sym.device), tau


def sym_eig_solve(s: Tensor, Q: Tensor, v: Tensor, damping: float) -> Tensor:
    """(Q diag(s) Qᵀ + δ I)⁻¹ v = Q [(Qᵀ v) ⊘ (s + δ)] for v of shape (d,) or (d, m)."""
    proj = Q.T @ v
    denom = s + damping
    if proj.dim() == 2:
        denom = denom.unsqueeze(1)
    return Q @ (proj / denom)


def kron_mv(G: Tensor, A: Tensor, V: Tensor) -> Tensor:
    """(G ⊗ A) vec(V) as a matrix: G V Aᵀ, for G (o, o), A (i, i), V (o, i).

    vec is row-major (``V.flatten()``), as for PyTorch's weights: vec(G V Aᵀ) = (G ⊗ A) vec(V).
    (Column-major vec, as in the K-FAC papers, gives the same matrix as A ⊗ G.)

    Example:
        >>> G, A, V = torch.randn(2, 2), torch.randn(3, 3), torch.randn(2, 3)
        >>> torch.allclose(kron_mv(G, A, V).flatten(), torch.kron(G, A) @ V.flatten(),
        ...                atol=1e-5)
        True
    """
    return G @ V @ A.T


def eig_solve(Q_G: Tensor, Q_A: Tensor, scale: Tensor, V: Tensor, damping: float) -> Tensor:
    """(Q diag(vec S) Qᵀ + δ I)⁻¹ vec(V) with Q = Q_G ⊗ Q_A, as a matrix.

    = Q_G [(Q_Gᵀ V Q_A) ⊘ (S + δ)] Q_Aᵀ, with S = s_G s_Aᵀ for K-FAC (so that the block is
    exactly G ⊗ A) and the EK-FAC scaling otherwise. Shapes: Q_G (o, o), Q_A (i, i), S and V
    (o, i).
    """
    return Q_G @ ((Q_G.T @ V @ Q_A) / (scale + damping)) @ Q_A.T


def check_invertible(min_eig: Tensor, max_eig: Tensor, damping: float, what: str) -> None:
    """Raise ``ValueError`` if s + δ is not safely positive (a singular undamped solve)."""
    floor = 64 * torch.finfo(max_eig.dtype).eps * max(float(max_eig.abs()), 1.0)
    if float(min_eig) + damping <= floor:
        raise ValueError(
            f"{what} + damping·I is singular (smallest eigenvalue {float(min_eig):.3g} with "
            f"damping {damping:g}); pass damping > 0"
        )


def conjugate_gradient(
    mv: Callable[[Tensor], Tensor],
    b: Tensor,
    damping: float,
    rtol: float = 1e-10,
    max_iter: int | None = None,
) -> tuple[Tensor, int, float]:
    """Solve (M + δI) x = b by conjugate gradient for a symmetric PSD operator ``mv``.

    Stops when ‖b − (M + δI) x‖ ≤ rtol ‖b‖ or after ``max_iter`` iterations (default: the
    dimension). Returns (x, iterations, relative residual).

    Raises:
        ValueError: a direction p with pᵀ(M + δI)p ≤ 0 (M singular or indefinite and δ = 0).

    Example:
        >>> M = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, iterations, residual = conjugate_gradient(lambda v: M @ v,
        ...                                              torch.ones(2, dtype=torch.float64), 1.0)
        >>> torch.allclose((M + torch.eye(2, dtype=torch.float64)) @ x,
        ...                torch.ones(2, dtype=torch.float64)), iterations
        (True, 2)
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    b_norm = float(b.norm())
    if b_norm == 0:
        return x, 0, 0.0
    limit = b.numel() if max_iter is None else max_iter
    iterations = 0
    while iterations < limit and math.sqrt(float(rr)) > rtol * b_norm:
        Ap = mv(p) + damping * p
        curvature = p @ Ap
        if float(curvature) <= 0:
            raise ValueError(
                "conjugate gradient met a non-positive curvature pᵀ(F + δI)p; pass damping > 0"
            )
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
        iterations += 1
    return x, iterations, math.sqrt(float(rr)) / b_norm


_SYRK_MIN_WIDTH = 2048
_TRIANGLE_LEAF = 256

_SYRK_MAX_WIDTH = 16384
"""Widest P for SciPy's syrk: OpenBLAS's ssyrk crashed the process (segmentation fault) for
(1024, 28000) and (1024, 32000) inputs (an untied language-model head's G factor) while
(2048, 24000), (4096, 20000) and (8192, 16384) ran; wider matrices take the torch path."""


def gram(M: Tensor) -> Tensor:
    """Mᵀ M for M of shape (R, P), exactly symmetric, computing only one triangle where that
    is cheaper.

    On the CPU in float32/float64: for 2048 ≤ P ≤ 16384 (dense and block Fisher matrices) BLAS
    ``syrk`` through SciPy, half the multiply-adds of a general product; for 256 < P < 2048
    (K-FAC's factors, where SciPy's BLAS threads competing with torch's cost more than they
    save) :func:`_block_triangle_gram` in torch. Otherwise (and on other devices) ``M.T @ M``
    made exactly symmetric.
    """
    cpu_float = M.device.type == "cpu" and M.dtype in (torch.float32, torch.float64)
    if not cpu_float or M.shape[1] <= _TRIANGLE_LEAF:
        return _symmetric(M.T @ M)
    if M.shape[1] < _SYRK_MIN_WIDTH or M.shape[1] > _SYRK_MAX_WIDTH:
        return _block_triangle_gram(M)
    try:
        from scipy.linalg.blas import dsyrk, ssyrk
    except ImportError:  # pragma: no cover - scipy is a dependency; keep working without it
        return _block_triangle_gram(M)
    syrk = ssyrk if M.dtype == torch.float32 else dsyrk
    # M.T is Fortran-contiguous when M is C-contiguous, so SciPy passes it without a copy.
    # syrk writes the upper triangle of C = 0 (its default) and leaves the other one 0
    return symmetric_from_upper(
        torch.from_numpy(syrk(1.0, M.detach().contiguous().numpy().T, trans=0, lower=0)))


def symmetric_from_upper(upper: Tensor, block: int = 256) -> Tensor:
    """S with S = Sᵀ from a matrix U holding S's upper triangle and zeros below it, copied
    tile by tile: S_ij = U_ij and S_ji = U_ijᵀ for the tiles above the diagonal, U_ii +
    triu(U_ii, 1)ᵀ on it (exact: no entry is added to a nonzero one). Tiles of ``block``² keep
    the transposed copy in cache: 2× faster than U + Uᵀ in one strided pass at P = 3137 (a
    syrk result is column-major), which cost a Fashion-MNIST CNN's K-FAC step 0.16 s."""
    n = upper.shape[0]
    full = torch.empty(n, n, dtype=upper.dtype, device=upper.device)
    for i in range(0, n, block):
        rows = slice(i, i + block)
        diagonal = upper[rows, rows]
        full[rows, rows] = diagonal + torch.triu(diagonal, 1).T
        for j in range(i + block, n, block):
            cols = slice(j, j + block)
            tile = upper[rows, cols]
            full[rows, cols] = tile
            full[cols, rows] = tile.T
    return full


def _symmetric(S: Tensor) -> Tensor:
    """½ (S + Sᵀ): a product Mᵀ M made exactly symmetric."""
    return 0.5 * (S + S.T)


def _block_triangle_gram(M: Tensor) -> Tensor:
    """Mᵀ M by halving the columns recursively, M = [M₁ M₂]:
    Mᵀ M = [[M₁ᵀ M₁, M₁ᵀ M₂], [(M₁ᵀ M₂)ᵀ, M₂ᵀ M₂]], the off-diagonal block computed once and
    the diagonal blocks recursively, down to leaves of width ℓ ≤ 256 (made exactly
    symmetric). Multiply-adds: R P² (1 + ℓ/P) / 2 instead of R P² (0.625 R P² for P = 785,
    ℓ = 196; measured on K-FAC's factors of the deep autoencoder: about 20 % less time)."""
    P = M.shape[1]
    out = M.new_empty(P, P)
    _fill_triangle(M, out, 0, P)
    return out


def _fill_triangle(M: Tensor, out: Tensor, lo: int, hi: int) -> None:
    """The block [lo, hi) × [lo, hi) of Mᵀ M into ``out``, recursively (a module-level
    function: a nested recursive closure is a reference cycle that kept M and ``out`` alive
    until the cyclic garbage collector ran, one Gram's input more per call)."""
    if hi - lo <= _TRIANGLE_LEAF:
        block = M[:, lo:hi]
        out[lo:hi, lo:hi] = _symmetric(block.T @ block)
        return
    mid = (lo + hi) // 2
    off = M[:, lo:mid].T @ M[:, mid:hi]
    out[lo:mid, mid:hi] = off
    out[mid:hi, lo:mid] = off.T
    _fill_triangle(M, out, lo, mid)
    _fill_triangle(M, out, mid, hi)
