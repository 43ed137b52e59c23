"""The adaptive step (no lr given) under a user's habits and mishaps: its trust region, a
step that raised, inputs changed in place, per-group momentum, dropout in the
Levenberg–Marquardt ρ, a one-class categorical model, finite differences beside frozen
parameters. Each case is checked against a run that did not meet the mishap, or against the
quantity's definition."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference_optim as R
from natgrad.optim import EKFAC, KFAC
from natgrad.optim.adaptive import _NO_FORWARD_AD, _output_jvp, minimize_quadratic_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dropout: float = 0.0, inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Dropout(dropout, inplace=inplace)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))


def _batch(seed: int = 1, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


def _step(model: nn.Module, opt: KFAC, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# -- the trust region --------------------------------------------------------------------------
def test_trust_region_shortens_the_minimiser_onto_its_boundary() -> None:
    """x = t x*, t = √(r / ½x*ᵀAx*), A = A_F + A_δ; M(t x*) = M(x*)(2t − t²) < 0."""
    AF = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    Ad = 0.1 * torch.eye(2, dtype=torch.float64)
    b = torch.tensor([-3.0, 1.0], dtype=torch.float64)
    free = minimize_quadratic_model(AF, Ad, b)
    x = torch.tensor(free.coefficients, dtype=torch.float64)
    q = float(0.5 * x @ (AF + Ad) @ x)
    r = q / 4
    bounded = minimize_quadratic_model(AF, Ad, b, radius=r)
    assert bounded.scale == pytest.approx(0.5, rel=1e-12)
    y = torch.tensor(bounded.coefficients, dtype=torch.float64)
    torch.testing.assert_close(y, 0.5 * x, rtol=1e-14, atol=0)
    assert float(0.5 * y @ (AF + Ad) @ y) == pytest.approx(r, rel=1e-12)
    assert bounded.value == pytest.approx(free.value * (2 * 0.5 - 0.25), rel=1e-12)
    assert bounded.value < 0
    assert bounded.kl == pytest.approx(float(0.5 * y @ AF @ y), rel=1e-12)
    inside = minimize_quadratic_model(AF, Ad, b, radius=2 * q)  # not binding
    assert inside.coefficients == free.coefficients and inside.scale == 1.0


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_every_adaptive_update_respects_the_trust_region(cls: type[KFAC]) -> None:
    """½ vᵀ(F + δI)v ≤ r for each update v (F: the exact Fisher of the batch, densely), and it
    binds: the same run without the bound takes a longer first step."""
    r = 1e-3
    model = _mlp()
    x, y = _batch()
    x = 5 * x  # a first step far outside r
    opt = cls(model, trust_region=r, trust_region_entropy=0.0)
    free_model = copy.deepcopy(model)
    free = cls(free_model, trust_region=None)
    for step in range(4):
        start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        _step(model, opt, x, y)
        v = R.flat({n: p.detach().double() for n, p in model.named_parameters()}) \
            - R.flat(start)
        F_dense = R.fisher(copy.deepcopy(model).double(), start, x.double(), "categorical")
        damping = float(opt.last_step_info["damping"])  # type: ignore[arg-type]
        damped = F_dense + damping * torch.eye(len(v), dtype=torch.float64)
        assert float(0.5 * v @ damped @ v) <= r * (1 + 1e-4)
        if step == 0:
            free_start = R.flat({n: p.detach().double() for n, p in
                                 free_model.named_parameters()})
            _step(free_model, free, x, y)
            free_v = R.flat({n: p.detach().double() for n, p in
                             free_model.named_parameters()}) - free_start
            assert float(free_v.norm()) > 1.5 * float(v.norm())


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_trust_region_grows_with_the_predictive_entropy(cls: type[KFAC]) -> None:
    """With κ H̄ > r₀ the bound is κ H̄, H̄ the batch's mean entropy per example of 12
    independent Bernoulli outputs (torch.distributions, densely): the first update, far
    outside it, lands on ½ vᵀ(F + δI)v = κ H̄ exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 12))
    g = torch.Generator().manual_seed(1)
    x = 5 * torch.randn(16, 3, generator=g)
    y = torch.randint(0, 2, (16, 12), generator=g).float()
    kappa = 0.01
    opt = cls(model, likelihood="bernoulli", trust_region=1e-4, trust_region_entropy=kappa)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    logits = torch.func.functional_call(copy.deepcopy(model).double(), start, (x.double(),))
    mean_entropy = float(torch.distributions.Bernoulli(logits=logits).entropy().sum(-1).mean())
    assert kappa * mean_entropy > 1e-4
    opt.zero_grad()
    F.binary_cross_entropy_with_logits(model(x), y, reduction="sum").div(16).backward()
    opt.step()
    v = R.flat({n: p.detach().double() for n, p in model.named_parameters()}) - R.flat(start)
    F_dense = R.fisher(copy.deepcopy(model).double(), start, x.double(), "bernoulli")
    damped = F_dense + float(opt.last_step_info["damping"]) * torch.eye(  # type: ignore[arg-type]
        len(v), dtype=torch.float64)
    assert float(0.5 * v @ damped @ v) == pytest.approx(kappa * mean_entropy, rel=1e-4)


