"""The exact-Fisher quadratic model of a step, and the step size and momentum minimising it.

Martens & Grosse 2015 §7 (kfac-jax's ``use_adaptive_learning_rate`` /
``use_adaptive_momentum``): with Δ the preconditioned direction and δ₀ the previous update, the
update is v = α Δ + μ δ₀ with (α, μ) minimising

    M(v) = gᵀ v + ½ vᵀ (F + δ I) v,

g the gradient, δ the damping and F the exact Fisher (GGN) of the batch,
F = (1/M) Σₙ Jₙᵀ D(fₙ) Jₙ over the M loss terms (DESIGN.md §1). With u₁ = Δ, u₂ = δ₀ this is
the 2 × 2 problem  min_x bᵀ x + ½ xᵀ A x,  A_ij = u_iᵀ F u_j + δ u_iᵀ u_j,  b_i = gᵀ u_i,
x = (α, μ) = −A⁻¹ b. The terms u_iᵀ F u_j = (1/M) Σₙ (Jₙ u_i)ᵀ D(fₙ) (Jₙ u_j) need Jₙ u_i only:
one forward-mode pass (Jacobian-vector product) per direction, no P × P matrix.

The functions here are usable with the preconditioners (:class:`KFACPreconditioner` users
compute Δ themselves and call :func:`fisher_gram` and :func:`minimize_quadratic_model`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from natgrad import distributed
from natgrad.capture import suspended
from natgrad.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from natgrad.outputs import OutputSelector, output_tensor

__all__ = [
    "QuadraticModel",
    "fisher_gram",
    "fisher_gram_entropy",
    "fisher_sees",
    "likelihood_quadratic",
    "merge_directions",
    "minimize_quadratic_model",
    "replay_passes",
]

RngState = tuple[Tensor, "torch.device | None", "Tensor | None"]


def likelihood_quadratic(likelihood: Likelihood, f: Tensor, U: Tensor) -> tuple[Tensor, int]:
    """The output-space Gram matrix of directions U and the number of loss terms M:

        Q_ij = Σₙ U_{i,n}ᵀ D(fₙ) U_{j,n}   (summed, not averaged),   shape (k, k), float64,

    with ``U`` (k, N, *f.shape[1:]) the output changes Jₙ u_i of k parameter directions and
    D(f) the likelihood's Fisher in output space: categorical (logits over the last dimension)
    uᵀ D w = Σ_c p_c u_c w_c − (pᵀu)(pᵀw), p = softmax(f); gaussian uᵀ w; bernoulli
    Σ p(1 − p) u w, p = σ(f); any other :class:`Likelihood` through its square root,
    uᵀ D w = (Bᵀu)ᵀ(Bᵀw). M counts the loss terms, every position of the output
    (:meth:`Likelihood.term_shape`: N for outputs (N, C), N·T for logits (N, T, C) or with
    ``event_dims``), as the optimizers' "mc"/"true" statistics do: they see no targets, so
    positions the loss ignores (padding) count too.
    """
    f64 = f.detach().to(torch.float64)
    U64 = U.detach().to(torch.float64)
    k = U64.shape[0]
    terms = math.prod(likelihood.term_shape(f))
    if isinstance(likelihood, Categorical):  # classes last, whatever class_dim says
        f64, U64 = likelihood.canonical(f64), likelihood.canonical_rows(U64)
        p = torch.softmax(f64, dim=-1)
        weighted = U64 * p  # (k, N, …, C)
        pu = weighted.sum(-1)  # (k, N, …)
        Q = (torch.einsum("i...,j...->ij", weighted, U64)
             - torch.einsum("i...,j...->ij", pu, pu))
    elif isinstance(likelihood, Gaussian):
        flat = U64.reshape(k, -1)
        Q = flat @ flat.T
    elif isinstance(likelihood, Bernoulli):
        p = torch.sigmoid(f64)
        flat = (U64 * (p * (1 - p)).sqrt()).reshape(k, -1)
        Q = flat @ flat.T
    else:
        B = likelihood.sqrt_fisher(f64)  # (N, C, C)
        W = torch.einsum("nck,ink->inc", B, U64.reshape(k, f.shape[0], -1))  # Bᵀ u
        flat = W.reshape(k, -1)
        Q = flat @ flat.T
    return 0.5 * (Q + Q.T), terms


def replay_rng(rng: RngState | None) -> None:
    """Set the random state to ``rng`` (CPU, and CUDA of its device); None: leave it."""
    if rng is None:
        return
    cpu, device, cuda = rng
    torch.set_rng_state(cpu)
    if device is not None and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def fisher_gram(
    model: nn.Module,
    passes: Sequence[tuple[tuple, dict]],
    likelihood: Likelihood,
    directions: Sequence[dict[str, Tensor]],
    rng_states: Sequence[RngState] | None = None,
    output: OutputSelector = None,
) -> Tensor:
    """G_ij = u_iᵀ F u_j for the parameter directions u_i (name → tensor shaped like the
    parameter; names missing from a direction are 0), F the exact Fisher of the forward passes
    ``passes`` ((args, kwargs) of ``model(*args, **kwargs)``, micro-batches b of M_b loss
    terms: F = Σ_b M_b F_b / Σ_b M_b). Shape (k, k), float64, summed over ranks when
    distributed.

    Each direction costs one forward-mode pass per micro-batch (``torch.autograd.forward_ad``
    through ``torch.func.functional_call``), run in the model's current mode with natgrad's
    hooks suspended and on copies of the buffers (train-mode BatchNorm keeps its running
    statistics); with ``rng_states`` each pass replays the random state its recorded pass
    started from (the same dropout masks), and the caller's random state is left unchanged.
    """
    return fisher_gram_entropy(model, passes, likelihood, directions, rng_states, output)[0]


def fisher_gram_entropy(
    model: nn.Module,
    passes: Sequence[tuple[tuple, dict]],
    likelihood: Likelihood,
    directions: Sequence[dict[str, Tensor]],
    rng_states: Sequence[RngState] | None = None,
    output: OutputSelector = None,
    on_tangents: Callable[[int, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, float | None, float]:
    """:func:`fisher_gram`, the mean entropy per loss term of the model's predictive
    distribution on the same passes, H̄ = Σ_b H_b / Σ_b M_b (:meth:`Likelihood.entropy`; None
    where the likelihood does not give it), from the same forward passes at no extra cost,
    and the number of loss terms M = Σ_b M_b (over all ranks).
    ``on_tangents(b, f_b, U_b)`` receives each pass's outputs and output changes
    U_b = (J_b u_i)_i, shape (k, *f_b.shape)."""
    k = len(directions)
    device = next(model.parameters()).device
    total = torch.zeros(k, k, dtype=torch.float64, device=device)
    entropy = torch.zeros((), dtype=torch.float64, device=device)
    known = True
    count = 0
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    devices = [device] if device.type == "cuda" else []
    # compiled code (torch.compile of the model or of its parts) runs eagerly here: its
    # kernels (addmm's out= variant) have no forward-mode derivative
    with suspended(), torch.no_grad(), torch.random.fork_rng(devices=devices), \
            torch.compiler.set_stance("force_eager"):
        for index, (args, kwargs) in enumerate(passes):
            outputs: list[Tensor] = []
            f: Tensor | None = None
            for u in directions:
                replay_rng(None if rng_states is None else rng_states[index])
                state = {n: b.clone() for n, b in buffers.items()}
                primal, tangent = _output_jvp(model, params, state, u, args, kwargs,
                                              None if rng_states is None else rng_states[index],
                                              output)
                f = primal
                outputs.append(tangent)
            if f is None:
                continue
            U = torch.stack(outputs)
            if on_tangents is not None:
                on_tangents(index, f, U)
            Q, m = likelihood_quadratic(likelihood, f, U)
            total += Q.to(device)
            count += m
            h = likelihood.entropy(f)
            if h is None:
                known = False
            else:
                entropy += h.to(device=device, dtype=torch.float64)
    summed = distributed.sum_across_ranks(
        [total.flatten(), torch.stack([torch.tensor(float(count), dtype=torch.float64,
                                                    device=device), entropy])])
    terms = float(summed[1][0])
    if terms <= 0:
        raise RuntimeError("the quadratic model needs at least one forward pass of the model "
                           "(with gradients enabled) before step()")
    mean_entropy = float(summed[1][1]) / terms if known else None
    return (summed[0] / terms).view(k, k), mean_entropy, terms


def replay_passes(model: nn.Module, passes: Sequence[tuple[tuple, dict]],
                  rng_states: Sequence[RngState] | None, output: OutputSelector,
                  reduce: Callable[[int, Tensor], float]) -> list[float]:
    """``reduce(i, f_i)`` for the output f_i of each recorded forward pass re-run at the
    model's current parameters: natgrad's hooks suspended, no graph, on copies of the buffers
    (a train-mode BatchNorm normalises with the batch, as the recorded pass did, and keeps
    its running statistics), each pass replaying the random state its recorded pass began
    with (the same dropout masks); the caller's random state is left unchanged."""
    device = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    values = []
    with suspended(), torch.no_grad(), torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []), \
            torch.compiler.set_stance("force_eager"):
        for index, (args, kwargs) in enumerate(passes):
            replay_rng(None if rng_states is None else rng_states[index])
            state = {**{n: b.clone() for n, b in buffers.items()}, **params}
            f = output_tensor(functional_call(model, state, args, kwargs), output)
            values.append(reduce(index, f))
    return values


