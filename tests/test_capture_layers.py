"""Capture on the models users have: in-place activations, tied and shared weights, the
example dimension of sequence layouts, empty batches, and layer kinds (adapters).

The per-example definitions used here are computed in this file with torch.func (never
natgrad): for the true Fisher, EK-FAC's scales in a basis Q = Q_G ⊗ Q_A are
S = diag(Qᵀ F_l Q) with F_l the exact layer block of F = (1/M) Σ_i J_iᵀ D_i J_i over the M
rows of the model's output (George et al. 2018), whatever layout the layers keep examples in.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import natgrad
from natgrad.optim import EKFAC, KFAC, EKFACPreconditioner, KFACPreconditioner


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """float64 models and data (restored afterwards); one thread for these tiny problems."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def _exact_fisher(model: nn.Module, x: Tensor) -> Tensor:
    """F = (1/M) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i over the M rows of the (M, C) logits."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    f = functional_call(model, params, (x,)).detach()
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.reshape(*f.shape, -1) for j in jac.values()], -1)  # (M, C, P)
    p = f.softmax(-1)
    D = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("mcp,mcd,mdq->pq", J, D, J) / f.shape[0]


def _theta_index(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = slice(start, start + p.numel())
            start += p.numel()
    return out


def _layer_block_indices(model: nn.Module, name: str) -> Tensor:
    """θ indices of vec_row([W | b]) of a Linear layer."""
    sl = _theta_index(model)
    w, b = sl[f"{name}.weight"], sl[f"{name}.bias"]
    out = b.stop - b.start
    return torch.cat([torch.arange(w.start, w.stop).view(out, -1),
                      torch.arange(b.start, b.stop).view(out, 1)], 1).flatten()


# -- 1. in-place activations -------------------------------------------------------------------
def _inplace_pair(conv: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if conv:
        plain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 5 * 5, 4), nn.ReLU(), nn.Linear(4, 3))
    else:
        plain = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                              nn.Linear(6, 3))
    inplace = copy.deepcopy(plain)
    for i, m in enumerate(inplace):
        if isinstance(m, nn.ReLU):
            inplace[i] = nn.ReLU(inplace=True)
    return plain, inplace


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("fisher_type", ["mc", "true", "empirical"])
@pytest.mark.parametrize("make", [
    lambda m, g: KFAC(m, lr=0.3, damping=1e-2, fisher_type=g[0], generator=g[1]),
    lambda m, g: EKFAC(m, lr=0.3, damping=1e-2, fisher_type=g[0], generator=g[1]),
    lambda m, g: KFACPreconditioner(m, damping=1e-2, fisher_type=g[0], generator=g[1]),
], ids=["KFAC", "EKFAC", "KFACPreconditioner"])
def test_inplace_relu_first_step_works_and_equals_plain_model(conv, fisher_type, make) -> None:
    """ReLU(inplace=True) right after a layer: no warning, and every step (the first one
    included) equals the step of the same model without ``inplace``."""
    plain, inplace = _inplace_pair(conv)
    opts = [make(m, (fisher_type, torch.Generator().manual_seed(3))) for m in (plain, inplace)]
    sgd = [torch.optim.SGD(m.parameters(), lr=0.3) if isinstance(o, KFACPreconditioner)
           else None for m, o in zip((plain, inplace), opts, strict=True)]
    g = torch.Generator().manual_seed(1)
    shape = (8, 2, 5, 5) if conv else (8, 5)
    for _ in range(3):
        x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (8,), generator=g)
        for model, opt, base in zip((plain, inplace), opts, sgd, strict=True):
            model.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "modified in place" warning
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if base is not None:
                base.step()
        for a, b in zip(plain.parameters(), inplace.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_inplace_layers_are_learned_on_the_first_pass() -> None:
    """Only layers followed by an in-place op keep handing out a copy after the first pass."""
    _, model = _inplace_pair(conv=False)
    opt = KFAC(model, lr=0.1, damping=1e-2)
    F.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    assert opt.preconditioner._capture.protect == {"0", "2"}


# -- 2. shared and tied weights ----------------------------------------------------------------
class _TiedLM(nn.Module):
    """GPT-2 style: the head is registered before the embedding it is tied to."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 11, bias=False)
        self.emb = nn.Embedding(11, 6)
        self.emb.weight = self.head.weight
        self.mid = nn.Linear(6, 6)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


