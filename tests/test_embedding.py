"""``nn.Embedding`` under K-FAC and EK-FAC: Ā = diag(f) (token frequencies), block G ⊗ diag(f)
on vec(W) with W = weightᵀ, exact damped solve Q_G [(Q_Gᵀ V) ⊘ (s_G fᵀ + δ)] — checked against
the float64 oracle (tests/reference.py, torch.func, no natgrad code), in ``fisher_matrix`` and
in the optimizers; memory shapes at vocabulary 50,000; fallbacks; checkpoints; two ranks.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import natgrad
import reference as ref
from natgrad import _diagonal_inputs
from natgrad.layers import LayerKind, register_layer_kind, registered_kinds
from natgrad.optim import EKFAC, KFAC, KFACPreconditioner

pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64


class Pooled(nn.Module):
    """Tokens (N, T) → Embedding → tanh → mean over positions → Linear: logits (N, C)."""

    def __init__(self, vocab: int = 7, dim: int = 3, classes: int = 4,
                 padding_idx: int | None = None, **embedding: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx, **embedding)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x)).mean(-2))


class TinyLM(nn.Module):
    """Embedding → Linear → tanh → Linear → untied head, logits flattened to (N·T, vocab)."""

    def __init__(self, vocab: int = 12, dim: int = 8, hidden: int = 16, tied: bool = False
                 ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        h = h + self.proj(torch.tanh(self.mix(h)))
        return self.head(h).reshape(-1, self.head.out_features)


def _model(seed: int = 0, **kw: object) -> Pooled:
    torch.manual_seed(seed)
    return Pooled(**kw).double()


def _tokens(n: int = 5, t: int = 4, vocab: int = 7, seed: int = 1) -> Tensor:
    """Tokens with repeats inside examples and some tokens never seen (vocab − 1 unused)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (n, t), generator=g)


def _block(model: nn.Module, M: Tensor, name: str = "emb") -> Tensor:
    idx = ref.embedding_indices(model, name)
    return M[idx.unsqueeze(1), idx.unsqueeze(0)]


def _dense_block(G: Tensor, A: Tensor) -> Tensor:
    return torch.kron(G, A)