def _output_jvp(model: nn.Module, params: dict[str, Tensor], state: dict[str, Tensor],
                u: dict[str, Tensor], args: tuple, kwargs: dict, rng: RngState | None,
                output: OutputSelector = None) -> tuple[Tensor, Tensor]:
    """(f, J u) of one forward pass: forward-mode AD, with PyTorch's math kernel for
    ``scaled_dot_product_attention`` (its fused CPU/GPU kernels have no forward-mode
    derivative). For a model with another operation lacking one, central differences in the
    parameters' dtype, J u ≈ [f(θ + εu) − f(θ − εu)] / 2ε with ε = ∛(machine ε)·(1 + ‖θ_u‖)/‖u‖
    (θ_u: the parameters u moves; frozen ones do not set the scale)
    (the step balancing truncation and rounding errors; the quadratic model needs a few
    digits), with a warning once."""
    buffers = {n: b for n, b in state.items() if n not in params}
    if model not in _NO_FORWARD_AD:
        _load_forward_ad()
        try:
            with forward_ad.dual_level(), sdpa_kernel([SDPBackend.MATH]), _no_mha_fastpath():
                for name, p in params.items():
                    t = u.get(name)
                    state[name] = p.detach() if t is None else forward_ad.make_dual(
                        p.detach(), t.to(p.dtype))
                out = output_tensor(functional_call(model, state, args, kwargs), output)
                primal, tangent = forward_ad.unpack_dual(out)
            return primal, torch.zeros_like(primal) if tangent is None else tangent
        except (NotImplementedError, RuntimeError) as err:
            if "forward" not in str(err).lower():
                raise
            _NO_FORWARD_AD.add(model)
            warnings.warn(
                "an operation of the model has no forward-mode derivative "
                f"({str(err).splitlines()[0][:160]}); the adaptive step's Jacobian-vector "
                "products for this model use central finite differences from now on",
                RuntimeWarning, stacklevel=5)
    norm_p = math.sqrt(sum(float(p.detach().double().square().sum())
                           for n, p in params.items() if n in u))  # the moved ones only
    norm_u = math.sqrt(sum(float(t.double().square().sum()) for t in u.values()))
    dtype = next(iter(params.values())).dtype
    if norm_u == 0:
        replay_rng(rng)
        f = output_tensor(functional_call(model, {**buffers, **{
            n: p.detach() for n, p in params.items()}}, args, kwargs), output)
        return f, torch.zeros_like(f)
    eps = torch.finfo(dtype).eps ** (1 / 3) * (1 + norm_p) / norm_u
    outs = []
    for sign in (1.0, -1.0, 0.0):
        replay_rng(rng)
        moved = {n: p.detach() + sign * eps * u[n].to(p.dtype) if n in u else p.detach()
                 for n, p in params.items()}
        copies = {n: b.clone() for n, b in buffers.items()}
        outs.append(output_tensor(functional_call(model, {**copies, **moved}, args, kwargs),
                                  output))
    return outs[2], (outs[0] - outs[1]) / (2 * eps)


