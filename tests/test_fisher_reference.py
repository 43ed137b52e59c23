"""natgrad.fisher_matrix against the brute-force float64 oracle in tests/reference.py.

Every likelihood × fisher type × structure is compared, in float64, to matrices the oracle
builds from the definitions (torch.func Jacobians, one example at a time). Exact quantities
must agree to a relative Frobenius error of 1e-10; Monte-Carlo ones either reproduce the same
draws exactly or converge with a stated tolerance.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import natgrad
import reference as ref

RTOL = 1e-10
STRUCTURES = ("dense", "block_diagonal", "kfac", "ekfac", "diagonal")
EXACT_TYPES = ("true", "empirical")
NUM_CLASSES = 3
N = 8


# ---------------------------------------------------------------------------------------------
# models and data


class SeqMean(nn.Module):
    """Linear layers applied to (N, T, d) inputs, averaged over T: outputs (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 5)
        self.lin2 = nn.Linear(5, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.tanh(self.lin1(x))).mean(1)


class SeqOut(nn.Module):
    """Per-position outputs (N, T, 2): a multi-dimensional output (gaussian/bernoulli only)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 3)
        self.lin2 = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


class Seq4D(nn.Module):
    """Linear layers on (N, T1, T2, d) inputs with an in-place ReLU, averaged over T1, T2."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 5)
        self.act = nn.ReLU(inplace=True)
        self.lin2 = nn.Linear(5, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x))).mean((1, 2))


class CNN(nn.Module):
    """Conv2d (stride 2, padding 1, dilation 2, bias) → Conv2d (2×3 kernel, no bias) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.conv2 = nn.Conv2d(3, 2, (2, 3), padding=(1, 1), bias=False)
        self.fc = nn.Linear(2 * 4 * 3, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv1(x))  # (N, 3, 3, 3)
        h = torch.tanh(self.conv2(h))  # (N, 2, 4, 3)
        return self.fc(h.flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(),
                         nn.Linear(4, NUM_CLASSES))


def _mlp_nobias() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Sigmoid(),
                         nn.Linear(4, NUM_CLASSES))


def _mlp_frozen() -> nn.Module:
    """Frozen weight (bias trains: ā = [1]), frozen bias (ā = h), a wholly frozen last layer."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(),
                          nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, NUM_CLASSES))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[6].requires_grad_(False)
    return model


def _cnn_frozen() -> nn.Module:
    model = CNN()
    model.conv1.bias.requires_grad_(False)
    model.fc.weight.requires_grad_(False)
    return model


MODELS = {
    "mlp": (_mlp, (5,)),
    "mlp_nobias": (_mlp_nobias, (5,)),
    "mlp_frozen": (_mlp_frozen, (5,)),
    "seq_mean": (SeqMean, (3, 4)),
    "seq_out": (SeqOut, (3, 4)),
    "seq4d_inplace": (Seq4D, (2, 3, 4)),
    "cnn": (CNN, (2, 7, 7)),
    "cnn_frozen": (_cnn_frozen, (2, 7, 7)),
}
# Linear layers seeing 2-D inputs only: K-FAC is exact there for one example.
LINEAR_2D = ("mlp", "mlp_nobias", "mlp_frozen")
CASES = [
    (m, lik) for m in MODELS for lik in ref.LIKELIHOODS
    if not (lik == "categorical" and m == "seq_out")
]


@functools.cache
def get_model(name: str) -> nn.Module:
    builder, _ = MODELS[name]
    torch.manual_seed(sum(map(ord, name)))
    model = builder().double()
    with torch.no_grad():  # weights large enough that the Fisher is far from trivial
        for p in model.parameters():
            p.mul_(1.5)
    return model


