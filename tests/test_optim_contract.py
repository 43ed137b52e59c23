"""The torch.optim contract of natgrad's optimizers: validation, closures, non-finite steps,
checkpoint/resume, repr, and the hooks they install on the model."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference_optim as R
from natgrad.optim import EKFAC, KFAC, NGD, EKFACPreconditioner, KFACPreconditioner

pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ------------------------------------------------------------------------------------
def _hooks(model: nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]


def _assert_same(a: object, b: object, path: str = "state") -> None:
    """Deep, exact comparison of nested state (tensors bitwise, NaN equal to NaN)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        same = torch.equal(a, b) or (a.is_floating_point() and torch.allclose(
            a, b, rtol=0, atol=0, equal_nan=True))
        if not same:
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else None
            raise AssertionError(f"{path} differs (max |difference| {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def _without_skip_count(state: dict) -> dict:
    state = dict(state)
    if "natgrad" in state:
        state["natgrad"] = {k: v for k, v in state["natgrad"].items() if k != "skipped_steps"}
    return state


def _train_step(opt, model, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _closure(opt, model, x, y, shift: float = 0.0):
    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + shift
        loss.backward()
        return loss

    return closure


def _make(cls, model, **options):
    if cls is NGD:
        return NGD(model, lr=0.1, damping=0.1, momentum=0.9, weight_decay=1e-2, **options)
    return cls(model, lr=0.1, damping=0.1, momentum=0.9, weight_decay=1e-2, ema_decay=0.8,
               inverse_update_period=3, **options)


# -- hyperparameter validation ------------------------------------------------------------------
BAD_COMMON = [
    ("lr", -0.1), ("lr", 0.0), ("lr", math.nan), ("lr", math.inf),
    ("damping", -1e-3), ("damping", math.nan), ("damping", math.inf),
    ("momentum", -0.5), ("momentum", math.nan), ("momentum", math.inf),
    ("weight_decay", -1.0), ("weight_decay", math.nan),
    ("fisher_type", "fisher"), ("likelihood", "poisson"), ("nonfinite", "ignore"),
]
BAD_KFAC = [
    *BAD_COMMON,
    ("ema_decay", -0.1), ("ema_decay", 1.0), ("ema_decay", 1.5), ("ema_decay", math.nan),
    ("factor_update_period", 0), ("factor_update_period", -2), ("factor_update_period", 1.5),
    ("inverse_update_period", 0), ("damping_adaptation_period", 0),
    ("mc_samples", 0), ("kl_clip", -1.0), ("kl_clip", 0.0),
    ("damping_mode", "tikhonov"), ("foo", 1),
]


@pytest.mark.parametrize("name, value", BAD_KFAC, ids=lambda v: repr(v))
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kfac_rejects_bad_hyperparameters(cls, name: str, value: object) -> None:
    model = R.make_mlp()
    if cls is EKFAC and name == "damping_mode":
        value = "factored"  # EK-FAC has no damping modes: an unknown option for it
    with pytest.raises(ValueError, match=name):
        cls(model, **{name: value})
    assert _hooks(model) == []


@pytest.mark.parametrize("cls", [EKFAC, EKFACPreconditioner])
def test_ekfac_scale_period_follows_the_factor_period(cls) -> None:
    """By default the scales are re-fitted when factors are (a period of 1 with factors every
    10 steps would capture statistics every step); an explicit period is kept."""
    kwargs = {"lr": 0.1} if cls is EKFAC else {}
    opt = cls(R.make_mlp(), factor_update_period=10, **kwargs)
    pre = opt.preconditioner if cls is EKFAC else opt
    assert pre.curvature.config.scale_update_period == 10
    opt = cls(R.make_mlp(), factor_update_period=10, scale_update_period=3, **kwargs)
    pre = opt.preconditioner if cls is EKFAC else opt
    assert pre.curvature.config.scale_update_period == 3


@pytest.mark.parametrize("name, value", [("scale_update_period", 0),
                                         ("scale_update_period", True)])
def test_ekfac_rejects_bad_scale_update_period(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        EKFAC(R.make_mlp(), **{name: value})


BAD_NGD = [*BAD_COMMON, ("structure", "kfac2"), ("cg_rtol", -1.0), ("cg_rtol", math.nan),
           ("cg_max_iter", 0)]


@pytest.mark.parametrize("name, value", BAD_NGD, ids=lambda v: repr(v))
def test_ngd_rejects_bad_hyperparameters(name: str, value: object) -> None:
    model = R.make_mlp()
    with pytest.raises(ValueError, match=name):
        NGD(model, **{name: value})
    assert _hooks(model) == []


def test_ngd_rejects_an_unknown_option_with_value_error() -> None:
    """Like KFAC/EKFAC: an unknown keyword is a bad hyperparameter (ValueError naming it)."""
    model = R.make_mlp()
    with pytest.raises(ValueError, match="foo"):
        NGD(model, foo=1)
    assert _hooks(model) == []


@pytest.mark.parametrize("name, value", [("damping", -1.0), ("ema_decay", 1.0),
                                         ("inverse_update_period", 0), ("fisher_type", "x"),
                                         ("likelihood", "x"), ("damping_mode", "x")])
def test_preconditioner_rejects_bad_hyperparameters(name: str, value: object) -> None:
    model = R.make_mlp()
    with pytest.raises(ValueError, match=name):
        KFACPreconditioner(model, **{name: value})
    assert _hooks(model) == []


def test_param_groups_are_validated() -> None:
    model = R.make_mlp()
    groups = [{"params": list(model[0].parameters()), "lr": -1.0},
              {"params": list(model[2].parameters())}]
    with pytest.raises(ValueError, match="lr"):
        KFAC(model, param_groups=groups)


# -- closures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_step_with_closure_returns_the_loss_and_trains(cls) -> None:
    model = R.make_mlp()
    (x, y), = R.make_batches(1)
    opt = cls(model, lr=0.3, damping=0.1, fisher_type="true")
    closure = _closure(opt, model, x, y)
    expected = R.loss_and_grad(model, R.snapshot(model), x, y, F.cross_entropy)[0]
    first = opt.step(closure)
    torch.testing.assert_close(first.detach(), expected, rtol=1e-12, atol=0)
    losses = [opt.step(closure).item() for _ in range(3)]
    assert losses[-1] < first.item()


# -- non-finite losses and gradients ------------------------------------------------------------
def _poison(kind: str, opt, model, x, y) -> Tensor | None:
    """Run the bad step: a closure with an infinite loss, or a NaN in one gradient."""
    if kind == "loss":
        return opt.step(_closure(opt, model, x, y, shift=math.inf))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = math.nan
    return opt.step()


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC, NGD])
def test_nonfinite_step_is_skipped_and_changes_nothing(cls, kind: str) -> None:
    """Skipped: parameters and the whole state_dict exactly as before (but the skip count), a
    RuntimeWarning, and the next step is the step a run without the bad batch takes."""
    batches = R.make_batches(4)
    model, clean = R.make_mlp(norm=True), R.make_mlp(norm=True)
    opt = _make(cls, model, fisher_type="true")
    ref = _make(cls, clean, fisher_type="true")
    for x, y in batches[:2]:
        _train_step(opt, model, x, y)
        _train_step(ref, clean, x, y)
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="skipped"):
        _poison(kind, opt, model, *batches[2])
    assert opt.skipped_steps == 1
    _assert_same(model.state_dict(), params, "model")
    _assert_same(_without_skip_count(opt.state_dict()), _without_skip_count(state))
    _train_step(opt, model, *batches[3])
    _train_step(ref, clean, *batches[3])
    _assert_same(model.state_dict(), clean.state_dict(), "model")
    _assert_same(_without_skip_count(opt.state_dict()), _without_skip_count(ref.state_dict()))


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC, NGD])
def test_nonfinite_raise_leaves_the_state_unchanged(cls, kind: str) -> None:
    batches = R.make_batches(2)
    model = R.make_mlp()
    opt = _make(cls, model, nonfinite="raise")
    _train_step(opt, model, *batches[0])
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError):
        _poison(kind, opt, model, *batches[1])
    assert opt.skipped_steps == 0
    _assert_same(model.state_dict(), params, "model")
    _assert_same(opt.state_dict(), state)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher_type", ["mc", "true"])