class _TwoShare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _FunctionalUse(nn.Module):
    """A Linear's weight also used through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.out(torch.tanh(F.linear(h, self.a.weight)))


@pytest.mark.parametrize(("make", "inputs", "shared", "kfac"), [
    (_TiedLM, lambda: torch.randint(0, 11, (5,)), {"head.weight"}, ["mid"]),
    (_TwoShare, lambda: torch.randn(5, 4), {"a.weight"}, ["out"]),
    (_FunctionalUse, lambda: torch.randn(5, 4), {"a.weight", "a.bias"}, ["out"]),
])
@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_shared_weights_get_the_fallback_step(make, inputs, shared, kfac, fisher_type) -> None:
    """A weight used by more than its layer gets the documented fallback (plain SGD in KFAC),
    never a K-FAC step built from one of its uses; repr says so truthfully."""
    torch.manual_seed(0)
    model = make()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type=fisher_type)
    x = inputs()
    y = torch.randint(0, 3 if make is not _TiedLM else 11, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    named = dict(model.named_parameters())
    before = {n: named[n].detach().clone() for n in shared}
    grads = {n: named[n].grad.clone() for n in shared}
    opt.step()
    for n in shared:
        torch.testing.assert_close(named[n].detach(), before[n] - 0.1 * grads[n], rtol=0,
                                   atol=1e-15)
    assert [layer.name for layer in opt.preconditioner.layers] == kfac
    text = repr(opt)
    assert "gradient left unchanged" not in text, text
    for line in text.splitlines():
        if any(line.strip().startswith(n.rsplit(".", 1)[0] + " ") for n in shared):
            assert "plain SGD" in line, text


def test_tied_head_is_reported_at_construction() -> None:
    """Tied parameters owned by two modules are found before any forward pass, whichever
    module was registered first."""
    opt = KFAC(_TiedLM(), lr=0.1)
    text = repr(opt)
    assert re.search(r"head \(Linear, shares parameters with emb\): plain SGD", text), text
    assert re.search(r"emb \(Embedding, shares parameters with head\): plain SGD", text), text


def test_fisher_matrix_kfac_refuses_a_weight_used_outside_its_layer() -> None:
    model = _FunctionalUse()
    with pytest.raises(ValueError, match=r"'a' a\.weight.*also used outside the layer"):
        natgrad.fisher_matrix(model, [(torch.randn(5, 4), None)], "categorical", "true",
                              "kfac")


def test_fallback_survives_a_checkpoint() -> None:
    """Layers moved to the fallback at the first pass stay there after load_state_dict into a
    fresh optimizer (no layer mismatch), and the resumed run continues identically."""
    torch.manual_seed(0)
    model = _FunctionalUse()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type="true")
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(model(x), y).backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    fresh = KFAC(clone, lr=0.1, damping=1e-2, fisher_type="true")
    fresh.load_state_dict(state)
    assert [layer.name for layer in fresh.preconditioner.layers] == ["out"]
    for m, o in ((model, opt), (clone, fresh)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


# -- 3. the example dimension ------------------------------------------------------------------
class _SeqModel(nn.Module):
    """Linear layers over (T, N, d) (sequence first) or (N, T, d); logits (N, C) or, with
    ``per_token``, (N·T, C)."""

    def __init__(self, batch_first: bool, per_token: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.per_token = per_token
        self.inp = nn.Linear(3, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.out(torch.tanh(self.inp(x)))
        if self.per_token:
            return (h if self.batch_first else h.transpose(0, 1)).reshape(-1, h.shape[-1])
        return h.mean(1 if self.batch_first else 0)


def _ekfac_scales_oracle(model: nn.Module, x: Tensor, Q_G: Tensor, Q_A: Tensor,
                         name: str) -> Tensor:
    F_ = _exact_fisher(model, x)
    idx = _layer_block_indices(model, name)
    Q = torch.kron(Q_G, Q_A)
    return torch.diagonal(Q.T @ F_[idx][:, idx] @ Q).view(Q_G.shape[0], Q_A.shape[0])


@pytest.mark.parametrize("T", [7, 6])  # T = N = 6: the probe decides between two dims
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
def test_ekfac_scales_follow_the_examples_of_the_output(T, batch_first, per_token) -> None:
    model = _SeqModel(batch_first, per_token)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, T, 3, generator=g)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    E = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "ekfac")
    for i, name in enumerate(("inp", "out")):
        expected = _ekfac_scales_oracle(model, x, E.Q_G[i], E.Q_A[i], name)
        torch.testing.assert_close(E.scales[i], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
def test_ekfac_optimizer_scales_equal_the_per_example_definition(batch_first) -> None:
    model = _SeqModel(batch_first)
    pre = EKFACPreconditioner(model, damping=1e-3, fisher_type="true", ema_decay=0.0)
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(4))
    x = x if batch_first else x.transpose(0, 1).contiguous()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3, 0])).backward()
    pre.step()
    for name in ("inp", "out"):
        st = pre.curvature.state[name]
        expected = _ekfac_scales_oracle(model, x, st["Q_G"], st["Q_A"], name)
        torch.testing.assert_close(st["S"], expected, rtol=1e-9, atol=1e-12)


def test_transformer_encoder_sequence_first_equals_batch_first() -> None:
    """nn.TransformerEncoderLayer with batch_first=False (the default) and True, same weights:
    EK-FAC's scales of every Linear and attention projection agree."""
    torch.manual_seed(0)
    layers = {bf: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=bf)
              for bf in (False, True)}
    layers[True].load_state_dict(layers[False].state_dict())
    x = torch.randn(4, 5, 8)  # (N, T, d)
    scales = {}
    for bf, layer in layers.items():
        torch.manual_seed(1)
        wrapper = _Wrapped(layer, nn.Linear(8, 3), bf)
        pre = EKFACPreconditioner(wrapper, damping=1e-3, fisher_type="true", ema_decay=0.0)
        inp = x if bf else x.transpose(0, 1).contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # nothing takes the fallback
            F.cross_entropy(wrapper(inp), torch.tensor([0, 1, 2, 0])).backward()
        pre.step()
        assert "layer.self_attn.in_proj" in pre.curvature.state
        scales[bf] = {n: st["S"] for n, st in pre.curvature.state.items()}
    assert scales[False].keys() == scales[True].keys() and scales[False]
    for name in scales[False]:
        torch.testing.assert_close(scales[False][name], scales[True][name], rtol=1e-8,
                                   atol=1e-12)


