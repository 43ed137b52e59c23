"""K-FAC-expand and K-FAC-reduce for layers applied at several positions of one example
(Eschenhagen et al. 2023), against their definitions in the float64 oracle (tests/reference.py)
and against the exact Fisher where the paper says one of them is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
import reference as ref
from natgrad.optim import EKFAC, KFAC, KFACPreconditioner

N, T, D_IN, HIDDEN, C = 5, 4, 3, 6, 3


class PooledSequence(nn.Module):
    """(N, T, d) → Linear → tanh → Linear → mean over positions → (N, C): a "reduce" setting."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(D_IN, HIDDEN, dtype=torch.float64)
        self.second = nn.Linear(HIDDEN, C, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))).mean(dim=1)


class PerPosition(nn.Module):
    """(N, T, d) → Linear → (N, T·C): every position its own output, an "expand" setting."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(D_IN, C, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).flatten(1)


def _data(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, T, D_IN, generator=g, dtype=torch.float64),
            torch.randint(0, C, (n,), generator=g))


def _block_mask(model: nn.Module, P: int) -> torch.Tensor:
    mask = torch.zeros(P, P, dtype=torch.float64)
    for layer, _ in ref.kfac_layers(model):
        idx = ref.layer_indices(model, layer)
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = 1.0
    return mask


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_kfac_factors_follow_their_definitions(approx: str, fisher_type: str) -> None:
    model = PooledSequence()
    x, y = _data()
    F = natgrad.fisher_matrix(model, [(x[:3], y[:3]), (x[3:], y[3:])], "categorical",
                              fisher_type, "kfac", kfac_approx=approx)
    expected = ref.kronecker_embed(
        model, ref.kfac_factors(model, (x, y), "categorical", fisher_type, approx=approx))
    torch.testing.assert_close(F.to_dense(), expected, rtol=1e-10, atol=1e-12)


def test_expand_and_reduce_differ_with_positions_and_agree_without() -> None:
    model = PooledSequence()
    x, y = _data()
    dense = {a: natgrad.fisher_matrix(model, (x, y), "categorical", "true", "kfac",
                                      kfac_approx=a).to_dense() for a in ("expand", "reduce")}
    assert (dense["expand"] - dense["reduce"]).abs().max() > 1e-3
    one = x[:, :1]  # one position: both are plain K-FAC
    same = {a: natgrad.fisher_matrix(model, (one, y), "categorical", "true", "kfac",
                                     kfac_approx=a).to_dense() for a in ("expand", "reduce")}
    torch.testing.assert_close(same["expand"], same["reduce"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_reduce_is_exact_for_a_pooled_linear_layer(likelihood: str) -> None:
    """One example, a linear layer whose positions are averaged before the loss: the K-FAC-
    reduce block is the exact Fisher block (Eschenhagen et al. 2023, §3); expand's is not."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(D_IN, C, dtype=torch.float64))
    pooled = _Pool(model)
    x, y = _data(1)
    y = y if likelihood == "categorical" else torch.randn(1, C, dtype=torch.float64)
    exact = ref.dense_fisher(pooled, (x, y), likelihood)
    got = {a: natgrad.fisher_matrix(pooled, (x, y), likelihood, "true", "kfac",
                                    kfac_approx=a).to_dense() for a in ("expand", "reduce")}
    torch.testing.assert_close(got["reduce"], exact, rtol=1e-10, atol=1e-12)
    assert (got["expand"] - exact).abs().max() > 1e-3


def test_expand_is_exact_for_a_linear_layer_with_a_loss_term_per_position() -> None:
    """One example, a linear layer, a Gaussian output per position: K-FAC-expand's block is
    the exact Fisher block (Eschenhagen et al. 2023, §3); reduce's is not."""
    model = PerPosition()
    x, _ = _data(1)
    y = torch.randn(1, T * C, dtype=torch.float64)
    exact = ref.dense_fisher(model, (x, y), "gaussian")
    got = {a: natgrad.fisher_matrix(model, (x, y), "gaussian", "true", "kfac",
                                    kfac_approx=a).to_dense() for a in ("expand", "reduce")}
    torch.testing.assert_close(got["expand"], exact, rtol=1e-10, atol=1e-12)
    assert (got["reduce"] - exact).abs().max() > 1e-3


class _Pool(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).mean(dim=1)


