"""NGD against the float64 oracle: θ − η (F + δI)⁻¹ (∇L + λθ) for every direct structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
import reference_optim as R

TOL = {"rtol": 1e-9, "atol": 1e-11}


pytestmark = pytest.mark.usefixtures("one_thread")


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


# -- gradient accumulation and keyword arguments (issue 12, item 7) --------------------------
@pytest.mark.parametrize("structure", ["dense", "diagonal", "matrix_free"])
def test_gradient_accumulation_uses_every_micro_batch(structure: str) -> None:
    """Two micro-batches (5 and 7 examples) before one step: F is the Fisher of all 12, each
    micro-batch weighted by its size, as in one step on the whole batch. Before: only the
    last micro-batch's Fisher was used."""
    model = R.make_mlp(hidden=5)
    (x, y), = R.make_batches(1, n=12)
    params = R.snapshot(model)
    lr, damping = 0.5, 1e-2
    opt = natgrad.optim.NGD(model, lr=lr, damping=damping, structure=structure,
                            fisher_type="true", cg_rtol=1e-13, cg_max_iter=1000)
    for part in (slice(0, 5), slice(5, 12)):
        (F.cross_entropy(model(x[part]), y[part]) * len(range(12)[part]) / 12).backward()
    opt.step()
    _, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
    F_all = _oracle_fisher(structure, model, params, x, "categorical")
    expected = R.NGDOracle(lr, damping).step(R.flat(params), R.flat(grads), F_all)
    torch.testing.assert_close(_params(model), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("as_list", [False, True])
def test_accumulated_empirical_fisher_takes_every_micro_batch_targets(as_list: bool) -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1, n=10)
    params = R.snapshot(model)
    opt = natgrad.optim.NGD(model, lr=0.3, damping=1e-2, fisher_type="empirical")
    for part in (slice(0, 4), slice(4, 10)):
        (F.cross_entropy(model(x[part]), y[part]) * len(range(10)[part]) / 10).backward()
    opt.step(targets=[y[:4], y[4:]] if as_list else y)
    _, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
    F_emp = R.fisher(model, params, x, "categorical", "empirical", y)
    expected = R.NGDOracle(0.3, 1e-2).step(R.flat(params), R.flat(grads), F_emp)
    torch.testing.assert_close(_params(model), expected, **TOL)


def test_targets_of_the_wrong_size_are_refused_and_nothing_changes() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1, n=10)
    params = R.flat(R.snapshot(model))
    opt = natgrad.optim.NGD(model, lr=0.3, damping=1e-2, fisher_type="empirical")
    for part in (slice(0, 4), slice(4, 10)):
        F.cross_entropy(model(x[part]), y[part]).backward()
    with pytest.raises(ValueError, match=r"targets has 6 examples but the 2 forward pass\(es\) "
                                         r"since the last step had 4 \+ 6 = 10"):
        opt.step(targets=y[4:])
    with pytest.raises(ValueError, match="targets holds 1 tensors but 2 forward passes"):
        opt.step(targets=[y])
    torch.testing.assert_close(_params(model), params, rtol=0, atol=0)
    opt.step(targets=y)  # the recorded passes were kept: the corrected call works
    assert not torch.equal(_params(model), params)


class Masked(torch.nn.Module):
    """f = scale · mlp(x ⊙ mask): a per-example tensor keyword and a non-tensor one."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = R.make_mlp(hidden=5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * self.mlp(x * mask)


def _masked_case() -> tuple[Masked, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    model = Masked()
    (x, y), = R.make_batches(1, n=10)
    mask = (torch.arange(40).reshape(10, 4) % 3 != 0).double()
    return model, x, y, mask, 2.0


def _masked_fisher(model: Masked, x: torch.Tensor, mask: torch.Tensor, scale: float):
    """The oracle's Fisher of θ ↦ scale · mlp(x ⊙ mask; θ)."""
    inner = R.snapshot(model.mlp)
    J = R.jacobians(model.mlp, inner, x * mask) * scale
    D = R.output_fisher("categorical", scale * R.forward(model.mlp, inner, x * mask))
    return torch.einsum("ncp,ncd,ndq->pq", J, D, J) / x.shape[0]


@pytest.mark.parametrize("structure", ["dense", "matrix_free"])
@pytest.mark.parametrize("keywords_only", [False, True])
def test_keyword_arguments_are_used(structure: str, keywords_only: bool) -> None:
    """model(x, mask=m, scale=2.0) and model(x=x, mask=m, scale=2.0): the Fisher is that of the
    call as made. Before: the keywords were dropped (a TypeError for the required mask), and a
    keywords-only call gave "NGD needs a forward pass"."""
    model, x, y, mask, scale = _masked_case()
    inner = R.snapshot(model.mlp)
    F_exact = _masked_fisher(model, x, mask, scale)
    opt = natgrad.optim.NGD(model, lr=0.4, damping=1e-2, structure=structure,
                            fisher_type="true", cg_rtol=1e-13, cg_max_iter=1000)
    f = model(x=x, mask=mask, scale=scale) if keywords_only else model(x, mask=mask, scale=scale)
    F.cross_entropy(f, y).backward()
    opt.step()
    _, grads = R.loss_and_grad(model.mlp, inner, x * mask, y,
                               lambda f, y: F.cross_entropy(scale * f, y))
    expected = R.NGDOracle(0.4, 1e-2).step(R.flat(inner), R.flat(grads), F_exact)
    torch.testing.assert_close(_params(model), expected, rtol=1e-8, atol=1e-10)


def test_fisher_matrix_takes_positional_and_keyword_arguments() -> None:
    """fisher_matrix's batches may be ModelInputs(args, kwargs); NGD's K-FAC of a keyword call
    is fisher_matrix's K-FAC of the same arguments."""
    model, x, y, mask, scale = _masked_case()
    inputs = natgrad.fisher.ModelInputs((x,), {"mask": mask, "scale": scale})
    dense = natgrad.fisher_matrix(model, [(inputs, y)], "categorical", "true", "dense")
    torch.testing.assert_close(dense.to_dense(), _masked_fisher(model, x, mask, scale), **TOL)
    kfac = natgrad.fisher_matrix(model, inputs, "categorical", "true", "kfac").to_dense()
    opt = natgrad.optim.NGD(model, structure="kfac", fisher_type="true")
    F.cross_entropy(model(x, mask=mask, scale=scale), y).backward()
    opt.step()
    torch.testing.assert_close(opt.last_fisher.to_dense(), kfac, rtol=1e-12, atol=1e-14)