# -- fisher_matrix against the oracle ------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_kfac_block_is_g_kron_diag_f_from_the_definitions(padding_idx: int | None) -> None:
    model = _model(padding_idx=padding_idx)
    x = _tokens()
    Fk = natgrad.fisher_matrix(model, [(x, None)], structure="kfac")
    G, A = ref.embedding_kfac_factors(model, [(x, None)], "categorical", "emb")
    assert torch.count_nonzero(A - torch.diag(A.diagonal())) == 0  # Ā is diagonal
    assert Fk.A[0].shape == (7,)  # stored as the vector f
    torch.testing.assert_close(Fk.A[0], A.diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(Fk.G[0], G, rtol=1e-10, atol=1e-12)
    dense = Fk.to_dense()
    expected = _dense_block(G, A)
    assert ref.rel_err(_block(model, dense), expected) < 1e-10
    # mv, solve and trace are those of the dense matrix
    v = torch.randn(Fk.num_params, dtype=f64)
    torch.testing.assert_close(Fk.mv(v), dense @ v, rtol=1e-10, atol=1e-12)
    damped = dense + 0.1 * torch.eye(Fk.num_params, dtype=f64)
    torch.testing.assert_close(Fk.solve(v, 0.1), torch.linalg.solve(damped, v), rtol=1e-9,
                               atol=1e-11)
    torch.testing.assert_close(Fk.trace(), dense.trace(), rtol=1e-12, atol=0)
    if padding_idx is not None:
        assert Fk.A[0][padding_idx] == 0  # the padding row gets no curvature


def test_kfac_block_is_exact_for_one_example_with_one_position() -> None:
    """ā = e_x is fixed, so F_l = E[g gᵀ] ⊗ e_x e_xᵀ = G ⊗ Ā exactly (one example, one
    position); with several examples K-FAC is an approximation (checked to differ)."""
    model = _model()
    one = torch.tensor([[3]])
    Fk = natgrad.fisher_matrix(model, [(one, None)], structure="kfac").to_dense()
    exact = ref.dense_fisher(model, [(one, None)], "categorical")
    assert ref.rel_err(_block(model, Fk), _block(model, exact)) < 1e-10
    many = _tokens()
    Fk = natgrad.fisher_matrix(model, [(many, None)], structure="kfac").to_dense()
    exact = ref.dense_fisher(model, [(many, None)], "categorical")
    assert ref.rel_err(_block(model, Fk), _block(model, exact)) > 1e-3


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_ekfac_scales_are_the_diagonal_of_the_exact_block_in_the_basis(
        padding_idx: int | None) -> None:
    """S = diag(Qᵀ F_l Q) with Q = Q_G ⊗ I (George et al. 2018) and F_l the oracle's exact
    block, with tokens repeated inside examples (their gradients add before squaring)."""
    model = _model(padding_idx=padding_idx)
    x = _tokens(n=6, t=5)
    x[0, :3] = 4  # a token three times in one example
    E = natgrad.fisher_matrix(model, [(x, None)], structure="ekfac")
    assert E.Q_A[0] is None
    G, _ = ref.embedding_kfac_factors(model, [(x, None)], "categorical", "emb")
    Q_G = E.Q_G[0]
    torch.testing.assert_close(Q_G.T @ G @ Q_G, torch.diag((Q_G.T @ G @ Q_G).diagonal()),
                               rtol=0, atol=1e-12)  # the eigenbasis of the oracle's G
    exact = _block(model, ref.dense_fisher(model, [(x, None)], "categorical"))
    Q = torch.kron(Q_G.contiguous(), torch.eye(7, dtype=f64))
    expected = (Q.T @ exact @ Q).diagonal().reshape(3, 7)
    torch.testing.assert_close(E.scales[0], expected, rtol=1e-10, atol=1e-13)
    dense = E.to_dense()
    v = torch.randn(E.num_params, dtype=f64)
    torch.testing.assert_close(E.mv(v), dense @ v, rtol=1e-10, atol=1e-12)
    damped = dense + 0.05 * torch.eye(E.num_params, dtype=f64)
    torch.testing.assert_close(E.solve(v, 0.05), torch.linalg.solve(damped, v), rtol=1e-9,
                               atol=1e-11)


def test_projected_second_moment_matches_one_hot_rows() -> None:
    """The scatter over (example, token) pairs equals Σₙₖ (Q_Gᵀ Γₙₖ)² with Γₙₖ built from
    explicit one-hot rows; negative indices (padding) contribute nothing."""
    g = torch.Generator().manual_seed(0)
    K, N, S, d, v = 2, 4, 6, 3, 9
    x = torch.randint(-1, v, (N, S, 1), generator=g)
    grads = torch.randn(K, N, S, d, generator=g, dtype=f64)
    Q_G = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))[0]
    onehot = F.one_hot(x.clamp(min=0)[..., 0], v).to(f64) * (x >= 0)
    gamma = torch.einsum("knso,nsi->knoi", grads, onehot)
    expected = (Q_G.T @ gamma).square().sum((0, 1))
    got = _diagonal_inputs.projected_second_moment(x, grads, Q_G, v)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    counts = _diagonal_inputs.input_counts(x, v, f64)
    torch.testing.assert_close(counts, onehot.sum((0, 1)), rtol=0, atol=0)


# -- the optimizers' step against the dense solve ------------------------------------------------
def _first_step(make_opt, padding_idx: int | None = None, lr: float = 0.5
                ) -> tuple[nn.Module, Tensor, Tensor, Tensor, object]:
    """One step from a fresh optimizer with the true Fisher: (model before, tokens, ∇W with
    W = weightᵀ, the step ΔW, the optimizer)."""
    model = _model(padding_idx=padding_idx)
    before = _model(padding_idx=padding_idx)
    x = _tokens(n=8, t=5)
    y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
    opt = make_opt(model, lr)
    F.cross_entropy(model(x), y).backward()
    grad = model.emb.weight.grad.T.clone()
    opt.step()
    return before, x, grad, (model.emb.weight - before.emb.weight).detach().T, opt


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_matrix_free_fisher_is_the_dense_one_with_a_padding_row(padding_idx: int | None
                                                                ) -> None:
    """Forward mode sees the padding row (it is used), the gradients do not (0 by convention):
    matrix_free must use the gradients' J both ways, or F v is neither dense F v nor
    symmetric (found by a red team: entries off by 0.06 of 0.24)."""
    model = _model(padding_idx=padding_idx)
    with torch.no_grad():
        model.emb.weight.normal_()  # a non-zero padding row (e.g. loaded embeddings)
    x = _tokens()
    x[:, 0] = 2  # the padding token in every example
    expected = ref.dense_fisher(model, [(x, None)], "categorical")
    free = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "matrix_free")
    M = free.to_dense()
    assert ref.rel_err(M, expected) < 1e-10
    torch.testing.assert_close(M, M.T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_kfac_step_is_the_dense_damped_solve(padding_idx: int | None) -> None:
    delta, lr = 0.03, 0.5
    before, x, grad, step, opt = _first_step(
        lambda m, lr: KFAC(m, lr=lr, damping=delta, fisher_type="true"), padding_idx, lr)
    G, A = ref.embedding_kfac_factors(before, [(x, None)], "categorical", "emb")
    M = _dense_block(G, A) + delta * torch.eye(G.shape[0] * A.shape[0], dtype=f64)
    expected = -lr * torch.linalg.solve(M, grad.reshape(-1)).reshape(grad.shape)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)
    st = opt.preconditioner.curvature.state["emb"]
    assert st["A"].shape == (7,) and "Q_A" not in st
    if padding_idx is not None:
        assert torch.count_nonzero(step[:, padding_idx]) == 0


