"""natgrad._linalg helpers that the structure tests do not reach at their small sizes."""

from __future__ import annotations

import pytest
import torch

from natgrad._linalg import conjugate_gradient, gram


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# plain product, block triangles (odd width: uneven halves), syrk
@pytest.mark.parametrize("width", [10, 785, 2100])
def test_gram_equals_the_general_product(dtype: torch.dtype, width: int) -> None:
    torch.manual_seed(width)
    M = torch.randn(40, width, dtype=dtype)
    G = gram(M)
    expected = M.double().T @ M.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.equal(G, G.T)
    assert ((G.double() - expected).norm() / expected.norm()).item() < tol


@pytest.mark.parametrize("width", [600, 2050])  # block triangles, syrk
def test_gram_of_a_non_contiguous_slice(width: int) -> None:
    M = torch.randn(30, width + 150, dtype=torch.float64)[:, 100:100 + width]
    assert torch.allclose(gram(M), M.T @ M, rtol=1e-12, atol=1e-12)


def test_gram_wider_than_syrk_allows_takes_the_torch_path(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Above _SYRK_MAX_WIDTH (where OpenBLAS's syrk crashed the process) SciPy is not called."""
    import scipy.linalg.blas as blas

    from natgrad import _linalg

    def crash(*args: object, **kwargs: object) -> None:
        raise AssertionError("syrk called above its width")

    monkeypatch.setattr(_linalg, "_SYRK_MAX_WIDTH", 2060)
    monkeypatch.setattr(blas, "ssyrk", crash)
    monkeypatch.setattr(blas, "dsyrk", crash)
    M = torch.randn(20, 2100, dtype=torch.float64)
    G = gram(M)
    assert torch.equal(G, G.T) and torch.allclose(G, M.T @ M, rtol=1e-12, atol=1e-12)


def test_conjugate_gradient_solves_a_damped_system() -> None:
    torch.manual_seed(0)
    A = torch.randn(20, 8, dtype=torch.float64)
    F = A.T @ A
    b = torch.randn(8, dtype=torch.float64)
    x, iterations, residual = conjugate_gradient(lambda v: F @ v, b, 0.1, rtol=1e-12)
    assert residual <= 1e-12 and iterations <= 8 + 2
    assert torch.allclose((F + 0.1 * torch.eye(8, dtype=torch.float64)) @ x, b, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# plain product, block triangles, syrk accumulated in place
@pytest.mark.parametrize("width", [10, 785, 2100])
def test_gram_sum_of_blocks_equals_one_gram_of_all_rows(dtype: torch.dtype, width: int) -> None:
    """Buffered blocks (smaller than a chunk), a block sliced across chunks, a block of a whole
    chunk at an empty buffer (no copy) and a float32 block into a float64 sum all give
    Σ Mᵀ M of the stacked rows."""
    from natgrad._gram import GramSum

    torch.manual_seed(width)
    acc = GramSum(width, torch.float64, torch.device("cpu"), min_rows=16, max_elements=1)
    c = acc.chunk
    assert c == min(max(16, width), width * width // 2 // width)  # the buffer ≤ P²/2 elements
    sizes = [c, c // 3, 1, c + c // 2, 2 * c, 5, 2]  # the first: whole, no copy (float64)
    blocks = [torch.randn(r, width, dtype=dtype) for r in sizes]
    for M in blocks:
        acc.add(M[:, :] if M.shape[0] % 2 else M.T.contiguous().T)  # also non-contiguous
    total = acc.result()
    stacked = torch.cat(blocks).double()
    expected = stacked.T @ stacked
    assert acc.rows == sum(sizes)
    assert total.dtype == torch.float64 and torch.equal(total, total.T)
    assert ((total - expected).norm() / expected.norm()).item() < 1e-12
    same = GramSum(width, dtype, torch.device("cpu"), min_rows=16, max_elements=1)
    for M in blocks:
        same.add(M)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((same.result().double() - expected).norm() / expected.norm()).item() < tol


def test_gram_sum_refuses_a_block_of_another_width_and_sums_nothing_to_zero() -> None:
    from natgrad._gram import GramSum

    acc = GramSum(4, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match="width 4"):
        acc.add(torch.zeros(2, 5, dtype=torch.float64))
    assert torch.equal(acc.result(), torch.zeros(4, 4, dtype=torch.float64))
