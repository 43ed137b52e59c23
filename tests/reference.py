"""Brute-force float64 oracle for Fisher matrices, built on ``torch.func``.

Shares no code with ``src/natgrad`` (it never imports natgrad): every quantity is computed from
its definition, one example at a time, so that it is slow but obviously right.

Conventions (DESIGN.md §1):

- θ = [p.flatten() for p in model.parameters() if p.requires_grad], concatenated;
- ``data`` is an iterable of (inputs, targets) batches (or one such pair); targets may be None
  where not needed. Examples are taken one at a time, in batch order;
- likelihoods, per example with outputs f (any shape for "gaussian"/"bernoulli", (C,) for
  "categorical"):
    categorical  log p(y|f) = f_y − logsumexp(f)                    (y an integer class)
    gaussian     log p(y|f) = −½‖y − f‖² − (C/2) log 2π             (unit variance)
    bernoulli    log p(y|f) = Σ y log σ(f) + (1 − y) log σ(−f)       (y ∈ {0, 1})
- the output-space Fisher D(f) is the Hessian of −log p(y|f) w.r.t. f (for these exponential
  families it does not depend on y);
- true Fisher F = (1/N) Σₙ Jₙᵀ D(fₙ) Jₙ, empirical Fisher F = (1/N) Σₙ ∇θ log p(yₙ) ∇θ log p(yₙ)ᵀ,
  Fisher from samples F = (1/N) Σₙ (1/S) Σₛ ∇θ log p(ŷₙₛ) ∇θ log p(ŷₙₛ)ᵀ;
- K-FAC per Linear/Conv2d layer: Ā = mean over examples and positions of ā āᵀ, ā = [h; 1]
  (h only if the weight trains, 1 only if the bias trains; Conv2d: zero-padded patches ordered
  like ``weight.flatten(1)``), G = (1/N) Σₙ Σₛ J_{aₛ,n}ᵀ D(fₙ) J_{aₛ,n} (true) or
  (1/N) Σₙ Σₛ gₛ gₛᵀ with gₛ = ∂ log p(yₙ|fₙ)/∂aₛ (empirical; averaged over ŷ for samples).
  The block G ⊗ Ā acts on vec_row([W | b]); :func:`kronecker_embed` scatters it into θ order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev

__all__ = [
    "LIKELIHOODS",
    "attention",
    "conv_patches",
    "dense_fisher",
    "dense_fisher_from_samples",
    "embedding_indices",
    "embedding_inputs",
    "embedding_kfac_factors",
    "examples",
    "kfac_factors",
    "kfac_factors_of",
    "kfac_layers",
    "kronecker_embed",
    "layer_indices",
    "layer_records",
    "log_likelihood",
    "loglik_gradient",
    "module_param_indices",
    "num_params",
    "output_fisher",
    "parameter_jacobian",
    "preactivation_jacobians",
    "rel_err",
    "sample_targets",
    "sequence_dense_fisher",
    "sequence_kfac_factors",
    "sequence_log_likelihood",
    "sequence_output_fisher",
    "sequence_sample_targets",
    "theta_slices",
]

LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


# ---------------------------------------------------------------------------------------------
# data, θ and small helpers


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖_F / ‖expected‖_F (absolute error if ``expected`` is zero)."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    denom = torch.linalg.norm(expected).item()
    err = torch.linalg.norm(actual - expected).item()
    return err / denom if denom > 0 else err


def examples(data: Iterable | tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor | None]]:
    """The examples (xₙ, yₙ) of ``data`` one by one, without batch dimension, in batch order."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    out = []
    for x, y in data:
        for n in range(x.shape[0]):
            out.append((x[n], None if y is None else y[n]))
    return out


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name, in ``model.parameters()`` order (detached)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def theta_slices(model: nn.Module) -> dict[str, slice]:
    """The slice of θ that holds each trainable parameter."""
    slices, start = {}, 0
    for name, p in trainable(model).items():
        slices[name] = slice(start, start + p.numel())
        start += p.numel()
    return slices


