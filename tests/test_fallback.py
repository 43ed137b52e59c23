"""The step of the parameters K-FAC does not cover (issue 13, item 3): ``fallback="sgd"`` (the
default) or an Adam-style diagonal step, against a hand-written float64 Adam and
``torch.optim.AdamW``; checkpoints, param groups, layers that move at run time, GradScaler,
closures, repr and bad input."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference_optim as R
from natgrad.optim import EKFAC, KFAC, AdamFallback, KFACPreconditioner

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = ("1.weight", "1.bias")  # R.make_mlp(norm=True): 0 Linear, 1 LayerNorm, 2 Tanh, 3 Linear


class HandAdam:
    """Adam with decoupled weight decay from its definition (Kingma & Ba 2015, Algorithm 1;
    Loshchilov & Hutter 2019), in float64, one parameter:
    m_t = β₁ m + (1 − β₁) g, v_t = β₂ v + (1 − β₂) g²,
    θ_t = θ − η (m_t / (1 − β₁ᵗ)) / (√(v_t / (1 − β₂ᵗ)) + ε) − η λ θ."""

    def __init__(self, theta: Tensor, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        self.theta = theta.detach().double().clone()
        self.m = torch.zeros_like(self.theta)
        self.v = torch.zeros_like(self.theta)
        self.t = 0
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay

    def step(self, g: Tensor) -> Tensor:
        g = g.double()
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        self.theta = self.theta - self.lr * m_hat / (v_hat.sqrt() + self.eps) \
            - self.lr * self.wd * self.theta
        return self.theta


def _grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _train(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# -- the step -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_adam_fallback_follows_the_float64_definition_with_param_groups(cls) -> None:
    """Norm parameters in their own group (lr 0.05 × lr_scale 0.4, weight decay 0.1) follow
    Adam's definition step by step; the K-FAC layers keep their momentum buffers, the norm
    parameters have Adam's state only (their group's momentum is not used)."""
    model = R.make_mlp(norm=True)
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n not in NORM]},
              {"params": [named[n] for n in NORM], "lr": 0.05, "weight_decay": 0.1}]
    config = AdamFallback(betas=(0.8, 0.99), eps=1e-6, lr_scale=0.4)
    opt = cls(model, lr=0.2, damping=1e-2, momentum=0.9, weight_decay=1e-3,
              param_groups=groups, fallback=config)
    refs = {n: HandAdam(named[n], 0.05 * 0.4, (0.8, 0.99), 1e-6, 0.1) for n in NORM}
    for x, y in R.make_batches(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = _grads(model, x, y)
        opt.step()
        for n in NORM:
            expected = refs[n].step(grads[n])
            torch.testing.assert_close(named[n].detach(), expected, rtol=1e-13, atol=1e-15)
    for n, p in named.items():
        keys = set(opt.state[p])
        assert keys == ({"step", "exp_avg", "exp_avg_sq"} if n in NORM
                        else {"momentum_buffer"}), (n, keys)
    assert opt.state[named["1.weight"]]["step"] == 4


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_fallback_is_torch_adamw_bit_for_bit(weight_decay: float) -> None:
    """float32: the fallback parameters equal torch.optim.AdamW's (single-tensor path) fed
    the same gradients, bit for bit; without weight decay also torch.optim.Adam's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    norm = model[1]
    twins = [p.detach().clone().requires_grad_() for p in norm.parameters()]
    opt = KFAC(model, lr=3e-3, damping=1e-2, weight_decay=weight_decay,
               fallback=AdamFallback(betas=(0.9, 0.95), eps=1e-8))
    torch_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    reference = torch_cls(twins, lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=weight_decay, foreach=False)
    for x, y in R.make_batches(5):
        x = x.float()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for twin, p in zip(twins, norm.parameters(), strict=True):
            twin.grad = p.grad.clone()
        opt.step()
        reference.step()
        for twin, p in zip(twins, norm.parameters(), strict=True):
            assert torch.equal(p.detach(), twin.detach())
            assert torch.equal(opt.state[p]["exp_avg_sq"], reference.state[twin]["exp_avg_sq"])