def test_factored_kfac_step_is_the_dense_tikhonov_solve() -> None:
    """(G + √δ/π I)⁻¹ ∇W (diag(f) + π√δ I)⁻¹, π² = (Σf / vocab) / (tr G / d)."""
    delta, lr = 0.03, 0.5
    before, x, grad, step, _ = _first_step(
        lambda m, lr: KFAC(m, lr=lr, damping=delta, fisher_type="true",
                           damping_mode="factored"), None, lr)
    G, A = ref.embedding_kfac_factors(before, [(x, None)], "categorical", "emb")
    pi = math.sqrt(float(A.trace() / A.shape[0]) / float(G.trace() / G.shape[0]))
    r = math.sqrt(delta)
    eye = torch.eye
    expected = -lr * torch.linalg.solve(G + r / pi * eye(3, dtype=f64), grad) @ torch.linalg.inv(
        A + pi * r * eye(7, dtype=f64))
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)


def test_ekfac_step_is_the_dense_solve_in_the_eigenbasis() -> None:
    """−η Q (diag(S) + δI)⁻¹ Qᵀ ∇ with Q = Q_G ⊗ I and S = diag(Qᵀ F_l Q) of the oracle."""
    delta, lr = 0.03, 0.5
    before, x, grad, step, opt = _first_step(
        lambda m, lr: EKFAC(m, lr=lr, damping=delta, fisher_type="true"), None, lr)
    st = opt.preconditioner.curvature.state["emb"]
    assert st["S"].shape == (3, 7) and "Q_A" not in st
    G, _ = ref.embedding_kfac_factors(before, [(x, None)], "categorical", "emb")
    torch.testing.assert_close(st["G"], G, rtol=1e-10, atol=1e-12)
    Q = torch.kron(st["Q_G"].contiguous(), torch.eye(7, dtype=f64))
    exact = _block(before, ref.dense_fisher(before, [(x, None)], "categorical"))
    S = (Q.T @ exact @ Q).diagonal()
    expected = -lr * (Q @ ((Q.T @ grad.reshape(-1)) / (S + delta))).reshape(grad.shape)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda m: KFAC(m, lr=0.3, damping=1e-2, momentum=0.9),
    lambda m: KFAC(m, lr=0.3, damping=1e-2, damping_mode="factored"),
    lambda m: EKFAC(m, lr=0.3, damping=1e-2, momentum=0.9),
    lambda m: KFAC(m, lr=0.3, damping=1e-2, adaptive_damping=True,
                   damping_adaptation_period=2),
])
def test_padding_row_is_never_updated(make) -> None:
    """padding_idx gets no gradient in PyTorch and no curvature here (f = 0, S = 0): with
    damping its preconditioned gradient is exactly 0, so the row never moves."""
    model = _model(padding_idx=0)
    opt = make(model)
    pad = model.emb.weight[0].detach().clone()
    start = model.emb.weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        x = torch.randint(0, 7, (8, 5), generator=g)
        x[:, -1] = 0  # padding at every example's end
        y = torch.randint(0, 4, (8,), generator=g)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert torch.equal(model.emb.weight[0], pad)
    assert (model.emb.weight[1:] - start[1:]).abs().max() > 1e-3
    assert "emb" in {layer.name for layer in opt.preconditioner.layers}