def num_params(model: nn.Module) -> int:
    """P, the number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _flat(grads: dict[str, Tensor], names: Iterable[str], lead: int) -> Tensor:
    """Concatenate per-parameter tensors (lead dims first) into (..., P) in θ order."""
    return torch.cat([grads[name].reshape(*grads[name].shape[:lead], -1) for name in names], -1)


def _forward(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """f(x) for one example x (no batch dimension), with the trainable parameters ``params``."""
    return functional_call(model, params, (x.unsqueeze(0),))[0]


# ---------------------------------------------------------------------------------------------
# likelihoods, written from their definitions


def log_likelihood(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """log p(y | f) for one example (a 0-d tensor)."""
    if likelihood == "categorical":
        onehot = (torch.arange(f.shape[-1], device=f.device) == y).to(f.dtype)
        return (f * onehot).sum() - torch.logsumexp(f, dim=-1)
    if likelihood == "gaussian":
        return -0.5 * (y - f).pow(2).sum() - 0.5 * f.numel() * math.log(2 * math.pi)
    if likelihood == "bernoulli":
        y = y.to(f.dtype)
        return (y * F.logsigmoid(f) + (1 - y) * F.logsigmoid(-f)).sum()
    raise ValueError(f"unknown likelihood {likelihood!r}")


def _dummy_target(likelihood: str, f: Tensor) -> Tensor:
    if likelihood == "categorical":
        return torch.zeros((), dtype=torch.long)
    return torch.zeros_like(f)


def output_fisher(likelihood: str, f: Tensor, y: Tensor | None = None) -> Tensor:
    """D(f) = ∇²_f [−log p(y | f)] for one example's outputs f, shape (C, C), C = f.numel().

    ``y`` defaults to a fixed dummy target: D does not depend on it for these likelihoods.
    """
    f = f.detach()
    y = _dummy_target(likelihood, f) if y is None else y
    shape = f.shape
    # jacrev∘jacrev rather than torch.func.hessian (jacfwd∘jacrev): same matrix, and it avoids
    # the forward-AD decomposition set-up that warns about torch.jit.script in torch 2.13.
    nll = lambda v: -log_likelihood(likelihood, v.reshape(shape), y)  # noqa: E731
    return jacrev(jacrev(nll))(f.reshape(-1))


# ---------------------------------------------------------------------------------------------
# dense Fisher matrices


def parameter_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """Jₙ = ∂f(xₙ)/∂θ for one example x (no batch dim): shape (C, P), C = f.numel()."""
    params = trainable(model)
    jac = jacrev(lambda p: _forward(model, p, x).reshape(-1))(params)
    return _flat(jac, params, 1)


def loglik_gradient(model: nn.Module, x: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """∇θ log p(y | f(x)) for one example, shape (P,)."""
    params = trainable(model)
    g = grad(lambda p: log_likelihood(likelihood, _forward(model, p, x), y))(params)
    return _flat(g, params, 0)


def dense_fisher(
    model: nn.Module, data: Iterable, likelihood: str, fisher_type: str = "true"
) -> Tensor:
    """The (P, P) Fisher, ``fisher_type`` "true" (Σ JᵀDJ / N) or "empirical" (Σ ggᵀ / N)."""
    P = num_params(model)
    total = torch.zeros(P, P, dtype=torch.float64)
    items = examples(data)
    for x, y in items:
        if fisher_type == "true":
            J = parameter_jacobian(model, x).to(torch.float64)
            with torch.no_grad():
                f = model(x.unsqueeze(0))[0]
            D = output_fisher(likelihood, f).to(torch.float64)
            total += J.T @ D @ J
        elif fisher_type == "empirical":
            g = loglik_gradient(model, x, y, likelihood).to(torch.float64)
            total += torch.outer(g, g)
        else:
            raise ValueError(f"unknown fisher_type {fisher_type!r}")
    return total / len(items)


def sample_targets(
    model: nn.Module, data: Iterable, likelihood: str, num_samples: int,
    generator: torch.Generator,
) -> list[Tensor]:
    """Draws ŷ ~ p(y | f) reproducing natgrad's sampling: one call per batch, in batch order.

    categorical: ``multinomial(softmax(f), S, replacement=True).T``; gaussian:
    ``f + randn((S, *f.shape))``; bernoulli: ``bernoulli(sigmoid(f).expand(S, *f.shape))``.
    Returns one (S, *y.shape) tensor per example.
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    out: list[Tensor] = []
    for x, _ in data:
        with torch.no_grad():
            f = model(x)
        S = num_samples
        if likelihood == "categorical":
            draws = torch.multinomial(torch.softmax(f, -1), S, replacement=True,
                                      generator=generator).T
        elif likelihood == "gaussian":
            draws = f + torch.randn((S, *f.shape), generator=generator, dtype=f.dtype)
        elif likelihood == "bernoulli":
            draws = torch.bernoulli(torch.sigmoid(f).expand(S, *f.shape), generator=generator)
        else:
            raise ValueError(f"unknown likelihood {likelihood!r}")
        out.extend(draws[:, n] for n in range(f.shape[0]))
    return out