def test_default_fallback_is_still_the_sgd_step() -> None:
    """fallback="sgd" (the default) keeps today's step θ ← θ − η (∇ + λθ) for the norm."""
    model = R.make_mlp(norm=True)
    named = dict(model.named_parameters())
    opt = KFAC(model, lr=0.1, damping=1e-2, weight_decay=0.01)
    assert opt.fallback is None
    (x, y), = R.make_batches(1)
    before = {n: named[n].detach().clone() for n in NORM}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = _grads(model, x, y)
    opt.step()
    for n in NORM:
        torch.testing.assert_close(named[n].detach(),
                                   before[n] - 0.1 * (grads[n] + 0.01 * before[n]),
                                   rtol=0, atol=1e-15)


def test_covered_layers_take_the_same_first_step_under_either_fallback() -> None:
    """The fallback changes only the non-covered parameters: the first K-FAC steps of the
    Linear layers are identical."""
    (x, y), = R.make_batches(1)
    models = []
    for fallback in ("sgd", "adam"):
        model = R.make_mlp(norm=True)
        _train(KFAC(model, lr=0.1, damping=1e-2, momentum=0.5, fallback=fallback), model, x, y)
        models.append(dict(model.named_parameters()))
    for n in ("0.weight", "0.bias", "3.weight", "3.bias"):
        assert torch.equal(models[0][n], models[1][n]), n
    assert not torch.equal(models[0]["1.weight"], models[1]["1.weight"])