def test_ekfac_with_reduce_uses_the_reduce_basis_and_exact_scales() -> None:
    """EK-FAC-reduce: Q = Q_G ⊗ Q_A from the reduce factors, S = diag(Qᵀ F_l Q) with F_l the
    exact Fisher block (per-example gradients do not depend on the approximation)."""
    model = PooledSequence()
    x, y = _data()
    F = natgrad.fisher_matrix(model, (x, y), "categorical", "true", "ekfac",
                              kfac_approx="reduce").to_dense()
    exact = ref.dense_fisher(model, (x, y), "categorical")
    factors = ref.kfac_factors(model, (x, y), "categorical", approx="reduce")
    for name, (G, A) in factors.items():
        idx = ref.layer_indices(model, name)
        Q = torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
        block = exact[idx.unsqueeze(1), idx.unsqueeze(0)]
        S = torch.diagonal(Q.T @ block @ Q)
        torch.testing.assert_close(F[idx.unsqueeze(1), idx.unsqueeze(0)],
                                   Q @ torch.diag(S) @ Q.T, rtol=1e-8, atol=1e-10)
    assert torch.count_nonzero(F * (1 - _block_mask(model, F.shape[0]))) == 0


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
@pytest.mark.parametrize("optimizer", [KFAC, EKFAC])
def test_optimizers_build_the_reduce_factors(optimizer: type, fisher_type: str) -> None:
    model = PooledSequence()
    x, y = _data()
    opt = optimizer(model, lr=0.1, damping=1e-2, fisher_type=fisher_type, kfac_approx="reduce")
    assert "kfac_approx='reduce'" in repr(opt)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    factors = ref.kfac_factors(model, (x, y), "categorical", fisher_type, approx="reduce")
    opt.step()
    for name, (G, A) in factors.items():
        state = opt.preconditioner.curvature.state[name]
        torch.testing.assert_close(state["A"], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["G"], G, rtol=1e-10, atol=1e-12)


def test_reduce_refuses_when_the_examples_cannot_be_told_apart() -> None:
    """Rows (N, N, d) whose examples interact: no example axis, so no per-example reduction;
    the error names the problem instead of reducing the wrong dimension."""

    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D_IN, C, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.lin(x)
            return (a + a.mean(dim=0, keepdim=True)).mean(dim=1)

    x = torch.randn(T, T, D_IN, dtype=torch.float64)  # N = T: two candidate axes
    model = Mixing()
    with pytest.raises(ValueError, match="K-FAC-reduce"):
        natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "kfac",
                              kfac_approx="reduce")
    expand = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "kfac")
    assert torch.isfinite(expand.to_dense()).all()  # expand needs no example axis


@pytest.mark.parametrize("bad", ["mean", "", None, 1])
def test_unknown_approximation_is_refused(bad: object) -> None:
    model = PooledSequence()
    x, y = _data()
    with pytest.raises(ValueError, match="kfac_approx"):
        natgrad.fisher_matrix(model, (x, y), "categorical", "true", "kfac", kfac_approx=bad)
    with pytest.raises(ValueError, match="kfac_approx"):
        KFACPreconditioner(model, kfac_approx=bad)
    with pytest.raises(ValueError, match="kfac_approx"):
        KFAC(model, lr=0.1, kfac_approx=bad)


def test_embeddings_keep_expand_under_reduce() -> None:
    """A one-hot input's average is not one-hot: the embedding's Ā stays the diagonal of
    token frequencies under "reduce" (and its block equals expand's), the Linear after it
    is reduced."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, C)).double()
    pooled = _Pool(model)
    x = torch.randint(0, 7, (N, T))
    y = torch.randint(0, C, (N,))
    got = {a: natgrad.fisher_matrix(pooled, (x, y), "categorical", "true", "kfac",
                                    kfac_approx=a).to_dense() for a in ("expand", "reduce")}
    n_emb = 7 * 4
    torch.testing.assert_close(got["reduce"][:n_emb, :n_emb], got["expand"][:n_emb, :n_emb])
    assert (got["reduce"][n_emb:, n_emb:] - got["expand"][n_emb:, n_emb:]).abs().max() > 1e-4
    opt = KFAC(pooled, lr=0.1, damping=1e-2, fisher_type="true", kfac_approx="reduce")
    nn.functional.cross_entropy(pooled(x), y).backward()
    opt.step()
    A = opt.preconditioner.curvature.state["inner.0"]["A"]
    torch.testing.assert_close(A, torch.bincount(x.flatten(), minlength=7).double() / x.numel())


def test_attention_input_projections_keep_expand_under_reduce() -> None:
    """Summed over positions, the keys' output gradients vanish (softmax is shift-invariant),
    so reduce would give them no curvature: attention's in_proj keeps expand's factors under
    "reduce" (its block equals expand's), while out_proj is reduced."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
            self.head = nn.Linear(4, C, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    model = Attend()
    x = torch.randn(N, T, 4, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    got = {a: natgrad.fisher_matrix(model, (x, y), "categorical", "true", "kfac",
                                    kfac_approx=a) for a in ("expand", "reduce")}
    blocks = {a: {lay.name: G for lay, G in zip(F.layers, F.G, strict=True)}
              for a, F in got.items()}
    torch.testing.assert_close(blocks["reduce"]["mha.in_proj"], blocks["expand"]["mha.in_proj"])
    key_rows = blocks["reduce"]["mha.in_proj"].diagonal()[4:8]
    assert key_rows.min() > 1e-8  # the keys keep curvature
    assert (blocks["reduce"]["mha.out_proj"] - blocks["expand"]["mha.out_proj"]).abs().max() > 1e-6