@functools.cache
def get_data(name: str, likelihood: str, n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fresh inputs and targets (fixed seed) fitting the model's outputs and the likelihood."""
    gen = torch.Generator().manual_seed(seed + 1000 * n)
    x = torch.randn((n, *MODELS[name][1]), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f = get_model(name)(x)
    if likelihood == "categorical":
        y = torch.randint(0, f.shape[1], (n,), generator=gen)
    elif likelihood == "gaussian":
        y = f + torch.randn(f.shape, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, f.shape, generator=gen).to(torch.float64)
    return x, y


def batches(x: Tensor, y: Tensor, cuts: tuple[int, ...] = (3,)) -> list[tuple[Tensor, Tensor]]:
    """(x, y) split at ``cuts`` into consecutive batches."""
    bounds = [0, *sorted(cuts), x.shape[0]]
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def case_data(name: str, likelihood: str, n: int = N) -> list[tuple[Tensor, Tensor]]:
    return batches(*get_data(name, likelihood, n))


@functools.cache
def oracle_dense(name: str, likelihood: str, fisher_type: str, n: int = N) -> Tensor:
    return ref.dense_fisher(get_model(name), case_data(name, likelihood, n), likelihood,
                            fisher_type)


@functools.cache
def oracle_kfac(name: str, likelihood: str, fisher_type: str) -> Tensor:
    model = get_model(name)
    factors = ref.kfac_factors(model, case_data(name, likelihood), likelihood, fisher_type)
    return ref.kronecker_embed(model, factors)


def natgrad_fisher(name: str, likelihood: str, fisher_type: str, structure: str, data=None,
                   **kwargs) -> natgrad.FisherMatrix:
    data = case_data(name, likelihood) if data is None else data
    return natgrad.fisher_matrix(get_model(name), data, likelihood, fisher_type, structure,
                                 **kwargs)


def block_mask(model: nn.Module) -> Tensor:
    """1 on the diagonal block of each module owning trainable parameters, else 0."""
    P = ref.num_params(model)
    mask = torch.zeros(P, P, dtype=torch.float64)
    for _, idx in ref.module_param_indices(model):
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = 1.0
    return mask


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, what: str = "") -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = ref.rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative Frobenius error {err:.3e} > {rtol:.0e}"


# ---------------------------------------------------------------------------------------------
# the oracle checks itself (so that a failure below points at natgrad, not at the oracle)


@pytest.mark.parametrize("name", ["cnn", "seq_mean", "mlp_frozen"])
def test_oracle_layer_gradients_factor_as_g_times_abar(name: str) -> None:
    """∂f_c/∂vec_row([W|b]) = Σₛ J_{aₛ}[c]ᵀ ⊗ āₛ: patches, positions and the index map agree
    with torch.func's Jacobian w.r.t. θ."""
    model = get_model(name)
    x = get_data(name, "gaussian")[0][0]
    J = ref.parameter_jacobian(model, x)
    records = ref.layer_records(model, x)
    for layer, J_a in ref.preactivation_jacobians(model, x).items():
        abar, _ = records[layer]
        expected = torch.einsum("sco,si->coi", J_a, abar).reshape(J.shape[0], -1)
        assert_close(J[:, ref.layer_indices(model, layer)], expected, 1e-12, layer)


def test_oracle_conv_patches_reproduce_conv2d() -> None:
    conv = get_model("cnn").conv1
    h = torch.randn(2, 7, 7, dtype=torch.float64)
    patches = ref.conv_patches(conv, h)
    a = conv(h.unsqueeze(0))[0].detach()  # (out, H', W')
    expected = (patches @ conv.weight.detach().flatten(1).T + conv.bias.detach())
    assert_close(expected.T.reshape(a.shape), a, 1e-12)


def test_oracle_true_fisher_is_expected_outer_product() -> None:
    """E_ŷ[∇θ log p(ŷ) ∇θ log p(ŷ)ᵀ] = Σ JᵀDJ: for categorical, the expectation is a finite
    sum, so the oracle's true Fisher must equal its empirical formula averaged over classes."""
    likelihood = "categorical"
    model = get_model("mlp")
    x, _ = get_data("mlp", likelihood, 3)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    total = 0.0
    for c in range(NUM_CLASSES):
        y = torch.full((3,), c)
        F_c = [torch.outer(g, g) for g in
               (ref.loglik_gradient(model, x[n], y[n], likelihood) for n in range(3))]
        total = total + sum(p[n, c] * F_c[n] for n in range(3)) / 3
    assert_close(total, ref.dense_fisher(model, [(x, None)], likelihood, "true"), 1e-12)


# ---------------------------------------------------------------------------------------------
# exact structures


@pytest.mark.parametrize("fisher_type", EXACT_TYPES)
@pytest.mark.parametrize(("name", "likelihood"), CASES)
def test_dense_matches_oracle(name: str, likelihood: str, fisher_type: str) -> None:
    F = natgrad_fisher(name, likelihood, fisher_type, "dense")
    assert F.num_params == ref.num_params(get_model(name))
    assert_close(F.to_dense(), oracle_dense(name, likelihood, fisher_type))


@pytest.mark.parametrize("fisher_type", EXACT_TYPES)
@pytest.mark.parametrize(("name", "likelihood"), CASES)
def test_block_diagonal_is_dense_module_blocks(name: str, likelihood: str,
                                               fisher_type: str) -> None:
    F = natgrad_fisher(name, likelihood, fisher_type, "block_diagonal")
    expected = oracle_dense(name, likelihood, fisher_type) * block_mask(get_model(name))
    assert_close(F.to_dense(), expected)


@pytest.mark.parametrize("fisher_type", EXACT_TYPES)
@pytest.mark.parametrize(("name", "likelihood"), CASES)
def test_diagonal_is_dense_diagonal(name: str, likelihood: str, fisher_type: str) -> None:
    F = natgrad_fisher(name, likelihood, fisher_type, "diagonal")
    expected = oracle_dense(name, likelihood, fisher_type).diagonal().diag()
    assert_close(F.to_dense(), expected)


@pytest.mark.parametrize("fisher_type", EXACT_TYPES)
@pytest.mark.parametrize(("name", "likelihood"), CASES)
def test_kfac_matches_oracle_factors(name: str, likelihood: str, fisher_type: str) -> None:
    F = natgrad_fisher(name, likelihood, fisher_type, "kfac")
    assert_close(F.to_dense(), oracle_kfac(name, likelihood, fisher_type))


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher_type", EXACT_TYPES)
@pytest.mark.parametrize("likelihood", ref.LIKELIHOODS)
@pytest.mark.parametrize("name", LINEAR_2D)
def test_kronecker_exact_for_one_example(name: str, likelihood: str, fisher_type: str,
                                         structure: str) -> None:
    """N = 1 and Linear layers with 2-D inputs: the layer block is exactly G ⊗ Ā (the note's
    factored FIM), and so is EK-FAC's."""
    data = case_data(name, likelihood, 1)
    F = natgrad_fisher(name, likelihood, fisher_type, structure, data=data)
    dense = oracle_dense(name, likelihood, fisher_type, 1)
    model = get_model(name)
    mask = torch.zeros_like(dense)
    for layer, _ in ref.kfac_layers(model):
        idx = ref.layer_indices(model, layer)
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = 1.0
    assert_close(F.to_dense(), dense * mask)


def _layer_blocks(model: nn.Module, M: Tensor) -> dict[str, Tensor]:
    return {layer: M[ref.layer_indices(model, layer)][:, ref.layer_indices(model, layer)]
            for layer, _ in ref.kfac_layers(model)}


def _check_ekfac(model: nn.Module, ekfac: natgrad.FisherMatrix, kfac: natgrad.FisherMatrix,
                 exact: Tensor) -> None:
    E, K = ekfac.to_dense(), kfac.to_dense()
    exact_blocks = _layer_blocks(model, exact)
    for layer, block in exact_blocks.items():
        e_err = torch.linalg.norm(_layer_blocks(model, E)[layer] - block).item()
        k_err = torch.linalg.norm(_layer_blocks(model, K)[layer] - block).item()
        assert e_err <= k_err + 1e-12, f"{layer}: EK-FAC error {e_err:.3e} > K-FAC {k_err:.3e}"
    mask = torch.zeros_like(E)
    for layer, _ in ref.kfac_layers(model):
        idx = ref.layer_indices(model, layer)
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = 1.0
    assert torch.count_nonzero(E * (1 - mask)) == 0, "EK-FAC has entries outside layer blocks"
    expected_trace = sum(b.trace() for b in exact_blocks.values())
    assert_close(ekfac.trace(), expected_trace)


@pytest.mark.parametrize("fisher_type", EXACT_TYPES)
@pytest.mark.parametrize(("name", "likelihood"), CASES)
def test_ekfac_beats_kfac_and_keeps_trace(name: str, likelihood: str, fisher_type: str) -> None:
    model = get_model(name)
    ekfac = natgrad_fisher(name, likelihood, fisher_type, "ekfac")
    kfac = natgrad_fisher(name, likelihood, fisher_type, "kfac")
    _check_ekfac(model, ekfac, kfac, oracle_dense(name, likelihood, fisher_type))


# ---------------------------------------------------------------------------------------------
# Monte Carlo


MC_CASES = [("mlp", lik) for lik in ref.LIKELIHOODS] + [
    ("cnn", "categorical"), ("seq_out", "bernoulli"), ("seq_mean", "gaussian"),
]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(("name", "likelihood"), MC_CASES)
def test_mc_equals_oracle_on_the_same_draws(name: str, likelihood: str, structure: str) -> None:
    """"mc" with a seeded generator equals the oracle's Fisher built from the same ŷ (drawn
    once per batch, in batch order, as natgrad documents)."""
    model, data, S = get_model(name), case_data(name, likelihood), 3
    F = natgrad_fisher(name, likelihood, "mc", structure, mc_samples=S,
                       generator=torch.Generator().manual_seed(1234))
    samples = ref.sample_targets(model, data, likelihood, S, torch.Generator().manual_seed(1234))
    if structure == "kfac":
        factors = ref.kfac_factors(model, data, likelihood, "samples", samples)
        assert_close(F.to_dense(), ref.kronecker_embed(model, factors))
        return
    dense = ref.dense_fisher_from_samples(model, data, likelihood, samples)
    if structure == "dense":
        assert_close(F.to_dense(), dense)
    elif structure == "block_diagonal":
        assert_close(F.to_dense(), dense * block_mask(model))
    elif structure == "diagonal":
        assert_close(F.to_dense(), dense.diagonal().diag())
    else:
        kfac = natgrad_fisher(name, likelihood, "mc", "kfac", mc_samples=S,
                              generator=torch.Generator().manual_seed(1234))
        _check_ekfac(model, F, kfac, dense)


# Tolerance for 2000 draws per example: the MC Fisher is an average of N·S = 16000 rank-one
# terms, so its relative Frobenius error to the true Fisher scales like c/√(S·N) with c ≈ 2-5
# for these models. Measured over seeds 0-19 for every case below: at most 0.038 (dense) and
# 0.026 (kfac), mean ≈ 0.02; the seed is fixed, so the test is deterministic, and 0.1 leaves a
# margin of 2.5× over the worst seed. A wrong sampler fails it: D off by a factor 2, a missing
# 1/√S, or the empirical Fisher in place of the true one give errors of 0.5-1.4 here.
MC_TOL = 0.1


@pytest.mark.parametrize("structure", ["dense", "kfac"])
@pytest.mark.parametrize(("name", "likelihood"), MC_CASES)
def test_mc_converges_to_true_fisher(name: str, likelihood: str, structure: str) -> None:
    F = natgrad_fisher(name, likelihood, "mc", structure, mc_samples=2000,
                       generator=torch.Generator().manual_seed(0))
    expected = (oracle_dense(name, likelihood, "true") if structure == "dense"
                else oracle_kfac(name, likelihood, "true"))
    err = ref.rel_err(F.to_dense(), expected)
    assert err < MC_TOL, f"MC relative error {err:.3f} ≥ {MC_TOL}"


# ---------------------------------------------------------------------------------------------
# operations of every structure against its own to_dense()


def _check_operations(F: natgrad.FisherMatrix, seed: int, dampings: tuple[float, ...]) -> None:
    M = F.to_dense()
    P = F.num_params
    assert M.shape == (P, P) and M.dtype == torch.float64
    assert_close(M.T, M, 1e-13, "symmetry")
    v = torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert_close(F.mv(v), M @ v, what="mv")
    assert_close(F.trace(), M.trace(), what="trace")
    eye = torch.eye(P, dtype=torch.float64)
    for damping in dampings:
        x = F.solve(v, damping)
        assert_close((M + damping * eye) @ x, v, what=f"solve(δ={damping})")


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(("name", "likelihood"), CASES)
def test_operations_agree_with_to_dense(name: str, likelihood: str, structure: str) -> None:
    F = natgrad_fisher(name, likelihood, "true", structure)
    assert F.num_params == ref.num_params(get_model(name))
    _check_operations(F, seed=7, dampings=(1e-3, 1.0))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    damping=st.floats(1e-3, 1e3),
    structure=st.sampled_from(STRUCTURES),
    case=st.sampled_from([("cnn", "categorical"), ("mlp_nobias", "bernoulli"),
                          ("seq_mean", "gaussian")]),
    seed=st.integers(0, 2**16),
)
def test_solve_inverts_damped_matrix(damping: float, structure: str, case: tuple[str, str],
                                     seed: int) -> None:
    F = natgrad_fisher(*case, "empirical", structure)
    _check_operations(F, seed=seed, dampings=(damping,))