def test_nonfinite_model_outputs_skip_the_step(cls, fisher_type: str) -> None:
    """A diverged forward pass (NaN outputs, so a NaN loss) is a non-finite loss like any
    other: with nonfinite="skip" the step is skipped with a RuntimeWarning, not an error."""
    batches = R.make_batches(2)
    model = R.make_mlp()
    opt = _make(cls, model, fisher_type=fisher_type)
    _train_step(opt, model, *batches[0])
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    x, y = batches[1]
    x = x.clone()
    x[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = opt.step(_closure(opt, model, x, y))
    assert math.isnan(loss.item()) and opt.skipped_steps == 1
    _assert_same(model.state_dict(), params, "model")
    _assert_same(_without_skip_count(opt.state_dict()), _without_skip_count(state))


def test_preconditioner_skips_a_nonfinite_gradient() -> None:
    model = R.make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    (x, y), = R.make_batches(1)
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[1, 1] = math.inf
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(pre.state_dict())
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert pre.step() is False
    assert pre.skipped_steps == 1
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.equal(g, p.grad)
    _assert_same({k: v for k, v in pre.state_dict().items() if k != "skipped_steps"},
                 {k: v for k, v in state.items() if k != "skipped_steps"})


# -- checkpoint and resume ----------------------------------------------------------------------
RESUME_AT = 4  # with inverse_update_period=3 the steps after it use a cached eigenbasis
RESUME_CASES = {
    "KFAC-global-rng": (KFAC, False, {}),
    "KFAC-generator": (KFAC, True, {}),
    "KFAC-factored-generator": (KFAC, True, {"damping_mode": "factored"}),
    "EKFAC-generator": (EKFAC, True, {}),
    "EKFAC-global-rng": (EKFAC, False, {}),
    "NGD-momentum-global-rng": (NGD, False, {}),
}


def _resume_run(cls, generator: bool, batches, split: int | None, **extra):
    """Train on ``batches`` (default fisher_type "mc"); if ``split``, checkpoint after that many
    steps, rebuild model and optimizer from scratch, load, and continue. The global RNG is
    reset identically before each phase."""

    def build(seed: int):
        model = R.make_mlp(seed=seed, norm=True)
        options = {"generator": torch.Generator().manual_seed(seed)} if generator else {}
        return model, _make(cls, model, **options, **extra)

    model, opt = build(0)
    torch.manual_seed(100)
    for i, (x, y) in enumerate(batches):
        if i == split:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
            buffer.seek(0)
            model, opt = build(7)  # different initial weights and generator seed
            checkpoint = torch.load(buffer)
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["optim"])
        if i in (0, RESUME_AT):
            torch.manual_seed(100 + i)
        _train_step(opt, model, x, y)
    return model, opt


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resumed_run_equals_the_uninterrupted_run_bitwise(case: str) -> None:
    cls, generator, extra = RESUME_CASES[case]
    batches = R.make_batches(7)
    model_a, opt_a = _resume_run(cls, generator, batches, split=None, **extra)
    model_b, opt_b = _resume_run(cls, generator, batches, split=RESUME_AT, **extra)
    _assert_same(model_b.state_dict(), model_a.state_dict(), "model")
    _assert_same(opt_b.state_dict(), opt_a.state_dict(), "optim")


