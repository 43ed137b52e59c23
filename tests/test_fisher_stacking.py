"""Stacking a DataLoader's small batches for K-FAC's statistics (natgrad.fisher.stacking).

Stacking must change neither the factors (against the float64 oracle and the unstacked
computation), nor the Monte-Carlo draws' pairing between EK-FAC's two passes; it must be
refused where dim 0 is not the examples (a sequence-first transformer) or the examples
interact, and it must never hold more than its budget."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import reference as ref
from natgrad.fisher import ModelInputs, fisher_matrix, stacking
from natgrad.fisher.stacking import StackPlan, concatenable

D = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _loader(n_batches: int = 6, size: int = 4, width: int = 5) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, width, generator=g, dtype=D),
             torch.randint(0, 3, (size,), generator=g)) for _ in range(n_batches)]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[StackPlan]:
    """Collect the plans fisher_matrix makes."""
    plans: list[StackPlan] = []
    original = stacking.StackPlan.__init__

    def init(self: StackPlan, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        plans.append(self)

    monkeypatch.setattr(stacking.StackPlan, "__init__", init)
    return plans


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_stacked_factors_equal_the_oracle_and_the_unstacked(
        structure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _mlp(), _loader()
    plans = _spy(monkeypatch)
    stacked = fisher_matrix(model, data, "categorical", "true", structure)
    assert plans[-1].groups == [[0], [1, 2, 3, 4, 5]]  # the first batch alone, then one stack
    monkeypatch.setattr(stacking, "_EXAMPLES", 1)  # nothing stacked
    apart = fisher_matrix(model, data, "categorical", "true", structure)
    assert plans[-1].groups == [[i] for i in range(6)]
    assert torch.allclose(stacked.to_dense(), apart.to_dense(), rtol=1e-12, atol=1e-14)
    if structure == "kfac":
        factors = ref.kfac_factors(model, data, "categorical", "true")
        expected = ref.kronecker_embed(model, factors)
        assert ref.rel_err(stacked.to_dense(), expected) < 1e-10


def test_ekfac_second_pass_replays_the_same_draws_on_the_same_stacks() -> None:
    """A layer whose input is the same for every example (zeros: ā = [0; 1]) has EK-FAC scales
    whose row sums are G's eigenvalues exactly when both passes draw the same ŷ."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(3)
    data = [(torch.zeros(n, 4, dtype=D), None) for n in (3, 5, 4, 4, 2)]
    F = fisher_matrix(model, data, "categorical", "mc", "ekfac", generator=g)
    eigenvalues = torch.linalg.eigvalsh(F.Q_G[0].T @ torch.diag(F.scales[0].sum(1)) @ F.Q_G[0])
    G = fisher_matrix(model, data, "categorical", "mc", "kfac",
                      generator=torch.Generator().manual_seed(3)).G[0]
    assert torch.allclose(eigenvalues, torch.linalg.eigvalsh(G), atol=1e-12)


class _SequenceFirst(nn.Module):
    """Inputs (T, N, E), outputs (T, N, C): dim 0 is time, not the examples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        for norm in (self.encoder.norm1, self.encoder.norm2):
            norm.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class _Interacting(nn.Module):
    """Each output depends on the batch mean: the examples interact even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0, keepdim=True)))


def test_no_stacking_where_dim_0_is_not_the_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    plans = _spy(monkeypatch)
    model = _SequenceFirst().double()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(6, 2, 8, generator=g, dtype=D) for _ in range(4)]  # 4 batches of T = 6
    fisher_matrix(model, data, "categorical", "mc", "kfac", generator=g)
    assert plans[-1].groups == [[0], [1], [2], [3]]


def test_no_stacking_where_examples_interact(monkeypatch: pytest.MonkeyPatch) -> None:
    plans = _spy(monkeypatch)
    model, data = _Interacting().double(), _loader()
    got = fisher_matrix(model, data, "categorical", "true", "kfac")
    assert plans[-1].groups == [[i] for i in range(6)]
    monkeypatch.setattr(stacking, "_EXAMPLES", 1)
    assert torch.equal(got.to_dense(), fisher_matrix(model, data, "categorical", "true",
                                                     "kfac").to_dense())


def test_stacks_respect_the_example_and_element_budgets() -> None:
    model = _mlp()
    data = [(ModelInputs((x,)), y) for x, y in _loader(n_batches=9)]

    def statistics(batch: tuple[ModelInputs, Tensor | None]) -> tuple[list, int]:
        n = batch[0].num_examples
        return [(torch.zeros(n, 1, 10), torch.zeros(1, n, 1, 10))], n  # 20 elements/example

    sizes = [count for _, count in StackPlan(model, data, examples=12).run(statistics)]
    assert sizes == [4, 12, 12, 8]
    # 80 elements in the first batch; a budget of 160 holds 8 examples
    plan = StackPlan(model, data, elements=160)
    assert [count for _, count in plan.run(statistics)] == [4, 8, 8, 8, 8]
    # a budget below the first batch's own size never shrinks the batches
    assert [c for _, c in StackPlan(model, data, elements=1).run(statistics)] == [4, 4, 4, 4,
                                                                                4, 4, 4, 4, 4]


def test_each_shape_is_measured_and_stacks_stay_within_2048_rows() -> None:
    """A first batch of short sequences does not set the budget of long ones (a red team's
    length-bucketed loader: 40 batches of 1,024 tokens were stacked into one): each new shape
    is used alone and measured, and a stack sees at most 2,048 rows (examples × positions)."""
    model = _mlp()

    def seq(n: int, t: int) -> tuple[ModelInputs, Tensor | None]:
        return ModelInputs((torch.zeros(n, t, 5, dtype=D),)), None

    data = [seq(4, 8), *[seq(4, 128) for _ in range(10)], seq(4, 8), seq(4, 8)]

    def statistics(batch: tuple[ModelInputs, Tensor | None]) -> tuple[list, int]:
        x = batch[0].args[0]
        n, t = x.shape[:2]
        return [(torch.zeros(n, t, 6), torch.zeros(1, n, t, 6))], n

    plan = StackPlan(model, data)
    sizes = [count for _, count in plan.run(statistics)]
    # 8-token batches: 32 rows each; 128-token batches: 512 rows, so 4 per stack (2,048)
    assert plan.groups == [[0], [1], [2, 3, 4, 5], [6, 7, 8, 9], [10], [11, 12]]
    assert sizes == [4, 4, 16, 16, 4, 8]
    # a batch already at the budget is never stacked (images: N·H·W rows)
    wide = [seq(4, 600) for _ in range(3)]
    assert [c for _, c in StackPlan(model, wide).run(statistics)] == [4, 4, 4]


def test_only_alike_batches_are_concatenable() -> None:
    x, mask = torch.randn(4, 7, 5, dtype=D), torch.ones(7, 7)
    y = torch.zeros(4, 7, dtype=torch.long)
    batch = (ModelInputs((x,), {"mask": mask}), y)
    assert concatenable(batch, (ModelInputs((x[:2],), {"mask": mask.clone()}), y[:2]))
    assert not concatenable(batch, (ModelInputs((torch.randn(4, 6, 5, dtype=D),), {"mask": mask}),
                                    y[:, :6]))  # another sequence length
    assert not concatenable(batch, (ModelInputs((x,), {"mask": torch.zeros(7, 7)}), y))
    assert not concatenable(batch, (ModelInputs((x,), {"mask": mask}), None))
    assert not concatenable(batch, (ModelInputs((x.float(),), {"mask": mask}), y))
    assert not concatenable(batch, (ModelInputs((x,), {"mask": mask, "k": 1}), y))