class _Wrapped(nn.Module):
    def __init__(self, layer: nn.Module, head: nn.Module, batch_first: bool) -> None:
        super().__init__()
        self.layer, self.head, self.batch_first = layer, head, batch_first

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1 if self.batch_first else 0))


# -- 9. empty batches --------------------------------------------------------------------------
@pytest.mark.parametrize("fisher_type", ["mc", "true", "empirical"])
def test_empty_batch_forward_does_not_crash(fisher_type: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type=fisher_type)
    out = model(torch.randn(0, 4))
    assert out.shape == (0, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- layer kinds -------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """transformers' Conv1D, as transformers defines it (weight (in, out))."""

    __module__ = "transformers.pytorch_utils"

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def test_conv1d_kfac_equals_the_same_linear() -> None:
    """A GPT-2 Conv1D (weight stored transposed) gets exactly the K-FAC block and step of the
    Linear computing the same function, in θ's own order."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(5, 3), nn.Tanh(), Conv1D(4, 5))
    lin = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    with torch.no_grad():
        for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
            li.weight.copy_(c.weight.T)
            li.bias.copy_(c.bias)
    x = torch.randn(6, 2, 3)
    Fc = natgrad.fisher_matrix(conv, [(x.reshape(-1, 3), None)], "categorical", "true", "kfac")
    Fl = natgrad.fisher_matrix(lin, [(x.reshape(-1, 3), None)], "categorical", "true", "kfac")
    # θ of the Conv1D model holds weightᵀ: permute the Linear model's θ to compare
    perm = []
    start = 0
    for c in (conv[0], conv[2]):
        nx, nf = c.weight.shape
        perm.append(start + torch.arange(nf * nx).view(nf, nx).T.flatten())
        perm.append(start + nf * nx + torch.arange(nf))
        start += nf * nx + nf
    perm = torch.cat(perm)
    torch.testing.assert_close(Fc.to_dense(), Fl.to_dense()[perm][:, perm], rtol=1e-10,
                               atol=1e-13)
    exact = _exact_fisher(conv, x.reshape(-1, 3))
    torch.testing.assert_close(Fc.trace(), Fl.trace())
    assert exact.shape == Fc.to_dense().shape
    opts = [KFAC(m, lr=0.2, damping=1e-2, fisher_type="true") for m in (conv, lin)]
    y = torch.randint(0, 4, (12,))
    for m, o in zip((conv, lin), opts, strict=True):
        F.cross_entropy(m(x.reshape(-1, 3)), y).backward()
        o.step()
    for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
        torch.testing.assert_close(c.weight.T, li.weight, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(c.bias, li.bias, rtol=1e-10, atol=1e-13)


def test_registered_kind_is_used_and_linear_subclasses_are_covered() -> None:
    """A user's adapter takes part like a built-in one; nn.Linear subclasses are Linear."""

    class Scaled(nn.Module):  # a user's dense layer: a = W h + b, weight (out, in)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.bias = nn.Parameter(torch.randn(3))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.weight, self.bias)

    class MyLinear(nn.Linear):
        pass

    class ScaledKind(natgrad.layers.LayerKind):
        name = "Scaled"

        def matches(self, module: nn.Module) -> bool:
            return isinstance(module, Scaled)

    model = nn.Sequential(Scaled(), nn.Tanh(), MyLinear(3, 2))
    with pytest.raises(ValueError, match=r"0 \(Scaled\)"):
        natgrad.fisher_matrix(model, [(torch.randn(5, 4), None)], structure="kfac")
    kind = natgrad.layers.register_layer_kind(ScaledKind())
    try:
        F_ = natgrad.fisher_matrix(model, [(torch.randn(5, 4), None)], structure="kfac")
        assert [layer.name for layer in F_.layers] == ["0", "2"]
    finally:
        natgrad.layers.base._KINDS.remove(kind)


# -- what a red team found -----------------------------------------------------------------------
class _SeqCLS(nn.Module):
    """Sequence-first Linear layers, classifying from position 0 (BERT's CLS token): the
    first example depends on index 0 of BOTH the sequence and the batch dimension."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 5)
        self.norm = nn.BatchNorm1d(5) if norm else None
        self.out = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: (T, N, 3)
        h = torch.tanh(self.inp(x))
        if self.norm is not None:
            h = self.norm(h.flatten(0, 1)).view_as(h)
        return self.out(h[0])


def test_ekfac_cls_token_with_t_equal_n_finds_the_batch_dimension() -> None:
    model = _SeqCLS()
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1))  # T = N = 4
    E = natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "ekfac")
    expected = _ekfac_scales_oracle(model, x, E.Q_G[0], E.Q_A[0], "inp")
    torch.testing.assert_close(E.scales[0], expected, rtol=1e-9, atol=1e-12)


def test_ekfac_refuses_when_examples_interact_and_the_axis_is_ambiguous() -> None:
    """Train-mode BatchNorm couples the examples: with T = N no dimension can be told to be
    the batch, so the EK-FAC optimizer gives that layer the fallback (warned, recorded)
    instead of guessing; K-FAC does not need it. (``fisher_matrix`` evaluates the eval-mode
    function, where examples do not interact.)"""
    model = _SeqCLS(norm=True)
    frozen = [p for p in model.norm.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1))
    opt = EKFAC(model, lr=0.1, damping=1e-2)
    with pytest.warns(RuntimeWarning, match=r"'inp' which dimension .* cannot be told"):
        out = model(x)
    assert "inp" in opt.preconditioner.fallback and "out" not in opt.preconditioner.fallback
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    opt.close()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()


class _AuxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)
        self.aux_out: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        self.aux_out = self.aux(h)  # used only in the loss
        return self.head(h)


@pytest.mark.parametrize("fisher_type", ["mc", "true"])
def test_auxiliary_head_outside_the_output_takes_the_fallback(fisher_type: str) -> None:
    """Its G from the model's output distribution is exactly 0, so K-FAC would divide its
    gradient by δ; it gets the fallback step instead, with a warning naming it."""
    model = _AuxHead()
    opt = KFAC(model, lr=0.1, damping=1e-3, fisher_type=fisher_type)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.warns(RuntimeWarning, match=r"'aux' its output does not reach"):
        f = model(x)
    (F.cross_entropy(f, y) + model.aux_out.square().mean()).backward()
    before, grad = model.aux.weight.detach().clone(), model.aux.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.aux.weight.detach(), before - 0.1 * grad, rtol=0,
                               atol=1e-15)
    assert [layer.name for layer in opt.preconditioner.layers] == ["body", "head"]


def test_empirical_two_backward_passes_of_one_forward_add_up() -> None:
    """``l1.backward(retain_graph=True); l2.backward()`` is ``(l1 + l2).backward()``."""
    models = [_SeqModel(True), _SeqModel(True)]
    opts = [KFAC(m, lr=0.1, damping=1e-2, fisher_type="empirical") for m in models]
    x = torch.randn(6, 3, 3, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(4))
    f = models[0](x)
    F.cross_entropy(f, y).backward(retain_graph=True)
    (0.5 * F.cross_entropy(f, y)).backward()
    (1.5 * F.cross_entropy(models[1](x), y)).backward()
    for o in opts:
        o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [KFAC, KFACPreconditioner])
def test_freezing_a_weight_after_construction_is_refused(cls) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = cls(model, damping=1e-2)
    model[0].weight.requires_grad_(False)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    step_refused(model, opt, r"layer '0' changed after")


def step_refused(model: nn.Module, opt: object, match: str) -> None:
    """``opt.step()`` raises ValueError matching ``match`` and leaves the model unchanged."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.step()  # type: ignore[attr-defined]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("cls", [KFAC, EKFAC, KFACPreconditioner])
def test_freezing_a_whole_first_layer_after_construction_is_refused(cls) -> None:
    """The first layer frozen whole (weight and bias) runs without gradients: it was moved to
    the plain-gradient fallback for good (found by a red team); now refused like a frozen
    weight, nothing changed, and the optimizer keeps working once it is unfrozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = cls(model, damping=1e-2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model[0].requires_grad_(False)
    F.cross_entropy(model(x), y).backward()
    step_refused(model, opt, r"layer '0' changed after")
    model[0].requires_grad_(True)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert "0" in [layer.name for layer in (opt if cls is KFACPreconditioner
                                            else opt.preconditioner).layers]


def test_a_layer_unfrozen_after_construction_is_not_stepped_and_says_so() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    opt = KFAC(model, lr=0.1, damping=1e-2)
    model[0].requires_grad_(True)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    frozen = model[0].weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"does not step \['0.weight', '0.bias'\]"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per parameter
        opt.step()
    assert torch.equal(model[0].weight, frozen)


def test_a_stale_gradient_of_a_frozen_parameter_is_not_reported() -> None:
    """A .grad left over from before freezing (no zero_grad) is not "unfrozen since"."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    model[0].requires_grad_(False)
    opt = KFAC(model, lr=0.1, damping=1e-2)
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()


def test_ngd_refuses_a_parameter_frozen_after_construction() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = natgrad.optim.NGD(model, lr=0.1, damping=0.1)
    model[0].weight.requires_grad_(False)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    step_refused(model, opt, r"frozen since: \['0.weight'\]")


def test_user_forward_hook_registered_first_does_not_change_the_preactivation() -> None:
    """natgrad records the layer's own output a = W h + b even when a user's forward hook,
    registered before the optimizer, rescales it: same step as the rescale written in
    forward()."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(torch.tanh(2.0 * self.fc1(x)))

    hooked = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    plain = Scaled()
    hooked[0].load_state_dict(plain.fc1.state_dict())
    hooked[2].load_state_dict(plain.fc2.state_dict())
    hooked[0].register_forward_hook(lambda m, a, out: 2.0 * out)
    opts = [KFAC(m, lr=0.1, damping=1e-2, fisher_type="true") for m in (plain, hooked)]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for m, o in zip((plain, hooked), opts, strict=True):
        F.cross_entropy(m(x), y).backward()
        o.step()
    torch.testing.assert_close(hooked[0].weight, plain.fc1.weight, rtol=1e-12, atol=1e-14)


def test_a_model_that_is_one_layer() -> None:
    """The model's own hook and the layer's hook sit on the same module."""
    torch.manual_seed(0)
    root = nn.Linear(4, 3)
    wrapped = nn.Sequential(copy.deepcopy(root))
    opts = [KFAC(m, lr=0.1, damping=1e-2, fisher_type="true") for m in (root, wrapped)]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for m, o in zip((root, wrapped), opts, strict=True):
        F.cross_entropy(m(x), y).backward()
        o.step()
    torch.testing.assert_close(root.weight, wrapped[0].weight, rtol=1e-12, atol=1e-14)


def test_a_model_returning_its_loss_gets_a_clear_error() -> None:
    class LossModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x).logsumexp(-1).mean()

    model = LossModel()
    KFAC(model, lr=0.1)
    with pytest.raises(ValueError, match=r"examples in dim 0.*not a 0-dim tensor"):
        model(torch.randn(8, 4))


def test_reentrant_checkpointing_is_named_as_the_cause() -> None:
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(checkpoint(lambda t: torch.tanh(self.inner(t)), x,
                                       use_reentrant=True))

    model = Block()
    KFAC(model, lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"'inner' ran without gradients.*use_reentrant"):
        model(torch.randn(8, 4, requires_grad=True))


def test_true_fisher_through_train_mode_batchnorm_is_refused() -> None:
    """The optimizers' "true" statistics need examples that do not interact; "mc" is fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type="true")
    with pytest.raises(ValueError, match=r"train-mode BatchNorm.*fisher_type='mc'"):
        model(x)
    model.eval()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.close()
    model.train()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type="mc")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# -- issue 12 item 18: messages name the real cause ------------------------------------------