def test_ngd_resume_with_a_generator_restores_its_samples() -> None:
    """NGD takes a generator like KFAC; its checkpoint must restore the sampling state too."""
    batches = R.make_batches(5)

    def build(seed: int):
        model = R.make_mlp(seed=seed)
        return model, _make(NGD, model, generator=torch.Generator().manual_seed(seed))

    model_a, opt_a = build(0)
    for x, y in batches:
        _train_step(opt_a, model_a, x, y)
    model_b, opt_b = build(0)
    for i, (x, y) in enumerate(batches):
        if i == 3:
            buffer = io.BytesIO()
            torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buffer)
            buffer.seek(0)
            model_b, opt_b = build(7)
            checkpoint = torch.load(buffer)
            model_b.load_state_dict(checkpoint["model"])
            opt_b.load_state_dict(checkpoint["optim"])
        _train_step(opt_b, model_b, x, y)
    _assert_same(model_b.state_dict(), model_a.state_dict(), "model")


# -- repr and hooks -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kind", [(KFAC, "KFAC"), (EKFAC, "EKFAC")])
def test_repr_lists_each_layer_and_its_treatment(cls, kind: str) -> None:
    model = R.make_mlp(norm=True)  # 0: Linear(4, 6), 1: LayerNorm(6), 2: Tanh, 3: Linear(6, 3)
    text = repr(cls(model, lr=0.25, damping=1e-2, momentum=0.9))
    assert re.search(rf"\b0: Linear 6x5 -> {kind}\b", text), text
    assert re.search(rf"\b3: Linear 3x7 -> {kind}\b", text), text
    assert re.search(r"\b1 \(LayerNorm\): (gradient left unchanged|plain SGD)", text), text
    assert "lr: 0.25" in text and "momentum: 0.9" in text, text
    assert "2" not in re.findall(r"^\s+(\w+)[ :]", text, flags=re.M)  # Tanh owns nothing