@functools.cache
def _load_forward_ad() -> None:
    """Load torch's forward-mode decompositions once, before the first dual level: torch
    builds them with ``torch.jit.script``, whose DeprecationWarnings (one per decomposition)
    would otherwise surface from the first adaptive step as if natgrad had caused them."""
    load = getattr(forward_ad, "_maybe_load_decompositions", None)
    if load is None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                category=DeprecationWarning)
        load()


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Without PyTorch's fused MultiheadAttention / TransformerEncoderLayer inference path
    (taken in eval mode when no parameter requires a gradient, as in the forward-mode pass;
    it has no forward-mode derivative)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


_NO_FORWARD_AD: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Models with an operation that has no forward-mode derivative (finite differences)."""


@dataclass(frozen=True)
class QuadraticModel:
    """The minimiser of M(x) = bᵀ x + ½ xᵀ A x over the coefficients x of the directions and
    what a user reads: ``coefficients`` (α, μ, …), ``value`` M(x) = M(v) − M(0) (≤ 0),
    ``kl`` = ½ xᵀ A_F x = ½ vᵀ F v (predicted KL), and ``fallback``: why the full 2 × 2 solve
    was not used ("" when it was); ``scale``: the trust region's t (1: not shortened)."""

    coefficients: tuple[float, ...]
    value: float
    kl: float
    fallback: str = ""
    scale: float = 1.0


