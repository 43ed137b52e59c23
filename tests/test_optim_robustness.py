"""K-FAC optimizers on the habits real users have (issue 12): per-group learning rates with a
KL clip, foreign parameters, stepping after ``close()``."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
import reference_optim as R
from natgrad.optim import EKFAC, KFAC, NGD, EKFACPreconditioner, KFACPreconditioner

pytestmark = pytest.mark.usefixtures("one_thread")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- item 5: KL clip with per-group learning rates ----------------------------------------------
GROUP_LR = {"0": 1.0, "2": 0.01}  # layer name -> its group's lr (model: 0 Linear, 1 Tanh, 2 Linear)


def _clipped_oracle_step(model: nn.Module, x, y, damping: float, kappa: float):
    """θ_p − η_p ν d_p with ν = min(1, √(κ / Σ_p η_p² ⟨d_p, ∇_p⟩)), in float64 from the
    definitions; returns (expected parameters, ν)."""
    params = R.snapshot(model)
    oracle = R.KFACOracle(model, 1.0, damping)
    _, grads = R.loss_and_grad(model, params, x, y, F.cross_entropy)
    pre = oracle.directions(params, grads, x)
    eta = {n: GROUP_LR[n.split(".")[0]] for n in params}
    inner = sum(eta[n] ** 2 * float((pre[n] * grads[n]).sum()) for n in pre)
    nu = min(1.0, math.sqrt(kappa / inner))
    return {n: p - eta[n] * nu * pre[n] for n, p in params.items()}, nu


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": list(getattr(model, name).parameters()), "lr": lr}
            for name, lr in GROUP_LR.items()]


def test_kl_clip_uses_each_groups_learning_rate() -> None:
    """Before the fix every layer used group 0's lr in Σ η² ⟨d, ∇⟩ (KL far above κ)."""
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    damping, kappa = 1e-3, 1e-4
    expected, nu = _clipped_oracle_step(model, x, y, damping, kappa)
    assert nu < 0.5  # the clip is active
    opt = KFAC(model, damping=damping, fisher_type="true", kl_clip=kappa,
               param_groups=_groups(model))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(R.snapshot(model), expected, rtol=1e-8, atol=1e-10)


def test_kl_clip_of_a_preconditioner_reads_the_base_optimizers_groups() -> None:
    """``lr=optimizer``: each parameter's η is its group's (a scheduler's change included)."""
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    damping, kappa = 1e-3, 1e-4
    expected, nu = _clipped_oracle_step(model, x, y, damping, kappa)
    assert nu < 0.5
    sgd = torch.optim.SGD([{"params": g["params"], "lr": 1.0} for g in _groups(model)])
    pre = KFACPreconditioner(model, damping=damping, fisher_type="true", kl_clip=kappa, lr=sgd)
    for group, lr in zip(sgd.param_groups, GROUP_LR.values(), strict=True):
        group["lr"] = lr  # e.g. set by a scheduler after construction
    F.cross_entropy(model(x), y).backward()
    pre.step()
    sgd.step()
    torch.testing.assert_close(R.snapshot(model), expected, rtol=1e-8, atol=1e-10)


# -- item 17: parameters that are not the model's -----------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_a_foreign_parameter_in_param_groups_is_a_clear_error(cls) -> None:
    model = R.make_mlp()
    stranger = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    groups = [{"params": list(model.parameters())}, {"params": [stranger], "lr": 0.1}]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(3, 2\)\)"
                                         r" is not a parameter of the model"):
        cls(model, param_groups=groups)
    assert _hooks(model) == 0  # nothing was installed


# -- item 19: step() after close() --------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_step_after_close_raises_and_changes_nothing(cls) -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    opt = cls(model, lr=0.1, damping=1e-2, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.close()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = R.snapshot(model)
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\).*stale curvature"):
        opt.step()
    torch.testing.assert_close(R.snapshot(model), before, rtol=0, atol=0)


