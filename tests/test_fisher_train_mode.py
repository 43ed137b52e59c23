"""Train-mode layers (BatchNorm, Dropout, LSTM/GRU): fisher_matrix is the Fisher of the
eval-mode function for every structure, and never writes a buffer or changes a mode.

In train mode Dropout draws a random mask on every call and BatchNorm normalises with the
batch's statistics (coupling the examples) and updates its running statistics; neither is a
per-example function. natgrad's definition (docs/guide.md §2, natgrad.fisher.evaluation):
the Fisher of the model in eval mode, whatever mode it is in. The oracle (tests/reference.py)
computes it on an eval-mode copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
import reference as ref

PER_EXAMPLE = ("dense", "block_diagonal", "diagonal", "matrix_free")


class Recurrent(nn.Module):
    """An LSTM or GRU over (N, T, 3) inputs; logits from the last step."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _model(kind: str, affine: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "batchnorm":
        model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, affine=affine), nn.Tanh(),
                              nn.Linear(5, 3)).double()
        with torch.no_grad():  # running statistics away from their initial 0 / 1
            for _ in range(3):
                model(torch.randn(16, 3, dtype=torch.float64) * 2 + 1)
    elif kind == "dropout":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5),
                              nn.Linear(5, 3)).double()
    else:
        model = Recurrent(nn.LSTM if kind == "lstm" else nn.GRU).double()
    return model.train()


def _inputs(kind: str, n: int = 6) -> Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (n, 2, 3) if kind in ("lstm", "gru") else (n, 3)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _state(model: nn.Module) -> tuple[dict[str, Tensor], list[bool]]:
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]


def _assert_state(model: nn.Module, before: tuple[dict[str, Tensor], list[bool]]) -> None:
    state, modes = before
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} changed"
    assert [m.training for m in model.modules()] == modes, "a module's mode changed"


def _eval_oracle(model: nn.Module, x: Tensor) -> Tensor:
    return ref.dense_fisher(copy.deepcopy(model).eval(), [(x, None)], "categorical", "true")


def _expected(structure: str, model: nn.Module, F_dense: Tensor) -> Tensor:
    if structure == "diagonal":
        return F_dense.diagonal().diag()
    if structure == "block_diagonal":
        mask = torch.zeros_like(F_dense)
        for _, idx in ref.module_param_indices(model):
            mask[idx.unsqueeze(1), idx.unsqueeze(0)] = 1.0
        return F_dense * mask
    return F_dense


@pytest.mark.parametrize("structure", PER_EXAMPLE)
@pytest.mark.parametrize("kind", ["batchnorm", "dropout", "lstm", "gru"])
def test_train_mode_model_gives_the_eval_mode_fisher(kind: str, structure: str) -> None:
    """Before: BatchNorm raised inside torch.func (and changed its running statistics),
    Dropout raised under vmap or made matrix_free random, float64 LSTM/GRU crashed on a
    broadcast under vmap."""
    model, x = _model(kind), _inputs(kind)
    before = _state(model)
    F_ng = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", structure)
    _assert_state(model, before)
    expected = _expected(structure, model, _eval_oracle(model, x))
    assert ref.rel_err(F_ng.to_dense(), expected) < 1e-10
    assert ref.rel_err(F_ng.trace(), expected.trace()) < 1e-10
    _assert_state(model, before)


