"""Brute-force float64 oracle for Natural Neural Networks (whitening, PRONG).

Independent of natgrad: it records layer inputs with its own hooks, pads convolution inputs
itself, computes means and covariances as averages of outer products of centred rows, folds
whitened parameters into canonical ones from the definitions, and differentiates the plain
(canonical) network with torch.func. Everything is float64.

Conventions (DESIGN.md §2): a whitened layer computes a = V U (h − c) + d; canonically
W = V U, b = d − W c (Conv2d: per kernel tap W_t = V_t U, b = d − Σ_t W_t c), U acting on the
channels of the zero-padded input of a convolution, spatial positions counting as samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "Recorder",
    "abar_conv",
    "abar_linear",
    "canonical_conv",
    "canonical_gradients",
    "canonical_linear",
    "canonical_params",
    "conv_rows",
    "dense_whitening",
    "leading_whitening_error",
    "linear_rows",
    "low_rank_whitening",
    "record_inputs",
    "rel_err",
    "row_statistics",
    "whitened_layers",
    "whitened_second_moment",
]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / max(‖expected‖, tiny), Frobenius norms, in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    return float((a - e).norm() / e.norm().clamp(min=1e-300))


# ---------------------------------------------------------------------------------------------
# layer inputs


class Recorder:
    """Context manager recording (float64 copies of) the inputs h of the named submodules in
    every forward pass run inside it, with its own forward pre-hooks: ``recorder.inputs[name]``
    is the list of inputs, in order."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.inputs: dict[str, list[Tensor]] = {n: [] for n in names}
        self._handles: list = []

    def __enter__(self) -> Recorder:
        for name in self.inputs:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            self.inputs[name].append(args[0].detach().clone().double())

        return hook


def record_inputs(
    model: nn.Module, names: Iterable[str], batches: Iterable[Tensor], eval_mode: bool = True
) -> dict[str, list[Tensor]]:
    """The inputs h of the named submodules over forward passes on ``batches`` (no grad, eval
    mode unless told otherwise; every module's mode is restored afterwards)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        with torch.no_grad(), Recorder(model, names) as rec:
            for x in batches:
                model(x)
    finally:
        for m, mode in modes:
            m.training = mode
    return rec.inputs


def linear_rows(inputs: list[Tensor]) -> Tensor:
    """Rows (samples, in) of a Linear layer's inputs (..., in): every leading index a sample."""
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs])