def test_ngd_step_after_close_raises_and_changes_nothing() -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    opt = NGD(model, lr=0.1, damping=1e-2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.close()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = R.snapshot(model)
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\).*stale inputs"):
        opt.step()
    torch.testing.assert_close(R.snapshot(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [KFACPreconditioner, EKFACPreconditioner])
def test_preconditioner_step_after_close_raises_and_keeps_the_gradients(cls) -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    pre = cls(model, damping=1e-2)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    pre.close()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\)"):
        pre.step()
    with pytest.raises(RuntimeError, match=r"directions\(\) after close\(\)"):
        pre.directions()
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


# -- item 22: eigendecompositions of factors with many exactly-zero rows ------------------------
def _padded_conv_factor(channels: int, n: int, seed: int) -> torch.Tensor:
    """Ā = mean ā āᵀ of a padded 3×3 convolution over a 1×1 feature map after a ReLU: of each
    patch only the centre is non-zero, so 8 of every 9 rows and columns are exactly zero."""
    g = torch.Generator().manual_seed(seed)
    h = torch.zeros(n, channels, 3, 3)
    h[:, :, 1, 1] = torch.randn(n, channels, generator=g).abs()
    a = torch.cat([h.reshape(n, -1), torch.ones(n, 1)], 1)
    return a.T @ a / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels, n, seed", [(8, 256, 1), (8, 256, 5), (16, 32, 2)])
