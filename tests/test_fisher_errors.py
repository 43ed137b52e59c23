"""Bad input to fisher_matrix: a clear error, and the model left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import natgrad

STRUCTURES = ["dense", "block_diagonal", "kfac", "ekfac", "diagonal"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def _assert_untouched(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["hooks"] == before["hooks"], "hooks left attached"
    assert after["training"] == before["training"]
    for (k, v), w in zip(before["state"].items(), after["state"].values(), strict=True):
        assert torch.allclose(v, w, rtol=0, atol=0, equal_nan=True), f"{k} changed"
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1), ".grad touched"


class Doubled(nn.Module):
    """Calls the same Linear twice: K-FAC would be silently wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize(
    ("model_fn", "structure", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)), "kfac",
         r"1 \(LayerNorm\)"),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)), "ekfac",
         r"1 \(BatchNorm1d\)"),
        (lambda: Doubled(), "kfac", r"'lin' called 2 times"),
    ],
)
def test_kfac_unsupported_or_reused_layers(model_fn, structure, match) -> None:
    model = model_fn().double()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        natgrad.fisher_matrix(model, [(_x(), None)], "categorical", "true", structure)
    _assert_untouched(model, before)


def test_reused_module_is_fine_for_dense() -> None:
    model = Doubled().double()
    F = natgrad.fisher_matrix(model, [(_x(), None)], "categorical", "true", "dense")
    assert F.num_params == sum(p.numel() for p in model.parameters())


def test_grouped_convolution_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3)).double()
    before = _snapshot(model)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="groups=2"):
        natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "kfac")
    _assert_untouched(model, before)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_empirical_without_targets(structure: str) -> None:
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"empirical.*targets"):
        natgrad.fisher_matrix(model, [(_x(), None)], "categorical", "empirical", structure)
    _assert_untouched(model, before)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(
    ("likelihood", "targets", "match"),
    [
        ("categorical", torch.tensor([0, 1, 2, 3, 0]), r"\[0, 3\)"),
        ("categorical", torch.tensor([0, -1, 2, 1, 0]), r"\[0, 3\)"),
        ("categorical", torch.zeros(5, 3), "integer class indices"),
        ("categorical", torch.zeros(5, 1, dtype=torch.long), r"shape \(N,\)"),
        ("gaussian", torch.zeros(5, 2, dtype=torch.float64), "shape"),
        ("bernoulli", torch.full((5, 3), 2.0, dtype=torch.float64), r"\[0, 1\]"),
    ],
)
def test_targets_that_do_not_fit(structure, likelihood, targets, match) -> None:
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        natgrad.fisher_matrix(model, [(_x(), targets)], likelihood, "empirical", structure)
    _assert_untouched(model, before)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_non_finite_outputs(structure: str) -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        natgrad.fisher_matrix(model, [(_x(), None)], "categorical", "true", structure)
    _assert_untouched(model, before)


@pytest.mark.parametrize("data", [[], [(torch.zeros(0, 4, dtype=torch.float64), None)]])
def test_empty_data(data) -> None:
    with pytest.raises(ValueError, match="empty"):
        natgrad.fisher_matrix(_mlp(), data, "categorical", "true", "kfac")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"likelihood": "poisson"}, "unknown likelihood"),
        ({"fisher_type": "exact"}, "unknown fisher_type"),
        ({"structure": "kron"}, "unknown structure"),
        ({"fisher_type": "mc", "mc_samples": 0}, "mc_samples"),
    ],
)
def test_unknown_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        natgrad.fisher_matrix(_mlp(), [(_x(), None)], **kwargs)


def test_exception_mid_forward_removes_hooks() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom().double()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        natgrad.fisher_matrix(model, [(_x(), None)], "categorical", "true", "kfac")
    _assert_untouched(model, before)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "x"])
def test_solve_rejects_bad_damping(bad) -> None:
    F = natgrad.fisher_matrix(_mlp(), [(_x(), None)], "categorical", "true", "kfac")
    with pytest.raises(ValueError, match="damping"):
        F.solve(torch.ones(F.num_params, dtype=torch.float64), bad)


@pytest.mark.parametrize("structure", ["dense", "block_diagonal", "kfac", "ekfac"])
def test_undamped_solve_of_singular_fisher(structure: str) -> None:
    # 2 examples, 51 parameters: every block has rank ≤ 2·(3−1) (K-FAC: G of rank ≤ 4 on the
    # 6 hidden units), so an undamped solve must refuse rather than return garbage.
    F = natgrad.fisher_matrix(_mlp(), [(_x(2), None)], "categorical", "true", structure)
    with pytest.raises(ValueError, match="singular"):
        F.solve(torch.ones(F.num_params, dtype=torch.float64), 0.0)


def test_wrong_vector_shape() -> None:
    F = natgrad.fisher_matrix(_mlp(), [(_x(), None)], "categorical", "true", "dense")
    with pytest.raises(ValueError, match=r"\(51,\)"):
        F.mv(torch.ones(44, dtype=torch.float64))


def test_inplace_activation_after_layer_is_handled() -> None:
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)
    x = _x()
    a = natgrad.fisher_matrix(plain, [(x, None)], "categorical", "true", "kfac").to_dense()
    b = natgrad.fisher_matrix(inplace, [(x, None)], "categorical", "true", "kfac").to_dense()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
