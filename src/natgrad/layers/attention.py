"""``nn.MultiheadAttention``'s projections as Kronecker-factored layers.

``nn.MultiheadAttention`` computes its projections inside ``F.multi_head_attention_forward``
from its weights directly (``out_proj`` is never called as a module), so no forward hook sees
them. While natgrad's hooks are on an attention module — from their registration
(:mod:`natgrad.capture`) until they are removed — its ``forward`` is replaced, on that
instance only, by :func:`attention_forward`: the same function, with every input projection
computed by a parameterless *tap* module (kept outside the module's registry, so parameters,
``named_modules`` and ``state_dict`` are unchanged) and ``out_proj`` called as a module. The
original forward is restored when the last hooks are removed. The layers, named after the
module (``m``):

- packed weights (kdim = vdim = embed_dim E): ``m.in_proj``, a = x W_inᵀ + b_in with
  W_in = ``in_proj_weight`` (3E, E) and b_in = ``in_proj_bias``, for self-attention calls
  (query, key and value the same tensor x: its rows h = x give q, k, v at once). A call with
  different query / key / value (cross-attention, e.g. ``TransformerDecoderLayer``'s
  ``multihead_attn``) applies the row blocks of W_in to different inputs, which one block
  G ⊗ Ā does not describe: the tap is not called and the layer takes the fallback, with
  that reason;
- separate weights (kdim or vdim ≠ E): ``m.q_proj``, ``m.k_proj``, ``m.v_proj`` with weights
  ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim), applied
  to query, key and value (self- or cross-attention); the packed ``in_proj_bias`` (3E) they
  share is one parameter of three layers and takes the fallback;
- ``m.out_proj``: a = o W_oᵀ + b_o with o the concatenated heads (``out_proj``'s parameters).

Not covered (the module takes the fallback, with the reason): ``add_bias_kv``,
``add_zero_attn``, a subclass with its own ``forward``, a ``forward`` that other code replaced
on the instance (e.g. accelerate's hooks), an ``out_proj`` that is not a plain ``nn.Linear``.
Without gradients (inference) the replaced forward calls the original one, fast path
included; nested-tensor inputs too.
"""

from __future__ import annotations

import copy
import math
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import LayerKind

__all__ = ["MultiheadAttentionKind", "attention_forward"]

_STATE = "_natgrad_attention"
_CROSS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Modules whose last attachment saw a packed-weight call that was not self-attention (kept
after the attachment ends, for the report of a capture that has closed)."""


class _Tap(nn.Module):
    """a = h Wᵀ + b with the weight and bias passed in: a call that hooks can see."""

    def forward(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(h, weight, bias)


class _Patched:
    """What :func:`attach` keeps on a module: its taps, how many attachments hold it, the
    ``forward`` entry of its ``__dict__`` it replaced, and whether a packed-weight call was
    not self-attention since."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        names = ("in_proj",) if module._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
        self.taps = {name: _Tap() for name in names}
        self.count = 0
        self.cross = False
        self.saved = module.__dict__.get("forward")

    def __deepcopy__(self, memo: dict) -> _Patched:
        """``copy.deepcopy`` of a model while attached: the copy computes the same function
        with fresh taps (no hooks of the original's captures) and no attachment, so that the
        removal of its own first attachment restores its forward."""
        fresh = _Patched.__new__(_Patched)
        fresh.taps = {name: _Tap() for name in self.taps}
        fresh.count, fresh.cross = 0, False
        fresh.saved = copy.deepcopy(self.saved, memo)
        return fresh


