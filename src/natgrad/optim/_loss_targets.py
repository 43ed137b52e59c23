"""The targets of a cross-entropy loss read off its gradient, for ρ without a closure.

Levenberg–Marquardt damping needs the loss after the step on the same batch,
L(θ + v) − L(θ). With ``step(closure)`` the closure computes it; without one the optimizer has
the batch's inputs (it re-runs them for the exact-Fisher model) but not its targets. For the
loss most classifiers and language models train with they can be read off the gradient that
reaches the model's output: a cross-entropy with hard labels, summed over its terms and divided
by any constant s (the mean over the M terms that are not ignored: s = M; a sum: s = 1; a
micro-batch of k accumulated: s = k M), has

    ∂L/∂f_r = (softmax(f_r) − e_{y_r}) / s   for every term r (row of classes) it reaches,

and 0 for the terms it ignores (``ignore_index``). So y_r = argmin_c ∂L/∂f_rc, s follows from
the label entries, s = Σ_r (1 − p_{r,y_r}) / Σ_r (−∂L/∂f_{r,y_r}), and the loss is exactly

    L(θ) = (1/s) Σ_r −log softmax(f_r(θ))_{y_r}   (up to terms that do not depend on f).

:func:`read_targets` accepts a gradient only when s ∂L/∂f equals softmax(f) − e_y entry by
entry to within the rounding of a float32 (or wider) gradient (64 units of its precision,
relative to each entry: a probability p_c ~ 1/C to its own size, the label's p_y − 1 to 1);
anything else (label smoothing
over few classes, soft targets, class weights, focal or z-loss terms, a regression loss,
16-bit gradients) returns the reason instead, and the damping then stays where it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.likelihoods import Categorical, Likelihood

__all__ = ["LossTargets", "loss_slopes", "loss_sum", "read_targets"]

_CHUNK_ENTRIES = 1 << 22
"""Rows are processed in chunks of at most this many (row, class) entries (memory)."""

_TOLERANCE_ULPS = 64
"""|s ∂L/∂f − (p − e_y)| may reach this many units of the gradient dtype's precision."""


@dataclass(frozen=True)
class LossTargets:
    """Hard labels read off a cross-entropy gradient: ``labels`` (rows,) int64 over the
    terms in the likelihood's canonical layout (classes last, flattened), ``reached`` (rows,)
    bool: the terms the loss reaches (the others carry a zero gradient), ``scale`` s, and
    ``loss`` = (1/s) Σ_r −log softmax(f_r)_{y_r} at the recorded outputs (float64)."""

    labels: Tensor
    reached: Tensor
    scale: float
    loss: float


def _rows(likelihood: Categorical, t: Tensor) -> Tensor:
    """(rows, C): the terms of ``t`` (f's shape), classes last."""
    canonical = likelihood.canonical(t)
    return canonical.reshape(-1, canonical.shape[-1])