def fisher_sees(fisher: Tensor, damping_gram: Tensor, indices: Sequence[int]) -> bool:
    """Whether the exact Fisher's curvature is at least the damping's along every combination
    of the directions ``indices``, xᵀA_F x ≥ xᵀA_δ x for all x in their span (the smallest
    generalised eigenvalue of (A_F, A_δ) there is ≥ 1): only then does the quadratic model say
    how far to move along each of them on its own. Otherwise some combination is seen by the
    damping alone and its coefficients are ≈ set by δ: parameters off the output's path (an
    auxiliary head, a loss-side weight: uᵀFu = 0). (Directions that change the outputs alike,
    a LayerNorm scale and the Linear after it, passed this test on BERT with ratios 2–55; the
    adaptive step catches them by the sign of their coefficients, ``optim.kfac._solve``.)"""
    idx = torch.tensor(list(indices))
    AF = fisher.to(torch.float64).cpu()[idx][:, idx]
    AD = damping_gram.to(torch.float64).cpu()[idx][:, idx]
    try:
        L = torch.linalg.cholesky(AD)
    except RuntimeError:  # a zero direction: nothing to compare
        return True
    inner = torch.linalg.solve_triangular(L, AF, upper=False)
    whitened = torch.linalg.solve_triangular(L, inner.T, upper=False)
    return bool(torch.linalg.eigvalsh(0.5 * (whitened + whitened.T))[0] >= 1.0)