def test_sym_eig_of_a_padded_convolution_factor(channels, n, seed, dtype) -> None:
    """With one thread, float32 LAPACK returns NaN without raising for seed 1 and raises for
    the others; sym_eig must still return an accurate decomposition, in A's dtype."""
    from natgrad._linalg import sym_eig

    A = _padded_conv_factor(channels, n, seed).to(dtype)
    s, Q = sym_eig(A)
    assert s.dtype == Q.dtype == dtype
    assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(Q).all())
    reference = torch.linalg.eigvalsh(A.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = float(reference.abs().max())
    assert float((s.double() - reference).abs().max()) <= tol * scale
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    assert float((Q.double().T @ Q.double() - eye).abs().max()) <= 10 * tol
    rebuilt = (Q.double() * s.double()) @ Q.double().T
    assert float((rebuilt - A.double()).abs().max()) <= 10 * tol * scale


def _flaky_eigh(real):
    """LAPACK as it behaves on some machines: a matrix with an exactly-zero row makes float32
    return NaN silently and float64 raise."""
    def eigh(M, *args, **kwargs):
        if bool((M == 0).all(dim=1).any()):
            if M.dtype == torch.float32:
                s, Q = real(M, *args, **kwargs)
                return torch.full_like(s, math.nan), Q
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(M, *args, **kwargs)

    return eigh


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_curvature_with_zero_rows_is_refreshed_not_kept_stale(monkeypatch, cls) -> None:
    """9 of 12 inputs always zero; every refresh must succeed (no fallback, no warning) and
    the float32 steps follow the float64 oracle."""
    import warnings

    real = torch.linalg.eigh
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [(torch.cat([x, torch.zeros(16, 9, dtype=x.dtype)], 1).float(), y)
               for x, y in R.make_batches(3, inputs=3)]
    opt = cls(model, lr=0.3, damping=1e-2, fisher_type="true", inverse_update_period=1)
    oracle = R.KFACOracle(model, 0.3, 1e-2, inverse_update_period=1, ekfac=cls is EKFAC)
    params = R.snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            monkeypatch.setattr(torch.linalg, "eigh", _flaky_eigh(real))  # natgrad's only
            opt.step()
            monkeypatch.setattr(torch.linalg, "eigh", real)
            params = oracle.step(params, x.double(), y, F.cross_entropy)
            torch.testing.assert_close(R.snapshot(model), params, rtol=1e-4, atol=1e-5)
    assert opt.preconditioner.curvature.eigen_failures == 0


# -- item 4: damping 0 with a rank-deficient factor ----------------------------------------------
def _state_bytes(opt) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.getvalue()


KINDS_4 = [
    pytest.param(KFAC, {}, id="KFAC-exact"),
    pytest.param(KFAC, {"damping_mode": "factored"}, id="KFAC-factored"),
    pytest.param(EKFAC, {}, id="EKFAC"),
]


@pytest.mark.parametrize("cls, options", KINDS_4)
def test_damping_zero_with_an_always_zero_input_is_refused_and_changes_nothing(cls,
                                                                               options) -> None:
    """An always-zero input makes Ā singular; damping 0 used to write NaN into the weights.
    Now: ValueError, parameters and state untouched, and the same step with damping > 0
    afterwards equals the oracle's (the step's statistics were kept, counted once)."""
    model = R.make_mlp(seed=3)
    (x, y), = R.make_batches(1, likelihood="gaussian")
    x[:, 0] = 0.0
    loss_fn = R.loss_function("gaussian")
    opt = cls(model, lr=0.3, damping=0.0, likelihood="gaussian", fisher_type="true",
              momentum=0.9, **options)
    loss_fn(model(x), y).backward()  # the forward pass may learn capture settings
    params, state = R.snapshot(model), _state_bytes(opt)
    with pytest.raises(ValueError, match=r"damping=0 but the .* of layer '0' is singular .*"
                                         r"pass damping > 0 \(nothing was changed\)"):
        opt.step()
    torch.testing.assert_close(R.snapshot(model), params, rtol=0, atol=0)
    assert _state_bytes(opt) == state
    for group in opt.param_groups:
        group["damping"] = 1e-2
    opt.step()
    oracle = R.KFACOracle(model, 0.3, 1e-2, "gaussian", momentum=0.9, ekfac=cls is EKFAC,
                          damping_mode=options.get("damping_mode", "exact"))
    expected = oracle.step(params, x, y, loss_fn)
    torch.testing.assert_close(R.snapshot(model), expected, rtol=1e-8, atol=1e-10)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_preconditioner_with_damping_zero_and_a_dead_unit_is_refused() -> None:
    """A hidden unit that is never active makes G of the first layer (and Ā of the second)
    singular; the gradients stay as they were."""
    model = R.make_mlp(seed=3)
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = -50.0  # tanh saturated: g = 0 for unit 2
    (x, y), = R.make_batches(1, likelihood="gaussian")
    pre = KFACPreconditioner(model, damping=0.0, likelihood="gaussian", fisher_type="true")
    R.loss_function("gaussian")(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="damping=0 but the K-FAC curvature"):
        pre.step()
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("cls, options", KINDS_4)
def test_damping_zero_with_invertible_factors_is_the_undamped_step(cls, options) -> None:
    """Full-rank factors (Gaussian likelihood, more examples than inputs): δ = 0 is allowed and
    equals the oracle's undamped solve."""
    model = R.make_mlp(seed=3)
    batches = R.make_batches(2, n=32, likelihood="gaussian")
    loss_fn = R.loss_function("gaussian")
    opt = cls(model, lr=0.1, damping=0.0, likelihood="gaussian", fisher_type="true",
              **options)
    oracle = R.KFACOracle(model, 0.1, 0.0, "gaussian", ekfac=cls is EKFAC,
                          damping_mode=options.get("damping_mode", "exact"))
    params = R.snapshot(model)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        params = oracle.step(params, x, y, loss_fn)
        torch.testing.assert_close(R.snapshot(model), params, rtol=1e-7, atol=1e-9)


# -- item 12: load_state_dict checks everything, then loads all or nothing ----------------------
def _trained(cls, model, steps: int = 2, **options):
    options = {"lr": 0.1, "damping": 0.1, "momentum": 0.9, **options}
    opt = cls(model, **options)
    dtype = next(model.parameters()).dtype
    for x, y in R.make_batches(steps, inputs=model[0].in_features):
        opt.zero_grad()
        F.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
    return opt


def _assert_refused(opt, state, match: str) -> None:
    """load_state_dict raises ValueError(match) and leaves the optimizer exactly as it was,
    able to step."""
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert _state_bytes(opt) == before


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_state_of_a_model_with_other_widths_is_refused(cls) -> None:
    """Same layer names, hidden width 8 against 6: used to load and crash at the next step."""
    source = _trained(cls, R.make_mlp(hidden=8))
    model = R.make_mlp(hidden=6)
    opt = _trained(cls, model, lr=0.5, damping=0.3)
    _assert_refused(opt, source.state_dict(),
                    r"of layer '0' of the state has shape \(8, 8\), the model's layer \(6 "
                    r"outputs, 5 inputs with the bias\) needs \(6, 6\): the state belongs to a "
                    r"model with other layer sizes")
    assert opt.param_groups[0]["lr"] == 0.5
    (x, y), = R.make_batches(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_momentum_buffers_of_other_shapes_are_refused() -> None:
    """The curvature fits but a momentum buffer does not (hand-edited or mixed states)."""
    opt = _trained(KFAC, R.make_mlp())
    state = opt.state_dict()
    state["state"][1]["momentum_buffer"] = torch.zeros(7, dtype=torch.float64)
    _assert_refused(opt, state, r"momentum buffer for parameter 1 of group 0 \(shape \(6,\)\) "
                                r"has shape \(7,\)")


def test_layer_names_mismatch_changes_nothing() -> None:
    """The torch part (lr, damping, momentum buffers) used to be replaced before the layer
    check raised."""
    source = _trained(KFAC, nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).double())
    opt = _trained(KFAC, R.make_mlp(), lr=0.5)
    _assert_refused(opt, source.state_dict(),
                    r"checkpoint layers \['0', '1'\] do not match the model's \['0', '2'\]")
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("source_cls, target_cls, match", [
    (KFAC, EKFAC, "saved by KFAC, this is EKFAC"),
    (EKFAC, KFAC, "saved by EKFAC, this is KFAC"),
])
def test_state_of_the_other_kind_is_refused(source_cls, target_cls, match) -> None:
    source = _trained(source_cls, R.make_mlp())
    _assert_refused(_trained(target_cls, R.make_mlp()), source.state_dict(), match)


def test_ngd_and_kfac_states_are_not_interchangeable() -> None:
    """NGD's state into KFAC used to raise KeyError('curvature'); KFAC's into NGD loaded
    per-parameter buffers where NGD keeps one flat one."""
    from natgrad.optim import NGD

    ngd = _trained(NGD, R.make_mlp())
    kfac = _trained(KFAC, R.make_mlp())
    _assert_refused(kfac, ngd.state_dict(), r"no K-FAC curvature.*\(an NGD or torch optimizer")
    _assert_refused(_trained(NGD, R.make_mlp()), kfac.state_dict(),
                    "saved by KFAC or EKFAC, not NGD")
    plain = torch.optim.SGD(R.make_mlp().parameters(), lr=0.1)
    _assert_refused(kfac, plain.state_dict(), "no 'natgrad' entry")


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["param_groups"][0].update(lr=-1.0), r"param_groups\[0\]\['lr'\] of the state "
                                                     r"must be > 0"),
    (lambda s: s["natgrad"]["curvature"]["layers"]["0"].update(
        A=torch.zeros(5, 5, dtype=torch.long)), "A of layer '0' of the state must be a floating"),
    (lambda s: s["natgrad"]["curvature"]["layers"]["2"].pop("s_G"),
     r"has \['Q_A', 'Q_G', 's_A'\] without \['s_G'\]"),
    (lambda s: s["natgrad"].update(damping=float("nan")), "the state's damping must be finite"),
    (lambda s: s["natgrad"].update(generator=torch.zeros(3, dtype=torch.uint8)),
     "the saved generator state does not fit"),
])
def test_a_damaged_state_is_refused_before_anything_loads(edit, match) -> None:
    opt = _trained(KFAC, R.make_mlp(), generator=torch.Generator().manual_seed(0))
    state = opt.state_dict()
    edit(state)
    _assert_refused(opt, state, match)