def _chunks(rows: Tensor) -> list[slice]:
    """Slices of the rows (R, C) holding at most :data:`_CHUNK_ENTRIES` entries each."""
    step = max(1, _CHUNK_ENTRIES // max(1, rows.shape[1]))
    return [slice(lo, lo + step) for lo in range(0, rows.shape[0], step)]


def read_targets(likelihood: Likelihood, f: Tensor, grad: Tensor) -> LossTargets | str:
    """The :class:`LossTargets` of a loss whose gradient at the outputs ``f`` is ``grad``, or
    why they cannot be read (module docstring). Two passes over the terms: s from those whose
    label entry is negative (a saturated term, p_y = 1 in the gradient's precision, has a zero
    one), then every reached term's label y = argmax_c (p_c − s ∂L/∂f_c) and the check."""
    if not isinstance(likelihood, Categorical):
        return f"the likelihood is {type(likelihood).__name__}, not categorical"
    if grad.dtype not in (torch.float32, torch.float64) or grad.shape != f.shape:
        return f"the output gradient is {grad.dtype} of shape {tuple(grad.shape)}"
    logits, g = _rows(likelihood, f.detach()), _rows(likelihood, grad.detach())
    chunks = _chunks(g)
    missing = torch.zeros((), dtype=torch.float64, device=g.device)  # Σ (1 − p_y)
    slope = torch.zeros((), dtype=torch.float64, device=g.device)  # Σ −∂L/∂f_y
    for rows in chunks:
        gc = g[rows].double()
        low, y = gc.min(-1)
        clear = low < 0
        log_p = torch.log_softmax(logits[rows].double(), -1).gather(-1, y[:, None])[:, 0]
        missing += (-torch.expm1(log_p))[clear].sum()
        slope += (-low)[clear].sum()
    if not float(slope) > 0:
        return "the loss gradient at the outputs has no negative entry: not a cross-entropy"
    scale = float(missing) / float(slope)
    tolerance = _TOLERANCE_ULPS * torch.finfo(grad.dtype).eps
    labels = torch.empty(g.shape[0], dtype=torch.long, device=g.device)
    reached = torch.empty(g.shape[0], dtype=torch.bool, device=g.device)
    nll = torch.zeros((), dtype=torch.float64, device=g.device)  # Σ −log p_y
    for rows in chunks:
        gc = g[rows].double()
        log_p = torch.log_softmax(logits[rows].double(), -1)
        p = log_p.exp()
        residual = p - scale * gc  # e_y for a cross-entropy term
        y = residual.argmax(-1)
        hit = (gc != 0).any(-1)
        rows_index = torch.arange(gc.shape[0], device=gc.device)
        residual[rows_index, y] -= 1
        # each entry to its own precision (p_c ~ 1/C: label smoothing over many classes
        # moves them by ε/C), the label's p_y − 1 to that of 1
        bound = tolerance * p
        bound[rows_index, y] = tolerance
        error = (residual.abs() - bound)[hit]
        if error.numel() and float(error.max()) > 0:
            worst = float(residual[hit].abs().max())
            return ("the loss gradient is not (softmax(f) − e_y) / s for hard labels y "
                    f"(off by up to {worst:.2g}): not a plain cross-entropy")
        labels[rows], reached[rows] = y, hit
        nll += (-log_p.gather(-1, y[:, None])[:, 0])[hit].sum()
    return LossTargets(labels, reached, scale, float(nll) / scale)


def loss_sum(likelihood: Categorical, f: Tensor, targets: LossTargets) -> float:
    """(1/s) Σ_r −log softmax(f_r)_{y_r} over the terms the loss reaches, at outputs ``f``
    (float64 accumulation, in chunks)."""
    logits = _rows(likelihood, f.detach())
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for rows in _chunks(logits):
        fc = logits[rows].double()
        y, hit = targets.labels[rows], targets.reached[rows]
        log_p = torch.log_softmax(fc, -1).gather(-1, y[:, None]).squeeze(-1)
        total += (-log_p)[hit].sum()
    return float(total) / targets.scale


def loss_slopes(likelihood: Categorical, f: Tensor, tangents: Tensor,
                targets: LossTargets) -> Tensor:
    """d/dt L(f + t U_i) at t = 0 for the output changes U_i = J u_i (``tangents``, shape
    (k, *f.shape)): (1/s) Σ_r (softmax(f_r) − e_{y_r})ᵀ U_{i,r} over the terms the loss
    reaches, shape (k,), float64 — the loss's first-order change along u_i through the output
    f, which :class:`~natgrad.optim.kfac.KFAC` compares with ∇Lᵀu_i: a loss with terms that
    do not pass through f (a penalty on θ, another head) makes them differ."""
    logits = _rows(likelihood, f.detach())
    k = tangents.shape[0]
    U = likelihood.canonical_rows(tangents.detach()).reshape(k, -1, logits.shape[1])
    total = torch.zeros(k, dtype=torch.float64, device=logits.device)
    for rows in _chunks(logits):
        p = torch.softmax(logits[rows].double(), -1)
        p[torch.arange(p.shape[0], device=p.device), targets.labels[rows]] -= 1
        p[~targets.reached[rows]] = 0
        total += torch.einsum("rc,krc->k", p, U[:, rows].double())
    return total / targets.scale