def merge_directions(fisher: Tensor, damping_gram: Tensor, gradient: Tensor, i: int, j: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The model over the directions with uᵢ and uⱼ replaced by their sum uᵢ + uⱼ (at
    position i; j removed): A' = T A Tᵀ, b' = T b, T the (k − 1) × k matrix doing so."""
    k = gradient.shape[0]
    keep = [c for c in range(k) if c != j]
    T = torch.eye(k, dtype=torch.float64)[keep]
    T[keep.index(i), j] = 1.0
    return (T @ fisher.to(torch.float64) @ T.T, T @ damping_gram.to(torch.float64) @ T.T,
            T @ gradient.to(torch.float64))


_NEGLIGIBLE = 1e-24
"""A direction whose damped curvature A_ii is below this fraction of the largest drops out."""


def minimize_quadratic_model(
    fisher: Tensor, damping_gram: Tensor, gradient: Tensor, fixed: dict[int, float] | None = None,
    radius: float | None = None,
) -> QuadraticModel:
    """x = argmin bᵀx + ½ xᵀ(A_F + A_δ)x in float64, guarded, then shortened to the trust
    region ½ xᵀ(A_F + A_δ)x ≤ r:

        x ← t x,  t = min(1, √(r / (½ xᵀ(A_F + A_δ)x))).

    Args:
        fisher: A_F (k, k), u_iᵀ F u_j.
        damping_gram: A_δ (k, k), Σ_groups δ_g u_iᵀ u_j (the damping, weight decay included).
        gradient: b (k,), gᵀ u_i.
        fixed: coefficients held at given values (index → value, e.g. {1: μ} for a fixed
            momentum); the others are minimised with those held.
        radius: r, the trust region's bound on the damped model's quadratic term (None: no
            bound). For a convex model M(t x) = M(x)(2t − t²) < 0 for t ∈ (0, 1]: the shortened
            step still decreases the model; fixed coefficients are scaled with the others.
            Where the Fisher vanishes along the directions (a saturated softmax) the damping
            term alone bounds the step: ‖v‖ ≤ √(2r / δ).

    Guards: a direction with a zero, negligible (A_ii ≤ 1e-24 · max_j A_jj: a previous update
    of ~1e-38 made μ ~ 1e36, which overflowed float32) or non-finite row (u = 0, δ₀ on the
    first step) drops out with coefficient 0; if the remaining system is not positive
    definite or its solution not finite, the 1-D model along the first direction,
    α = −b₁ / A₁₁ (μ = 0), is used; if that is not positive and finite either, x = 0 (no
    step). The result is never NaN.
    """
    A = (fisher + damping_gram).to(torch.float64).cpu()
    AF = fisher.to(torch.float64).cpu()
    b = gradient.to(torch.float64).cpu()
    k = b.shape[0]
    fixed = dict(fixed or {})
    x = torch.zeros(k, dtype=torch.float64)
    for i, value in fixed.items():
        x[i] = value
    diagonal = A.diagonal()
    scale_of = float(diagonal[torch.isfinite(diagonal)].abs().max()) if bool(
        torch.isfinite(diagonal).any()) else 0.0
    free = [i for i in range(k) if i not in fixed
            and bool(torch.isfinite(A[i]).all()) and float(A[i, i]) > _NEGLIGIBLE * scale_of
            and float(A[i, i]) > 0 and math.isfinite(b[i])]
    reason = ""
    if free:
        idx = torch.tensor(free)
        Aff = A[idx][:, idx]
        rhs = -(b[idx] + A[idx] @ x) if fixed else -b[idx]
        ok = bool(torch.isfinite(rhs).all())
        if ok:
            try:
                L = torch.linalg.cholesky(Aff)
                sol = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
                ok = bool(torch.isfinite(sol).all())
            except RuntimeError:
                ok = False
        if ok:
            x[idx] = sol
        else:
            reason = "the model over the directions is not positive definite"
            x = torch.zeros(k, dtype=torch.float64)
            for i, value in fixed.items():
                x[i] = value
            if 0 in free:
                alpha = -(b[0] + A[0] @ x) / A[0, 0]
                x[0] = alpha if math.isfinite(float(alpha)) else 0.0
    else:
        reason = "no direction has a positive, finite curvature"
    scale = 1.0
    quadratic = float(0.5 * x @ A @ x)
    if radius is not None and math.isfinite(quadratic) and quadratic > radius:
        scale = math.sqrt(radius / quadratic)
        x = x * scale
    value = float(b @ x + 0.5 * x @ A @ x)
    kl = float(0.5 * x @ AF @ x)
    if not (math.isfinite(value) and math.isfinite(kl)):
        x = torch.zeros(k, dtype=torch.float64)
        value, kl, reason, scale = 0.0, 0.0, "the model is not finite", 1.0
    return QuadraticModel(tuple(float(c) for c in x), value, kl, reason, scale)