# -- memory shapes at a real vocabulary size -----------------------------------------------------
class _Largest(TorchDispatchMode):
    """Records the largest tensor any operation creates (forward, backward and step)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_vocabulary_50000_allocates_nothing_quadratic(cls) -> None:
    """vocab 50,000 × d 64: Ā is a vector, no tensor reaches vocab·d twice over (vocab² would
    be 2.5·10⁹ entries), and a step takes seconds."""
    vocab, dim = 50_000, 64
    torch.manual_seed(0)
    model = Pooled(vocab=vocab, dim=dim, classes=10)
    opt = cls(model, lr=0.1, damping=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (32, 16), generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    start = time.perf_counter()
    largest = _Largest()
    with largest:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    seconds = time.perf_counter() - start
    st = opt.preconditioner.curvature.state["emb"]
    assert st["A"].shape == (vocab,) and st["s_A"].shape == (vocab,)
    assert st["G"].shape == (dim, dim) and "Q_A" not in st
    if cls is EKFAC:
        assert st["S"].shape == (dim, vocab)
    assert vocab * dim <= largest.numel <= 2 * vocab * dim, largest.numel  # ops were seen
    assert seconds < 60, f"two steps took {seconds:.1f} s"
    assert torch.isfinite(model.emb.weight).all()


# -- what is not covered -------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "reason"), [
    ({"sparse": True}, "sparse=True"),
    ({"max_norm": 1.0}, "max_norm"),
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
])
def test_unsupported_variants_take_the_fallback_with_the_reason(options, reason) -> None:
    model = _model(**options)
    opt = KFAC(model, lr=0.1)
    assert [layer.name for layer in opt.preconditioner.layers] == ["out"]
    text = repr(opt)
    line = next(line for line in text.splitlines() if line.strip().startswith("emb"))
    assert reason in line and "plain SGD" in line, text
    with pytest.raises(ValueError, match=reason):
        natgrad.fisher_matrix(model, [(_tokens(), None)], structure="kfac")
    if not options.get("sparse"):  # SGD's fallback step cannot take sparse gradients
        F.cross_entropy(model(_tokens()), torch.zeros(5, dtype=torch.long)).backward()
        opt.step()


def test_tied_embedding_and_head_stay_on_the_fallback() -> None:
    """GPT-style tying: both owners of the weight take the fallback, the rest is covered."""
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    opt = KFAC(model, lr=0.1)
    assert [layer.name for layer in opt.preconditioner.layers] == ["mix", "proj"]
    assert "emb (Embedding, shares parameters with head)" in repr(opt)


def test_a_diagonal_kind_with_a_trainable_bias_is_not_covered() -> None:
    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3))
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x: Tensor) -> Tensor:
            return self.weight[x] + self.bias

    class BiasedKind(LayerKind):
        name = "Biased"
        diagonal_inputs = True

        def matches(self, module: nn.Module) -> bool:
            return isinstance(module, Biased)

    kind = register_layer_kind(BiasedKind())
    try:
        model = nn.Sequential(Biased(), nn.Linear(3, 2))
        opt = KFAC(model, lr=0.1)
        assert [layer.name for layer in opt.preconditioner.layers] == ["1"]
        assert "diagonal inputs and a bias" in repr(opt)
    finally:
        from natgrad.layers import base

        base._KINDS.remove(kind)
    assert kind not in registered_kinds()


# -- training, checkpoints, damping 0, reuse -----------------------------------------------------
def _lm_batches(steps: int, vocab: int = 12, n: int = 16, t: int = 9) -> list[Tensor]:
    """Sequences of a fixed rule x_{t+1} = (3 x_t + 1) mod vocab from random starts."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        seq = [torch.randint(0, vocab, (n,), generator=g)]
        for _ in range(t - 1):
            seq.append((3 * seq[-1] + 1) % vocab)
        out.append(torch.stack(seq, 1))
    return out