def test_preconditioner_refuses_a_state_of_other_widths() -> None:
    model = R.make_mlp(hidden=8)
    (x, y), = R.make_batches(1)
    F.cross_entropy(model(x), y).backward()
    source = KFACPreconditioner(model, damping=0.1)
    F.cross_entropy(model(x), y).backward()
    source.step()
    target = KFACPreconditioner(R.make_mlp(hidden=6), damping=0.3)
    before = target.state_dict()
    with pytest.raises(ValueError, match="other layer sizes"):
        target.load_state_dict(source.state_dict())
    assert target.state_dict()["damping"] == before["damping"] == 0.3


def test_a_float32_state_loads_into_a_float64_model_as_float64() -> None:
    state = _trained(KFAC, R.make_mlp().float()).state_dict()
    opt = KFAC(R.make_mlp(), lr=0.1, damping=0.1, momentum=0.9)
    opt.load_state_dict(state)
    curvature = opt.preconditioner.curvature.state
    assert {t.dtype for st in curvature.values() for k, t in st.items() if k != "pi"} == {
        torch.float64}


# -- item 6: torch.amp.GradScaler -------------------------------------------------------------
def _amp_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _amp_batches(count: int = 3):
    return [(x.float(), y) for x, y in R.make_batches(count)]


def _plain_run(cls, batches, clip: float | None = None, **options):
    """The reference: the same optimizer without a scaler."""
    model = _amp_model()
    opt = cls(model, **options)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


