"""natgrad.likelihoods against the oracle's likelihoods (tests/reference.py), in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import grad

import reference as ref
from natgrad.likelihoods import (
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    cotangent_rows,
    get_likelihood,
)

SHAPES = {"categorical": [(5, 4)], "gaussian": [(5, 3), (4, 2, 3)],
          "bernoulli": [(5, 3), (4, 2, 3)]}
CASES = [(lik, shape) for lik, shapes in SHAPES.items() for shape in shapes]


def outputs_and_targets(likelihood: str, shape: tuple[int, ...], seed: int = 0
                        ) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if likelihood == "categorical":
        y = torch.randint(0, shape[1], shape[:1], generator=gen)
    elif likelihood == "gaussian":
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, shape, generator=gen).to(torch.float64)
    return f, y


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-12) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = ref.rel_err(actual, expected)
    assert err <= rtol, f"relative Frobenius error {err:.3e} > {rtol:.0e}"


@pytest.mark.parametrize(("likelihood", "shape"), CASES)
def test_log_prob_and_gradient(likelihood: str, shape: tuple[int, ...]) -> None:
    f, y = outputs_and_targets(likelihood, shape)
    lik = get_likelihood(likelihood)
    expected = torch.stack([ref.log_likelihood(likelihood, f[n], y[n]) for n in range(len(f))])
    assert_close(lik.log_prob(f, y), expected)
    expected_grad = torch.stack([grad(lambda v, n=n: ref.log_likelihood(likelihood, v, y[n]))(f[n])
                                 for n in range(len(f))])
    assert_close(lik.grad_log_prob(f, y), expected_grad)


@pytest.mark.parametrize(("likelihood", "shape"), CASES)
def test_fisher_is_hessian_of_nll_and_b_is_its_root(likelihood: str,
                                                    shape: tuple[int, ...]) -> None:
    f, y = outputs_and_targets(likelihood, shape)
    lik = get_likelihood(likelihood)
    D = torch.stack([ref.output_fisher(likelihood, f[n]) for n in range(len(f))])
    # the oracle's D does not depend on the target it is evaluated at
    D_y = torch.stack([ref.output_fisher(likelihood, f[n], y[n]) for n in range(len(f))])
    assert_close(D_y, D)
    assert_close(lik.fisher(f), D)
    B = lik.sqrt_fisher(f)
    assert_close(B @ B.transpose(-1, -2), D)
    rows = cotangent_rows(lik, f, "true")  # (K, N, ...): Σₖ r rᵀ = D
    R = rows.reshape(rows.shape[0], rows.shape[1], -1)
    assert_close(torch.einsum("kni,knj->nij", R, R), D)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(likelihood=st.sampled_from(sorted(SHAPES)), seed=st.integers(0, 2**16))
def test_samples_have_fisher_as_score_covariance(likelihood: str, seed: int) -> None:
    """E_ŷ[∇f log p(ŷ) ∇f log p(ŷ)ᵀ] = D(f): with 20000 draws the Monte-Carlo estimate is
    within 0.1 (relative Frobenius; the standard error is ≈ 2/√20000 ≈ 0.015)."""
    shape = SHAPES[likelihood][0]
    f, _ = outputs_and_targets(likelihood, shape, seed)
    f = f / 2  # moderate logits: no near-degenerate D, whose relative error would be noisy
    lik = get_likelihood(likelihood)
    S = 20000
    gen = torch.Generator().manual_seed(seed)
    rows = cotangent_rows(lik, f, "mc", mc_samples=S, generator=gen)  # (S, N, ...)
    R = rows.reshape(S, f.shape[0], -1)
    estimate = torch.einsum("kni,knj->nij", R, R)
    D = torch.stack([ref.output_fisher(likelihood, f[n]) for n in range(len(f))])
    assert ref.rel_err(estimate, D) < 0.1
    y_hat = lik.sample(f, 3, torch.Generator().manual_seed(seed))
    expected_shape = (3, *f.shape[:1]) if likelihood == "categorical" else (3, *f.shape)
    assert y_hat.shape == expected_shape
    lik.check_targets(f, y_hat[0])


@pytest.mark.parametrize(("likelihood", "shape"), CASES)
def test_empirical_rows_are_score(likelihood: str, shape: tuple[int, ...]) -> None:
    f, y = outputs_and_targets(likelihood, shape)
    rows = cotangent_rows(get_likelihood(likelihood), f, "empirical", y)
    expected = torch.stack([grad(lambda v, n=n: ref.log_likelihood(likelihood, v, y[n]))(f[n])
                            for n in range(len(f))])
    assert_close(rows, expected.unsqueeze(0))


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_categorical_fisher_rows_are_a_rank_c_minus_1_root(classes: int) -> None:
    """The true Fisher sends C − 1 rows through the network, not C: Σ r rᵀ = D still."""
    torch.manual_seed(classes)
    f = 3 * torch.randn(7, classes, dtype=torch.float64)
    rows = get_likelihood("categorical").fisher_rows(f)
    assert rows.shape == (classes - 1, 7, classes)
    D = torch.stack([ref.output_fisher("categorical", fn) for fn in f])
    built = torch.einsum("kni,knj->nij", rows, rows)
    assert ref.rel_err(built, D) < 1e-12


# -- predictive entropy (the adaptive step's trust region) --------------------------------------
@pytest.mark.parametrize(("likelihood", "shape", "law"), [
    (Categorical(), (5, 7), lambda f: torch.distributions.Categorical(logits=f).entropy()),
    (Categorical(), (3, 4, 6), lambda f: torch.distributions.Categorical(logits=f).entropy()),
    (Categorical(class_dim=1), (3, 6, 4),
     lambda f: torch.distributions.Categorical(logits=f.movedim(1, -1)).entropy()),
    (Bernoulli(), (5, 9), lambda f: torch.distributions.Bernoulli(logits=f).entropy()),
    (Gaussian(), (5, 2, 3), lambda f: torch.distributions.Normal(f, 1.0).entropy()),
])
def test_entropy_is_the_sum_over_terms_of_the_distributions_entropy(
        likelihood: Likelihood, shape: tuple[int, ...], law: Any) -> None:
    f = 3 * torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = likelihood.entropy(f)
    assert h is not None and h.dtype == torch.float64 and h.dim() == 0
    torch.testing.assert_close(h, law(f).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_categorical_knows_a_regression_loss_gradient(dtype: torch.dtype) -> None:
    """Losses of softmax(f) (hard, smoothed, soft or weighted targets, padding ignored, classes
    in dim 1), a small z-loss and nll_loss of log-probabilities pass; mse_loss is named. The
    gradients are float32 rounded to ``dtype`` (autocast's)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, 7, generator=g, requires_grad=True)  # (N, C, T): classes in dim 1
    y = torch.randint(0, 5, (6, 7), generator=g)
    y[0, :3] = -100
    soft = torch.softmax(torch.randn(6, 5, 7, generator=g), 1)
    lik = Categorical(class_dim=1)
    nn_f = torch.nn.functional
    losses = {
        "hard": lambda f: nn_f.cross_entropy(f, y),
        "smoothed": lambda f: nn_f.cross_entropy(f, y, label_smoothing=0.1),
        "soft": lambda f: nn_f.cross_entropy(f, soft),
        "weighted": lambda f: nn_f.cross_entropy(f, y, weight=torch.arange(1.0, 6.0)),
        "z-loss": lambda f: nn_f.cross_entropy(f, y) + 1e-4 * f.logsumexp(1).square().mean(),
        "mse": lambda f: nn_f.mse_loss(f, soft),
    }
    for name, loss in losses.items():
        (grad,) = torch.autograd.grad(loss(f), f)
        problem = lik.loss_gradient_problem(f.detach().to(dtype), grad.to(dtype))
        if name == "mse":
            assert problem is not None and "likelihood='gaussian'" in problem
            assert "class_dim=1" in problem
        else:
            assert problem is None, name
    logp = torch.log_softmax(f.detach(), 1).requires_grad_()
    (grad,) = torch.autograd.grad(nn_f.nll_loss(logp, y), logp)
    assert lik.loss_gradient_problem(logp.detach(), grad) is None  # LogSoftmax + nll_loss
    assert lik.loss_gradient_problem(f.detach(), torch.zeros(6, 5, 7)) is None
    assert Gaussian().loss_gradient_problem(f.detach(), torch.randn(6, 5, 7)) is None