def _lm_step(model: nn.Module, opt, batch: Tensor) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(batch[:, :-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_tiny_language_model_trains_with_the_embedding_covered(cls) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = cls(model, lr=0.1, damping=0.1, momentum=0.5)
    assert [layer.name for layer in opt.preconditioner.layers] == ["emb", "mix", "proj", "head"]
    assert "emb: Embedding 8x12 ->" in repr(opt)
    losses = [_lm_step(model, opt, batch) for batch in _lm_batches(40)]
    assert losses[-1] < 0.05 * losses[0], losses
    assert opt.skipped_steps == 0


class OneHotLM(nn.Module):
    """TinyLM with the embedding replaced by a bias-free Linear on one-hot rows: the same
    function, and a Linear layer whose dense Ā is exactly diag(f)."""

    def __init__(self, lm: TinyLM) -> None:
        super().__init__()
        vocab, dim = lm.emb.weight.shape
        self.emb = nn.Linear(vocab, dim, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(lm.emb.weight.T)
        self.mix, self.proj, self.head = lm.mix, lm.proj, lm.head

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(F.one_hot(x, self.emb.in_features).to(self.emb.weight.dtype))
        h = h + self.proj(torch.tanh(self.mix(h)))
        return self.head(h).reshape(-1, self.head.out_features)


@pytest.mark.parametrize(("cls", "options"), [
    (KFAC, {"momentum": 0.5}), (KFAC, {"damping_mode": "factored"}), (EKFAC, {}),
])
def test_embedding_steps_equal_a_linear_layer_on_one_hot_rows(cls, options) -> None:
    """The embedding path (Ā as a vector, no eigendecomposition of it) takes the same steps as
    the generic dense path on the equivalent one-hot Linear layer (where the vocab × vocab
    Ā is formed and eigendecomposed)."""
    torch.manual_seed(0)
    model = TinyLM().double()
    torch.manual_seed(0)
    other = OneHotLM(TinyLM()).double()
    opt = cls(model, lr=0.05, damping=0.1, fisher_type="true", inverse_update_period=2,
              **options)
    opt_other = cls(other, lr=0.05, damping=0.1, fisher_type="true", inverse_update_period=2,
                    **options)
    for batch in _lm_batches(5):
        assert _lm_step(model, opt, batch) == pytest.approx(_lm_step(other, opt_other, batch),
                                                            rel=1e-10)
    torch.testing.assert_close(model.emb.weight.T, other.emb.weight, rtol=1e-9, atol=1e-12)
    torch.manual_seed(0)
    assert (model.emb.weight - TinyLM().double().emb.weight).abs().max() > 1e-3


@pytest.mark.parametrize(("cls", "options"), [
    (KFAC, {"momentum": 0.5}), (KFAC, {"damping_mode": "factored"}), (EKFAC, {}),
])
def test_checkpoint_round_trip_is_bitwise(cls, options) -> None:
    batches = _lm_batches(8)
    torch.manual_seed(0)
    model = TinyLM()
    opt = cls(model, lr=0.1, damping=0.1, inverse_update_period=3,
              generator=torch.Generator().manual_seed(0), **options)
    for batch in batches[:4]:
        _lm_step(model, opt, batch)
    buffer = io.BytesIO()  # a real round trip: a state_dict shares the optimizer's tensors
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    state = checkpoint["optim"]
    curvature = state["natgrad"]["curvature"]["layers"]["emb"]
    assert curvature["A"].shape == (12,) and "Q_A" not in curvature
    torch.manual_seed(1)
    other = TinyLM()
    other.load_state_dict(checkpoint["model"])
    resumed = cls(other, lr=0.1, damping=0.1, inverse_update_period=3,
                  generator=torch.Generator().manual_seed(7), **options)
    resumed.load_state_dict(state)
    for batch in batches[4:]:
        _lm_step(model, opt, batch)
        _lm_step(other, resumed, batch)
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
    # a state whose embedding factor is a matrix does not fit, and nothing is loaded
    bad = opt.state_dict()
    bad["natgrad"]["curvature"]["layers"]["emb"]["A"] = torch.eye(12)
    fresh = cls(TinyLM(), lr=0.1, damping=0.1, inverse_update_period=3, **options)
    with pytest.raises(ValueError, match=r"A of layer 'emb' of the state has shape \(12, 12\)"):
        fresh.load_state_dict(bad)
    assert fresh.preconditioner.curvature.state["emb"] == {}


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_damping_zero_refuses_unseen_tokens_and_changes_nothing(mode: str) -> None:
    """f_j = 0 for a token never seen: G ⊗ diag(f) is singular, so damping 0 raises."""
    model = _model()
    opt = KFAC(model, lr=0.1, damping=0.0, damping_mode=mode)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(_tokens()), torch.zeros(5, dtype=torch.long)).backward()
    with pytest.raises(ValueError, match=r"damping=0 but the .* of layer 'emb' is singular"):
        opt.step()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert opt.preconditioner.curvature.state["emb"] == {}


@pytest.mark.parametrize("cls,options", [
    (KFACPreconditioner, {}), (KFACPreconditioner, {"damping_mode": "factored"}),
    (natgrad.optim.EKFACPreconditioner, {}),
])
def test_curvature_mv_is_the_block_product(cls, options) -> None:
    model = _model()
    pre = cls(model, damping=1e-2, fisher_type="true", **options)
    F.cross_entropy(model(_tokens()), torch.zeros(5, dtype=torch.long)).backward()
    pre.step()
    layer = pre.layers[0]
    st = pre.curvature.state["emb"]
    V = torch.randn(3, 7, dtype=f64)
    if "S" in st:
        Q = torch.kron(st["Q_G"].contiguous(), torch.eye(7, dtype=f64))
        block = Q @ torch.diag(st["S"].reshape(-1)) @ Q.T
    else:
        G, f = (st["G_frozen"], st["A_frozen"]) if "pi" in st else (st["G"], st["A"])
        block = torch.kron(G, torch.diag(f))
    torch.testing.assert_close(pre.curvature.curvature_mv(layer, V).reshape(-1),
                               block @ V.reshape(-1), rtol=1e-10, atol=1e-12)


def test_a_reused_embedding_moves_to_the_fallback() -> None:
    """An embedding called twice in one forward pass cannot be Kronecker-factored: it moves to
    the fallback at the first pass (its curvature forgotten), the other layers keep K-FAC."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 3)
            self.out = nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.tanh(self.emb(x) + self.emb(x.flip(-1))).mean(-2))

    torch.manual_seed(0)
    model = Twice().double()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(_tokens()), torch.zeros(5, dtype=torch.long)).backward()
            opt.step()
    assert any("called 2 times" in str(w.message) for w in caught)
    assert [layer.name for layer in opt.preconditioner.layers] == ["out"]
    assert "emb" not in opt.preconditioner.curvature.state


# -- two ranks ----------------------------------------------------------------------------------
def _dist_train(kind: str, rank: int, world: int) -> list[Tensor]:
    torch.manual_seed(0)
    model = Pooled(vocab=9, dim=4, classes=3, padding_idx=0).double()
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if kind == "ekfac":
        opt = EKFAC(wrapped, lr=0.2, damping=0.05, fisher_type="true", inverse_update_period=3)
    else:
        opt = KFAC(wrapped, lr=0.2, damping=0.05, fisher_type="true", inverse_update_period=3,
                   damping_mode="factored" if kind == "factored" else "exact", momentum=0.5)
    g = torch.Generator().manual_seed(1)
    share = 8 // world
    for _ in range(6):
        x = torch.randint(0, 9, (8, 5), generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        rows = slice(rank * share, (rank + 1) * share)
        opt.zero_grad()
        F.cross_entropy(wrapped(x[rows]), y[rows]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _dist_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        torch.save({kind: _dist_train(kind, rank, world) for kind in DIST_KINDS},
                   f"{out}.rank{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


DIST_KINDS = ("kfac", "factored", "ekfac")


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """The vector Ā and the EK-FAC scales are summed over ranks: K-FAC (exact and factored)
    and EK-FAC give the same parameters as one process on the whole batch."""
    out = str(tmp_path / "dist")
    mp.start_processes(_dist_worker, args=(2, f"{out}.store", out), nprocs=2, join=True,
                       start_method="spawn")
    for kind in DIST_KINDS:
        single = _dist_train(kind, 0, 1)
        torch.manual_seed(0)
        assert (single[0] - Pooled(vocab=9, dim=4, classes=3, padding_idx=0).double()
                .emb.weight).abs().max() > 1e-3  # the run moved
        for r in range(2):
            got = torch.load(f"{out}.rank{r}", weights_only=True)[kind]
            for p, q in zip(got, single, strict=True):
                assert (p - q).norm() / q.norm() < 1e-10, kind


def test_prong_preconditioner_leaves_the_embedding_gradient_alone() -> None:
    """PRONG whitens dense inputs: an embedding is listed as not whitened and keeps its
    gradient, the Linear after it is preconditioned."""
    model = _model()
    data = [_tokens(n=16, seed=s) for s in range(2)]
    pre = natgrad.nn.PRONGPreconditioner(model, data, period=5, num_samples=32)
    assert [layer.name for layer in pre.layers] == ["out"]
    assert any(u.startswith("emb (Embedding") for u in pre.unsupported)
    F.cross_entropy(model(_tokens()), torch.zeros(5, dtype=torch.long)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    assert torch.equal(model.emb.weight.grad, grads["emb.weight"])
    assert not torch.equal(model.out.weight.grad, grads["out.weight"])