@pytest.mark.parametrize("fisher_type", ["mc", "true", "empirical"])
def test_close_removes_every_hook(fisher_type: str) -> None:
    model = R.make_mlp(norm=True)
    before = _hooks(model)
    opt = KFAC(model, fisher_type=fisher_type)
    assert _hooks(model) != before
    (x, y), = R.make_batches(1)
    _train_step(opt, model, x, y)
    opt.close()  # the preconditioner's hooks and the adaptive step's input recorder
    assert _hooks(model) == before == []
    ngd = NGD(model)
    ngd.close()
    assert _hooks(model) == []


class _Reused(nn.Module):
    """The same Linear called twice in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize("fisher_type", ["mc", "true", "empirical"])
def test_linear_called_twice_takes_the_fallback(fisher_type: str) -> None:
    """A module called twice in one pass cannot be Kronecker-factored as one layer: at the
    first forward pass it moves to the fallback (warning naming it), repr says so, and its
    parameters get the plain SGD step; the other layer keeps K-FAC."""
    model = _Reused().double()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type=fisher_type)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with pytest.warns(RuntimeWarning, match=r"'inner' called 2 times"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    before = model.inner.weight.detach().clone()
    grad = model.inner.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.inner.weight.detach(), before - 0.1 * grad, rtol=0,
                               atol=1e-15)
    assert [layer.name for layer in opt.preconditioner.layers] == ["head"]
    assert re.search(r"inner \(Linear, called 2 times.*\): plain SGD", repr(opt)), repr(opt)


def test_ekfac_preconditioner_repr_and_close() -> None:
    model = R.make_mlp()
    pre = EKFACPreconditioner(model, damping=1e-2)
    assert "0: Linear 6x5 -> EKFAC" in repr(pre)
    pre.close()
    assert _hooks(model) == []


@pytest.mark.parametrize(
    ("values", "finite"),
    [([1.0, -2.0], True), ([6e4, 6e4], True), ([math.nan, 1.0], False),
     ([math.inf, -math.inf], False), ([-math.inf, 0.0], False)],
    ids=["finite", "finite-sum-overflows", "nan", "inf-cancelling-sum", "neg-inf"],
)
def test_grads_finite_is_exact_even_when_the_fast_sum_overflows(values, finite) -> None:
    """float16 sums of finite gradients can overflow (6e4 + 6e4 > 65504): still finite."""
    from natgrad.optim._validation import grads_finite

    p = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor(values, dtype=torch.float16)
    q.grad = torch.ones(3)
    assert grads_finite([p, q, torch.zeros(1, requires_grad=True)]) is finite


@pytest.mark.parametrize(
    ("factor", "value", "finite"),
    [("a", 1.0, True), ("a", math.nan, False), ("g", math.inf, False),
     ("g", -math.inf, False), ("a", 1e30, True)],
    ids=["finite", "nan-input", "inf-gradient", "neg-inf-gradient", "large-but-finite"],
)
def test_pending_statistics_finiteness_is_decided_by_the_diagonals(factor, value,
                                                                    finite) -> None:
    """One bad entry of one example's ā or g makes the pending statistics non-finite (its
    Gram diagonal is); huge finite values do not (float64 factors here)."""
    from natgrad.capture import scan_layers
    from natgrad.optim.curvature import CurvatureConfig, KroneckerCurvature

    model = R.make_mlp()  # float64
    layers, _ = scan_layers(model)
    curvature = KroneckerCurvature(layers, CurvatureConfig())
    stats = [(torch.randn(8, layer.in_dim, dtype=torch.float64),
              torch.randn(8, layer.out_dim, dtype=torch.float64)) for layer in layers]
    a, g = stats[-1]
    (a if factor == "a" else g)[3, 1] = value
    curvature.add(stats, 8)
    assert curvature.pending_finite() is finite


def test_directions_into_with_kl_clip_raises_and_changes_nothing() -> None:
    """Accumulating in place cannot honour a KL clip (ν needs every direction first): a
    ValueError before any curvature update or parameter change."""
    model = R.make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=1e-3, lr=0.1)
    (x, y), = R.make_batches(1)
    F.cross_entropy(model(x), y).backward()
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(pre.state_dict())
    weight = next(model.parameters())
    with pytest.raises(ValueError, match="kl_clip"):
        pre.directions(into={"0.weight": (weight.detach().clone(), 0.9, 1.0)})
    _assert_same(model.state_dict(), params, "model")
    _assert_same(pre.state_dict(), state)