def test_matrix_free_with_dropout_is_a_fixed_symmetric_operator() -> None:
    """Before: every mv drew new dropout masks, so the operator was random and not symmetric,
    and CG failed with "pass damping > 0" although damping > 0."""
    model, x = _model("dropout"), _inputs("dropout", n=8)
    F_mf = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "matrix_free")
    g = torch.Generator().manual_seed(2)
    u, v = (torch.randn(F_mf.num_params, generator=g, dtype=torch.float64) for _ in range(2))
    assert model.training
    torch.testing.assert_close(F_mf.mv(v), F_mf.mv(v), rtol=0, atol=0)
    torch.testing.assert_close(u @ F_mf.mv(v), v @ F_mf.mv(u), rtol=1e-12, atol=1e-14)
    F_mf.cg_rtol = 1e-12
    solved = F_mf.solve(v, 1e-3)
    expected = torch.linalg.solve(_eval_oracle(model, x) + 1e-3 * torch.eye(F_mf.num_params,
                                  dtype=torch.float64), v)
    torch.testing.assert_close(solved, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kfac_through_train_mode_batchnorm_uses_running_statistics(structure: str) -> None:
    """K-FAC's "true" Fisher through a train-mode BatchNorm (frozen affine) is defined as that
    of the eval-mode function; before, the batch statistics coupled the examples and the
    running statistics were updated."""
    model, x = _model("batchnorm", affine=False), _inputs("batchnorm", n=8)
    before = _state(model)
    F_ng = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", structure)
    _assert_state(model, before)
    frozen = copy.deepcopy(model).eval()
    factors = ref.kfac_factors(frozen, [(x, None)], "categorical", "true")
    if structure == "kfac":
        assert ref.rel_err(F_ng.to_dense(), ref.kronecker_embed(frozen, factors)) < 1e-10
    else:  # EK-FAC keeps the exact layer-block traces of the eval-mode Fisher
        exact = _eval_oracle(model, x)
        for name, _ in ref.kfac_layers(frozen):
            idx = ref.layer_indices(frozen, name)
            block = F_ng.to_dense()[idx.unsqueeze(1), idx.unsqueeze(0)]
            assert ref.rel_err(block.trace(), exact[idx, idx].sum()) < 1e-10


@pytest.mark.parametrize("structure", [*PER_EXAMPLE, "kfac"])
def test_batchnorm_without_running_statistics_is_refused(structure: str) -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, affine=False,
                                                          track_running_stats=False),
                          nn.Tanh(), nn.Linear(5, 3)).double()
    before = _state(model)
    with pytest.raises(ValueError, match=r"track_running_stats=False.*coupling the examples"):
        natgrad.fisher_matrix(model, _inputs("batchnorm"), "categorical", "true", structure)
    _assert_state(model, before)


@pytest.mark.parametrize("structure", ["dense", "matrix_free", "kfac"])
def test_buffers_unchanged_when_fisher_matrix_raises(structure: str) -> None:
    """Before: the forward pass ran in train mode (running statistics updated) before the
    missing targets were noticed."""
    model = _model("batchnorm", affine=structure != "kfac")
    before = _state(model)
    with pytest.raises(ValueError, match="needs the training targets"):
        natgrad.fisher_matrix(model, _inputs("batchnorm"), "categorical", "empirical", structure)
    _assert_state(model, before)


def test_model_random_in_eval_mode_is_refused() -> None:
    class Noisy(nn.Module):
        def forward(self, h: Tensor) -> Tensor:
            return h + 0.1 * torch.randn_like(h)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="random numbers in eval mode"):
        natgrad.fisher_matrix(model, _inputs("dropout"), "categorical", "true", "dense")


@pytest.mark.parametrize("structure", ["dense", "matrix_free"])
@pytest.mark.parametrize("kind", ["batchnorm", "dropout"])
def test_ngd_on_a_train_mode_model_uses_the_eval_mode_fisher(kind: str, structure: str) -> None:
    """NGD's Fisher is fisher_matrix's: that of the eval-mode function at θ before the step
    (BatchNorm with the running statistics left by the training pass), and step() writes no
    buffer. Before: BatchNorm and Dropout raised inside torch.func."""
    model, x = _model(kind), _inputs(kind, n=8)
    y = torch.arange(8) % 3
    opt = natgrad.optim.NGD(model, lr=0.1, damping=1e-2, structure=structure,
                            fisher_type="true", cg_rtol=1e-12, cg_max_iter=500)
    F.cross_entropy(model(x), y).backward()
    before_step = copy.deepcopy(model)  # θ and running statistics the step's Fisher uses
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt.step()
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"{name} changed by step()"
    assert opt.last_fisher is not None
    assert ref.rel_err(opt.last_fisher.to_dense(), _eval_oracle(before_step, x)) < 1e-10
