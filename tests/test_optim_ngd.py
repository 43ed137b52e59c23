"""NGD against the float64 oracle: θ − η (F + δI)⁻¹ (∇L + λθ) for every direct structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
import reference_optim as R

TOL = {"rtol": 1e-9, "atol": 1e-11}


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one intra-op thread avoids oversubscribing shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _oracle_fisher(structure: str, model, params, x, likelihood, fisher_type="true", y=None):
    F_dense = R.fisher(model, params, x, likelihood, fisher_type, y)
    if structure in ("dense", "matrix_free"):
        return F_dense
    if structure == "block_diagonal":
        return R.block_diagonal(F_dense, R.module_slices(params))
    return torch.diag(F_dense.diagonal())


def _params(model) -> torch.Tensor:
    return R.flat(R.snapshot(model))


@pytest.mark.parametrize("structure", ["dense", "block_diagonal", "diagonal"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
def test_one_step_is_the_damped_natural_gradient(structure: str, likelihood: str) -> None:
    model = R.make_mlp(norm=True, hidden=5)
    (x, y), = R.make_batches(1, n=10, likelihood=likelihood)
    loss_fn = R.loss_function(likelihood)
    params = R.snapshot(model)
    lr, damping = 0.7, 1e-2
    opt = natgrad.optim.NGD(model, lr=lr, damping=damping, likelihood=likelihood,
                            structure=structure, fisher_type="true")
    loss_fn(model(x), y).backward()
    opt.step()

    _, grads = R.loss_and_grad(model, params, x, y, loss_fn)
    F_oracle = _oracle_fisher(structure, model, params, x, likelihood)
    expected = R.NGDOracle(lr, damping).step(R.flat(params), R.flat(grads), F_oracle)
    torch.testing.assert_close(_params(model), expected, **TOL)
    torch.testing.assert_close(opt.last_fisher.to_dense(), F_oracle, **TOL)


@pytest.mark.parametrize("structure", ["dense", "block_diagonal", "diagonal"])
def test_weight_decay_and_momentum_over_two_steps(structure: str) -> None:
    """NGD's documented rule: m ← μ m + (F + δI)⁻¹ (∇L + λθ) (m = d first), θ ← θ − η m, with
    F the Fisher of each step's own batch (NGD, unlike K-FAC, preconditions the weight decay)."""
    model = R.make_mlp(norm=True, hidden=5)
    batches = R.make_batches(2, n=10)
    params = R.snapshot(model)
    hyper = {"lr": 0.5, "damping": 3e-2, "momentum": 0.9, "weight_decay": 0.1}
    opt = natgrad.optim.NGD(model, structure=structure, fisher_type="true", **hyper)
    oracle = R.NGDOracle(**hyper)
    theta = R.flat(params)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        current = R.unflat(theta, params)
        _, grads = R.loss_and_grad(model, current, x, y, F.cross_entropy)
        theta = oracle.step(theta, R.flat(grads),
                            _oracle_fisher(structure, model, current, x, "categorical"))
        torch.testing.assert_close(_params(model), theta, **TOL)


def test_matrix_free_conjugate_gradient_converges_to_the_direct_solve() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1, n=12)
    params = R.snapshot(model)
    lr, damping = 0.5, 1e-3
    opt = natgrad.optim.NGD(model, lr=lr, damping=damping, structure="matrix_free",
                            fisher_type="true", cg_rtol=1e-13, cg_max_iter=1000)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
    F_dense = R.fisher(model, params, x, "categorical")
    expected = R.NGDOracle(lr, damping).step(R.flat(params), R.flat(grads), F_dense)
    torch.testing.assert_close(_params(model), expected, rtol=1e-8, atol=1e-10)
    iterations, residual = opt.last_fisher.last_cg
    assert residual <= 1e-13 and 0 < iterations <= 1000


def test_matrix_free_with_a_loose_tolerance_stops_early() -> None:
    """cg_max_iter bounds the work: one iteration is a (scaled) gradient step, not the solve."""
    model = R.make_mlp()
    (x, y), = R.make_batches(1, n=12)
    opt = natgrad.optim.NGD(model, lr=0.5, damping=1e-3, structure="matrix_free",
                            fisher_type="true", cg_max_iter=1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_fisher.last_cg[0] == 1


def test_empirical_fisher_uses_the_training_targets() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1, n=12)
    params = R.snapshot(model)
    opt = natgrad.optim.NGD(model, lr=0.3, damping=1e-2, fisher_type="empirical")
    F.cross_entropy(model(x), y).backward()
    opt.step(targets=y)
    _, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
    F_emp = R.fisher(model, params, x, "categorical", "empirical", y)
    expected = R.NGDOracle(0.3, 1e-2).step(R.flat(params), R.flat(grads), F_emp)
    torch.testing.assert_close(_params(model), expected, **TOL)


def test_step_with_closure_returns_the_loss() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1, n=12)
    opt = natgrad.optim.NGD(model, lr=0.3, damping=1e-2, fisher_type="true")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    expected = R.loss_and_grad(model, R.snapshot(model), x, y, F.cross_entropy)[0]
    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    torch.testing.assert_close(first.detach(), expected, rtol=1e-12, atol=0)
    second = opt.step(closure)
    assert second.item() < first.item()