AMP_OPTIONS = {"lr": 0.2, "damping": 1e-2, "fisher_type": "empirical", "momentum": 0.5,
               "inverse_update_period": 1}


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_grad_scaler_standard_loop_takes_the_unscaled_steps(cls, fisher_type) -> None:
    """scaler.scale(loss).backward(); scaler.step(opt); scaler.update(): the empirical G used
    to be s² = 2³² times too large (steps ~1e9 times too small), silently."""
    options = {**AMP_OPTIONS, "fisher_type": fisher_type}
    batches = _amp_batches()
    expected = _plain_run(cls, batches, **options)
    model = _amp_model()
    opt = cls(model, **options)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in batches:
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**16
    torch.testing.assert_close(R.snapshot(model), R.snapshot(expected), rtol=1e-6, atol=1e-7)


def test_grad_scaler_overflow_skips_the_step_and_drops_its_statistics() -> None:
    """An iteration whose gradients overflow changes nothing (as GradScaler promises); the
    run equals one that never saw that batch."""
    batches = _amp_batches(3)
    expected = _plain_run(KFAC, [batches[0], batches[2]], **AMP_OPTIONS)
    model = _amp_model()
    opt = KFAC(model, **AMP_OPTIONS)
    scaler = torch.amp.GradScaler("cpu")
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**15  # the overflow halved it
    assert opt.skipped_steps == 0
    torch.testing.assert_close(R.snapshot(model), R.snapshot(expected), rtol=1e-6, atol=1e-7)


def test_grad_scaler_with_unscale_before_step_needs_the_scaler() -> None:
    """Clipping needs scaler.unscale_(opt) first; then the scale reaches step() no more, so the
    empirical statistics' scale must come from grad_scaler=: without it a clear error."""
    batches = _amp_batches()
    expected = _plain_run(KFAC, batches, clip=0.5, **AMP_OPTIONS)
    for with_argument in (False, True):
        model = _amp_model()
        scaler = torch.amp.GradScaler("cpu")
        opt = KFAC(model, **AMP_OPTIONS, **({"grad_scaler": scaler} if with_argument else {}))
        for x, y in batches:
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if not with_argument:
                before = R.snapshot(model)
                with pytest.raises(ValueError, match=r"pass grad_scaler=scaler to KFAC"):
                    scaler.step(opt)
                torch.testing.assert_close(R.snapshot(model), before, rtol=0, atol=0)
                break
            scaler.step(opt)
            scaler.update()
        else:
            torch.testing.assert_close(R.snapshot(model), R.snapshot(expected), rtol=1e-6,
                                       atol=1e-7)