class _OnlyFunctional(nn.Module):
    """A Linear whose module is never called: its weight is used through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_layer_used_only_through_f_linear_is_named_with_the_cause(fisher_type: str) -> None:
    model = _OnlyFunctional()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type=fisher_type)
    with pytest.warns(RuntimeWarning, match=r"'proj' not called.*through F\.linear") as rec:
        loss = F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,)))
    assert not any("freeze it" in str(w.message) for w in rec)
    loss.backward()
    opt.step()
    assert [layer.name for layer in opt.preconditioner.layers] == ["out"]


def test_empirical_two_forward_passes_before_one_backward() -> None:
    """Gradient accumulation through one backward pass: each pass's statistics are its own
    per-example gradients, so the factors equal those of one pass over both micro-batches."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [KFAC(m, lr=0.1, damping=1e-2, fisher_type="empirical", ema_decay=0.0)
            for m in models]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    (F.cross_entropy(models[0](x[:8]), y[:8]) + F.cross_entropy(models[0](x[8:]), y[8:])
     ).backward()
    F.cross_entropy(models[1](x), y).backward()
    for o in opts:
        o.step()
    for name in ("0", "2"):
        for key in ("A", "G"):
            torch.testing.assert_close(opts[0].preconditioner.curvature.state[name][key],
                                       opts[1].preconditioner.curvature.state[name][key],
                                       rtol=1e-10, atol=1e-12)