# -- layers that move to the fallback during training -------------------------------------------
class _Sometimes(nn.Module):
    """``inner`` is called once per pass until ``twice`` is set; then K-FAC cannot cover it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.twice = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inner(x))
        if self.twice:
            h = torch.tanh(self.inner(h))
        return self.head(h)


def test_layer_moved_at_run_time_starts_its_adam_state_afresh() -> None:
    """A layer that moves to the fallback after two K-FAC steps (with momentum) drops its
    momentum buffer and takes Adam's first step, Δθ = −η g / (|g| + ε) (bias-corrected
    moments at t = 1); a checkpoint taken then resumes bit for bit."""
    model = _Sometimes().double()
    opt = KFAC(model, lr=0.1, damping=1e-2, momentum=0.9, fisher_type="true",
               fallback=AdamFallback(eps=1e-8, lr_scale=0.5))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 3, generator=g, dtype=torch.float64),
                torch.randint(0, 2, (6,), generator=g)) for _ in range(5)]
    for x, y in batches[:2]:
        _train(opt, model, x, y)
    w = model.inner.weight
    assert set(opt.state[w]) == {"momentum_buffer"}
    model.twice = True
    x, y = batches[2]
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"'inner' called 2 times"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    before, grad = w.detach().clone(), w.grad.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before - 0.05 * grad / (grad.abs() + 1e-8),
                               rtol=1e-14, atol=1e-15)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"} and opt.state[w]["step"] == 1
    assert "momentum_buffer" in opt.state[model.head.weight]
    assert re.search(r"inner \(Linear, called 2 times.*\): Adam-style diagonal step", repr(opt))

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    clone = _Sometimes().double()
    clone.twice = True
    clone.load_state_dict(saved["model"])
    fresh = KFAC(clone, lr=0.1, damping=1e-2, momentum=0.9, fisher_type="true",
                 fallback=AdamFallback(eps=1e-8, lr_scale=0.5))
    fresh.load_state_dict(saved["optim"])
    for x, y in batches[3:]:
        _train(opt, model, x, y)
        _train(fresh, clone, x, y)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state[w]["step"] == fresh.state[clone.inner.weight]["step"] == 3


# -- checkpoints ----------------------------------------------------------------------------------
class _TiedLM(nn.Module):
    """Embedding tied to the head (both take the fallback), a LayerNorm and a covered Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.norm(self.emb(tokens)))))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_adam_fallback_state_round_trips_bit_for_bit(cls) -> None:
    """state_dict → torch.save → load into a fresh optimizer: the resumed run equals the
    uninterrupted one bit for bit (parameters and every Adam moment)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (8,), generator=g), torch.randint(0, 11, (8,), generator=g))
               for _ in range(6)]
    options = {"lr": 0.05, "damping": 1e-2, "weight_decay": 0.01, "momentum": 0.5,
               "fallback": "adam"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _TiedLM()
        opt = cls(model, generator=torch.Generator().manual_seed(1), **options)
        for x, y in batches[:3]:
            _train(opt, model, x, y)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        clone = _TiedLM()
        clone.load_state_dict(saved["model"])
        fresh = cls(clone, generator=torch.Generator(), **options)
        fresh.load_state_dict(saved["optim"])
        for x, y in batches[3:]:
            _train(opt, model, x, y)
            _train(fresh, clone, x, y)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        for key, value in opt.state[p].items():
            other = fresh.state[q][key]
            assert torch.equal(value, other) if isinstance(value, Tensor) else value == other
    assert opt.state[model.emb.weight]["step"] == 6


def _adam_checkpoint() -> tuple[dict, nn.Module]:
    model = R.make_mlp(norm=True)
    opt = KFAC(model, lr=0.1, damping=1e-2, fallback="adam")
    for x, y in R.make_batches(2):
        _train(opt, model, x, y)
    return copy.deepcopy(opt.state_dict()), model


def _break_first_norm_entry(state: dict, change) -> dict:
    index = state["param_groups"][0]["params"][2]  # 1.weight
    state["state"][index] = change(dict(state["state"][index]))
    return state


@pytest.mark.parametrize(("options", "change", "message"), [
    ({}, lambda e: e, r"Adam fallback state .* built with fallback='sgd'"),
    ({"fallback": "adam"}, lambda e: {k: v for k, v in e.items() if k != "exp_avg_sq"},
     r"lacks \['exp_avg_sq'\]"),
    ({"fallback": "adam"}, lambda e: {**e, "exp_avg": torch.zeros(7, dtype=torch.float64)},
     r"exp_avg for parameter '1\.weight' \(shape \(6,\)\) has shape \(7,\)"),
    ({"fallback": "adam"}, lambda e: {**e, "step": 0}, r"step .* integer >= 1"),
])
def test_bad_adam_state_is_refused_and_nothing_changes(options, change, message) -> None:
    state, _ = _adam_checkpoint()
    state = _break_first_norm_entry(state, change)
    model = R.make_mlp(norm=True)
    opt = KFAC(model, lr=0.1, damping=1e-2, **options)
    (x, y), = R.make_batches(1, seed=5)
    _train(opt, model, x, y)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for i, entry in before["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            other = after["state"][i][key]
            assert torch.equal(other, value) if isinstance(value, Tensor) else other == value


def test_adam_state_for_a_covered_parameter_is_refused() -> None:
    state, _ = _adam_checkpoint()
    norm_entry = state["state"][state["param_groups"][0]["params"][2]]
    state["state"][state["param_groups"][0]["params"][0]] = dict(norm_entry)  # 0.weight
    state["state"][state["param_groups"][0]["params"][0]]["exp_avg"] = torch.zeros(6, 4).double()
    state["state"][state["param_groups"][0]["params"][0]]["exp_avg_sq"] = \
        torch.zeros(6, 4).double()
    opt = KFAC(R.make_mlp(norm=True), lr=0.1, damping=1e-2, fallback="adam")
    with pytest.raises(ValueError, match=r"'0\.weight'.*K-FAC covers that parameter"):
        opt.load_state_dict(state)


# -- GradScaler, closure, adaptive damping ------------------------------------------------------
def test_grad_scaler_and_closure_take_the_plain_steps() -> None:
    """The standard GradScaler loop and step(closure) give the same Adam fallback steps as the
    plain loop (a power-of-two scale divides exactly)."""
    batches = [(x.float(), y) for x, y in R.make_batches(3)]

    def make() -> tuple[nn.Module, KFAC]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        return model, KFAC(model, lr=0.05, damping=1e-2, fallback="adam",
                           fisher_type="empirical")

    plain, opt = make()
    for x, y in batches:
        _train(opt, plain, x, y)
    scaled, opt = make()
    scaler = torch.amp.GradScaler("cpu")
    for x, y in batches:
        opt.zero_grad()
        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    closed, opt = make()
    for x, y in batches:
        def closure(x: Tensor = x, y: Tensor = y, model: nn.Module = closed,
                    opt: KFAC = opt) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    for other in (scaled, closed):
        for a, b in zip(plain.parameters(), other.parameters(), strict=True):
            assert torch.equal(a, b)


def test_adaptive_damping_counts_the_adam_step_in_its_model() -> None:
    """With adaptive damping the applied Δ of the fallback parameters (Adam's) enters
    M(Δ) = ∇ᵀΔ + ½ Δᵀ(F̂ + δI)Δ; the run stays finite and adapts δ."""
    model = R.make_mlp(norm=True)
    opt = KFAC(model, lr=0.1, damping=1e-1, fallback="adam", adaptive_damping=True,
               damping_adaptation_period=1)
    for x, y in R.make_batches(3):
        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert math.isfinite(opt.last_reduction_ratio)
    assert opt.param_groups[0]["damping"] != 1e-1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- repr, the preconditioners, bad input ---------------------------------------------------------
def test_repr_says_what_each_parameter_gets() -> None:
    model = R.make_mlp(norm=True)
    named = dict(model.named_parameters())
    opt = KFAC(model, lr=0.1, fallback=AdamFallback(lr_scale=0.01),
               param_groups=[{"params": [p for n, p in named.items() if n != "3.bias"]}])
    text = repr(opt)
    assert re.search(r"\b0: Linear 6x5 -> KFAC\b", text), text
    assert re.search(r"1 \(LayerNorm\): Adam-style diagonal step \(fallback, not "
                     r"preconditioned: betas=\(0\.9, 0\.999\), eps=1e-08, its group's lr x "
                     r"0\.01, decoupled weight decay\)", text), text
    assert re.search(r"3\.bias: in no parameter group \(not stepped\)", text), text
    assert "plain SGD" in repr(KFAC(R.make_mlp(norm=True), lr=0.1))


def test_preconditioner_leaves_fallback_gradients_to_the_base_optimizer() -> None:
    """The preconditioners have no fallback option: they leave the other gradients as they
    are, so the base optimizer (here AdamW) gives those parameters its own step."""
    model = R.make_mlp(norm=True)
    pre = KFACPreconditioner(model, damping=1e-2)
    (x, y), = R.make_batches(1)
    F.cross_entropy(model(x), y).backward()
    grads = _grads(model, x, y)
    assert pre.step()
    named = dict(model.named_parameters())
    for n in NORM:
        assert torch.equal(named[n].grad, grads[n])
    assert not torch.equal(named["0.weight"].grad, grads["0.weight"])
    with pytest.raises(TypeError):
        KFACPreconditioner(model, fallback="adam")  # type: ignore[call-arg]


@pytest.mark.parametrize(("fallback", "message"), [
    ("adamw", r"fallback must be 'sgd', 'adam' or an AdamFallback"),
    (None, r"fallback must be"),
])
def test_unknown_fallback_is_refused(fallback, message) -> None:
    with pytest.raises(ValueError, match=message):
        KFAC(R.make_mlp(norm=True), fallback=fallback)


@pytest.mark.parametrize(("options", "message"), [
    ({"betas": (0.9, 1.0)}, r"betas\[1\] must lie in \[0, 1\)"),
    ({"betas": (0.9,)}, r"betas must be a pair"),
    ({"betas": (True, 0.9)}, r"betas\[0\]"),
    ({"eps": 0.0}, r"eps must be a finite number > 0"),
    ({"lr_scale": math.inf}, r"lr_scale must be a finite number > 0"),
])
def test_bad_adam_fallback_options(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdamFallback(**options)


def test_sparse_gradient_with_adam_fallback_is_refused_before_any_change() -> None:
    class Sparse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(5, 4, sparse=True)
            self.out = nn.Linear(4, 3)

        def forward(self, t: Tensor) -> Tensor:
            return self.out(self.emb(t))

    model = Sparse()
    opt = KFAC(model, lr=0.1, damping=1e-2, fallback="adam")
    tokens, y = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(tokens), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'emb\.weight' has a sparse gradient"):
        opt.step()
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not opt.state