def dense_fisher_from_samples(
    model: nn.Module, data: Iterable, likelihood: str, samples: list[Tensor]
) -> Tensor:
    """(1/N) Σₙ (1/S) Σₛ ∇θ log p(ŷₙₛ) ∇θ log p(ŷₙₛ)ᵀ, ``samples[n]`` of shape (S, *y.shape)."""
    P = num_params(model)
    total = torch.zeros(P, P, dtype=torch.float64)
    items = examples(data)
    for (x, _), y_hat in zip(items, samples, strict=True):
        for y in y_hat:
            g = loglik_gradient(model, x, y, likelihood).to(torch.float64)
            total += torch.outer(g, g) / y_hat.shape[0]
    return total / len(items)


def module_param_indices(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(module name, θ indices of its own trainable parameters) per module owning any."""
    slices = theta_slices(model)
    out = []
    for mname, module in model.named_modules():
        idx = [
            torch.arange(slices[f"{mname}.{pname}" if mname else pname].start,
                         slices[f"{mname}.{pname}" if mname else pname].stop)
            for pname, p in module.named_parameters(recurse=False) if p.requires_grad
        ]
        if idx:
            out.append((mname, torch.cat(idx)))
    return out


# ---------------------------------------------------------------------------------------------
# K-FAC from the definitions


def kfac_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv2d layer with a trainable parameter, in θ order."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_patches(module: nn.Conv2d, h: Tensor) -> Tensor:
    """Zero-padded patches of one example's input h (C, H, W): shape (H'·W', C·kh·kw).

    Row s = i·W' + j holds h_pad[c, i·sh + ki·dh, j·sw + kj·dw] at column (c, ki, kj)
    (row-major, like ``weight.flatten(1)``), so that a[:, i, j] = W.flatten(1) @ row + b.
    """
    assert module.padding_mode == "zeros" and not isinstance(module.padding, str)
    ph, pw = _pair(module.padding)
    kh, kw = _pair(module.kernel_size)
    sh, sw = _pair(module.stride)
    dh, dw = _pair(module.dilation)
    C, H, W = h.shape
    hp = h.new_zeros(C, H + 2 * ph, W + 2 * pw)
    hp[:, ph:ph + H, pw:pw + W] = h
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = [
        hp[:, ki * dh: ki * dh + sh * (Ho - 1) + 1: sh, kj * dw: kj * dw + sw * (Wo - 1) + 1: sw]
        for ki in range(kh) for kj in range(kw)
    ]  # each (C, Ho, Wo)
    patches = torch.stack(taps, dim=1)  # (C, kh·kw, Ho, Wo): column order (c, ki, kj)
    return patches.reshape(C * kh * kw, Ho * Wo).T


def _positions(module: nn.Module, t: Tensor, lead: int) -> Tensor:
    """Pre-activation-shaped values with ``lead`` leading dims, then a's shape (1, ...):
    returned as (*lead, S, out), positions s in row-major order."""
    lead_shape = t.shape[:lead]
    rest = t.shape[lead + 1:]  # drop the batch dim of size 1
    if isinstance(module, nn.Conv2d):
        out = rest[0]
        return t.reshape(*lead_shape, out, -1).transpose(-1, -2)
    return t.reshape(*lead_shape, -1, rest[-1])


def layer_records(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """For one example x: per K-FAC layer name, (ā rows (S, in'), pre-activation a (1, ...))."""
    layers = kfac_layers(model)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            assert name not in seen, f"layer {name} called twice"
            seen[name] = (args[0].detach(), out.detach())
        return hook

    try:
        for name, module in layers:
            handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(x.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    records = {}
    for name, module in layers:
        h, a = seen[name]
        if isinstance(module, nn.Conv2d):
            rows = conv_patches(module, h[0])
        else:
            rows = h[0].reshape(-1, h.shape[-1])
        parts = []
        if module.weight.requires_grad:
            parts.append(rows)
        if module.bias is not None and module.bias.requires_grad:
            parts.append(torch.ones(rows.shape[0], 1, dtype=rows.dtype))
        records[name] = (torch.cat(parts, dim=1), a)
    return records


def _output_of_deltas(model: nn.Module, x: Tensor, deltas: dict[str, Tensor]) -> Tensor:
    """f(x) (one example) with ``deltas[name]`` added to each layer's pre-activation."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, delta in deltas.items():
            def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor,
                     delta: Tensor = delta) -> Tensor:
                return out + delta
            handles.append(modules[name].register_forward_hook(hook))
        return model(x.unsqueeze(0))[0]
    finally:
        for handle in handles:
            handle.remove()


def preactivation_jacobians(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Per K-FAC layer, J_{aₛ} = ∂f/∂aₛ for every position s of one example: (S, C, out)."""
    records = layer_records(model, x)
    zeros = {name: torch.zeros_like(a) for name, (_, a) in records.items()}
    jac = jacrev(lambda d: _output_of_deltas(model, x, d).reshape(-1))(zeros)
    modules = dict(model.named_modules())
    # (C, 1, ...) -> (C, S, out) -> (S, C, out)
    return {name: _positions(modules[name], j, 1).transpose(0, 1) for name, j in jac.items()}


def _preactivation_grads(
    model: nn.Module, x: Tensor, y: Tensor, likelihood: str
) -> dict[str, Tensor]:
    """Per K-FAC layer, gₛ = ∂ log p(y | f(x))/∂aₛ for every position s: (S, out)."""
    records = layer_records(model, x)
    zeros = {name: torch.zeros_like(a) for name, (_, a) in records.items()}
    g = grad(lambda d: log_likelihood(likelihood, _output_of_deltas(model, x, d), y))(zeros)
    modules = dict(model.named_modules())
    return {name: _positions(modules[name], v, 0) for name, v in g.items()}


def kfac_factors(
    model: nn.Module, data: Iterable, likelihood: str, fisher_type: str = "true",
    samples: list[Tensor] | None = None, approx: str = "expand",
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per K-FAC layer name: (G, Ā) from the definitions (see the module docstring).

    ``fisher_type``: "true", "empirical" (the data's targets) or "samples" (``samples[n]`` of
    shape (S, *y.shape): G averages g gᵀ over the S draws). ``approx`` for a layer applied at
    several positions s of one example (Eschenhagen et al. 2023): "expand" sums g gᵀ over the
    positions and averages ā āᵀ over examples and positions; "reduce" sums g over positions
    and averages ā over them before the outer products, Ā averaged over examples.
    """
    reduce = approx == "reduce"
    assert approx in ("expand", "reduce")
    layers = kfac_layers(model)
    modules = dict(layers)
    A = {name: 0.0 for name in modules}
    G = {name: 0.0 for name in modules}
    rows_seen = dict.fromkeys(modules, 0)
    items = examples(data)
    for n, (x, y) in enumerate(items):
        for name, (abar, _) in layer_records(model, x).items():
            abar = abar.to(torch.float64)
            if reduce:
                abar = abar.mean(0, keepdim=True)
            A[name] = A[name] + abar.T @ abar
            rows_seen[name] += abar.shape[0]
        if fisher_type == "true":
            with torch.no_grad():
                f = model(x.unsqueeze(0))[0]
            D = output_fisher(likelihood, f).to(torch.float64)
            for name, J in preactivation_jacobians(model, x).items():
                J = J.to(torch.float64)
                if reduce:
                    J = J.sum(0, keepdim=True)
                G[name] = G[name] + torch.einsum("sco,cd,sdp->op", J, D, J)
        else:
            if fisher_type == "empirical":
                targets = [y]
            elif fisher_type == "samples":
                assert samples is not None
                targets = list(samples[n])
            else:
                raise ValueError(f"unknown fisher_type {fisher_type!r}")
            for t in targets:
                for name, g in _preactivation_grads(model, x, t, likelihood).items():
                    g = g.to(torch.float64)
                    if reduce:
                        g = g.sum(0, keepdim=True)
                    G[name] = G[name] + g.T @ g / len(targets)
    return {name: (G[name] / len(items), A[name] / rows_seen[name]) for name in modules}


def layer_indices(model: nn.Module, layer_name: str) -> Tensor:
    """θ indices of the entries of vec_row([W | b]) of a layer (bias as the last column)."""
    module = dict(model.named_modules())[layer_name]
    slices = theta_slices(model)
    prefix = f"{layer_name}." if layer_name else ""
    out = module.weight.shape[0]
    columns = []
    if module.weight.requires_grad:
        sl = slices[prefix + "weight"]
        columns.append(torch.arange(sl.start, sl.stop).reshape(out, -1))
    if module.bias is not None and module.bias.requires_grad:
        sl = slices[prefix + "bias"]
        columns.append(torch.arange(sl.start, sl.stop).reshape(out, 1))
    return torch.cat(columns, dim=1).reshape(-1)


def kronecker_embed(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """The (P, P) matrix in θ order with block G ⊗ Ā on each layer's vec_row([W | b])."""
    P = num_params(model)
    out = torch.zeros(P, P, dtype=torch.float64)
    for name, (G, A) in factors.items():
        idx = layer_indices(model, name)
        out[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(G, A)
    return out


# ---------------------------------------------------------------------------------------------
# K-FAC of layers computed inside a function (attention's projections)


def attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
              mask: Tensor | None = None, deltas: dict[str, Tensor] | None = None
              ) -> tuple[Tensor, Tensor]:
    """Multi-head attention of one sequence from its definition, with the parameters of
    ``mha`` (no dropout): query (L, E), key (S, kdim), value (S, vdim);

        packed weights (self-attention: query = key = value = x):
            a_in = x W_inᵀ + b_in (+ deltas["in_proj"]), (L, 3E); q | k | v its column blocks;
        separate weights: q = query W_qᵀ + b_q (+ deltas["q_proj"]), k, v likewise with the
            blocks b_q | b_k | b_v of in_proj_bias;
        head i (columns i·d … (i+1)·d, d = E/H): o_i = softmax(q_i k_iᵀ/√d + M) v_i;
        a_out = o W_oᵀ + b_o (+ deltas["out_proj"]), o = [o_1 … o_H] (L, E).

    ``mask`` M: boolean (L, S), True = not attended (−∞), or None. Returns (a_out, o).
    """
    deltas = deltas or {}
    E, H = mha.embed_dim, mha.num_heads
    d = E // H

    def project(x: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> Tensor:
        a = x @ weight.T
        if bias is not None:
            a = a + bias
        return a + deltas[name] if name in deltas else a

    if mha.in_proj_weight is not None:
        assert query is key and key is value, "packed weights: self-attention only"
        a_in = project(query, mha.in_proj_weight, mha.in_proj_bias, "in_proj")
        q, k, v = a_in[:, :E], a_in[:, E:2 * E], a_in[:, 2 * E:]
    else:
        b = mha.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        q = project(query, mha.q_proj_weight, bq, "q_proj")
        k = project(key, mha.k_proj_weight, bk, "k_proj")
        v = project(value, mha.v_proj_weight, bv, "v_proj")
    heads = []
    for i in range(H):
        cols = slice(i * d, (i + 1) * d)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(mask, -math.inf)
        heads.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    o = torch.cat(heads, dim=1)
    return project(o, mha.out_proj.weight, mha.out_proj.bias, "out_proj"), o


def kfac_factors_of(
    f_of: Callable[[Tensor, dict[str, Tensor]], Tensor],
    rows_of: Callable[[Tensor], dict[str, Tensor]],
    out_dims: dict[str, int], inputs: Iterable[Tensor], likelihood: str = "categorical",
) -> dict[str, tuple[Tensor, Tensor]]:
    """(G, Ā) of layers inside a function, from the definitions, true Fisher: for each
    example x, ``rows_of(x)[name]`` are the rows ā (S, in') of the layer's S positions and
    ``f_of(x, deltas)`` the outputs f (C,) with ``deltas[name]`` (S, out) added to the
    layer's pre-activations; Ā = Σ ā āᵀ / (rows seen), G = (1/N) Σₙ Σₛ J_sᵀ D(fₙ) J_s with
    J_s = ∂f/∂a_s."""
    A: dict[str, Tensor] = {}
    G: dict[str, Tensor] = {}
    rows_seen = dict.fromkeys(out_dims, 0)
    n = 0
    for x in inputs:
        n += 1
        rows = {name: r.detach().to(torch.float64) for name, r in rows_of(x).items()}
        zeros = {name: torch.zeros(rows[name].shape[0], out, dtype=torch.float64)
                 for name, out in out_dims.items()}
        with torch.no_grad():
            f = f_of(x, zeros)
        D = output_fisher(likelihood, f).to(torch.float64)
        jac = jacrev(lambda d, x=x: f_of(x, d))(zeros)  # per name (C, S, out)
        for name in out_dims:
            J = jac[name].to(torch.float64)
            A[name] = A.get(name, 0.0) + rows[name].T @ rows[name]
            G[name] = G.get(name, 0.0) + torch.einsum("cso,cd,dsp->op", J, D, J)
            rows_seen[name] += rows[name].shape[0]
    return {name: (G[name] / n, A[name] / rows_seen[name]) for name in out_dims}
# nn.Embedding: K-FAC with one-hot inputs, from the definitions


def embedding_inputs(module: nn.Embedding, x: Tensor) -> Tensor:
    """ā of every position of one example's tokens x (any shape): one-hot rows e_{x_s} of
    shape (S, num_embeddings), a zero row where x = padding_idx (PyTorch gives that row of the
    weight no gradient, so it is no input of the weight: a = W ā + weight[padding_idx])."""
    rows = F.one_hot(x.reshape(-1), module.num_embeddings).to(torch.float64)
    if module.padding_idx is not None:
        rows[x.reshape(-1) == module.padding_idx] = 0
    return rows


def embedding_kfac_factors(model: nn.Module, data: Iterable, likelihood: str, name: str
                           ) -> tuple[Tensor, Tensor]:
    """(G, Ā) of the embedding ``name`` for the true Fisher, with W = weightᵀ (d, vocab):
    Ā = mean over examples and positions of ā āᵀ (dense, vocab × vocab: small vocabularies
    only), G = (1/N) Σₙ Σₛ J_{aₛ}ᵀ D(fₙ) J_{aₛ}, aₛ the embedding's output at position s."""
    module = dict(model.named_modules())[name]
    A = torch.zeros(module.num_embeddings, module.num_embeddings, dtype=torch.float64)
    G = torch.zeros(module.embedding_dim, module.embedding_dim, dtype=torch.float64)
    rows = 0
    items = examples(data)
    for x, _ in items:
        abar = embedding_inputs(module, x)
        A += abar.T @ abar
        rows += abar.shape[0]
        with torch.no_grad():
            a = module(x.unsqueeze(0))
            f = model(x.unsqueeze(0))[0]
        D = output_fisher(likelihood, f).to(torch.float64)
        jac = jacrev(lambda d, x=x: _output_of_deltas(model, x, {name: d}).reshape(-1))(
            torch.zeros_like(a))  # (C, 1, *x.shape, d)
        J = jac.reshape(jac.shape[0], -1, module.embedding_dim).transpose(0, 1).to(
            torch.float64)  # (S, C, d)
        G += torch.einsum("sco,cd,sdp->op", J, D, J).detach()
    return G / len(items), A / rows


def embedding_indices(model: nn.Module, name: str) -> Tensor:
    """θ indices of vec_row(W) for the embedding ``name``, W = weightᵀ (d, vocab): entry
    (i, j) of W is weight[j, i]."""
    module = dict(model.named_modules())[name]
    sl = theta_slices(model)[f"{name}.weight" if name else "weight"]
    return torch.arange(sl.start, sl.stop).reshape(module.weight.shape).T.reshape(-1)
# ---------------------------------------------------------------------------------------------
# sequence outputs: categorical logits per position, with ignored positions
#
# One example's logits f have shape (T₁, …, C) (``class_dim=-1``) or (C, T₁, …)
# (``class_dim=1``, cross_entropy's layout; 1 counts the batch dimension). Each position t is
# a loss term unless its target equals ``ignore_index``; log p(y | f) = Σ_t [f_t,y_t −
# logsumexp(f_t)] over the counted positions. M = number of counted positions over all
# examples (all positions when targets are None). Then
#   true       F = (1/M) Σₙ Jₙᵀ Dₙ Jₙ,  Dₙ = ∇²_f [−log p(y | fₙ)] (block diagonal, zero blocks
#              at ignored positions),
#   empirical  F = (1/M) Σₙ gₙ gₙᵀ,  gₙ = ∇θ log p(yₙ | fₙ) (the per-sequence gradient),
#   samples    F = (1/M) Σₙ (1/S) Σₛ ∇θ log p(ŷₙₛ) ∇θ log p(ŷₙₛ)ᵀ,
# and K-FAC-expand: Ā = mean of ā āᵀ over all input rows (examples × positions),
# G = (1/M) Σₙ Σₛ [true: J_{aₛ}ᵀ Dₙ J_{aₛ}; else gₛ gₛᵀ with gₛ = ∂ log p(y | fₙ)/∂aₛ].


def _classes_last(f: Tensor, class_dim: int) -> Tensor:
    """One example's logits with the classes last (class_dim counts the batch dim)."""
    dim = class_dim - 1 if class_dim > 0 else class_dim
    return f.movedim(dim, -1)


def sequence_log_likelihood(f: Tensor, y: Tensor, ignore_index: int = -100,
                            class_dim: int = -1) -> Tensor:
    """Σ over the positions t with y_t ≠ ignore_index of f_t[y_t] − logsumexp(f_t)."""
    z = _classes_last(f, class_dim)
    z = z.reshape(-1, z.shape[-1])
    y = y.reshape(-1)
    total = f.new_zeros(())
    for t in range(z.shape[0]):
        if int(y[t]) != ignore_index:
            total = total + z[t, int(y[t])] - torch.logsumexp(z[t], dim=0)
    return total


def _position_mask(f: Tensor, y: Tensor | None, ignore_index: int, class_dim: int) -> Tensor:
    shape = _classes_last(f, class_dim).shape[:-1]
    if y is None:
        return torch.ones(shape, dtype=torch.bool)
    assert tuple(y.shape) == tuple(shape)
    return y != ignore_index


def sequence_output_fisher(f: Tensor, mask: Tensor, class_dim: int = -1) -> Tensor:
    """D = ∇²_f [−Σ_{t counted} log p(y_t | f_t)] for one example, (numel, numel) in f's
    flattened order (independent of y: dummy class 0 at the counted positions)."""
    f = f.detach()
    dummy = torch.where(mask, 0, -100)
    shape = f.shape
    nll = lambda v: -sequence_log_likelihood(v.reshape(shape), dummy, -100, class_dim)  # noqa: E731
    return jacrev(jacrev(nll))(f.reshape(-1))


def _sequence_gradient(model: nn.Module, x: Tensor, y: Tensor, ignore_index: int,
                       class_dim: int) -> Tensor:
    params = trainable(model)
    g = grad(lambda p: sequence_log_likelihood(_forward(model, p, x), y, ignore_index,
                                               class_dim))(params)
    return _flat(g, params, 0).to(torch.float64)


def sequence_dense_fisher(
    model: nn.Module, data: Iterable, fisher_type: str = "true", ignore_index: int = -100,
    class_dim: int = -1, samples: list[Tensor] | None = None,
) -> Tensor:
    """The (P, P) Fisher of a model with sequence logits, per the block comment above;
    ``fisher_type`` "true", "empirical" or "samples" (``samples[n]`` (S, T…) per example)."""
    P = num_params(model)
    total = torch.zeros(P, P, dtype=torch.float64)
    terms = 0
    for n, (x, y) in enumerate(examples(data)):
        with torch.no_grad():
            f = model(x.unsqueeze(0))[0]
        mask = _position_mask(f, y, ignore_index, class_dim)
        terms += int(mask.sum())
        if fisher_type == "true":
            J = parameter_jacobian(model, x).to(torch.float64)
            D = sequence_output_fisher(f, mask, class_dim).to(torch.float64)
            total += J.T @ D @ J
        elif fisher_type == "empirical":
            g = _sequence_gradient(model, x, y, ignore_index, class_dim)
            total += torch.outer(g, g)
        elif fisher_type == "samples":
            assert samples is not None
            for y_hat in samples[n]:
                y_hat = torch.where(mask, y_hat, ignore_index)
                g = _sequence_gradient(model, x, y_hat, ignore_index, class_dim)
                total += torch.outer(g, g) / samples[n].shape[0]
        else:
            raise ValueError(f"unknown fisher_type {fisher_type!r}")
    return total / terms


def sequence_sample_targets(
    model: nn.Module, data: Iterable, num_samples: int, generator: torch.Generator,
    ignore_index: int = -100, class_dim: int = -1,
) -> list[Tensor]:
    """Draws reproducing natgrad's sampling for sequence logits: per batch, one call
    ``multinomial(softmax(z), S, replacement=True)`` on the logits z (classes last) of the
    counted positions in row-major (example, position) order; (S, T…) per example."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    out: list[Tensor] = []
    for x, y in data:
        with torch.no_grad():
            f = model(x)
        z = f.movedim(class_dim, -1)
        positions = z.shape[:-1]
        flat = z.reshape(-1, z.shape[-1])
        keep = (torch.ones(flat.shape[0], dtype=torch.bool) if y is None
                else (y != ignore_index).reshape(-1))
        draws = torch.full((num_samples, flat.shape[0]), ignore_index, dtype=torch.long)
        draws[:, keep] = torch.multinomial(torch.softmax(flat[keep], -1), num_samples,
                                           replacement=True, generator=generator).T
        draws = draws.reshape(num_samples, *positions)
        out.extend(draws[:, n] for n in range(positions[0]))
    return out


def sequence_kfac_factors(
    model: nn.Module, data: Iterable, fisher_type: str = "true", ignore_index: int = -100,
    class_dim: int = -1, samples: list[Tensor] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per Linear layer (G, Ā) of K-FAC-expand for sequence logits (block comment above)."""
    layers = dict(kfac_layers(model))
    A = {name: 0.0 for name in layers}
    G = {name: 0.0 for name in layers}
    rows_seen = dict.fromkeys(layers, 0)
    terms = 0
    for n, (x, y) in enumerate(examples(data)):
        for name, (abar, _) in layer_records(model, x).items():
            abar = abar.to(torch.float64)
            A[name] = A[name] + abar.T @ abar
            rows_seen[name] += abar.shape[0]
        with torch.no_grad():
            f = model(x.unsqueeze(0))[0]
        mask = _position_mask(f, y, ignore_index, class_dim)
        terms += int(mask.sum())
        if fisher_type == "true":
            D = sequence_output_fisher(f, mask, class_dim).to(torch.float64)
            for name, J in preactivation_jacobians(model, x).items():
                J = J.to(torch.float64)
                G[name] = G[name] + torch.einsum("sco,cd,sdp->op", J, D, J)
            continue
        if fisher_type == "empirical":
            targets = [y]
        elif fisher_type == "samples":
            assert samples is not None
            targets = [torch.where(mask, t, ignore_index) for t in samples[n]]
        else:
            raise ValueError(f"unknown fisher_type {fisher_type!r}")
        records = layer_records(model, x)
        zeros = {name: torch.zeros_like(a) for name, (_, a) in records.items()}
        for t in targets:
            g = grad(lambda d, t=t, x=x: sequence_log_likelihood(
                _output_of_deltas(model, x, d), t, ignore_index, class_dim))(zeros)
            for name, v in g.items():
                v = _positions(layers[name], v, 0).to(torch.float64)
                G[name] = G[name] + v.T @ v / len(targets)
    return {name: (G[name] / terms, A[name] / rows_seen[name]) for name in layers}