def test_empirical_unused_branch_is_named_not_a_gradient_problem() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    model = Branch()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type="empirical")
    with pytest.warns(RuntimeWarning, match=r"'unused' not called in the forward pass"):
        loss = F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,)))
    loss.backward()
    opt.step()


# -- model outputs in a dict or a transformers ModelOutput ---------------------------------------
class _DictOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> object:
        z = self.fc2(torch.tanh(self.fc1(x)))
        if self.kind == "dict":
            return {"hidden": x, "logits": z}
        if self.kind == "tuple":
            return (z, x)
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=z)


@pytest.mark.parametrize("kind", ["dict", "model_output"])
def test_model_output_and_dict_logits_are_used(kind: str) -> None:
    """K-FAC and fisher_matrix take the "logits" of a dict / ModelOutput: the same steps and
    matrix as the model returning the tensor."""
    if kind == "model_output":
        pytest.importorskip("transformers")
    wrapped, plain = _DictOut(kind), _DictOut("dict")
    plain.forward = lambda x: _DictOut.forward(plain, x)["logits"]  # type: ignore[method-assign]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    Fs = [natgrad.fisher_matrix(m, [(x, None)], "categorical", "true", s).to_dense()
          for m in (wrapped, plain) for s in ("kfac", "dense")]
    torch.testing.assert_close(Fs[0], Fs[2])
    torch.testing.assert_close(Fs[1], Fs[3])
    opts = [KFAC(m, lr=0.1, damping=1e-2, fisher_type="true") for m in (wrapped, plain)]
    out = wrapped(x)
    F.cross_entropy(out["logits"] if kind == "dict" else out.logits, y).backward()
    F.cross_entropy(plain(x), y).backward()
    for o in opts:
        o.step()
    for a, b in zip(wrapped.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_tuple_output_is_not_guessed_at() -> None:
    model = _DictOut("tuple")
    KFAC(model, lr=0.1)
    with pytest.raises(TypeError, match=r"one tensor \(or a dict / ModelOutput.*got tuple"):
        model(torch.randn(8, 4))
    with pytest.raises(TypeError, match=r"got tuple"):
        natgrad.fisher_matrix(model, [(torch.randn(8, 4), None)], structure="dense")


def test_unsupported_attention_projections_are_listed_not_warned_about() -> None:
    """An nn.MultiheadAttention natgrad does not cover (add_bias_kv) uses out_proj's weight
    in its functional forward (the module is never called): it is reported at construction,
    with no warning at the first pass; the feed-forward Linears are covered. (Supported
    attention modules: tests/test_attention.py.)"""
    torch.manual_seed(0)
    model = _Wrapped(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.Linear(8, 3), False)
    model.layer.self_attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    opt = KFAC(model, lr=0.1, damping=1e-2)
    text = repr(opt)
    assert re.search(r"layer\.self_attn \(MultiheadAttention with add_bias_kv=True.*\): "
                     r"plain SGD", text), text
    assert re.search(r"layer\.self_attn\.out_proj \(NonDynamicallyQuantizableLinear inside "
                     r"MultiheadAttention.*\): plain SGD", text), text
    assert [layer.name for layer in opt.preconditioner.layers] == [
        "layer.linear1", "layer.linear2", "head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        F.cross_entropy(model(torch.randn(5, 4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()


class _Positions(nn.Module):
    """Token embedding + a positional embedding applied to arange(T) (broadcast over the
    batch, as in GPT-style models) → Linear per position, logits (N·T, C)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(6, 4)
        self.positions = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1]))
        return self.out(torch.tanh(h)).flatten(0, 1)


@pytest.mark.parametrize(("optimizer", "fisher_type", "covered"), [
    (KFAC, "mc", True), (KFAC, "true", False), (KFAC, "empirical", False),
    (EKFAC, "mc", False)])
def test_layer_shared_by_all_examples_takes_the_fallback_unless_mc_kfac(
        optimizer: type, fisher_type: str, covered: bool) -> None:
    """A layer whose output has no example dimension (positions of arange(T), broadcast) gets
    gradients summed over the examples: only MC K-FAC-expand stays unbiased for it; everywhere
    else it takes the fallback with the cause named, and the other layers stay covered."""
    model = _Positions()
    x = torch.randint(0, 6, (3, 5))
    opt = optimizer(model, lr=0.1, damping=1e-2, fisher_type=fisher_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = F.cross_entropy(model(x), x.flatten())
    reasons = opt.preconditioner.fallback
    assert ("positions" not in reasons) == covered
    if not covered:
        assert "shared by all 15 examples" in reasons["positions"]  # N·T rows of f
        assert any("positions" in str(w.message) for w in caught)
    assert "tokens" not in reasons and "out" not in reasons
    loss.backward()
    before = model.positions.weight.detach().clone()
    grad = model.positions.weight.grad.clone()
    opt.step()
    if not covered:  # the fallback: plain SGD
        torch.testing.assert_close(model.positions.weight.detach(), before - 0.1 * grad)


@pytest.mark.parametrize(("optimizer", "fisher_type", "covered"), [
    (KFAC, "mc", True), (KFAC, "empirical", False), (EKFAC, "mc", False)])
def test_positions_shared_by_the_batch_are_found_when_t_equals_n(
        optimizer: type, fisher_type: str, covered: bool) -> None:
    """With T = N the positions' rows (T,) have a dimension of the examples' size: the
    gradients of the first and last example's outputs (nonzero at every position) show that
    it does not index the examples, and the layer is treated as shared; the token embedding,
    whose rows are (N, T), keeps its curvature."""

    class Unflattened(_Positions):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.tokens(x) + self.positions(torch.arange(x.shape[1]))
            return self.out(torch.tanh(h)).mean(1)

    model = Unflattened()
    x = torch.randint(0, 6, (5, 5))  # N = T = 5
    opt = optimizer(model, lr=0.1, damping=1e-2, fisher_type=fisher_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(model(x), x[:, 0]).backward()
    reasons = opt.preconditioner.fallback
    assert ("positions" not in reasons) == covered
    assert "tokens" not in reasons and "out" not in reasons
    opt.step()


class _ScaledLinear(nn.Linear):
    """An equalised-learning-rate layer: a = h (c W)ᵀ + b, not h Wᵀ + b."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * 0.1, self.bias)


class _MaskPositions(nn.Embedding):
    """OPT-style: called with the attention mask, looks up positions computed from it."""

    def forward(self, mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.cumsum(mask, 1) - 1 + 2)


class _SlicedPositions(nn.Embedding):
    """Whisper-style: called with the token ids, returns the first T rows of its table."""

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return self.weight[: ids.shape[1]]


class _FloatPositions(nn.Embedding):
    """BART-style: called with a float tensor, computes the positions from its shape."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.arange(x.shape[1]).expand(x.shape[0], -1))


class _Tokens(nn.Module):
    def __init__(self, positions: str) -> None:
        super().__init__()
        self.positions = positions
        self.tok = nn.Embedding(32, 8)
        self.pos = {"mask": _MaskPositions(20, 8), "slice": _SlicedPositions(12, 8),
                    "float": _FloatPositions(20, 8)}[positions]
        self.head = nn.Linear(8, 32)

    def forward(self, ids: Tensor) -> Tensor:
        tokens = self.tok(ids)
        arg = {"mask": torch.ones_like(ids), "slice": ids, "float": tokens[..., 0]}
        return self.head(torch.tanh(tokens + self.pos(arg[self.positions])))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("case", ["scaled-linear", "mask", "slice", "float", "keyword"])
def test_a_call_that_is_not_w_h_plus_b_takes_the_fallback(cls: type, case: str) -> None:
    """A layer whose call does not compute a = W h + b from its first argument (a rescaled
    weight, an embedding computing its positions inside forward, an input passed by keyword)
    takes the fallback at the first pass with the reason, and the step equals the one with
    that layer's gradient left to the fallback (not a preconditioned step of the wrong
    factors); the other layers keep K-FAC."""
    torch.manual_seed(0)
    if case == "scaled-linear":
        model: nn.Module = nn.Sequential(_ScaledLinear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        bad, why = "0", "differs from W h + b"
    elif case == "keyword":
        class Keyword(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

            def forward(self, x: Tensor) -> Tensor:
                return self.b(torch.tanh(self.a(input=x)))

        model = Keyword()
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        bad, why = "a", "first positional argument"
    else:
        model = _Tokens(case)
        x = torch.randint(0, 32, (4, 10))
        y = torch.randint(0, 32, (4 * 10,))
        bad, why = "pos", {"mask": "differs from W h + b", "slice": "does not compute a = W h + b",
                           "float": "not its integer indices"}[case]
    lr = 0.1
    opt = cls(model, lr=lr, damping=1e-3)
    with pytest.warns(RuntimeWarning, match=re.escape(why)):
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(y.shape[0], -1), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert any(bad in line and why in line for line in repr(opt).splitlines())
    assert bad not in {layer.name for layer in opt.preconditioner.layers}
    assert opt.preconditioner.layers  # the others keep K-FAC
    for n, p in model.named_parameters():
        if n.startswith(bad + "."):  # the fallback: plain SGD with the group's lr
            torch.testing.assert_close(p.detach(), before[n] - lr * grads[n])


@pytest.mark.parametrize("case", ["scaled-linear", "mask"])
def test_fisher_matrix_kfac_refuses_a_call_that_is_not_w_h_plus_b(case: str) -> None:
    torch.manual_seed(0)
    if case == "scaled-linear":
        model: nn.Module = nn.Sequential(_ScaledLinear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(16, 5)
    else:
        model, x = _Tokens("mask"), torch.randint(0, 32, (4, 10))
    with pytest.raises(ValueError, match="differs from W h \\+ b"):
        natgrad.fisher_matrix(model, x, structure="kfac")


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "legacy_weight_norm", "prune"])
def test_a_computed_weight_takes_the_fallback_with_the_reason(wrap: str) -> None:
    """A Linear whose weight is computed from other parameters (parametrizations, the legacy
    weight_norm, pruning) is not a layer K-FAC can precondition: listed with the reason, its
    parameters take the fallback, the rest keep K-FAC; fisher_matrix refuses it by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    wrappers = {
        "weight_norm": nn.utils.parametrizations.weight_norm,
        "spectral_norm": nn.utils.parametrizations.spectral_norm,
        "legacy_weight_norm": nn.utils.weight_norm,
        "prune": lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.25),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy weight_norm
        wrappers[wrap](model[0])
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = KFAC(model, lr=0.1, damping=1e-2)
    assert [layer.name for layer in opt.preconditioner.layers] == ["2"]
    assert "computed from other parameters" in repr(opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="computed from other parameters"):
        natgrad.fisher_matrix(model, x, structure="kfac")


class _FlatFeedForward(nn.Module):
    """Embedding → feed-forward → head on (N, T) tokens; with ``flat`` the feed-forward layer
    sees the hidden states flattened to (N·T, d) (Hugging Face OPT's layout), with
    ``position_major`` flattened position-major (T·N, d)."""

    def __init__(self, flat: bool, position_major: bool = False) -> None:
        super().__init__()
        self.flat, self.position_major = flat, position_major
        self.emb, self.fc, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        n, t, d = h.shape
        if self.position_major:
            z = self.fc(h.transpose(0, 1).reshape(-1, d)).reshape(t, n, d).transpose(0, 1)
        elif self.flat:
            z = self.fc(h.reshape(-1, d)).reshape(n, t, d)
        else:
            z = self.fc(h)
        return self.head(h + torch.tanh(z))


@pytest.mark.parametrize(("make", "kind"), [
    (lambda m: EKFAC(m, lr=0.1, damping=1e-2), "ekfac"),
    (lambda m: KFAC(m, lr=0.1, damping=1e-2, fisher_type="true"), "true"),
    (lambda m: KFAC(m, lr=0.1, damping=1e-2, fisher_type="empirical"), "empirical"),
    (lambda m: KFAC(m, lr=0.1, damping=1e-2, kfac_approx="reduce"), "reduce"),
])
def test_a_layer_on_flattened_example_major_rows_keeps_its_examples(make, kind: str) -> None:
    """A layer applied to (N·T, d) rows, each example's T rows one after the other, has the
    examples of the (N, T, d) layout: the same steps (EK-FAC's per-example scales, the true
    and empirical Fisher's rows, K-FAC-reduce's per-example sums), not the fallback. Flattened
    position-major, (T·N, d), its examples cannot be told: the fallback, with the reason."""
    torch.manual_seed(0)
    plain = _FlatFeedForward(flat=False)
    flat = _FlatFeedForward(flat=True)
    flat.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(1))
    opts = [make(plain), make(flat)]
    for step in range(3):
        for model, opt in zip((plain, flat), opts, strict=True):
            torch.manual_seed(step)
            opt.zero_grad()
            F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
                            ).backward()
            opt.step()
    assert "fc" in {layer.name for layer in opts[1].preconditioner.layers}
    for p, q in zip(plain.parameters(), flat.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    if kind in ("ekfac", "true"):
        strided = _FlatFeedForward(flat=True, position_major=True)
        opt = make(strided)
        with pytest.warns(RuntimeWarning, match="fc"):
            opt.zero_grad()
            F.cross_entropy(strided(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
                            ).backward()
        opt.step()
        assert "fc" not in {layer.name for layer in opt.preconditioner.layers}


def test_quantisation_aware_training_layers_keep_kfac() -> None:
    """torch.ao's QAT Linear computes F.linear(h, fake_quant(W), b): a few 10⁻³ from W h + b,
    with the straight-through gradient g hᵀ of a dense layer, so it keeps its K-FAC block."""
    from torch.ao.nn import qat
    from torch.ao.quantization import get_default_qat_qconfig

    torch.set_default_dtype(torch.float32)  # fake quantisation is float32 (the module's
    torch.manual_seed(0)  # fixture restores its float64 default afterwards)
    layer = qat.Linear(6, 8, qconfig=get_default_qat_qconfig("fbgemm"))
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model, lr=0.1, damping=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
        opt.step()
    assert [layer.name for layer in opt.preconditioner.layers] == ["0", "2"]