def conv_pads(
    kernel_size: tuple[int, int], padding: str | int | tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d, including padding="same" (extra
    row/column at the bottom/right when the total padding is odd)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th = dilation[0] * (kernel_size[0] - 1)
        tw = dilation[1] * (kernel_size[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph, pw, pw)


def conv_rows(inputs: list[Tensor], conv: nn.Module) -> Tensor:
    """Rows (samples, in_channels): the channel vector of the zero-padded input at every
    position of every example (``conv`` gives kernel_size, padding and dilation)."""
    top, bottom, left, right = conv_pads(
        tuple(conv.kernel_size), conv.padding, tuple(conv.dilation))
    rows = []
    for h in inputs:
        n, ch, hh, ww = h.shape
        padded = torch.zeros(n, ch, hh + top + bottom, ww + left + right, dtype=torch.float64)
        padded[:, :, top:top + hh, left:left + ww] = h
        rows.append(padded.permute(0, 2, 3, 1).reshape(-1, ch))
    return torch.cat(rows)


def row_statistics(rows: Tensor, centred: bool) -> tuple[Tensor, Tensor]:
    """(c, Σ): the mean of the rows and the average outer product of the centred rows
    (uncentred: c = 0 and Σ = E[x xᵀ])."""
    rows = rows.double()
    c = rows.mean(0) if centred else torch.zeros(rows.shape[1], dtype=torch.float64)
    x = rows - c
    sigma = torch.einsum("ni,nj->ij", x, x) / rows.shape[0]
    return c, 0.5 * (sigma + sigma.T)


def whitened_second_moment(sigma: Tensor, epsilon: float) -> Tensor:
    """E diag(λ / (λ + ε)) Eᵀ for Σ = E diag(λ) Eᵀ: the covariance of z = U (h − c) whenever
    UᵀU = (Σ + εI)⁻¹ and U is symmetric (ZCA); PCA's is diag(λ / (λ + ε)) in E's basis."""
    lam, E = torch.linalg.eigh(sigma)
    return (E * (lam / (lam + epsilon))) @ E.T


# ---------------------------------------------------------------------------------------------
# canonical coordinates and the preconditioner Ā_ε


def canonical_linear(
    V: Tensor, U: Tensor, c: Tensor, d: Tensor | None
) -> tuple[Tensor, Tensor]:
    """W = V U and b = d − W c (d = 0 when the layer has no bias)."""
    W = V.double() @ U.double()
    b = (d.double() if d is not None else torch.zeros(W.shape[0], dtype=torch.float64))
    return W, b - W @ c.double()


def canonical_conv(
    V: Tensor, U: Tensor, c: Tensor, d: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per kernel tap t = (k, l): W[:, :, k, l] = V[:, :, k, l] U; b = d − Σ_t W_t c."""
    V, U, c = V.double(), U.double(), c.double()
    W = torch.empty_like(V)
    shift = torch.zeros(V.shape[0], dtype=torch.float64)
    for k in range(V.shape[2]):
        for j in range(V.shape[3]):
            W[:, :, k, j] = V[:, :, k, j] @ U
            shift += W[:, :, k, j] @ c
    b = d.double() if d is not None else torch.zeros(V.shape[0], dtype=torch.float64)
    return W, b - shift


def abar_linear(sigma: Tensor, c: Tensor, epsilon: float) -> Tensor:
    """Ā_ε = [[Σ + εI + c cᵀ, c], [cᵀ, 1]] ((in+1) × (in+1))."""
    n = sigma.shape[0]
    A = torch.empty(n + 1, n + 1, dtype=torch.float64)
    A[:n, :n] = sigma + epsilon * torch.eye(n, dtype=torch.float64) + torch.outer(c, c)
    A[:n, n] = c
    A[n, :n] = c
    A[n, n] = 1.0
    return A


def abar_conv(sigma: Tensor, c: Tensor, epsilon: float, taps: int) -> Tensor:
    """Ā_ε for a Conv2d whose weight is flattened channel-major to (out, in·taps):
    [[Σ_ε ⊗ I_taps + u uᵀ, u], [uᵀ, 1]] with Σ_ε = Σ + εI and u = c ⊗ 1_taps."""
    n = sigma.shape[0]
    sig_eps = sigma + epsilon * torch.eye(n, dtype=torch.float64)
    u = torch.kron(c, torch.ones(taps, dtype=torch.float64))
    m = n * taps
    A = torch.empty(m + 1, m + 1, dtype=torch.float64)
    A[:m, :m] = torch.kron(sig_eps, torch.eye(taps, dtype=torch.float64)) + torch.outer(u, u)
    A[:m, m] = u
    A[m, :m] = u
    A[m, m] = 1.0
    return A


def canonical_gradients(
    plain: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, Tensor]:
    """∇ of loss(plain(x; params), y) w.r.t. ``params`` (names of ``plain``'s parameters;
    the others keep their values), by torch.func."""
    def f(p: dict[str, Tensor]) -> Tensor:
        return loss(torch.func.functional_call(plain, p, (x,)), y)

    return torch.func.grad(f)({k: v.detach().double() for k, v in params.items()})


def whitened_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Submodules carrying whitening parameters (V, c, d and U or its low-rank factors), by
    name (duck-typed)."""
    return {n: m for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("V", "c", "d"))
            and (hasattr(m, "U") or hasattr(m, "U_basis"))}


def dense_whitening(m: nn.Module) -> Tensor:
    """A whitened layer's U as a dense matrix: the buffer ``U``, or for the low-rank storage
    (``U_basis`` B, ``U_scale`` σ, ``U_rest`` r) U = r I + B diag(σ − r) Bᵀ."""
    if hasattr(m, "U"):
        return m.U.double()
    B, sigma, r = m.U_basis.double(), m.U_scale.double(), m.U_rest.double()
    return r * torch.eye(B.shape[0], dtype=torch.float64) + B @ torch.diag(sigma - r) @ B.T


def low_rank_whitening(sigma: Tensor, epsilon: float, rank: int) -> Tensor:
    """U = r I + E_k diag((λ_k + ε)^{-1/2} − r) E_kᵀ for Σ = E diag(λ) Eᵀ, E_k the
    eigenvectors of the k largest eigenvalues, r = (mean of the other λ + ε)^{-1/2}."""
    lam, E = torch.linalg.eigh(sigma)
    lam = lam.clamp(min=0)
    Ek, lam_k = E[:, -rank:], lam[-rank:]
    r = 1 / torch.sqrt(lam[:-rank].mean() + epsilon)
    n = sigma.shape[0]
    return r * torch.eye(n, dtype=torch.float64) + Ek @ torch.diag(
        1 / torch.sqrt(lam_k + epsilon) - r) @ Ek.T


def leading_whitening_error(U: Tensor, sigma: Tensor, epsilon: float, rank: int) -> float:
    """How far U is from whitening the ``rank`` leading directions of Σ:
    ‖E_kᵀ U Σ Uᵀ E_k − diag(λ_k/(λ_k + ε))‖ / ‖diag(λ_k/(λ_k + ε))‖ (Frobenius), E_k from
    torch.linalg.eigh in float64."""
    lam, E = torch.linalg.eigh(sigma.double())
    Ek, lam_k = E[:, -rank:], lam[-rank:].clamp(min=0)
    U = U.double()
    return rel_err(Ek.T @ U @ sigma.double() @ U.T @ Ek, torch.diag(lam_k / (lam_k + epsilon)))


def canonical_params(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """(W, b) of every whitened layer (Linear if V is 2-D, Conv2d if 4-D)."""
    out = {}
    for name, m in whitened_layers(model).items():
        fold = canonical_linear if m.V.dim() == 2 else canonical_conv
        out[name] = fold(m.V.detach(), dense_whitening(m), m.c,
                         None if m.d is None else m.d.detach())
    return out