def attach(module: nn.MultiheadAttention) -> Callable[[], None]:
    """Route ``module``'s forward through :func:`attention_forward` until the returned
    callable is called (reference-counted: several captures may hold one module)."""
    state = module.__dict__.get(_STATE)
    if state is None:
        state = _Patched(module)
        _CROSS.discard(module)
        object.__setattr__(module, _STATE, state)
        object.__setattr__(module, "forward", types.MethodType(attention_forward, module))
    state.count += 1
    done = [False]

    def detach() -> None:
        if done[0]:
            return
        done[0] = True
        state.count -= 1
        if state.cross:
            _CROSS.add(module)
        if state.count == 0 and module.__dict__.get(_STATE) is state:
            del module.__dict__[_STATE]
            if state.saved is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = state.saved

    return detach


class _Projection(LayerKind):
    """One projection of an attention module (attributes relative to the module), seen by
    the tap ``tap`` (or by ``out_proj`` itself)."""

    name = "MultiheadAttention"

    def __init__(self, tap: str, weight_attr: str, bias_attr: str | None) -> None:
        self.tap = tap
        self.weight_attr = weight_attr
        self.bias_attr = bias_attr
        # reduce sums a projection's output gradients over the positions first: for the
        # keys that sum is exactly 0 (softmax is invariant to a shift of every score of a
        # query), so reduce would give them no curvature; the input projections use expand
        self.supports_reduce = tap == "out_proj"

    def matches(self, module: nn.Module) -> bool:
        return False  # made by MultiheadAttentionKind.sublayers, never registered

    def hook_module(self, module: nn.Module) -> nn.Module:
        if self.tap == "out_proj":
            return module.out_proj
        return module.__dict__[_STATE].taps[self.tap]

    def attach(self, module: nn.Module) -> Callable[[], None]:
        return attach(module)  # type: ignore[arg-type]

    def not_called_reason(self, module: nn.Module) -> str | None:
        state = module.__dict__.get(_STATE)
        cross = module in _CROSS if state is None else state.cross
        if self.tap == "in_proj" and cross:
            return ("called with query, key and value not all the same tensor "
                    "(cross-attention): the packed in_proj_weight then projects different "
                    "inputs, which one Kronecker block G ⊗ Ā does not describe")
        return None


class MultiheadAttentionKind(LayerKind):
    """``nn.MultiheadAttention``: its input projections (``in_proj``, or ``q_proj``/
    ``k_proj``/``v_proj``) and ``out_proj`` (see the module docstring)."""

    name = "MultiheadAttention"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        cls = type(module).__name__
        if type(module).forward is not nn.MultiheadAttention.forward:
            return f"{cls}, a MultiheadAttention subclass with its own forward"
        if "forward" in module.__dict__ and _STATE not in module.__dict__:
            return f"{cls} whose forward other code replaced on the instance"
        if module.bias_k is not None or module.bias_v is not None:
            return f"{cls} with add_bias_kv=True: its learned key/value rows are not covered"
        if module.add_zero_attn:
            return f"{cls} with add_zero_attn=True: not covered"
        out = module.out_proj
        if not isinstance(out, nn.Linear) or type(out).forward is not nn.Linear.forward:
            return f"{cls} whose out_proj is not a plain nn.Linear"
        return None

    def sublayers(self, module: nn.Module) -> list[tuple[str, LayerKind]]:
        if module._qkv_same_embed_dim:
            subs = [("in_proj", _Projection("in_proj", "in_proj_weight", "in_proj_bias"))]
        else:
            subs = [(p, _Projection(p, f"{p}_weight", None))
                    for p in ("q_proj", "k_proj", "v_proj")]
        return [*subs, ("out_proj", _Projection("out_proj", "out_proj.weight", "out_proj.bias"))]

    def uncovered(self, module: nn.Module) -> dict[str, str]:
        if module._qkv_same_embed_dim:
            return {}
        return {"in_proj_bias": "the packed bias of its separate q/k/v projections, one "
                                "parameter of three layers, is not covered"}