def test_one_class_categorical_is_refused_with_the_fix() -> None:
    """A categorical law over one class has a zero Fisher: the step would be g/δ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = KFAC(model)
    with pytest.raises(ValueError, match=r"1 class.*gaussian.*bernoulli"):
        model(torch.randn(4, 3))
    del opt


# -- a step that raised leaves nothing behind --------------------------------------------------
def test_nonfinite_raise_then_a_good_step_equals_a_fresh_run() -> None:
    x, y = _batch()
    bad = x.clone()
    bad[0, 0] = math.nan
    clean, dirty = _mlp(), _mlp()
    opt_c, opt_d = (KFAC(m, nonfinite="raise", fisher_type="true") for m in (clean, dirty))
    opt_d.zero_grad()
    F.cross_entropy(dirty(bad), y).backward()
    with pytest.raises(FloatingPointError):
        opt_d.step()
    for model, opt in ((clean, opt_c), (dirty, opt_d)):
        _step(model, opt, x, y)
    assert opt_d.last_step_info == opt_c.last_step_info and _same(clean, dirty)


@pytest.mark.parametrize("lr", [None, 0.1])
def test_a_closure_that_raises_leaves_nothing_behind(lr: float | None) -> None:
    x, y = _batch()
    clean, dirty = _mlp(), _mlp()
    opt_c, opt_d = (KFAC(m, lr=lr, fisher_type="true") for m in (clean, dirty))

    other, _ = _batch(seed=9)

    def broken() -> Tensor:
        opt_d.zero_grad()
        loss = F.cross_entropy(dirty(other), y)
        raise IndexError("a label out of range")
        return loss  # pragma: no cover

    with pytest.raises(IndexError):
        opt_d.step(broken)
    for model, opt in ((clean, opt_c), (dirty, opt_d)):
        def closure(model: nn.Module = model, opt: KFAC = opt) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert opt_d.last_step_info == opt_c.last_step_info and _same(clean, dirty)


# -- inputs changed after the forward pass -----------------------------------------------------
def test_inputs_changed_in_place_do_not_change_the_step() -> None:
    """Dropout(inplace=True) first (it rewrites the input) takes the step of Dropout(inplace=
    False), and step() leaves the caller's tensor alone; a buffer refilled per micro-batch
    gives the step of fresh tensors."""
    x, y = _batch()
    runs = {}
    for inplace in (False, True):
        model = _mlp(dropout=0.5, inplace=inplace)
        opt = KFAC(model, momentum=0.0)
        xi = x.clone()
        torch.manual_seed(5)
        opt.zero_grad()
        F.cross_entropy(model(xi), y).backward()
        after_forward = xi.clone()
        opt.step()
        assert torch.equal(xi, after_forward)  # step() did not touch it
        runs[inplace] = (opt.last_step_info, model)
    assert runs[True][0] == runs[False][0] and _same(runs[True][1], runs[False][1])
    micro = [_batch(seed) for seed in (2, 3)]
    results = []
    for static in (False, True):
        model = _mlp()
        opt = KFAC(model, momentum=0.0)
        buffer = torch.empty(16, 3)
        opt.zero_grad()
        for xb, yb in micro:
            if static:
                buffer.copy_(xb)
                xb = buffer
            (F.cross_entropy(model(xb), yb) / 2).backward()
        opt.step()
        results.append((opt.last_step_info, model))
    assert results[0][0] == results[1][0] and _same(results[0][1], results[1][1])


# -- per-group momentum ------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [None, 0.0])
def test_per_group_momentum_is_refused_by_the_adaptive_step(momentum: float | None) -> None:
    model = _mlp()
    groups = [{"params": model[0].parameters(), "momentum": 0.9},
              {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match="one μ"):
        KFAC(model, momentum=momentum, param_groups=groups)
    same = [{"params": model[0].parameters(), "momentum": 0.5},
            {"params": model[2].parameters(), "momentum": 0.5}]
    KFAC(model, momentum=0.5, param_groups=same)  # the same value everywhere is fine
    KFAC(model, lr=0.1, param_groups=[{"params": model[0].parameters(), "momentum": 0.9},
                                      {"params": model[2].parameters()}])


# -- dropout in ρ ------------------------------------------------------------------------------
def test_levenberg_marquardt_reevaluates_the_loss_with_the_same_dropout_masks() -> None:
    """ρ compares L(θ + v) with L(θ) on the same batch: the closure's second run (the new
    loss) draws the dropout masks of the recorded pass, so it equals the loss at the new
    parameters with the random state the step began with."""
    x, y = _batch()
    model = _mlp(dropout=0.5)
    opt = KFAC(model, damping_adaptation_period=1)
    seen: list[float] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(float(loss.detach()))
        return loss

    torch.manual_seed(7)
    start = torch.get_rng_state()
    opt.step(closure)
    assert len(seen) == 2 and opt.last_step_info["rho"] is not None
    with torch.no_grad():
        torch.set_rng_state(start)
        expected = float(F.cross_entropy(model(x), y))
    assert seen[1] == expected


# -- finite differences beside frozen parameters -----------------------------------------------
def test_finite_difference_jvp_is_accurate_beside_a_large_frozen_table() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50000, 8), nn.Flatten(), nn.Linear(16, 8), nn.Tanh(),
                          nn.Linear(8, 4))
    model[0].weight.requires_grad_(False)
    model[0].weight.data.mul_(30)  # ‖frozen‖ ≫ ‖trained‖
    x = torch.randint(0, 50000, (6, 2))
    params = dict(model.named_parameters())
    u = {n: torch.randn_like(p) for n, p in params.items() if p.requires_grad}
    exact = _output_jvp(model, params, dict(model.named_buffers()), u, (x,), {}, None)[1]
    _NO_FORWARD_AD.add(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            approx = _output_jvp(model, params, dict(model.named_buffers()), u, (x,), {},
                                 None)[1]
    finally:
        _NO_FORWARD_AD.discard(model)
    torch.testing.assert_close(approx, exact, rtol=5e-2, atol=5e-2)  # a few digits


def test_an_empty_batch_is_refused_clearly_and_changes_nothing() -> None:
    model = _mlp()
    opt = KFAC(model)
    x, y = _batch()
    _step(model, opt, x, y)
    steps = opt.preconditioner.curvature.steps
    params = copy.deepcopy(model)
    opt.zero_grad()
    F.cross_entropy(model(x[:0]), y[:0], reduction="sum").backward()
    with pytest.raises(ValueError, match="empty batch"):
        opt.step()
    assert _same(model, params) and opt.preconditioner.curvature.steps == steps
    _step(model, opt, x, y)  # and the next step runs
    assert math.isfinite(float(opt.last_step_info["alpha"]))  # type: ignore[arg-type]
