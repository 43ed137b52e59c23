"""Analysis does not leak into training: fisher_matrix on a model with a natgrad optimizer
attached feeds nothing into the optimizer's next update (issue 12, item 11).

Two identical models train on the same batches with the same optimizer; on one of them,
fisher_matrix (every structure, and a matrix_free result's later mv/solve/trace) runs on other
data between the training forward pass and step(). Parameters and optimizer states must stay
bitwise equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from natgrad.capture import InputRecorder, suspended

STRUCTURES = ("dense", "block_diagonal", "diagonal", "kfac", "ekfac", "matrix_free")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(count: int, n: int = 8, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for _ in range(count)]


def _analyse(model: nn.Module, structure: str) -> None:
    """What a user might run mid-training: a Fisher of other data, and its operations."""
    other = _batches(1, n=5, seed=7)
    fisher = natgrad.fisher_matrix(model, other, "categorical", "true", structure)
    v = torch.ones(fisher.num_params, dtype=torch.float64)
    fisher.mv(v)
    fisher.solve(v, 0.1)
    fisher.trace()


def _flat_state(state: object) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _flat_state(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _flat_state(item)]
    return []


def _train(model: nn.Module, opt: torch.optim.Optimizer, structure: str | None) -> None:
    for x, y in _batches(3):
        opt.zero_grad()
        if structure is not None:
            _analyse(model, structure)  # before the training forward pass ...
        F.cross_entropy(model(x), y).backward()
        if structure is not None:
            _analyse(model, structure)  # ... and between it and step()
        opt.step()


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC", "NGD"])
def test_fisher_matrix_does_not_feed_an_attached_optimizer(optimizer: str,
                                                          structure: str) -> None:
    """Before: "kfac"/"ekfac" added the analysis batch to K-FAC's next factor update (and to
    NGD's recorded batch), "dense"/"diagonal" crashed inside the optimizer's hooks under vmap."""
    models = [_mlp(), _mlp()]
    kwargs = {"lr": 0.1, "damping": 0.1, "fisher_type": "true"}
    if optimizer != "NGD":
        kwargs["inverse_update_period"] = 1
    opts = [getattr(natgrad.optim, optimizer)(m, **kwargs) for m in models]
    _train(models[0], opts[0], None)
    _train(models[1], opts[1], structure)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q), "the analysis changed the training trajectory"
    for s, t in zip(_flat_state(opts[0].state_dict()), _flat_state(opts[1].state_dict()),
                    strict=True):
        assert torch.equal(s, t), "the analysis changed the optimizer's state"


def test_fisher_matrix_with_an_attached_optimizer_equals_it_without() -> None:
    model, x = _mlp(), _batches(1)[0][0]
    expected = {s: natgrad.fisher_matrix(model, x, "categorical", "true", s).to_dense()
                for s in STRUCTURES}
    natgrad.optim.KFAC(model, lr=0.1, damping=0.1)
    for structure in STRUCTURES:
        got = natgrad.fisher_matrix(model, x, "categorical", "true", structure).to_dense()
        torch.testing.assert_close(got, expected[structure], rtol=0, atol=0)


def test_input_recorder_records_args_and_kwargs_but_nothing_when_suspended() -> None:
    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
            return self.lin(x if shift is None else x + shift)

    model = Keyed()
    recorder = InputRecorder(model)
    x, shift = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    model(x, shift=shift)
    with suspended():
        model(x)
    with torch.no_grad():
        model(x)
    model(x=x)
    passes = recorder.take()
    assert len(passes) == 2 and recorder.passes == []
    (args0, kwargs0), (args1, kwargs1) = passes
    assert torch.equal(args0[0], x) and not args0[0].requires_grad
    assert torch.equal(kwargs0["shift"], shift) and args1 == () and set(kwargs1) == {"x"}
    recorder.close()
    model(x)
    assert recorder.passes == []


def test_analysis_mid_accumulation_keeps_ngd_batches() -> None:
    """NGD with two micro-batches and a fisher_matrix call between them equals NGD without."""
    models = [_mlp(), _mlp()]
    opts = [natgrad.optim.NGD(m, lr=0.3, damping=0.1, fisher_type="true") for m in models]
    (x, y), = _batches(1, n=10)
    for i, (model, opt) in enumerate(zip(models, opts, strict=True)):
        for part in (slice(0, 4), slice(4, 10)):
            (F.cross_entropy(model(x[part]), y[part]) * (part.stop - part.start) / 10).backward()
            if i:
                _analyse(model, "kfac")
        opt.step()
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opts[0].last_fisher.to_dense(), opts[1].last_fisher.to_dense())
