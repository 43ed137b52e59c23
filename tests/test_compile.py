"""K-FAC on ``torch.compile``d models (inductor on CPU, float64 so that the compiled kernels'
rounding does not hide a difference): the same steps as the eager model, no false in-place
warnings, with a cold and a warm compile cache."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad.optim import EKFAC, KFAC, KFACPreconditioner


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(2 * 5 * 5, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)
                         ).double()


@pytest.mark.parametrize(("make", "fisher_type"), [
    (lambda m, t: KFAC(m, lr=0.1, damping=1e-2, fisher_type=t), "true"),
    (lambda m, t: KFAC(m, lr=0.1, damping=1e-2, fisher_type=t,
                       generator=torch.Generator().manual_seed(0)), "mc"),
    (lambda m, t: EKFAC(m, lr=0.1, damping=1e-2, fisher_type=t), "empirical"),
    (lambda m, t: KFACPreconditioner(m, damping=1e-2, fisher_type=t), "true"),
    (lambda m, t: KFAC(m, fisher_type=t), "true"),  # the adaptive step's forward-mode pass
], ids=["KFAC-true", "KFAC-mc", "EKFAC-empirical", "KFACPreconditioner", "KFAC-adaptive"])
def test_compiled_model_takes_the_eager_steps(make, fisher_type: str) -> None:
    torch.set_num_threads(1)
    runs = []
    for compiled in (False, True, True):  # eager, cold cache, warm cache
        model = _net()
        opt = make(model, fisher_type)
        sgd = (torch.optim.SGD(model.parameters(), lr=0.1)
               if isinstance(opt, KFACPreconditioner) else None)
        call = torch.compile(model) if compiled else model
        runs.append(_three_steps(model, call, opt, sgd))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def _three_steps(model: nn.Module, call: nn.Module, opt, sgd=None) -> list[torch.Tensor]:
    """Three training steps through ``call`` (the model or its compiled wrapper), failing on
    any RuntimeWarning (a false in-place warning, finite differences); the parameters after."""
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            # 64 examples: full-rank factors (EK-FAC's scales depend on the basis chosen
            # inside a degenerate eigenspace, which rounding decides)
            x = torch.randn(64, 2, 5, 5, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (64,), generator=g)
            model.zero_grad()
            F.cross_entropy(call(x), y).backward()
            opt.step()
            if sgd is not None:
                sgd.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_optimizer_built_on_the_compiled_model_takes_the_eager_adaptive_steps(cls) -> None:
    """``KFAC(torch.compile(model))`` (the wrapper's parameter names, compiled code in the
    forward-mode pass) takes the eager model's adaptive steps without a finite-difference
    warning: natgrad runs compiled code eagerly for its Jacobian-vector products. The third
    step adapts δ without a closure (the labels read off the loss gradient at the compiled
    model's output): the same ρ."""
    torch.set_num_threads(1)
    runs = []
    rhos = []
    for compiled in (False, True):
        model = _net()
        call = torch.compile(model) if compiled else model
        opt = cls(call, damping_adaptation_period=3)
        runs.append(_three_steps(model, call, opt))
        assert opt.last_step_info["alpha"] > 0
        rhos.append(opt.last_step_info["rho"])
        assert opt.damping_note is None
    assert rhos[0] is not None and rhos[1] == pytest.approx(rhos[0], rel=1e-9)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("make", "fisher_type"), [
    (lambda m, t: KFAC(m, lr=0.1, damping=1e-2, fisher_type=t), "true"),
    (lambda m, t: KFAC(m, lr=0.1, damping=1e-2, fisher_type=t), "empirical"),
    (lambda m, t: EKFAC(m, lr=0.1, damping=1e-2, fisher_type=t,
                        generator=torch.Generator().manual_seed(0)), "mc"),
], ids=["KFAC-true", "KFAC-empirical", "EKFAC-mc"])
def test_compiled_sequence_model_takes_the_eager_steps(make, fisher_type: str) -> None:
    """A token model (N, T) through torch.compile: the example-axis probe's batched backward
    pass cannot be vmapped through the compiled backward (it crashed on the first pass); it
    runs row by row, and the steps are the eager model's."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 20, (4, 6), generator=g) for _ in range(3)]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 12), nn.Tanh(),
                              nn.Linear(12, 20)).double()
        opt = make(model, fisher_type)
        call = torch.compile(model) if compiled else model
        for x in ids:
            opt.zero_grad()
            F.cross_entropy(call(x).flatten(0, 1), x.flatten()).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
