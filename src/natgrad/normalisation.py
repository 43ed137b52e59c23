"""How every Fisher estimate is normalised: per loss term (DESIGN.md §1).

An *example* is dim 0 of the model's output f (a sequence for (N, T, C) logits); a *loss term*
is one position of an example that is not ignored (:func:`natgrad.likelihoods.num_terms`).
Every structure divides its sums over examples by M, the number of loss terms, like
``cross_entropy(..., ignore_index=-100)``'s mean:

    F = (1/M) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ,  M = N for (N, C) outputs;

per-example quantities (the empirical Fisher, EK-FAC's scales) use per-sequence gradients
(summed over the sequence's terms) and the same 1/M. K-FAC "expand" (positions as extra rows,
Grosse & Martens 2016; Eschenhagen et al. 2023) averages Ā over all input rows of the layer
(examples × positions) and divides G = Σ g gᵀ by M, so that G ⊗ Ā is the exact block for a
Linear layer with one position and one term per example, as before.

The optimizers' capture has no targets: with "mc" / "true" every position of f is a term
(M = N·T); with "empirical" the terms are the positions the user's loss gradient ∂L/∂f
reaches (:func:`empirical_terms`), for L the mean of −log p over them.
"""

from __future__ import annotations

import math

from torch import Tensor

from natgrad.likelihoods import Likelihood

__all__ = ["empirical_terms", "kfac_divisors", "per_example_divisor"]


def per_example_divisor(terms: int) -> int:
    """The divisor of Σₙ Σₖ (Jₙᵀ r_{nk})(Jₙᵀ r_{nk})ᵀ (dense, block-diagonal, diagonal,
    matrix-free, EK-FAC's scales): M."""
    return terms


def kfac_divisors(input_rows: int, terms: int) -> tuple[int, int]:
    """(divisor of Σ ā āᵀ, divisor of Σ g gᵀ) for K-FAC-expand: (examples × positions of the
    layer's input, M): Ā = Σ ā āᵀ / (N·S), G = Σₙ Σₛ Σₖ g gᵀ / M."""
    return input_rows, terms


def empirical_terms(likelihood: Likelihood, f: Tensor, grad: Tensor | None) -> int:
    """M for the empirical Fisher captured from the user's loss L: the terms of f that
    ∂L/∂f (``grad``, f's shape) reaches — padding positions a loss with ``ignore_index``
    leaves out get an exactly zero gradient; all terms if ``grad`` is None. For outputs with
    one term per example M = N (as g = −N ∂L/∂a assumes a batch mean)."""
    shape = likelihood.term_shape(f)
    if len(shape) == 1 or grad is None:
        return math.prod(shape)
    return int(likelihood.term_gradient_mask(grad).sum())
