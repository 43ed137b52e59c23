"""Weight sharing: Kronecker factors of a layer applied at several positions of one example.

A layer applied over extra dimensions (a Linear over sequence positions, a Conv2d over pixels)
gives, per example n, S rows ā_{ns} and output gradients g_{nks} (k: cotangent rows). Two
approximations of its Fisher block (Eschenhagen et al. 2023, "Kronecker-Factored Approximate
Curvature for Modern Neural Network Architectures"):

- ``"expand"`` (positions as extra examples; Grosse & Martens' KFC for convolutions):
  Ā = Σₙ Σₛ ā_{ns} ā_{ns}ᵀ / (N·S),  G = Σₙ Σₖ Σₛ g_{nks} g_{nks}ᵀ / N.
  Exact for one example of a linear layer whose every position carries its own loss term
  with a constant output Fisher (e.g. a Gaussian likelihood per position).
- ``"reduce"`` (positions reduced first): ā_n = (1/S) Σₛ ā_{ns}, g_{nk} = Σₛ g_{nks},
  Ā = Σₙ ā_n ā_nᵀ / N,  G = Σₙ Σₖ g_{nk} g_{nk}ᵀ / N.
  Exact for one example of a linear layer whose positions are pooled (averaged) before the
  loss. Its factors are built from N rows instead of N·S, so it is the cheaper of the two.

With one position (S = 1) both are plain K-FAC. Layers with one-hot inputs (``nn.Embedding``,
Ā = diag(f)) always use expand: the average of one-hot rows is not one-hot, and Ā would lose
its diagonal form. So do attention's input projections (``LayerKind.supports_reduce``): the
keys' output gradients summed over the positions are exactly zero (a softmax does not change
when every score of a query is shifted), and reduce would leave them without curvature.
EK-FAC's scales use the exact per-example gradients Γₙ = Σₛ g_{ns} ā_{ns}ᵀ under either; only
the eigenbasis differs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from natgrad._diagonal_inputs import input_counts
from natgrad._linalg import gram

__all__ = ["KFAC_APPROXIMATIONS", "KFACApprox", "check_kfac_approx", "factor_rows",
           "factor_sums"]

KFACApprox = Literal["expand", "reduce"]
KFAC_APPROXIMATIONS: tuple[str, ...] = ("expand", "reduce")


def check_kfac_approx(value: object) -> KFACApprox:
    """``value`` if it names an approximation, else ``ValueError``."""
    if value not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {value!r}"
        )
    return value  # type: ignore[return-value]


def factor_rows(a: Tensor, g: Tensor, approx: KFACApprox) -> tuple[Tensor, Tensor]:
    """The rows whose Gram matrices are the factors' sums: a (N, S, in'), g (K, N, S, out) →
    (rows of Ā, rows of G), 2-D. ``"expand"``: every (n, s) resp. (k, n, s); ``"reduce"``: the
    positions averaged (ā) resp. summed (g) first, one row per n resp. (k, n). The count that
    normalises Ā is the number of its rows (N·S, resp. N)."""
    if approx == "reduce":
        a, g = a.mean(dim=1, keepdim=True), g.sum(dim=2, keepdim=True)
    return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])


def factor_sums(a: Tensor, g: Tensor, approx: KFACApprox, in_dim: int, diagonal: bool,
                dtype: torch.dtype, reducible: bool = True) -> tuple[Tensor, Tensor, int]:
    """(Σ ā āᵀ, Σ g gᵀ, rows of Ā) of one forward pass, in ``dtype``: Ā = first / rows.

    ``diagonal``: a holds the indices of one-hot rows (N, S, 1) and Σ ā āᵀ is returned as its
    diagonal, the counts of each index (:mod:`natgrad._diagonal_inputs`), with expand; so is
    a layer that is not ``reducible``."""
    if not reducible:
        approx = "expand"
    if diagonal:
        counts = input_counts(a, in_dim, dtype)
        return counts, gram(g.reshape(-1, g.shape[-1]).to(dtype)), a.shape[0] * a.shape[1]
    a_rows, g_rows = factor_rows(a, g, approx)
    return gram(a_rows.to(dtype)), gram(g_rows.to(dtype)), a_rows.shape[0]
