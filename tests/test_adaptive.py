"""The adaptive step (no lr given): α, μ and the Levenberg–Marquardt ρ against the dense float64
oracle with the exact Fisher of the batch (tests/reference_optim.py, tests/reference.py)."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference as REF
import reference_optim as R
from natgrad.capture import InputRecorder
from natgrad.likelihoods import Likelihood, get_likelihood
from natgrad.optim import EKFAC, KFAC, KFACPreconditioner
from natgrad.optim.adaptive import (
    fisher_gram,
    likelihood_quadratic,
    merge_directions,
    minimize_quadratic_model,
)
from natgrad.optim.kfac import ADAPTIVE_TRUST_REGION, ADAPTIVE_TRUST_REGION_ENTROPY

pytestmark = pytest.mark.usefixtures("one_thread")

CURVATURE = {"fisher_type": "true", "ema_decay": 0.95, "factor_update_period": 1,
             "inverse_update_period": 1}


def _dense_model(F_dense: Tensor, damping: float, g: Tensor, dirs: list[Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """A = Uᵀ(F + δI)U, b = Uᵀ g, and x = −A⁻¹ b, densely (U's columns: the directions)."""
    U = torch.stack(dirs, 1)
    A = U.T @ (F_dense + damping * torch.eye(F_dense.shape[0], dtype=F_dense.dtype)) @ U
    b = U.T @ g
    return A, b, -torch.linalg.solve(A, b)


def _oracle_step(oracle: R.KFACOracle, model: nn.Module, params: R.Params, x: Tensor, y: Tensor,
                 prev: Tensor | None, wd: float, damping: float, radius: float | None = None,
                 kappa: float = 0.0) -> tuple[Tensor, list[float], float]:
    """The adaptive update v = α Δ_K + β Δ_F + μ δ₀ (flat) of the oracle, its coefficients
    (α, β when there are fallback parameters — β = α unless the Fisher sees every combination
    of Δ_K, Δ_F and both coefficients are positive —, μ when there is a δ₀) and ½ vᵀ F v; with
    ``radius`` r₀ the coefficients x are scaled by min(1, √(r / ½xᵀAx)) (the trust region),
    r = max(r₀, κ H̄), H̄ the mean entropy of softmax(f) over the batch."""
    _, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
    if radius is not None:
        logp = torch.log_softmax(torch.func.functional_call(model, params, (x,)), -1)
        radius = max(radius, kappa * float(-(logp.exp() * logp).sum(-1).mean()))
    pre = oracle.directions(params, grads, x)
    # Δ_K: the K-FAC-preconditioned parameters' part of Δ, Δ_F: the fallback parameters'
    # (their negative gradient), each with its own coefficient
    zero = {n: torch.zeros_like(p) for n, p in params.items()}
    covered = R.flat({**zero, **{n: -(pre[n] + wd * p) for n, p in params.items() if n in pre}})
    fallback = R.flat({**zero, **{n: -(grads[n] + wd * p) for n, p in params.items()
                                  if n not in pre}})
    g = R.flat({n: grads[n] + wd * p for n, p in params.items()})
    F_dense = R.fisher(model, params, x, "categorical")
    previous = [] if prev is None else [prev]

    def solve(dirs: list[Tensor]) -> tuple[Tensor, Tensor]:
        A, _, coef = _dense_model(F_dense, damping + wd, g, dirs)
        quadratic = float(0.5 * coef @ A @ coef)
        if radius is not None and quadratic > radius:
            coef = coef * math.sqrt(radius / quadratic)
        return coef, sum(c * u for c, u in zip(coef, dirs, strict=True))

    # β of its own only where the Fisher's curvature is at least the damping's on the span of
    # Δ_K and Δ_F (generalised eigenvalues ≥ 1) and α, β > 0; else one α for Δ_K + Δ_F
    shared = bool(fallback.any())
    if shared:
        U = torch.stack([covered, fallback], 1)
        ratios = torch.linalg.eigvals(torch.linalg.solve((damping + wd) * U.T @ U,
                                                         U.T @ F_dense @ U)).real
        if bool(ratios.min() >= 1):
            coef, v = solve([covered, fallback, *previous])
            shared = not bool(coef[:2].min() > 0)
    if shared:
        coef, v = solve([covered + fallback, *previous])
    elif not fallback.any():
        coef, v = solve([covered, *previous])
    coefficients = [float(c) for c in coef]
    if shared:
        coefficients.insert(1, coefficients[0])
    return v, coefficients, float(0.5 * v @ F_dense @ v)


@pytest.mark.parametrize(("trust_region", "kappa"), [
    (None, 0.0), (1e-3, 0.0), (ADAPTIVE_TRUST_REGION, ADAPTIVE_TRUST_REGION_ENTROPY),
    (1e-3, 0.05)])  # the last: κ H̄ ≈ 0.05 > r₀ sets the bound
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("ekfac", [False, True])
def test_alpha_and_mu_minimise_the_exact_fisher_model(weight_decay: float, ekfac: bool,
                                                      trust_region: float | None,
                                                      kappa: float) -> None:
    """Each step's v = αΔ_K + βΔ_F + μδ₀ equals the dense minimiser of
    gᵀv + ½vᵀ(F + (δ+λ)I)v with the exact Fisher of the batch, shortened to the trust region
    ½vᵀ(F + (δ+λ)I)v ≤ r,
    r = max(r₀, κ H̄); the model has a LayerNorm (fallback parameters: their part Δ_F of the
    step is their negative gradient, with its own coefficient β)."""
    model = R.make_mlp(norm=True)
    batches = R.make_batches(6)
    damping = 1e-2
    cls = EKFAC if ekfac else KFAC
    extra = {"scale_update_period": 1} if ekfac else {}
    opt = cls(model, damping=damping, weight_decay=weight_decay, trust_region=trust_region,
              trust_region_entropy=kappa, adaptive_damping=False, **CURVATURE, **extra)
    oracle = R.KFACOracle(model, 1.0, damping, ekfac=ekfac, **CURVATURE)
    params, prev = R.snapshot(model), None
    own: list[tuple[float, float]] = []
    for x, y in batches:
        v, coef, kl = _oracle_step(oracle, model, params, x, y, prev, weight_decay, damping,
                                   trust_region, kappa)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        new = R.snapshot(model)
        torch.testing.assert_close(R.flat(new), R.flat(params) + v, rtol=1e-9, atol=1e-12)
        info = opt.last_step_info
        assert info["alpha"] == pytest.approx(coef[0], rel=1e-8)
        assert info["alpha_fallback"] == pytest.approx(coef[1], rel=1e-8)
        assert info["mu"] == pytest.approx(coef[2] if prev is not None else 0.0, rel=1e-8,
                                           abs=1e-14)
        assert info["predicted_kl"] == pytest.approx(kl, rel=1e-8)
        assert info["damping"] == damping and info["rho"] is None
        own.append((info["alpha"], info["alpha_fallback"]))
        params, prev = new, v
    assert opt.last_step_info["alpha"] > 0 and opt.last_step_info["mu"] != 0
    assert any(a != b for a, b in own)  # some step gave the LayerNorm a β of its own


def test_fixed_momentum_holds_mu_and_momentum_zero_chooses_alpha_alone() -> None:
    model = R.make_mlp()
    (x1, y1), (x2, y2) = R.make_batches(2)
    for momentum in (0.0, 0.5):
        m = copy.deepcopy(model)
        opt = KFAC(m, damping=1e-2, momentum=momentum, trust_region=None, **CURVATURE)
        oracle = R.KFACOracle(m, 1.0, 1e-2, **CURVATURE)
        params = R.snapshot(m)
        _, _ = R.loss_and_grad(m, params, x1, y1, F.cross_entropy)
        v1, _, _ = _oracle_step(oracle, m, params, x1, y1, None, 0.0, 1e-2)
        F.cross_entropy(m(x1), y1).backward()
        opt.step()
        params = R.snapshot(m)
        _, grads = R.loss_and_grad(m, params, x2, y2, F.cross_entropy)
        pre = oracle.directions(params, grads, x2)
        delta = R.flat({n: -pre.get(n, grads[n]) for n in params})
        g, F_dense = R.flat(grads), R.fisher(m, params, x2, "categorical")
        curvature = F_dense + 1e-2 * torch.eye(F_dense.shape[0], dtype=F_dense.dtype)
        # α minimises the model along Δ with μ δ₀ held
        alpha = -(g @ delta + momentum * delta @ curvature @ v1) / (delta @ curvature @ delta)
        opt.zero_grad()
        F.cross_entropy(m(x2), y2).backward()
        opt.step()
        assert opt.last_step_info["mu"] == momentum
        assert opt.last_step_info["alpha"] == pytest.approx(float(alpha), rel=1e-8)
        torch.testing.assert_close(R.flat(R.snapshot(m)), R.flat(params) + alpha * delta
                                   + momentum * v1, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("period", [1, 2])
@pytest.mark.parametrize("with_closure", [True, False])
def test_levenberg_marquardt_rho_is_its_definition_with_the_exact_fisher(
        period: int, with_closure: bool) -> None:
    """ρ = [L(θ + v) − L(θ) + ½λ(‖θ + v‖² − ‖θ‖²)] / M(v) with M from the exact Fisher; δ moves
    by ω = (19/20)^k every k-th step, only then. Without a closure L(θ + v) comes from the
    labels read off the cross-entropy's gradient: the same ρ."""
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    damping, wd = 1e-2, 1e-3
    opt = KFAC(model, damping=damping, weight_decay=wd, damping_adaptation_period=period,
               trust_region=None, **CURVATURE)
    oracle = R.KFACOracle(model, 1.0, damping, **CURVATURE)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    prev = None
    for _ in range(period):
        params = R.snapshot(model)
        loss0, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
        v, _, _ = _oracle_step(oracle, model, params, x, y, prev, wd, damping)
        if with_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
        prev = v
    theta = R.flat(params)
    loss1, _ = R.loss_and_grad(model, R.snapshot(model), x, y, F.cross_entropy)
    g = R.flat(grads) + wd * theta
    F_dense = R.fisher(model, params, x, "categorical")
    M = float(g @ v + 0.5 * v @ (F_dense + (damping + wd) * torch.eye(len(v),
                                                                      dtype=v.dtype)) @ v)
    actual = float(loss1 - loss0) + 0.5 * wd * float((theta + v).square().sum()
                                                    - theta.square().sum())
    rho = actual / M
    assert M < 0
    assert opt.last_step_info["rho"] == pytest.approx(rho, rel=1e-7)
    omega = (19 / 20) ** period
    factor = omega if rho > 0.75 else (1 / omega if rho < 0.25 else 1.0)
    assert opt.param_groups[0]["damping"] == pytest.approx(damping * factor, rel=1e-12)


class _SequenceModel(nn.Module):
    """Logits (N, T, C) of a per-position MLP with dropout (a language-model-shaped output)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _sequence_batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    batches = []
    for n in (6, 4):  # two micro-batches of different sizes
        x = torch.randn(n, 7, 5, generator=g)
        y = torch.randint(0, 4, (n, 7), generator=g)
        y[0, -2:] = -100  # padding
        batches.append((x, y))
    return batches


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_without_a_closure_rho_is_the_closures(cls: type) -> None:
    """Without a closure, ρ uses L(θ + v) on the same batch from the hard labels read off
    ∂L/∂f (natgrad.optim._loss_targets): with (N, T, C) logits, ignore_index padding, dropout
    and two accumulated micro-batches (each loss a mean / 2), ρ and δ equal those of the same
    steps taken with step(closure)."""
    torch.manual_seed(0)
    base = _SequenceModel()
    batches = _sequence_batches()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts = [cls(m, damping_adaptation_period=2) for m in models]

    def accumulate(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> Tensor:
        opt.zero_grad()
        total = torch.zeros(())
        for i, (x, y) in enumerate(batches):
            torch.manual_seed(seed + i)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / 2
            loss.backward()
            total = total + loss.detach()
        return total

    rhos = []
    for t in range(6):
        opts[0].step(lambda t=t: accumulate(models[0], opts[0], 10 * t))
        accumulate(models[1], opts[1], 10 * t)
        opts[1].step()
        a, b = opts[0].last_step_info, opts[1].last_step_info
        assert (a["rho"] is None) == (b["rho"] is None) == (t % 2 == 0)
        if a["rho"] is not None:
            assert b["rho"] == pytest.approx(a["rho"], rel=1e-4)
            rhos.append(b["rho"])
        assert b["damping"] == pytest.approx(a["damping"], rel=1e-12)
        assert opts[1].damping_note is None
    assert len(rhos) == 3


@pytest.mark.parametrize(("loss_name", "why"), [
    ("label_smoothing", "cross-entropy"), ("label_smoothing_many_classes", "cross-entropy"),
    ("class_weights", "cross-entropy"), ("mse", "cross-entropy"),
    ("penalty_in_loss", "do not pass through"), ("masked_in_place", "in place")])
def test_without_a_closure_other_losses_keep_the_damping(loss_name: str, why: str) -> None:
    """A loss whose gradient is not (softmax(f) − e_y)/s (label smoothing, also over 4,096
    classes where it moves each p_c by ε/C only, class weights, a regression loss), one with a
    term that does not pass through the output (an L2 penalty written into the loss: its
    slope along the step differs from ⟨∂L/∂f, J v⟩), or one computed from logits changed in
    place cannot be re-evaluated without a closure: δ stays, ρ is None and ``damping_note``
    says why."""
    model = R.make_mlp(outputs=4096 if loss_name.endswith("many_classes") else 3)
    (x, y), = R.make_batches(1)

    def masked(f: Tensor) -> Tensor:
        f[:, 0] = -1e4
        return F.cross_entropy(f, y)

    losses = {
        "label_smoothing": lambda f: F.cross_entropy(f, y, label_smoothing=0.1),
        "label_smoothing_many_classes": lambda f: F.cross_entropy(
            f, y * 1000, label_smoothing=0.1),
        "class_weights": lambda f: F.cross_entropy(
            f, y, weight=torch.linspace(0.5, 2.0, f.shape[1], dtype=f.dtype)),
        "mse": lambda f: F.mse_loss(f, F.one_hot(y, f.shape[1]).to(f.dtype)),
        "penalty_in_loss": lambda f: F.cross_entropy(f, y) + 0.05 * sum(
            p.square().sum() for p in model.parameters()),
        "masked_in_place": masked,
    }
    opt = KFAC(model, damping_adaptation_period=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the regression loss's likelihood warning
        for _ in range(3):
            opt.zero_grad()
            losses[loss_name](model(x)).backward()
            opt.step()
    assert opt.param_groups[0]["damping"] == opt.last_step_info["damping"] == 1e-2
    assert opt.last_step_info["rho"] is None
    assert opt.damping_note is not None and why in opt.damping_note


def test_without_a_closure_a_gaussian_model_keeps_the_damping() -> None:
    model = R.make_mlp()
    (x, _), = R.make_batches(1)
    target = torch.randn(x.shape[0], 3, dtype=x.dtype)
    opt = KFAC(model, likelihood="gaussian", damping_adaptation_period=1)
    for _ in range(2):
        opt.zero_grad()
        (0.5 * (model(x) - target).square().sum(1).mean()).backward()
        opt.step()
    assert opt.param_groups[0]["damping"] == 1e-2 and opt.last_step_info["rho"] is None
    assert "Gaussian" in (opt.damping_note or "")


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli", "custom"])
def test_likelihood_quadratic_is_u_d_w(name: str) -> None:
    """Q_ij = Σₙ U_inᵀ D(fₙ) U_jn against D from the oracle's Hessian of −log p."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 4, generator=g, dtype=torch.float64)
    U = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    if name == "custom":
        class Scaled(Likelihood):  # D = diag(1..4) through the generic square-root path
            name = "scaled"

            def check_outputs(self, f: Tensor) -> None: ...
            def check_targets(self, f: Tensor, y: Tensor) -> None: ...
            def sample(self, f, num_samples, generator):  # type: ignore[no-untyped-def]
                raise NotImplementedError

            def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
                raise NotImplementedError

            def grad_log_prob(self, f: Tensor, y: Tensor) -> Tensor:
                raise NotImplementedError

            def sqrt_fisher(self, f: Tensor) -> Tensor:
                root = torch.arange(1, f.shape[1] + 1, dtype=f.dtype).sqrt()
                return torch.diag_embed(root.expand(f.shape[0], -1))

        lik: Likelihood = Scaled()
        D = [torch.diag(torch.arange(1, 5, dtype=torch.float64))] * 5
    else:
        lik = get_likelihood(name)
        D = [REF.output_fisher(name, fn) for fn in f]
    expected = torch.stack([torch.stack([sum(U[i, n] @ D[n] @ U[j, n] for n in range(5))
                                         for j in range(2)]) for i in range(2)])
    Q, count = likelihood_quadratic(lik, f, U)
    assert count == 5
    torch.testing.assert_close(Q, expected, rtol=1e-12, atol=1e-12)


def test_minimizer_guards_never_return_nan() -> None:
    zero = torch.zeros(2, 2, dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    # δ₀ = 0: μ drops out, α from the 1-D model
    A = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    model = minimize_quadratic_model(A, zero, b)
    assert model.coefficients == pytest.approx((0.5, 0.0), rel=1e-14)
    assert model.value == pytest.approx(-0.25) and not model.fallback
    # indefinite: the 1-D model along Δ
    A = torch.tensor([[2.0, 3.0], [3.0, 1.0]], dtype=torch.float64)
    model = minimize_quadratic_model(A, zero, b)
    assert model.coefficients == pytest.approx((0.5, 0.0), rel=1e-14) and model.fallback
    # non-finite or zero curvature: no step
    for bad in (torch.full((2, 2), math.nan, dtype=torch.float64), zero):
        model = minimize_quadratic_model(bad, zero, b)
        assert model.coefficients == (0.0, 0.0) and model.value == 0.0 and model.kl == 0.0


def _ill_conditioned(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    x = torch.randn(64, 8)
    y = torch.randint(0, 4, (64,))
    if kind == "scaled":
        x = x * 1e6
    elif kind == "dead":
        with torch.no_grad():
            model[0].bias[:12] = -1e3  # 12 of 16 units never fire
    elif kind == "rank_deficient":
        x[:, 4:] = x[:, :4]  # Ā has rank 4 + 1 of 9
        x[:, 3] = 0
    return model, x, y


@pytest.mark.parametrize("kind", ["scaled", "dead", "rank_deficient"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("closure", [False, True])
def test_defaults_stay_finite_on_ill_conditioned_problems(kind: str, cls: type, closure: bool
                                                          ) -> None:
    model, x, y = _ill_conditioned(kind)
    opt = cls(model)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))

    def loss_fn() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(15):
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        info = opt.last_step_info
        assert all(v is None or not math.isnan(v) for v in info.values())
    with torch.no_grad():
        last = float(F.cross_entropy(model(x), y))
    if kind != "scaled":
        # features ×1e6 saturate the softmax: F ≈ 0 and the damping is the only trust region,
        # the first step overshoots (later steps are skipped for overflowing statistics, the
        # parameters stay finite); a known limit of the quadratic model, see docs/guide.md
        assert last <= first


def _train(opt: KFAC, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_state_round_trips_bitwise_and_resuming_takes_the_same_step(cls: type) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
               for _ in range(6)]
    opt = cls(model, damping_adaptation_period=2, generator=torch.Generator().manual_seed(1))
    _train(opt, model, batches[:3])
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    other = cls(clone, damping_adaptation_period=2, generator=torch.Generator().manual_seed(7))
    other.load_state_dict(copy.deepcopy(saved))
    again = other.state_dict()
    assert again["adaptive"] == saved["adaptive"]
    assert again["param_groups"] == saved["param_groups"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(again["state"][index][key], value)
    assert any("previous_update" in entry for entry in saved["state"].values())
    assert other.last_step_info == opt.last_step_info
    _train(opt, model, batches[3:])
    _train(other, clone, batches[3:])
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
    assert other.last_step_info == opt.last_step_info
    assert other.param_groups[0]["damping"] == opt.param_groups[0]["damping"]


def test_adaptive_and_fixed_states_do_not_mix() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    adaptive, fixed = KFAC(model), KFAC(copy.deepcopy(model), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    adaptive.step()
    with pytest.raises(ValueError, match="adaptive"):
        fixed.load_state_dict(adaptive.state_dict())
    with pytest.raises(ValueError, match="fixed lr"):
        KFAC(model).load_state_dict(fixed.state_dict())


def test_with_lr_the_step_is_todays() -> None:
    """lr given: the fixed step θ ← θ − η (F̂ + δI)⁻¹∇L of the oracle (default δ 1e-3, no
    momentum), diagnostics report η, μ = 0 and no predicted KL."""
    model = R.make_mlp()
    opt = KFAC(model, lr=0.1, **CURVATURE)
    oracle = R.KFACOracle(model, 0.1, 1e-3, **CURVATURE)
    params = R.snapshot(model)
    for x, y in R.make_batches(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        params = oracle.step(params, x, y, F.cross_entropy)
        torch.testing.assert_close(R.snapshot(model), params, rtol=1e-8, atol=1e-10)
    assert opt.last_step_info == {"alpha": 0.1, "alpha_fallback": None, "mu": 0.0,
                                  "damping": 1e-3, "rho": None, "predicted_kl": None}
    assert "adaptive" not in opt.state_dict()


def test_needs_a_forward_pass_and_leaves_everything_unchanged() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    opt = KFAC(model)
    F.cross_entropy(model(x), y).backward()
    opt._recorder.take()  # as if the gradients came from elsewhere
    before = R.snapshot(model)
    with pytest.raises(RuntimeError, match="forward pass"):
        opt.step()
    torch.testing.assert_close(R.snapshot(model), before, rtol=0, atol=0)
    assert not opt.state


def test_batchnorm_statistics_and_random_state_are_untouched() -> None:
    """The extra forward-mode pass runs on copies of the buffers and does not advance the
    caller's random state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
                          nn.Dropout(0.3), nn.Linear(8, 3)).train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = KFAC(model, generator=torch.Generator().manual_seed(0), damping_adaptation_period=1)
    F.cross_entropy(model(x), y).backward()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    opt.step()
    assert opt.last_step_info["rho"] is not None  # the loss was re-evaluated, too
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.last_step_info["alpha"] > 0 and opt.last_step_info["predicted_kl"] > 0


def test_the_fisher_pass_replays_the_dropout_masks() -> None:
    """u_iᵀ F u_j for directions of the last layer of Linear → Dropout → Linear with a
    Gaussian likelihood is (1/N) Σₙ (U hₙ)ᵀ (U' hₙ), h the dropped-out features of the
    recorded pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x = torch.randn(16, 4, dtype=torch.float64)
    recorder = InputRecorder(model, record_rng=True)
    torch.manual_seed(5)
    model(x)
    torch.manual_seed(5)
    with torch.no_grad():
        h = model[1](model[0](x))
    us = [torch.randn(3, 8, dtype=torch.float64) for _ in range(2)]
    gram = fisher_gram(model, recorder.passes, get_likelihood("gaussian"),
                       [{"2.weight": u} for u in us], recorder.rng_states)
    outs = [h @ u.T for u in us]
    expected = torch.tensor([[float((a * b).sum()) / 16 for b in outs] for a in outs],
                            dtype=torch.float64)
    torch.testing.assert_close(gram, expected, rtol=1e-12, atol=1e-12)
    recorder.close()


@pytest.mark.parametrize("initial, floor", [(2e-3, 1e-3), (1e-4, 1e-4)])
def test_levenberg_marquardt_keeps_the_damping_above_its_floor(initial: float, floor: float
                                                               ) -> None:
    """ρ ≈ 1 on the same batch step after step would lower δ without end; it stops at
    min(1e-3, the initial δ)."""
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    opt = KFAC(model, damping=initial, damping_adaptation_period=1, **CURVATURE)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    seen = []
    for _ in range(30):
        opt.step(closure)
        seen.append(opt.param_groups[0]["damping"])
    assert min(seen) >= floor
    if initial > floor:
        assert floor in seen


def test_preconditioner_users_take_the_same_adaptive_step() -> None:
    """guide §3: KFACPreconditioner + InputRecorder + fisher_gram + minimize_quadratic_model
    reproduce KFAC(model)'s first adaptive step (μ = 0 there)."""
    model = R.make_mlp()
    other = copy.deepcopy(model)
    (x, y), = R.make_batches(1)
    opt = KFAC(model, **CURVATURE)
    F.cross_entropy(model(x), y).backward()
    opt.step()

    pre = KFACPreconditioner(other, damping=1e-2, **CURVATURE)
    recorder = InputRecorder(other)
    F.cross_entropy(other(x), y).backward()
    grads = {n: p.grad.clone() for n, p in other.named_parameters()}
    pre.step()  # .grad ← (F̂ + δI)⁻¹ ∇L
    delta = {n: -p.grad for n, p in other.named_parameters()}
    fisher = fisher_gram(other, recorder.passes, get_likelihood("categorical"), [delta])
    sq = sum(float((d * d).sum()) for d in delta.values())
    b = sum(float((grads[n] * d).sum()) for n, d in delta.items())
    step = minimize_quadratic_model(fisher, torch.tensor([[1e-2 * sq]], dtype=torch.float64),
                                    torch.tensor([b], dtype=torch.float64),
                                    radius=ADAPTIVE_TRUST_REGION)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.add_(delta[n], alpha=step.coefficients[0])
    assert step.coefficients[0] == pytest.approx(opt.last_step_info["alpha"], rel=1e-10)
    torch.testing.assert_close(R.snapshot(other), R.snapshot(model), rtol=1e-10, atol=1e-12)
    recorder.close()
    pre.close()


class _NoForwardTanh(torch.autograd.Function):
    """tanh with a backward but no forward-mode derivative (as some custom kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _Net(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.custom = nn.Linear(4, 8), nn.Linear(8, 3), custom

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(_NoForwardTanh.apply(h) if self.custom else torch.tanh(h))


def test_an_operation_without_forward_mode_uses_finite_differences() -> None:
    """A model with an operation lacking a forward-mode derivative still takes the adaptive
    step (warned once): its Jacobian-vector products by central differences give the same
    α, μ as forward mode on the same model written with torch.tanh, to a few digits."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    infos = []
    for custom in (False, True):
        model = _Net(custom)
        opt = KFAC(model, **CURVATURE)
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if custom and step == 0:
                with pytest.warns(RuntimeWarning, match="finite differences"):
                    opt.step()
            else:
                opt.step()
        infos.append(opt.last_step_info)
    for key in ("alpha", "mu", "predicted_kl"):
        assert infos[1][key] == pytest.approx(infos[0][key], rel=2e-3), key


def test_scaled_dot_product_attention_takes_the_adaptive_step() -> None:
    """F.scaled_dot_product_attention's fused CPU kernel has no forward-mode derivative: the
    quadratic model's pass runs it on the math kernel, equal to an explicit softmax
    attention's model."""

    class Attend(nn.Module):
        def __init__(self, fused: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.qkv, self.out, self.fused = nn.Linear(8, 24), nn.Linear(8, 3), fused

        def forward(self, x: Tensor) -> Tensor:
            n, t, _ = x.shape  # two heads of width 4: (N, H, T, 4), as in Llama
            q, k, v = (z.view(n, t, 2, 4).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
            if self.fused:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = torch.ones(t, t, dtype=torch.bool).tril()
                scores = (q @ k.transpose(-1, -2) / math.sqrt(4)).masked_fill(~mask, -math.inf)
                o = torch.softmax(scores, -1) @ v
            return self.out(o.transpose(1, 2).reshape(n, t, 8)).mean(1)

    x = torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    infos = []
    for fused in (True, False):
        model = Attend(fused)
        opt = KFAC(model, **CURVATURE)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # forward mode, no finite differences
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        infos.append(opt.last_step_info)
    for key in ("alpha", "mu", "predicted_kl"):
        assert infos[0][key] == pytest.approx(infos[1][key], rel=1e-4), key


class _SeqLM(nn.Module):
    """Embedding → Linear → logits per position; ``layout``: "ntc" (N, T, C), "nct" (N, C, T,
    cross_entropy's layout), "flat" (N·T, C), "dict" ({"aux": …, "scores": (N, T, C)})."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.emb, self.out, self.aux = nn.Embedding(7, 6), nn.Linear(6, 7), nn.Linear(6, 7)

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        h = torch.tanh(self.emb(x))
        z = self.out(h)
        if self.layout == "nct":
            return z.transpose(1, 2)
        if self.layout == "flat":
            return z.flatten(0, 1)
        if self.layout == "dict":
            return {"aux": self.aux(h.detach()) * 0 + z.detach() * 3, "scores": z}
        return z


def _seq_steps(layout: str) -> list[Tensor]:
    from natgrad.likelihoods import Categorical

    model = _SeqLM(layout)
    kwargs = {"fisher_type": "true", "factor_update_period": 1, "inverse_update_period": 1}
    if layout == "nct":
        kwargs["likelihood"] = Categorical(class_dim=1)
    if layout == "dict":
        kwargs["output"] = "scores"
    params = [model.emb.weight, model.out.weight, model.out.bias]
    opt = KFAC(model, **kwargs)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randint(0, 7, (4, 5), generator=g)
        y = torch.randint(0, 7, (4, 5), generator=g)
        opt.zero_grad()
        out = model(x)
        z = {"ntc": lambda o: o, "nct": lambda o: o.transpose(1, 2),
             "flat": lambda o: o.view(4, 5, 7), "dict": lambda o: o["scores"]}[layout](out)
        F.cross_entropy(z.reshape(-1, 7), y.reshape(-1)).backward()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("layout", ["nct", "flat", "dict"])
def test_adaptive_step_of_sequence_logits_in_any_layout(layout: str) -> None:
    """The exact-Fisher model is normalised per loss term (N·T for (N, T, C) logits), reads
    the classes where ``class_dim`` says and the output ``output=`` selects: the same steps
    whether the logits are (N, T, C), (N, C, T), flattened to (N·T, C) or a dict entry."""
    for p, q in zip(_seq_steps(layout), _seq_steps("ntc"), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_forward_pass_that_raises_leaves_no_inputs_behind() -> None:
    """A malformed batch whose forward pass raises (caught by the loop) is not replayed by
    the next steps' quadratic model."""
    model = _Net(custom=False)
    opt = KFAC(model, **CURVATURE)
    with pytest.raises(RuntimeError):
        model(torch.randn(8, 5))  # wrong width
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.last_step_info["alpha"] > 0


def test_sparse_gradients_are_refused_by_the_adaptive_step_and_nothing_changes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    opt = KFAC(model, **CURVATURE)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randint(0, 5, (8, 3)), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not opt.state


def test_eval_mode_transformer_takes_the_forward_mode_pass() -> None:
    """In eval mode PyTorch runs TransformerEncoderLayer / MultiheadAttention on a fused
    inference kernel without a forward-mode derivative when nothing requires a gradient: the
    quadratic model's pass turns that path off (no finite differences, no warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(40, 3)).eval()
    opt = KFAC(model, **CURVATURE)
    x, y = torch.randn(16, 5, 8), torch.randint(0, 3, (16,))  # 16: no small-batch warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert torch.backends.mha.get_fastpath_enabled()


def test_merge_directions_is_the_model_of_the_summed_direction() -> None:
    g = torch.Generator().manual_seed(0)
    U = torch.randn(7, 3, generator=g, dtype=torch.float64)
    F_dense = (lambda B: B @ B.T)(torch.randn(7, 7, generator=g, dtype=torch.float64))
    grad = torch.randn(7, generator=g, dtype=torch.float64)
    fisher, damping_gram, b = U.T @ F_dense @ U, 0.1 * U.T @ U, U.T @ grad
    merged = merge_directions(fisher, damping_gram, b, 0, 1)
    W = torch.stack([U[:, 0] + U[:, 1], U[:, 2]], 1)
    for got, want in zip(merged, (W.T @ F_dense @ W, 0.1 * W.T @ W, W.T @ grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _AuxHead(nn.Module):
    """Main logits (the Fisher's output) and an auxiliary head used only in the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.main, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.body(x))
        return self.main(h), self.aux(h)


def test_fallback_parameters_the_fisher_does_not_see_share_alpha() -> None:
    """An auxiliary head off the output's path has uᵀFu = 0 along its direction: β would be
    −gᵀu/δ‖u‖² ≈ 1/δ (set by the damping alone), so it shares α (v_aux = −α ∇_aux), while
    the fallback of a LayerNorm the Fisher sees keeps a β of its own (the oracle test)."""
    model = _AuxHead()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt = KFAC(model, output=0)
    before = model.aux.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="does not reach the model's output"):
        main, aux = model(x)
    (F.cross_entropy(main, y) + 0.4 * F.cross_entropy(aux, y)).backward()
    grad = model.aux.weight.grad.clone()
    opt.step()
    info = opt.last_step_info
    assert info["alpha_fallback"] == info["alpha"] > 0
    torch.testing.assert_close(model.aux.weight.detach(), before - info["alpha"] * grad)


def test_the_first_adaptive_step_raises_no_torch_deprecation_warning() -> None:
    """torch builds its forward-mode decompositions with torch.jit.script on first use; its
    DeprecationWarnings must not surface from natgrad's step (a fresh interpreter: the
    decompositions load once per process)."""
    import subprocess
    import sys

    script = (
        "import warnings, torch\n"
        "from torch import nn\n"
        "from natgrad.optim import KFAC\n"
        "warnings.simplefilter('error')\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))\n"
        "opt = KFAC(model)\n"
        "x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))\n"
        "nn.functional.cross_entropy(model(x), y).backward()\n"
        "opt.step()\n"
        "assert opt.last_step_info['alpha'] is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_loss_targets_do_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """read_targets, loss_sum and loss_slopes in chunks of 7 entries (3 rows of 2 classes)
    equal the one-chunk results: the chunks cover every row once."""
    from natgrad.optim import _loss_targets as lt

    g = torch.Generator().manual_seed(0)
    f = torch.randn(10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (10,), generator=g)
    (grad,) = torch.autograd.grad(F.cross_entropy(f, y), f)
    lik = get_likelihood("categorical")
    tangents = torch.randn(3, 10, 2, generator=g, dtype=torch.float64)

    def results() -> tuple:
        t = lt.read_targets(lik, f, grad)
        assert isinstance(t, lt.LossTargets)
        return t.labels, t.scale, lt.loss_sum(lik, f, t), lt.loss_slopes(lik, f, tangents, t)

    whole = results()
    monkeypatch.setattr(lt, "_CHUNK_ENTRIES", 7)
    chunked = results()
    assert torch.equal(whole[0], y) and torch.equal(chunked[0], y)
    assert whole[1] == pytest.approx(chunked[1], rel=1e-12)
    assert whole[2] == pytest.approx(chunked[2], rel=1e-12)
    assert torch.allclose(whole[3], chunked[3], rtol=1e-12)



def test_adaptive_step_warns_once_below_16_examples() -> None:
    """One or two examples' exact Fisher cannot bound the adaptive step (a red team's MLP
    diverged at batch 1–2): said once, at the first step; 16 examples (also accumulated over
    micro-batches) say nothing, nor do 2 sequences of 8 positions (16 loss terms)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for half in (slice(0, 8), slice(8, 16)):  # accumulated: 16 examples
            F.cross_entropy(model(x[half]), y[half]).backward()
        opt.step()
    with pytest.warns(RuntimeWarning, match=r"has 2 loss term\(s\): below 16"):
        opt.zero_grad()
        F.cross_entropy(model(x[:2]), y[:2]).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.zero_grad()
        F.cross_entropy(model(x[:2]), y[:2]).backward()
        opt.step()
    sequences = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    seq_opt = KFAC(sequences)
    xs, ys = torch.randn(2, 8, 4), torch.randint(0, 3, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        F.cross_entropy(sequences(xs).transpose(1, 2), ys).backward()
        seq_opt.step()


def test_a_negligible_previous_update_drops_out_of_the_model() -> None:
    """A previous update of ~1e-38 (after a zero-loss batch) made μ = −b/A ~ 1e36, which
    overflowed float32 inside step() after the factors had been updated (a red team, batch
    1): a direction whose A_ii is below 1e-24 of the largest now drops out (μ = 0)."""
    tiny = 1e-38
    fisher = torch.tensor([[2.0, 0.0], [0.0, tiny * tiny]], dtype=torch.float64)
    damping_gram = torch.tensor([[0.1, 0.0], [0.0, 0.1 * tiny * tiny]], dtype=torch.float64)
    b = torch.tensor([-1.0, -tiny], dtype=torch.float64)
    model = minimize_quadratic_model(fisher, damping_gram, b)
    assert model.coefficients[1] == 0.0
    assert model.coefficients[0] == pytest.approx(1 / 2.1, rel=1e-12)


def test_delta_is_only_raised_on_batches_of_few_loss_terms() -> None:
    """Batch 1: ρ on one example says how well the step memorises it, and lowering δ by it
    let KFAC(model) diverge (held-out loss 15–24 after 150 steps, a red team; constant
    prediction: 1.39). Below 16 loss terms δ never falls; the held-out loss stays below 3."""
    W = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    test_x = torch.randn(512, 16, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = KFAC(model, damping_adaptation_period=1)
    g = torch.Generator().manual_seed(100)
    dampings = [opt.param_groups[0]["damping"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the small-batch warning
        for _ in range(150):
            x = torch.randn(1, 16, generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), (x @ W).argmax(1)).backward()
            opt.step()
            dampings.append(opt.param_groups[0]["damping"])
    assert all(b >= a for a, b in itertools.pairwise(dampings))
    with torch.no_grad():
        held_out = float(F.cross_entropy(model(test_x), (test_x @ W).argmax(1)))
    assert held_out < 3.0