@pytest.mark.parametrize("cls", [KFACPreconditioner, EKFACPreconditioner])
def test_preconditioner_with_grad_scaler_equals_the_unscaled_run(cls) -> None:
    batches = _amp_batches()
    options = {"damping": 1e-2, "fisher_type": "empirical", "inverse_update_period": 1}
    runs = []
    for scaled in (False, True):
        model = _amp_model()
        scaler = torch.amp.GradScaler("cpu", enabled=scaled)
        pre = cls(model, grad_scaler=scaler, **options)
        sgd = torch.optim.SGD(model.parameters(), lr=0.2)
        for x, y in batches:
            sgd.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(sgd)
            pre.step()
            scaler.step(sgd)
            scaler.update()
        runs.append(R.snapshot(model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-7)


def test_undamped_invertibility_is_checked_once_per_refresh(monkeypatch) -> None:
    """Factored damping with δ = 0 needs the factors' spectra: computed when the frozen
    factors change, not at every step (4 = 2 layers × 2 factors, one refresh in 3 steps)."""
    import natgrad.optim.curvature as curvature

    calls = []
    real = curvature.sym_eig
    monkeypatch.setattr(curvature, "sym_eig", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = R.make_mlp(seed=3)
    loss_fn = R.loss_function("gaussian")
    opt = KFAC(model, lr=0.1, damping=0.0, likelihood="gaussian", fisher_type="true",
               damping_mode="factored", inverse_update_period=3)
    for x, y in R.make_batches(3, n=32, likelihood="gaussian"):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert len(calls) == 4


@pytest.mark.parametrize("fisher_type", ["mc", "true", "empirical"])
def test_a_regression_loss_under_the_categorical_default_is_named(fisher_type: str) -> None:
    """KFAC(model) assumes cross-entropy: an mse_loss is named once (a RuntimeWarning
    suggesting likelihood='gaussian'); cross-entropy, LogSoftmax + nll_loss and the Gaussian
    likelihood stay quiet."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for likelihood, loss_fn, named in [
            ("categorical", F.mse_loss, True),
            ("gaussian", lambda f, t: 0.5 * (f - t).square().sum(1).mean(), False),
            ("categorical", lambda f, t: F.cross_entropy(f, t.argmax(1), label_smoothing=0.1),
             False),
            ("log-probabilities", lambda f, t: F.nll_loss(f, t.argmax(1)), False)]:
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        if likelihood == "log-probabilities":  # a LogSoftmax model trained with nll_loss
            model.append(nn.LogSoftmax(-1))
            likelihood = "categorical"
        opt = KFAC(model, likelihood=likelihood, fisher_type=fisher_type)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        messages = [str(w.message) for w in caught if "sum to zero" in str(w.message)]
        assert len(messages) == int(named), (likelihood, messages)
        if named:
            assert "likelihood='gaussian'" in messages[0]


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NGD, KFACPreconditioner, EKFACPreconditioner])
def test_parameters_instead_of_the_model_get_a_type_error(cls) -> None:
    """The torch.optim habit ``Opt(model.parameters())`` is named, not an AttributeError."""
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=rf"iterable of parameters.*{cls.__name__}\(model\)"):
        cls(model.parameters())
    with pytest.raises(TypeError, match="iterable of parameters"):
        cls([model.weight])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got str"):
        cls("model")  # type: ignore[arg-type]
    if cls in (KFAC, EKFAC):  # Opt(model, model.parameters()): the parameters land in lr
        with pytest.raises(TypeError, match=r"takes the model and no parameter list"):
            cls(model, model.parameters())  # type: ignore[arg-type]


def test_fisher_matrix_of_parameters_gets_a_type_error() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"fisher_matrix\(model\)"):
        natgrad.fisher_matrix(model.parameters(), [(torch.randn(4, 3), torch.zeros(4).long())])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_a_step_that_fails_part_way_changes_nothing(cls: type, momentum: float,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed step computes every layer's direction before any parameter or momentum
    buffer moves: an error while preconditioning the last layer (out of memory, a bad
    shape) leaves the model and the optimizer's state as they were, and the next step
    works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(),
                          nn.Linear(6, 3))
    opt = cls(model, lr=0.1, damping=1e-2, momentum=momentum)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def loss() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    loss()
    opt.step()  # momentum buffers exist from here on
    loss()
    before = [p.detach().clone() for p in model.parameters()]
    buffers = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()
               if "momentum_buffer" in s}
    curvature = opt.preconditioner.curvature
    original = curvature.precondition_parts
    last = opt.preconditioner.layers[-1]

    def failing(layer, *args, **kwargs):  # type: ignore[no-untyped-def]
        if layer is last:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(curvature, "precondition_parts", failing)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    for p, s in opt.state.items():
        if "momentum_buffer" in s:
            assert torch.equal(s["momentum_buffer"], buffers[id(p)])
    assert (momentum == 0) == (not buffers)
    monkeypatch.setattr(curvature, "precondition_parts", original)
    loss()
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_adaptive_step_reads_the_unscaled_loss(unscale_first: bool) -> None:
    """The adaptive step under a GradScaler: the labels read off the loss gradient carry the
    scale s_amp (∂(s_amp L)/∂f); the loss change divides it out, so ρ and δ equal the
    unscaled run's. After ``unscale_()`` (scale unknown without ``grad_scaler=``) δ stays
    and ``damping_note`` says why; with ``grad_scaler=scaler`` it is known again."""
    batches = _amp_batches(4)
    plain = _amp_model()
    opt = KFAC(plain, damping_adaptation_period=2)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    assert opt.last_step_info["rho"] is not None
    for given in ((False, True) if unscale_first else (False,)):
        model = _amp_model()
        scaler = torch.amp.GradScaler("cpu")
        scaled = KFAC(model, damping_adaptation_period=2,
                      **({"grad_scaler": scaler} if given else {}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in batches:
                scaled.zero_grad()
                scaler.scale(F.cross_entropy(model(x), y)).backward()
                if unscale_first:
                    scaler.unscale_(scaled)
                scaler.step(scaled)
                scaler.update()
        said = [str(w.message) for w in caught if "δ is not adapted" in str(w.message)]
        assert len(said) == (1 if unscale_first and not given else 0)  # said once
        if unscale_first and not given:
            assert scaled.last_step_info["rho"] is None
            assert "grad_scaler=scaler" in (scaled.damping_note or "")
            assert scaled.param_groups[0]["damping"] == 1e-2
            continue
        assert scaled.damping_note is None
        assert scaled.last_step_info["rho"] == pytest.approx(opt.last_step_info["rho"],
                                                             rel=1e-4)
        assert scaled.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
        torch.testing.assert_close(R.snapshot(model), R.snapshot(plain), rtol=1e-5, atol=1e-6)


# -- habits found by a red team (session 10): missing gradients, copies, added groups --------
def _ln_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _xy(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("kind", ["preconditioner+adam", "kfac-momentum", "kfac-adaptive"])
def test_a_parameter_without_gradient_is_not_stepped(kind: str) -> None:
    """As in torch.optim, ``.grad is None`` means "not stepped": before the fix the
    preconditioner wrote zeros into it (Adam then moved it) and KFAC moved it by momentum."""
    model = _ln_mlp()
    x, y = _xy()
    if kind == "preconditioner+adam":
        pre = KFACPreconditioner(model, damping=0.05)
        base = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step() -> None:
            pre.step()
            base.step()
        zero = base.zero_grad
    else:
        opt = KFAC(model, lr=0.1, damping=0.05, momentum=0.9) if kind == "kfac-momentum" \
            else KFAC(model)
        step, zero = opt.step, opt.zero_grad
    zero()
    F.cross_entropy(model(x), y).backward()
    step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero(set_to_none=True)
    F.cross_entropy(model(x), y)  # a forward pass, no backward: every .grad stays None
    step()
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n
    # one layer without gradient (its .grad cleared by the user), the others with: only
    # those move
    zero(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for p in model[0].parameters():
        p.grad = None
    step()
    assert torch.equal(model[0].weight, before["0.weight"])
    assert not torch.equal(model[3].weight, before["3.weight"])


@pytest.mark.parametrize("make", [
    lambda m: KFAC(m, lr=0.1, damping=0.05, momentum=0.9),
    lambda m: KFAC(m),
    lambda m: EKFAC(m, lr=0.1, damping=0.05),
    lambda m: NGD(m, lr=0.1, damping=0.1),
])
def test_a_deep_copy_of_model_and_optimizer_steps_as_the_original(make) -> None:
    """``copy.deepcopy((model, opt))`` kept only torch's three attributes and the copy failed
    at its first step; now the copy steps bitwise as the original, and the original's hooks
    do not see the copy's passes."""
    import copy

    model = _ln_mlp()
    opt = make(model)
    x, y = _xy()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    twin, twin_opt = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.manual_seed(5)  # the same Monte-Carlo samples for both
        for k in range(3):
            xs, ys = _xy(10 + k)
            o.zero_grad()
            F.cross_entropy(m(xs), ys).backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert twin_opt.preconditioner.model is twin if hasattr(twin_opt, "preconditioner") \
        else twin_opt.model is twin


@pytest.mark.parametrize("make", [lambda m: KFAC(m, lr=0.1), lambda m: KFAC(m),
                                  lambda m: EKFAC(m, lr=0.1), lambda m: NGD(m, lr=0.1)])
def test_add_param_group_after_construction_is_refused(make) -> None:
    """Accepted before, then step() failed with a bare KeyError (or NGD a shape error)."""
    model = _ln_mlp()
    model[3].requires_grad_(False)
    opt = make(model)
    groups = len(opt.param_groups)
    model[3].requires_grad_(True)  # gradual unfreezing
    with pytest.raises(ValueError, match=r"fixed when it is built.*nothing was changed"):
        opt.add_param_group({"params": list(model[3].parameters())})
    assert len(opt.param_groups) == groups


@pytest.mark.parametrize("make", [lambda m: KFAC(m, lr=0.1, damping=0.05), lambda m: KFAC(m),
                                  lambda m: KFACPreconditioner(m, damping=0.05)])
def test_a_copy_of_the_model_alone_records_nothing(make) -> None:
    """An EMA or teacher copy (``copy.deepcopy(model)``) carries natgrad's hooks: they must do
    nothing there (no Monte-Carlo draws, no recorded inputs, no statistics for anyone)."""
    import copy

    model = _ln_mlp()
    opt = make(model)
    x, y = _xy()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    ema = copy.deepcopy(model)
    rng = torch.get_rng_state()
    for _ in range(3):
        F.cross_entropy(ema(x), y).backward()
    assert torch.equal(torch.get_rng_state(), rng)  # MC sampling would draw
    recorder = getattr(opt, "_recorder", None)
    assert recorder is None or not recorder.passes
    for module in ema.modules():
        for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            owner = getattr(hook, "_owner", None)
            assert owner is None or owner() is None or hook._module() is not module


def test_suspended_pass_gives_user_hooks_the_plain_gradient() -> None:
    """natgrad's MC backward during the forward pass reaches a retained activation (guide,
    silent pitfalls); under ``natgrad.capture.suspended()`` its .grad is the plain one."""
    from natgrad.capture import suspended

    class Retaining(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
            self.h: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            h.retain_grad()
            self.h = h
            return self.b(h)

    torch.manual_seed(0)
    model = Retaining()
    plain = copy.deepcopy(model)
    KFAC(model, lr=0.1, damping=0.1)
    x, y = _xy()
    x = x[:, :4]
    F.cross_entropy(plain(x), y).backward()
    with suspended():
        F.cross_entropy(model(x), y).backward()
    assert model.h is not None and plain.h is not None
    assert torch.equal(model.h.grad, plain.h.grad)
