"""Brute-force float64 oracle for natgrad's optimizer steps.

Everything here is computed from the definitions with ``torch.func`` (``functional_call``,
``jacrev``, ``grad``, ``vmap``) and dense linear algebra; it never imports natgrad and shares no
code with ``src/``.

Models are ``nn.Sequential`` whose children are ``nn.Linear`` layers or modules applied
as-is (``Tanh``, ``ReLU``, ``LayerNorm``, …). :func:`forward` evaluates such a model explicitly
from a parameter dict, calling ``F.linear`` for the Linear layers, so that hooks installed on the
model or its Linear layers (natgrad's) never run while the oracle works.

Conventions (DESIGN.md §1): θ = the trainable parameters in ``named_parameters()`` order,
each flattened row-major. A Linear layer's parameters as a matrix are V = [W | b] (out, in + 1),
and its Kronecker block in row-major vec(V) order is G ⊗ Ā.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "KFACOracle",
    "NGDOracle",
    "block_diagonal",
    "fisher",
    "flat",
    "forward",
    "kfac_statistics",
    "layer_block",
    "layer_matrix",
    "linear_names",
    "loss_and_grad",
    "loss_function",
    "make_batches",
    "make_mlp",
    "module_slices",
    "snapshot",
    "unflat",
]


# -- parameters ------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> Params:
    """The trainable parameters as detached float64 copies, in θ's order."""
    return {
        n: p.detach().clone().to(torch.float64)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def flat(params: Params) -> Tensor:
    """θ: the parameters flattened row-major and concatenated, shape (P,)."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflat(theta: Tensor, like: Params) -> Params:
    """The inverse of :func:`flat` with the names and shapes of ``like``."""
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = theta[offset:offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's Linear children (the layers K-FAC handles), in order."""
    return [name for name, child in model.named_children() if isinstance(child, nn.Linear)]


def module_slices(params: Params) -> list[slice]:
    """The slice of θ owned by each module (parameters grouped by their owner's name)."""
    slices: list[slice] = []
    owners: list[str] = []
    offset = 0
    for name, t in params.items():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owners and owners[-1] == owner:
            slices[-1] = slice(slices[-1].start, offset + t.numel())
        else:
            owners.append(owner)
            slices.append(slice(offset, offset + t.numel()))
        offset += t.numel()
    return slices


# -- the network, explicitly -----------------------------------------------------------------
def forward(
    model: nn.Module,
    params: Params,
    x: Tensor,
    offsets: dict[str, Tensor] | None = None,
    inputs: dict[str, Tensor] | None = None,
) -> Tensor:
    """f(x; θ) for a Sequential model, evaluated from ``params``.

    ``offsets[name]`` is added to the pre-activation a = W h + b of Linear layer ``name`` (to
    differentiate w.r.t. a); ``inputs[name]`` receives the layer's input h.
    """
    h = x
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            if inputs is not None:
                inputs[name] = h
            h = F.linear(h, params[f"{name}.weight"], params.get(f"{name}.bias"))
            if offsets is not None and name in offsets:
                h = h + offsets[name]
        else:
            own = {k.split(".", 1)[1]: v for k, v in params.items() if k.split(".", 1)[0] == name}
            h = functional_call(child, own, (h,))
    return h


def log_prob(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """log p(y | f) for one example (f of shape (C,)), up to constants in f."""
    if likelihood == "categorical":
        return torch.log_softmax(f, dim=-1).gather(0, y.reshape(1)).squeeze(0)
    if likelihood == "gaussian":
        return -0.5 * (y - f).square().sum()
    if likelihood == "bernoulli":
        return (y * f - F.softplus(f)).sum()
    raise ValueError(likelihood)


def output_fisher(likelihood: str, f: Tensor) -> Tensor:
    """D(fₙ) = E_{ŷ~p(·|fₙ)}[∇ log p ∇ log pᵀ] in closed form, shape (N, C, C)."""
    if likelihood == "categorical":
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if likelihood == "gaussian":
        eye = torch.eye(f.shape[-1], dtype=f.dtype)
        return eye.expand(f.shape[0], -1, -1)
    if likelihood == "bernoulli":
        p = torch.sigmoid(f)
        return torch.diag_embed(p * (1 - p))
    raise ValueError(likelihood)


def scores(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """∇_f log p(yₙ | fₙ) per example by autodiff, shape (N, C)."""
    return vmap(grad(lambda fn, yn: log_prob(likelihood, fn, yn)))(f, y)


def loss_and_grad(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn
) -> tuple[Tensor, Params]:
    """L(θ) = loss_fn(f(x; θ), y) and ∇L as a parameter dict."""
    theta = flat(params)

    def loss(t: Tensor) -> Tensor:
        return loss_fn(forward(model, unflat(t, params), x), y)

    return loss(theta).detach(), unflat(grad(loss)(theta), params)


# -- Fisher matrices --------------------------------------------------------------------------
def jacobians(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Per-example Jacobians Jₙ = ∂fₙ/∂θ, shape (N, C, P)."""
    theta = flat(params)

    def f_single(t: Tensor, xn: Tensor) -> Tensor:
        return forward(model, unflat(t, params), xn.unsqueeze(0))[0]

    return vmap(jacrev(f_single), in_dims=(None, 0))(theta, x)


def fisher(
    model: nn.Module,
    params: Params,
    x: Tensor,
    likelihood: str,
    fisher_type: str = "true",
    y: Tensor | None = None,
) -> Tensor:
    """Dense F (P, P): "true" (1/N) Σ Jₙᵀ D(fₙ) Jₙ, or "empirical" (1/N) Σ Jₙᵀ sₙ sₙᵀ Jₙ
    with sₙ = ∇_f log p(yₙ | fₙ)."""
    J = jacobians(model, params, x)
    f = forward(model, params, x)
    n = x.shape[0]
    if fisher_type == "true":
        D = output_fisher(likelihood, f)
        return torch.einsum("ncp,ncd,ndq->pq", J, D, J) / n
    if fisher_type == "empirical":
        g = torch.einsum("ncp,nc->np", J, scores(likelihood, f, y))
        return g.T @ g / n
    raise ValueError(fisher_type)


def block_diagonal(F_dense: Tensor, slices: list[slice]) -> Tensor:
    """F with every entry outside the diagonal blocks ``slices`` set to zero."""
    out = torch.zeros_like(F_dense)
    for sl in slices:
        out[sl, sl] = F_dense[sl, sl]
    return out


def _layer_index(params: Params, name: str) -> Tensor:
    """Positions in θ of vec([W | b]) (row-major) for Linear layer ``name``."""
    offsets, offset = {}, 0
    for key, t in params.items():
        offsets[key] = offset
        offset += t.numel()
    W = params[f"{name}.weight"]
    out, inp = W.shape
    parts = [offsets[f"{name}.weight"] + torch.arange(out * inp).reshape(out, inp)]
    if f"{name}.bias" in params:
        parts.append(offsets[f"{name}.bias"] + torch.arange(out).reshape(out, 1))
    return torch.cat(parts, dim=1).reshape(-1)


def layer_block(F_dense: Tensor, params: Params, name: str) -> Tensor:
    """The layer's block of F, rows and columns in row-major vec([W | b]) order."""
    idx = _layer_index(params, name)
    return F_dense[idx][:, idx]


def layer_matrix(tensors: Params, name: str) -> Tensor:
    """[W | b] (out, in + 1) from per-parameter tensors (just W if there is no bias)."""
    parts = [tensors[f"{name}.weight"]]
    if f"{name}.bias" in tensors:
        parts.append(tensors[f"{name}.bias"].unsqueeze(1))
    return torch.cat(parts, dim=1)


def split_layer_matrix(V: Tensor, params: Params, name: str) -> Params:
    """Inverse of :func:`layer_matrix`."""
    in_dim = params[f"{name}.weight"].shape[1]
    out = {f"{name}.weight": V[:, :in_dim]}
    if f"{name}.bias" in params:
        out[f"{name}.bias"] = V[:, in_dim]
    return out


def kfac_statistics(
    model: nn.Module,
    params: Params,
    x: Tensor,
    likelihood: str,
    fisher_type: str = "true",
    y: Tensor | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per Linear layer (Ā, G) on one batch, from the definitions.

    Ā = (1/N) Σₙ āₙ āₙᵀ, ā = [h; 1]; G = (1/N) Σₙ J_{a,n}ᵀ D(fₙ) J_{a,n} ("true") or
    (1/N) Σₙ J_{a,n}ᵀ sₙ sₙᵀ J_{a,n} ("empirical"), with J_{a,n} = ∂fₙ/∂aₙ obtained by
    differentiating w.r.t. an offset added to the pre-activation a.
    """
    names = linear_names(model)
    inputs: dict[str, Tensor] = {}
    f = forward(model, params, x, inputs=inputs)
    zeros = {name: torch.zeros(params[f"{name}.weight"].shape[0], dtype=x.dtype)
             for name in names}

    def f_single(offsets: dict[str, Tensor], xn: Tensor) -> Tensor:
        return forward(model, params, xn.unsqueeze(0), offsets=offsets)[0]

    J_a = vmap(jacrev(f_single), in_dims=(None, 0))(zeros, x)  # name -> (N, C, out)
    n = x.shape[0]
    if fisher_type == "true":
        D = output_fisher(likelihood, f)
    elif fisher_type == "empirical":
        s = scores(likelihood, f, y)
        D = s.unsqueeze(-1) * s.unsqueeze(-2)
    else:
        raise ValueError(fisher_type)
    out = {}
    for name in names:
        h = inputs[name]
        a_bar = torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], 1) if (
            f"{name}.bias" in params) else h
        A = a_bar.T @ a_bar / n
        G = torch.einsum("nco,ncd,ndq->oq", J_a[name], D, J_a[name]) / n
        out[name] = (A, G)
    return out


# -- optimizers -------------------------------------------------------------------------------
class NGDOracle:
    """θ ← θ − η m, m ← μ m + (F + δI)⁻¹ (∇L + λθ) with a dense solve."""

    def __init__(self, lr: float, damping: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.damping = lr, damping
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buf: Tensor | None = None

    def step(self, theta: Tensor, g: Tensor, F_dense: Tensor) -> Tensor:
        eye = torch.eye(theta.numel(), dtype=theta.dtype)
        d = torch.linalg.solve(F_dense + self.damping * eye, g + self.weight_decay * theta)
        if self.momentum:
            self.buf = d.clone() if self.buf is None else self.momentum * self.buf + d
            d = self.buf
        return theta - self.lr * d


class KFACOracle:
    """K-FAC / EK-FAC as torch.optim.SGD on preconditioned gradients, from the definitions.

    Step t (t = 0, 1, …):

    - if t % factor_update_period == 0: Ā ← β Ā + (1 − β) Ā_t, G ← β G + (1 − β) G_t (the first
      update copies);
    - if t % inverse_update_period == 0 (or never done): the curvature is frozen at the current
      (Ā, G) until the next refresh (K-FAC uses the frozen factors; EK-FAC their eigenbases);
    - EK-FAC scales: S_t = diag(Qᵀ F_l Q) (= (1/N) Σₙ Σₖ (Q_Gᵀ Γ_{nk} Q_A)²) with F_l the exact
      Fisher block of the layer and Q = Q_G ⊗ Q_A; when statistics were gathered this step
      (factor or scale update due) and (the basis changed or a scale update is due):
      S ← S_t on a basis change, S ← β S + (1 − β) S_t otherwise; a basis change without
      statistics sets S = s_G s_Aᵀ;
    - P_l = (G ⊗ Ā + δI)⁻¹ vec ∇V ("exact", dense solve), (G + √δ/π I)⁻¹ ∇V (Ā + π√δ I)⁻¹
      ("factored", π² = (tr Ā/dim Ā)/(tr G/dim G) of the frozen factors), or
      (Q diag(S) Qᵀ + δI)⁻¹ vec ∇V (EK-FAC, dense solve);
    - d = P(∇L) + λθ (∇L + λθ for parameters outside Linear layers), m ← μ m + d (m = d first),
      θ ← θ − η m.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        likelihood: str = "categorical",
        *,
        fisher_type: str = "true",
        ema_decay: float = 0.95,
        factor_update_period: int = 1,
        inverse_update_period: int = 10,
        damping_mode: str = "exact",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ekfac: bool = False,
        scale_update_period: int = 1,
    ) -> None:
        self.model = model
        self.lr, self.damping, self.likelihood = lr, damping, likelihood
        self.fisher_type = fisher_type
        self.beta = ema_decay
        self.factor_period, self.inverse_period = factor_update_period, inverse_update_period
        self.damping_mode = damping_mode
        self.momentum, self.weight_decay = momentum, weight_decay
        self.ekfac, self.scale_period = ekfac, scale_update_period
        self.layers = linear_names(model)
        self.steps = 0
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.frozen: dict[str, tuple[Tensor, Tensor]] = {}
        self.S: dict[str, Tensor] = {}
        self.buf: dict[str, Tensor] = {}

    def _eigenbasis(self, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        A, G = self.frozen[name]
        s_A, Q_A = torch.linalg.eigh(A)
        s_G, Q_G = torch.linalg.eigh(G)
        return s_G.clamp(min=0), Q_G, s_A.clamp(min=0), Q_A

    def directions(self, params: Params, grads: Params, x: Tensor,
                   y: Tensor | None = None) -> Params:
        """Advance the curvature by one step on batch (x, y); return P(∇L) per parameter."""
        t = self.steps
        factors_due = t % self.factor_period == 0
        scales_due = self.ekfac and t % self.scale_period == 0
        if factors_due:
            stats = kfac_statistics(self.model, params, x, self.likelihood, self.fisher_type, y)
            for name, (A_t, G_t) in stats.items():
                if name in self.factors:
                    A, G = self.factors[name]
                    A_t = self.beta * A + (1 - self.beta) * A_t
                    G_t = self.beta * G + (1 - self.beta) * G_t
                self.factors[name] = (A_t, G_t)
        new_basis = t % self.inverse_period == 0 or not self.frozen
        if new_basis:
            self.frozen = {name: (A.clone(), G.clone()) for name, (A, G) in self.factors.items()}
        if self.ekfac:
            gathered = factors_due or scales_due
            if gathered and (new_basis or scales_due):
                F_dense = fisher(self.model, params, x, self.likelihood, self.fisher_type, y)
                for name in self.layers:
                    _, Q_G, _, Q_A = self._eigenbasis(name)
                    Q = torch.kron(Q_G, Q_A)
                    block = layer_block(F_dense, params, name)
                    S_t = torch.diagonal(Q.T @ block @ Q).reshape(Q_G.shape[0], Q_A.shape[0])
                    if new_basis or name not in self.S:
                        self.S[name] = S_t
                    else:
                        self.S[name] = self.beta * self.S[name] + (1 - self.beta) * S_t
            elif new_basis:
                for name in self.layers:
                    s_G, _, s_A, _ = self._eigenbasis(name)
                    self.S[name] = torch.outer(s_G, s_A)
        out: Params = {}
        delta = self.damping
        for name in self.layers:
            V = layer_matrix(grads, name)
            A, G = self.frozen[name]
            if self.ekfac:
                _, Q_G, _, Q_A = self._eigenbasis(name)
                Q = torch.kron(Q_G, Q_A)
                M = Q @ torch.diag(self.S[name].reshape(-1)) @ Q.T
                eye = torch.eye(M.shape[0], dtype=M.dtype)
                P = torch.linalg.solve(M + delta * eye, V.reshape(-1)).reshape(V.shape)
            elif self.damping_mode == "exact":
                M = torch.kron(G, A)
                eye = torch.eye(M.shape[0], dtype=M.dtype)
                P = torch.linalg.solve(M + delta * eye, V.reshape(-1)).reshape(V.shape)
            else:
                pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
                root = math.sqrt(delta)
                eye_G = torch.eye(G.shape[0], dtype=G.dtype)
                eye_A = torch.eye(A.shape[0], dtype=A.dtype)
                left = torch.linalg.solve(G + root / pi * eye_G, V)
                P = torch.linalg.solve(A + pi * root * eye_A, left.T).T
            out.update(split_layer_matrix(P, params, name))
        self.steps += 1
        return out

    def step(self, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn,
             lr: float | None = None) -> Params:
        """One optimizer step on batch (x, y): the new parameters."""
        _, grads = loss_and_grad(self.model, params, x, y, loss_fn)
        targets = y if self.fisher_type == "empirical" else None
        pre = self.directions(params, grads, x, targets)
        return self.apply(params, grads, pre, lr)

    def apply(self, params: Params, grads: Params, pre: Params,
              lr: float | None = None) -> Params:
        """SGD with momentum and (unpreconditioned) weight decay on the directions ``pre``."""
        lr = self.lr if lr is None else lr
        new = {}
        for name, p in params.items():
            d = pre.get(name, grads[name]) + self.weight_decay * p
            if self.momentum:
                self.buf[name] = d.clone() if name not in self.buf else (
                    self.momentum * self.buf[name] + d)
                d = self.buf[name]
            new[name] = p - lr * d
        return new

    def quadratic(self, grads: Params, deltas: Params) -> float:
        """M(Δ) = ∇Lᵀ Δ + ½ Δᵀ (F̂ + δI) Δ with F̂ the current (frozen) K-FAC curvature."""
        total = sum(float((grads[n] * d).sum()) for n, d in deltas.items())
        quad = self.damping * sum(float(d.square().sum()) for d in deltas.values())
        for name in self.layers:
            A, G = self.frozen[name]
            D = layer_matrix(deltas, name).reshape(-1)
            quad += float(D @ torch.kron(G, A) @ D)
        return total + 0.5 * quad


# -- small test problems ----------------------------------------------------------------------
def make_mlp(seed: int = 0, hidden: int = 6, inputs: int = 4, outputs: int = 3,
             norm: bool = False, last_bias: bool = True) -> nn.Sequential:
    """A float64 MLP Linear-Tanh-Linear (with a LayerNorm after the first layer if ``norm``)."""
    torch.manual_seed(seed)
    mid: list[nn.Module] = [nn.LayerNorm(hidden)] if norm else []
    model = nn.Sequential(nn.Linear(inputs, hidden), *mid, nn.Tanh(),
                          nn.Linear(hidden, outputs, bias=last_bias))
    if norm:  # move LayerNorm's parameters off their trivial initial values
        with torch.no_grad():
            mid[0].weight.uniform_(0.5, 1.5)
            mid[0].bias.uniform_(-0.5, 0.5)
    return model.double()


def make_batches(count: int, n: int = 16, inputs: int = 4, outputs: int = 3,
                 likelihood: str = "categorical", seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """``count`` float64 batches (x, y) of ``n`` examples with targets for ``likelihood``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(n, inputs, generator=g, dtype=torch.float64)
        if likelihood == "categorical":
            y = torch.randint(0, outputs, (n,), generator=g)
        elif likelihood == "gaussian":
            y = torch.randn(n, outputs, generator=g, dtype=torch.float64)
        else:
            y = torch.randint(0, 2, (n, outputs), generator=g).to(torch.float64)
        batches.append((x, y))
    return batches


def loss_function(likelihood: str) -> LossFn:
    """The batch-mean negative log-likelihood loss matching ``likelihood``."""
    if likelihood == "categorical":
        return F.cross_entropy
    if likelihood == "gaussian":
        return lambda f, y: 0.5 * (f - y).square().sum(1).mean()
    return F.binary_cross_entropy_with_logits
