"""nn.MultiheadAttention under K-FAC / EK-FAC (natgrad.layers.attention).

While natgrad's hooks are on an attention module its forward is replaced by an equivalent one
whose projections hooks can see. Checked here: the function (outputs, attention weights,
gradients, dropout draws) is the original's in many configurations; parameters, modules and
``state_dict`` keys do not change, and the original forward comes back when the hooks go; the
K-FAC blocks of in_proj, q/k/v_proj and out_proj equal G ⊗ Ā from the definitions (the
float64 oracle in tests/reference.py, with attention written out from its definition);
EK-FAC's scales follow the examples in both layouts; cross-attention with packed weights takes
the fallback with its reason; transformer encoders (eager and compiled) train with every
projection covered.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import natgrad
import reference as R
from natgrad.layers.attention import attach
from natgrad.optim import EKFAC, KFAC, EKFACPreconditioner, KFACPreconditioner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _patched(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and "forward" in m.__dict__]


# -- 1. the function -----------------------------------------------------------------------------
def _inputs(bf: bool, unbatched: bool, pattern: str, kdim: int, vdim: int, g: torch.Generator,
            dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    N, L, S, E = 3, 5, 4, 8

    def make(length: int, width: int) -> Tensor:
        shape = (length, width) if unbatched else ((N, length, width) if bf else
                                                   (length, N, width))
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = make(L, E).requires_grad_()
    if pattern == "self":
        return q, q, q
    if pattern == "kv":  # encoder-decoder: key is value
        k = make(S, kdim)
        return q, k, k
    return q, make(S, kdim), make(S, vdim)


def _masks(kind: str, unbatched: bool, L: int, S: int, heads: int, g: torch.Generator,
           dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, bool]:
    """(attn_mask, key_padding_mask, is_causal); no row is fully masked."""
    N = 1 if unbatched else 3
    kpm = torch.rand(*(() if unbatched else (N,)), S, generator=g) < 0.3
    kpm[..., 0] = False
    if kind == "none":
        return None, None, False
    if kind == "padding":
        return None, kpm, False
    if kind == "bool2d":
        mask = torch.rand(L, S, generator=g) < 0.3
        mask[:, 0] = False
        return mask, kpm, False
    if kind == "float3d":
        mask = torch.randn(N * heads, L, S, generator=g, dtype=dtype)
        return mask, kpm.to(dtype).masked_fill(kpm, float("-inf")), False
    if kind == "causal":
        return torch.ones(L, L, dtype=torch.bool).triu(1), None, True
    if kind == "causal+padding":
        return torch.ones(L, L, dtype=torch.bool).triu(1), kpm, True
    raise AssertionError(kind)


def _run(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, seed: int
         ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Outputs, attention weights and the gradients of ⟨w, out⟩ w.r.t. query and every
    parameter (w fixed)."""
    torch.manual_seed(seed)
    out, weights = mha(*args, **kwargs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    inputs = [args[0], *mha.parameters()]
    grads = torch.autograd.grad((out * w).sum(), inputs)
    return out, weights, list(grads)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("separate", [False, True], ids=["packed", "separate"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
def test_forward_is_the_original_one(batch_first: bool, separate: bool, train: bool) -> None:
    """Outputs, attention weights (averaged or per head) and gradients equal the original
    forward's to 1e-12 in float64 (dropout: the same draws), over masks (boolean / float,
    2-D / 3-D, key padding, causal), self / encoder-decoder / cross calls, unbatched inputs
    and bias=False; the original forward is back afterwards."""
    g = torch.Generator().manual_seed(0)
    kdim, vdim = (5, 6) if separate else (8, 8)
    checked = 0
    for bias, unbatched, pattern, kind, need_weights, average in itertools.product(
            (True, False), (False, True), ("self", "kv", "cross"),
            ("none", "padding", "bool2d", "float3d", "causal", "causal+padding"),
            (False, True), (True, False)):
        if (separate and pattern != "cross") or (kind.startswith("causal") and pattern != "self"):
            continue  # key is value needs kdim = vdim
        if not need_weights and not average:
            continue  # average_attn_weights only matters with the weights
        torch.manual_seed(1)
        mha = nn.MultiheadAttention(8, 2, dropout=0.3, bias=bias, kdim=kdim, vdim=vdim,
                                    batch_first=batch_first).train(train)
        q, k, v = _inputs(batch_first, unbatched, pattern, kdim, vdim, g, torch.float64)
        L, S = 5, (5 if pattern == "self" else 4)
        mask, kpm, causal = _masks(kind, unbatched, L, S, 2, g, torch.float64)
        if unbatched and mask is not None and mask.dim() == 3:
            mask = mask[:2]
        kwargs = dict(key_padding_mask=kpm, need_weights=need_weights, attn_mask=mask,
                      average_attn_weights=average, is_causal=causal)
        expected = _run(mha, (q, k, v), kwargs, seed=checked)
        detach = attach(mha)
        assert _patched(mha) == [mha]
        got = _run(mha, (q, k, v), kwargs, seed=checked)
        detach()
        assert not _patched(mha) and "_natgrad_attention" not in mha.__dict__
        assert got[0].shape == expected[0].shape
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-12)
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-12)
        for a, b in zip(got[2], expected[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        checked += 1
    assert checked == (48 if separate else 168)


def test_float32_forward_matches_and_no_grad_uses_the_original() -> None:
    """float32: the same outputs to 1e-6; without gradients (inference) the original forward
    runs (its fast path included), so the taps see nothing."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).float().eval()
    x = torch.randn(4, 7, 16, dtype=torch.float32)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    expected = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    detach = attach(mha)
    calls = []
    tap = mha.__dict__["_natgrad_attention"].taps["in_proj"]
    handle = tap.register_forward_hook(lambda *args: calls.append(1))
    got = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert calls == [1]
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x, attn_mask=mask, need_weights=False)[0],
                                   expected, rtol=1e-6, atol=1e-6)
    assert calls == [1]
    handle.remove()
    detach()


# -- 2. parameters, modules and state_dict ------------------------------------------------------
def _encoder(batch_first: bool, dropout: float = 0.0, layers: int = 2) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.batch_first = batch_first
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout,
                                               batch_first=batch_first, norm_first=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nested tensors off with norm_first
                self.enc = nn.TransformerEncoder(layer, layers)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor, mask: Tensor | None = None,
                    padding: Tensor | None = None) -> Tensor:
            h = self.enc(x, mask=mask, src_key_padding_mask=padding,
                         is_causal=mask is not None)
            return self.head(h.mean(1 if self.batch_first else 0))

    torch.manual_seed(0)
    return Net()


def _batch(batch_first: bool, seed: int, N: int = 6, T: int = 5
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, 8, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    padding = torch.zeros(N, T, dtype=torch.bool)
    padding[: N // 2, -2:] = True
    return (x if batch_first else x.transpose(0, 1).contiguous()), y, mask, padding


def test_parameters_modules_and_state_dict_are_unchanged() -> None:
    """While an optimizer (or two) holds the model and after they close: the same parameter
    objects and names, module names and state_dict keys; the original forward returns only
    when the last holder closes."""
    model = _encoder(True)
    params = list(model.named_parameters())
    modules = [name for name, _ in model.named_modules()]
    keys = list(model.state_dict())

    def same() -> None:
        assert [(n, id(p)) for n, p in model.named_parameters()] == [
            (n, id(p)) for n, p in params]
        assert [name for name, _ in model.named_modules()] == modules
        assert list(model.state_dict()) == keys

    first = KFAC(model, lr=0.1, damping=0.1)
    second = EKFACPreconditioner(model, damping=0.1)
    assert len(_patched(model)) == 2
    same()
    x, y, mask, padding = _batch(True, 0)
    F.cross_entropy(model(x, mask, padding), y).backward()
    first.step()
    second.step()
    same()
    first.close()
    assert len(_patched(model)) == 2
    second.close()
    assert not _patched(model)
    assert not any("_natgrad_attention" in m.__dict__ for m in model.modules())
    same()


def test_a_deep_copy_made_while_attached_is_independent() -> None:
    """copy.deepcopy of a model held by an optimizer computes the same function without the
    original's hooks, and its own optimizer's close() restores its forward."""
    model = _encoder(True)
    opt = KFAC(model, lr=0.1, damping=0.1)
    clone = copy.deepcopy(model)
    x, y, mask, padding = _batch(True, 1)
    torch.testing.assert_close(clone(x, mask, padding), model(x, mask, padding), rtol=0,
                               atol=0)
    other = KFAC(clone, lr=0.1, damping=0.1)
    F.cross_entropy(clone(x, mask, padding), y).backward()
    other.step()
    other.close()
    assert not _patched(clone) and len(_patched(model)) == 2
    opt.close()


# -- 3. the K-FAC blocks from the definitions ---------------------------------------------------
class _SelfNet(nn.Module):
    """emb → tanh → self-attention (optionally causal) → mean over positions → head."""

    def __init__(self, batch_first: bool, causal: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first, self.causal = batch_first, causal
        self.emb = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 4)

    def mask(self, T: int) -> Tensor | None:
        return torch.ones(T, T, dtype=torch.bool).triu(1) if self.causal else None

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.emb(x))
        T = h.shape[1 if self.batch_first else 0]
        a = self.attn(h, h, h, attn_mask=self.mask(T), need_weights=False,
                      is_causal=self.causal)[0]
        return self.head(a.mean(1 if self.batch_first else 0))

    # the oracle: one example x (T, 3), attention from its definition
    def reference(self, x: Tensor, deltas: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.tanh(self.emb(x))
        a, o = R.attention(self.attn, h, h, h, self.mask(x.shape[0]),
                           {k.removeprefix("attn."): v for k, v in deltas.items()})
        return self.head(a.mean(0)), h, o


class _CrossNet(nn.Module):
    """Separate q/k/v weights (kdim, vdim ≠ embed_dim): query, key and value from three
    embeddings of the input; batch first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.eq, self.ek, self.ev = nn.Linear(3, 8), nn.Linear(3, 5), nn.Linear(3, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (torch.tanh(e(x)) for e in (self.eq, self.ek, self.ev))
        return self.head(self.attn(q, k, v, need_weights=False)[0].mean(1))

    def reference(self, x: Tensor, deltas: dict[str, Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        q, k, v = (torch.tanh(e(x)) for e in (self.eq, self.ek, self.ev))
        a, o = R.attention(self.attn, q, k, v, None,
                           {n.removeprefix("attn."): d for n, d in deltas.items()})
        return self.head(a.mean(0)), q, k, v, o


def _ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1)], 1)


def _vec_indices(model: nn.Module, weight: str, bias: str | None) -> Tensor:
    """θ indices of vec_row([W | b]) (bias as the last column)."""
    slices, start = {}, 0
    for n, p in model.named_parameters():
        slices[n] = slice(start, start + p.numel())
        start += p.numel()
    w = slices[weight]
    out = dict(model.named_parameters())[weight].shape[0]
    cols = [torch.arange(w.start, w.stop).view(out, -1)]
    if bias is not None:
        cols.append(torch.arange(slices[bias].start, slices[bias].stop).view(out, 1))
    return torch.cat(cols, 1).flatten()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_in_proj_and_out_proj_blocks_equal_the_definition(batch_first: bool,
                                                          causal: bool) -> None:
    model = _SelfNet(batch_first, causal)
    X = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))  # (N, T, 3)
    inp = X if batch_first else X.transpose(0, 1).contiguous()
    with torch.no_grad():  # the oracle computes the model's function
        expected_f = torch.stack([model.reference(x, {})[0] for x in X])
        torch.testing.assert_close(model(inp), expected_f, rtol=1e-12, atol=1e-12)
    Fk = natgrad.fisher_matrix(model, [(inp, None)], "categorical", "true", "kfac")
    names = [layer.name for layer in Fk.layers]
    assert names == ["emb", "attn.in_proj", "attn.out_proj", "head"]
    assert not _patched(model)
    oracle = R.kfac_factors_of(
        lambda x, d: model.reference(x, d)[0],
        lambda x: {"attn.in_proj": _ones(model.reference(x, {})[1]),
                   "attn.out_proj": _ones(model.reference(x, {})[2])},
        {"attn.in_proj": 24, "attn.out_proj": 8}, list(X))
    dense = Fk.to_dense()
    for name, (weight, bias) in {"attn.in_proj": ("attn.in_proj_weight", "attn.in_proj_bias"),
                                 "attn.out_proj": ("attn.out_proj.weight",
                                                   "attn.out_proj.bias")}.items():
        i = names.index(name)
        G, A = oracle[name]
        torch.testing.assert_close(Fk.G[i], G, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(Fk.A[i], A, rtol=1e-10, atol=1e-13)
        idx = _vec_indices(model, weight, bias)
        torch.testing.assert_close(dense[idx][:, idx], torch.kron(G, A), rtol=1e-10,
                                   atol=1e-13)


def test_separate_qkv_blocks_equal_the_definition_and_the_bias_falls_back() -> None:
    """kdim, vdim ≠ embed_dim: q_proj, k_proj and v_proj (weights only; ā without the ones
    column) and out_proj are blocks G ⊗ Ā of their own inputs; the packed in_proj_bias is
    listed as taking the fallback (and gets the plain step)."""
    model = _CrossNet()
    X = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(X), torch.stack([model.reference(x, {})[0]
                                                          for x in X]), rtol=1e-12,
                                   atol=1e-12)
    with pytest.raises(ValueError, match=r"attn\.in_proj_bias \(MultiheadAttention: the "
                                         r"packed bias"):
        natgrad.fisher_matrix(model, [(X, None)], "categorical", "true", "kfac")
    model.attn.in_proj_bias.requires_grad_(False)
    Fk = natgrad.fisher_matrix(model, [(X, None)], "categorical", "true", "kfac")
    model.attn.in_proj_bias.requires_grad_(True)
    names = [layer.name for layer in Fk.layers]
    assert names[3:8] == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                          "head"]
    oracle = R.kfac_factors_of(
        lambda x, d: model.reference(x, d)[0],
        lambda x: dict(zip(("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
                           (*model.reference(x, {})[1:4], _ones(model.reference(x, {})[4])),
                           strict=True)),
        {"attn.q_proj": 8, "attn.k_proj": 8, "attn.v_proj": 8, "attn.out_proj": 8}, list(X))
    for name, (G, A) in oracle.items():
        i = names.index(name)
        torch.testing.assert_close(Fk.G[i], G, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(Fk.A[i], A, rtol=1e-10, atol=1e-13)
    opt = KFAC(model, lr=0.1, damping=0.1)
    text = repr(opt)
    assert re.search(r"attn\.in_proj_bias \(MultiheadAttention: the packed bias.*\): plain SGD",
                     text), text
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert re.search(rf"attn\.{proj}: MultiheadAttention 8x\d+ -> KFAC", text), text
    bias = model.attn.in_proj_bias.detach().clone()
    y = torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(X), y).backward()
    grad = model.attn.in_proj_bias.grad.clone()
    opt.step()
    torch.testing.assert_close(model.attn.in_proj_bias, bias - 0.1 * grad, rtol=0, atol=1e-15)


def _exact_fisher(model: nn.Module, x: Tensor) -> Tensor:
    """F = (1/M) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i over the M rows of the (M, C) logits."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    f = functional_call(model, params, (x,)).detach()
    with warnings.catch_warnings():  # attention's backward has no batching rule on CPU
        warnings.filterwarnings("ignore", message="There is a performance drop")
        jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.reshape(*f.shape, -1) for j in jac.values()], -1)
    p = f.softmax(-1)
    D = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("mcp,mcd,mdq->pq", J, D, J) / f.shape[0]


def _scales(model: nn.Module, x: Tensor, Q_G: Tensor, Q_A: Tensor, weight: str,
            bias: str) -> Tensor:
    """S = diag(Qᵀ F_l Q), Q = Q_G ⊗ Q_A, F_l the exact block of the layer."""
    idx = _vec_indices(model, weight, bias)
    Q = torch.kron(Q_G, Q_A)
    F_l = _exact_fisher(model, x)[idx][:, idx]
    return torch.diagonal(Q.T @ F_l @ Q).view(Q_G.shape[0], Q_A.shape[0])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("T", [6, 5])  # T = N = 5: the probe decides between two dims
def test_ekfac_scales_of_the_projections_follow_the_examples(batch_first: bool, T: int) -> None:
    model = _SelfNet(batch_first, causal=True)
    X = torch.randn(5, T, 3, generator=torch.Generator().manual_seed(3))
    inp = X if batch_first else X.transpose(0, 1).contiguous()
    E = natgrad.fisher_matrix(model, [(inp, None)], "categorical", "true", "ekfac")
    names = [layer.name for layer in E.layers]
    for name, params in {"attn.in_proj": ("attn.in_proj_weight", "attn.in_proj_bias"),
                         "attn.out_proj": ("attn.out_proj.weight", "attn.out_proj.bias")
                         }.items():
        i = names.index(name)
        expected = _scales(model, inp, E.Q_G[i], E.Q_A[i], *params)
        torch.testing.assert_close(E.scales[i], expected, rtol=1e-9, atol=1e-12)
    pre = EKFACPreconditioner(model, damping=1e-3, fisher_type="true", ema_decay=0.0)
    F.cross_entropy(model(inp), torch.tensor([0, 1, 2, 3, 0])).backward()
    pre.step()
    pre.close()
    st = pre.curvature.state["attn.in_proj"]
    expected = _scales(model, inp, st["Q_G"], st["Q_A"], "attn.in_proj_weight",
                       "attn.in_proj_bias")
    torch.testing.assert_close(st["S"], expected, rtol=1e-9, atol=1e-12)


# -- 4. cross-attention and unsupported variants ------------------------------------------------
class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)
        for norm in (self.dec.norm1, self.dec.norm2, self.dec.norm3):
            norm.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dec(x, x[:, :3].flip(1) * 0.5).mean(1))


def test_cross_attention_with_packed_weights_takes_the_fallback_with_its_reason() -> None:
    """TransformerDecoderLayer's multihead_attn (query ≠ key = value, packed in_proj): its
    in_proj takes the fallback at the first pass, named with the cause, and gets the plain
    step; its out_proj and the self-attention stay covered; fisher_matrix refuses, and
    leaves the module unpatched."""
    model = _Decoder()
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"'dec\.multihead_attn\.in_proj' called with query, "
                                         r"key and value not all the same tensor"):
        natgrad.fisher_matrix(model, [(x, None)], "categorical", "true", "kfac")
    assert not _patched(model)
    opt = KFAC(model, lr=0.1, damping=0.1)
    weight = model.dec.multihead_attn.in_proj_weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"'dec\.multihead_attn\.in_proj' called with "
                                            r"query, key and value not all the same tensor "
                                            r"\(cross-attention\)"):
        F.cross_entropy(model(x), y).backward()
    grad = model.dec.multihead_attn.in_proj_weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.dec.multihead_attn.in_proj_weight, weight - 0.1 * grad,
                               rtol=0, atol=1e-15)
    assert list(opt.preconditioner.fallback) == ["dec.multihead_attn.in_proj"]
    names = [layer.name for layer in opt.preconditioner.layers]
    assert "dec.self_attn.in_proj" in names and "dec.multihead_attn.out_proj" in names
    assert "dec.multihead_attn.in_proj" not in names
    assert re.search(r"dec\.multihead_attn\.in_proj \(MultiheadAttention, called with query, "
                     r"key and value not all the same tensor.*\): plain SGD", repr(opt))
    state = opt.state_dict()
    fresh = KFAC(model, lr=0.1, damping=0.1)
    opt.close()
    fresh.load_state_dict(state)
    assert "dec.multihead_attn.in_proj" in fresh.preconditioner.fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        F.cross_entropy(model(x), y).backward()
    fresh.step()
    fresh.close()
    assert not _patched(model)


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn", "replaced forward"])
def test_unsupported_attention_is_listed_and_left_alone(option: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    if option == "replaced forward":  # e.g. accelerate's hooks wrap forward on the instance
        model.attn = nn.MultiheadAttention(8, 2)
        model.attn.forward = lambda *args, **kwargs: nn.MultiheadAttention.forward(
            model.attn, *args, **kwargs)
        reason = "whose forward other code replaced on the instance"
    else:
        model.attn = nn.MultiheadAttention(8, 2, **{option: True})
        reason = f"with {option}=True"
    model.head = nn.Linear(8, 3)
    forward = model.attn.__dict__.get("forward")
    opt = KFAC(model, lr=0.1)
    text = repr(opt)
    assert re.search(rf"attn \(MultiheadAttention {reason}.*\): plain SGD", text), text
    assert re.search(r"attn\.out_proj \(NonDynamicallyQuantizableLinear inside "
                     r"MultiheadAttention.*\): plain SGD", text)
    assert [layer.name for layer in opt.preconditioner.layers] == ["head"]
    assert model.attn.__dict__.get("forward") is forward


# -- 5. transformer encoders ---------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_transformer_encoder_trains_with_every_projection_covered(cls, batch_first) -> None:
    """nn.TransformerEncoder (pre-norm, causal mask and key padding, dropout): every Linear
    and attention weight under K-FAC (only the LayerNorms fall back), the same function
    (dropout draws included) as the model without natgrad, the loss decreases, the
    state_dict keys do not change and a checkpoint resumes identically."""
    model = _encoder(batch_first, dropout=0.1)
    keys = list(model.state_dict())
    x, y, mask, padding = _batch(batch_first, 5, N=8, T=6)
    torch.manual_seed(3)
    plain = model(x, mask, padding)
    opt = cls(model, lr=0.05, damping=0.1)
    torch.manual_seed(3)
    torch.testing.assert_close(model(x, mask, padding), plain, rtol=0, atol=1e-14)
    names = [layer.name for layer in opt.preconditioner.layers]
    for i in range(2):
        for proj in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"):
            assert f"enc.layers.{i}.{proj}" in names
    assert all("norm" in desc for desc in opt.preconditioner.unsupported)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(12):
            opt.zero_grad()
            loss = F.cross_entropy(model(x, mask, padding), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert opt.preconditioner.fallback == {}
    assert losses[-1] < 0.5 * losses[0], losses
    assert list(model.state_dict()) == keys
    state = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    fresh = cls(clone, lr=0.05, damping=0.1)
    fresh.load_state_dict(state)
    for m, o in ((model, opt), (clone, fresh)):
        torch.manual_seed(4)
        o.zero_grad()
        F.cross_entropy(m(x, mask, padding), y).backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_kfac_preconditioner_precondition_attention_gradients() -> None:
    """KFACPreconditioner rewrites the attention gradients as (G ⊗ Ā + δI)⁻¹ ∇ block by block
    (checked for in_proj against the factors it holds)."""
    model = _SelfNet(True, causal=False)
    pre = KFACPreconditioner(model, damping=0.1, fisher_type="true", ema_decay=0.0)
    X = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(6))
    F.cross_entropy(model(X), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    grad = torch.cat([model.attn.in_proj_weight.grad, model.attn.in_proj_bias.grad[:, None]],
                     1)
    pre.step()
    st = pre.curvature.state["attn.in_proj"]
    block = torch.kron(st["G"], st["A"]) + 0.1 * torch.eye(grad.numel())
    expected = torch.linalg.solve(block, grad.flatten()).view_as(grad)
    got = torch.cat([model.attn.in_proj_weight.grad, model.attn.in_proj_bias.grad[:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_prong_preconditioner_leaves_attention_projections_listed() -> None:
    model = _SelfNet(True, causal=False)
    pre = natgrad.nn.PRONGPreconditioner(model, [torch.randn(16, 4, 3)], period=5,
                                         num_samples=16)
    assert [layer.name for layer in pre.layers] == ["emb", "head"]
    assert any("attn.in_proj" in desc for desc in pre.unsupported)


def test_compiled_transformer_encoder_layer_takes_the_eager_steps() -> None:
    """torch.compile of a model with a TransformerEncoderLayer: K-FAC takes the eager steps
    (float64) with a cold and a warm compile cache, every projection covered, no false
    in-place warning."""
    runs = []
    for compiled in (False, True, True):  # eager, cold cache, warm cache
        model = _encoder(True, layers=1)
        opt = KFAC(model, lr=0.1, damping=0.1, fisher_type="true")
        call = torch.compile(model) if compiled else model
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for step in range(2):
                x, y, mask, padding = _batch(True, 10 + step, N=16)
                model.zero_grad()
                F.cross_entropy(call(x, mask, padding), y).backward()
                opt.step()
        assert opt.preconditioner.fallback == {}
        assert "enc.layers.0.self_attn.in_proj" in opt.preconditioner.curvature.state
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