# ---------------------------------------------------------------------------------------------
# θ: batching, frozen parameters


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    cuts=st.sets(st.integers(1, N - 1), max_size=4),
    structure=st.sampled_from(STRUCTURES),
    fisher_type=st.sampled_from(EXACT_TYPES),
    case=st.sampled_from([("cnn", "categorical"), ("seq_mean", "bernoulli"),
                          ("mlp_frozen", "gaussian"), ("seq_out", "gaussian")]),
)
def test_batch_split_does_not_matter(cuts: set[int], structure: str, fisher_type: str,
                                     case: tuple[str, str]) -> None:
    x, y = get_data(*case)
    one = natgrad_fisher(*case, fisher_type, structure, data=[(x, y)])
    split = natgrad_fisher(*case, fisher_type, structure, data=batches(x, y, tuple(cuts)))
    assert_close(split.to_dense(), one.to_dense())
    assert_close(split.trace(), one.trace())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_frozen_parameters_are_left_out_of_theta(structure: str) -> None:
    """Freezing parameters restricts θ: the Fisher is the full model's Fisher restricted to the
    trainable entries (for dense), and each structure matches the oracle on the frozen model."""
    full = get_model("mlp")
    frozen = _mlp().double()
    frozen.load_state_dict(full.state_dict())
    frozen[0].weight.requires_grad_(False)
    frozen[2].requires_grad_(False)
    data = case_data("mlp", "categorical")
    keep = torch.cat([torch.arange(sl.start, sl.stop) for name, sl in ref.theta_slices(full).items()
                      if name not in ("0.weight", "2.weight", "2.bias")])
    F = natgrad.fisher_matrix(frozen, data, "categorical", "true", structure)
    assert F.num_params == keep.numel() == ref.num_params(frozen)
    dense = ref.dense_fisher(frozen, data, "categorical", "true")
    assert_close(dense, oracle_dense("mlp", "categorical", "true")[keep][:, keep], 1e-12)
    if structure == "dense":
        expected = dense
    elif structure == "block_diagonal":
        expected = dense * block_mask(frozen)
    elif structure == "diagonal":
        expected = dense.diagonal().diag()
    elif structure == "kfac":
        expected = ref.kronecker_embed(frozen, ref.kfac_factors(frozen, data, "categorical"))
    else:
        kfac = natgrad.fisher_matrix(frozen, data, "categorical", "true", "kfac")
        _check_ekfac(frozen, F, kfac, dense)
        return
    assert_close(F.to_dense(), expected)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("case", [("cnn", "categorical"), ("seq_out", "gaussian")])
def test_kfac_rows_sent_backward_in_groups_match_the_oracle(
        monkeypatch: pytest.MonkeyPatch, structure: str, case: tuple[str, str]) -> None:
    """With the bound on g's elements so low that each of the K true-Fisher rows goes
    backward on its own (and the Gram rows are buffered across those passes), the factors
    are the oracle's to 1e-12, as with all rows in one pass."""
    from natgrad.fisher import compute

    one = natgrad_fisher(*case, "true", structure)
    monkeypatch.setattr(compute, "_ROW_GROUP_ELEMENTS", 1)
    grouped = natgrad_fisher(*case, "true", structure)
    assert_close(grouped.to_dense(), one.to_dense(), 1e-12)
    if structure == "kfac":
        assert_close(grouped.to_dense(), oracle_kfac(*case, "true"), 1e-12)
