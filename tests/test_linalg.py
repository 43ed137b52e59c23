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


def test_conjugate_gradient_solves_a_damped_system() -> None:
    torch.manual_seed(0)
    A = torch.randn(20, 8, dtype=torch.float64)
    F = A.T @ A
    b = torch.randn(8, dtype=torch.float64)
    x, iterations, residual = conjugate_gradient(lambda v: F @ v, b, 0.1, rtol=1e-12)
    assert residual <= 1e-12 and iterations <= 8 + 2
    assert torch.allclose((F + 0.1 * torch.eye(8, dtype=torch.float64)) @ x, b, atol=1e-10)