def attention_forward(
    self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
    key_padding_mask: Tensor | None = None, need_weights: bool = True,
    attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` with the projections as module calls (the tap of
    :func:`attach`, ``self.out_proj``); arguments and results as there.

    With H heads of width d = E/H, per example: q, k, v = the projections of query, key,
    value; head i: softmax(q_i k_iᵀ/√d + mask) v_i (dropout on the weights in train mode);
    the output is out_proj(concat of the heads). Masks follow torch: boolean True = not
    attended, float masks are added; ``key_padding_mask`` (N, S) merges into ``attn_mask``
    (L, S) or (N·H, L, S); ``is_causal`` is the hint torch accepts with ``attn_mask``.
    """
    if not torch.is_grad_enabled() or query.is_nested or key.is_nested or value.is_nested:
        return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask,
                                             need_weights, attn_mask, average_attn_weights,
                                             is_causal)
    state: _Patched = self.__dict__[_STATE]
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=query.dtype, check_other=False)
    heads = self.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)
    E = self.embed_dim
    if query.shape[-1] != E:
        raise AssertionError(f"was expecting embedding dimension of {E}, but got "
                             f"{query.shape[-1]}")
    if self._qkv_same_embed_dim and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if not self._qkv_same_embed_dim and key.shape[:-1] != value.shape[:-1]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match "
                             f"value's {value.shape[:-1]}")
    # -- the projections, in the caller's layout
    if self._qkv_same_embed_dim:
        if query is key and key is value:
            proj = state.taps["in_proj"](query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = proj.unflatten(-1, (3, E)).unbind(-2)
        else:
            state.cross = True
            W, b = self.in_proj_weight, self.in_proj_bias
            if key is value:  # encoder-decoder attention: key and value projected at once
                Wq, Wkv = W.split([E, 2 * E])
                bq, bkv = (None, None) if b is None else b.split([E, 2 * E])
                q = F.linear(query, Wq, bq)
                k, v = F.linear(key, Wkv, bkv).unflatten(-1, (2, E)).unbind(-2)
            else:
                (Wq, Wk, Wv), (bq, bk, bv) = W.chunk(3), (
                    (None, None, None) if b is None else b.chunk(3))
                q, k, v = F.linear(query, Wq, bq), F.linear(key, Wk, bk), F.linear(value, Wv, bv)
    else:
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        q = state.taps["q_proj"](query, self.q_proj_weight, bq)
        k = state.taps["k_proj"](key, self.k_proj_weight, bk)
        v = state.taps["v_proj"](value, self.v_proj_weight, bv)
    # -- sequence first, (L, N, E)
    if not is_batched:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif self.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    tgt_len, bsz, _ = q.shape
    src_len = k.shape[0]
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False  # the merged mask is no longer causal
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(bsz * heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    d = E // heads
    q = q.reshape(tgt_len, bsz * heads, d).transpose(0, 1)  # (N·H, L, d)
    k = k.reshape(src_len, bsz * heads, d).transpose(0, 1)
    v = v.reshape(src_len, bsz * heads, d).transpose(0, 1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but "
                                 f"got {key_padding_mask.shape}")
        padding = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                   .reshape(bsz * heads, 1, src_len))
        attn_mask = padding if attn_mask is None else attn_mask + padding
    dropout_p = self.dropout if self.training else 0.0
    weights: Tensor | None = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(d))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        scores = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            scores = F.dropout(scores, p=dropout_p)
        out = torch.bmm(scores, v).view(bsz, heads, tgt_len, d)
        weights = scores.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        out = F.scaled_dot_product_attention(
            q.reshape(bsz, heads, tgt_len, d), k.reshape(bsz, heads, src_len, d),
            v.reshape(bsz, heads, src_len, d), attn_mask, dropout_p, is_causal)
    # -- the heads concatenated, (L, N, E) or (L, E), through out_proj; batch first as a
    # transposed view, like torch's (so that dropout downstream draws the same mask)
    if not is_batched:
        return self.out_proj(out[0].transpose(0, 1).reshape(tgt_len, E)), weights
    out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, E))
    return (out.transpose(0, 1) if self.batch_first else out), weights
