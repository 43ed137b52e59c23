"""How well each Fisher approximation matches the exact Fisher of a model on some examples.

For the exact (dense, "true") Fisher F and an approximation F̂ (block_diagonal, kfac, ekfac,
PRONG's implied G = I ⊗ Ā, diagonal):

- per layer l, the relative Frobenius error of its diagonal block ‖F̂_l − F_l‖ / ‖F_l‖;
- for the whole matrix ‖F̂ − F‖ / ‖F‖, and the same after the best rescaling of F̂,
  min_α ‖αF̂ − F‖ / ‖F‖ = √(1 − ⟨F̂, F⟩² / (‖F̂‖² ‖F‖²)) (PRONG's F̂ has no scale of its own:
  the learning rate absorbs it);
- the cosine between the damped natural-gradient directions (F̂ + δI)⁻¹ g and (F + δI)⁻¹ g,
  g the gradient of the task loss on the same examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from natgrad.fisher import KFACFisher, ParameterLayout, fisher_matrix
from natgrad.fisher.base import FisherMatrix
from natgrad.fisher.block_diagonal import module_blocks

__all__ = ["APPROXIMATIONS", "Comparison", "FisherAnalysis", "analyse", "approximations",
           "layer_blocks"]

APPROXIMATIONS = ("block_diagonal", "kfac", "ekfac", "prong", "diagonal")


@dataclass
class Comparison:
    """One approximation against the exact Fisher (errors ``None`` where not meaningful)."""

    name: str
    layer_errors: dict[str, float | None]
    error: float | None
    scaled_error: float | None
    cosine: float


@dataclass
class FisherAnalysis:
    """The exact Fisher, the gradient and every approximation's comparison."""

    exact: Tensor
    gradient: Tensor
    damping: float
    blocks: list[tuple[str, slice]]
    comparisons: list[Comparison] = field(default_factory=list)
    kfac_dense: Tensor | None = None


def layer_blocks(model: nn.Module, layout: ParameterLayout) -> list[tuple[str, slice]]:
    """(module name, slice of θ) for each module owning parameters, in θ's order."""
    return module_blocks(model, layout)


def approximations(
    model: nn.Module, data: list[tuple[Tensor, Tensor | None]], likelihood: str,
    names: tuple[str, ...] = APPROXIMATIONS,
) -> dict[str, FisherMatrix]:
    """The approximations ``names`` of the "true" Fisher, by name (see :data:`APPROXIMATIONS`;
    K-FAC is always computed).

    PRONG's is K-FAC with G = I: the identity in output-gradient space, Ā from the same pass.
    """
    found: dict[str, FisherMatrix] = {}
    for structure in ("block_diagonal", "kfac", "ekfac", "diagonal"):
        if structure in names or structure == "kfac":
            found[structure] = fisher_matrix(model, data, likelihood, "true", structure)
    kfac = found["kfac"]
    assert isinstance(kfac, KFACFisher)
    eyes = [torch.eye(g.shape[0], dtype=g.dtype, device=g.device) for g in kfac.G]
    found["prong"] = KFACFisher(kfac.layers, eyes, kfac.A, kfac.layout)
    return {name: found[name] for name in APPROXIMATIONS if name in names}


def _relative(diff: Tensor, ref: Tensor) -> float:
    norm = float(torch.linalg.matrix_norm(ref))
    return float(torch.linalg.matrix_norm(diff)) / norm if norm > 0 else math.inf


def _cosine(a: Tensor, b: Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def damped_solve(F: Tensor, g: Tensor, damping: float) -> Tensor:
    """(F + δI)⁻¹ g for a dense symmetric positive semi-definite F and δ > 0 (Cholesky)."""
    A = F + damping * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
    return torch.linalg.solve(A, g)


def compare(name: str, approx: FisherMatrix | None, analysis: FisherAnalysis,
            exact_direction: Tensor) -> Comparison:
    """``approx`` (``None``: the identity, i.e. the plain gradient) against the exact F."""
    F, g, delta = analysis.exact, analysis.gradient, analysis.damping
    if approx is None:
        direction = g / (1 + delta)
        return Comparison("identity (SGD)", dict.fromkeys((n for n, _ in analysis.blocks)),
                          None, None, _cosine(direction, exact_direction))
    D = approx.to_dense().to(F.dtype)
    layer_errors: dict[str, float | None] = {
        block: _relative(D[sl, sl] - F[sl, sl], F[sl, sl]) for block, sl in analysis.blocks}
    inner = float((D * F).sum())
    norms = float(torch.linalg.matrix_norm(D)) * float(torch.linalg.matrix_norm(F))
    scaled = math.sqrt(max(0.0, 1 - (inner / norms) ** 2)) if norms > 0 else math.inf
    error = _relative(D - F, F)
    if name == "kfac":
        analysis.kfac_dense = D
    direction = approx.solve(g, delta).to(F.dtype)
    return Comparison(name, layer_errors, error, scaled, _cosine(direction, exact_direction))


def analyse(
    model: nn.Module, x: Tensor, targets: Tensor, likelihood: str, loss_fn, damping: float,
    names: tuple[str, ...] = APPROXIMATIONS,
) -> FisherAnalysis:
    """Exact Fisher and the approximations ``names`` of ``model`` (used as given: cast it to
    float64 first for accurate errors) on inputs ``x``; ``loss_fn(output, targets)`` gives g."""
    layout = ParameterLayout.of(model)
    data = [(x, None)]
    exact = fisher_matrix(model, data, likelihood, "true", "dense").to_dense()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), targets), params)
    gradient = torch.cat([gr.flatten() for gr in grads]).to(exact.dtype)
    analysis = FisherAnalysis(exact, gradient, damping, layer_blocks(model, layout))
    exact_direction = damped_solve(exact, gradient, damping)
    analysis.comparisons.append(compare("identity", None, analysis, exact_direction))
    for name, approx in approximations(model, data, likelihood, names).items():
        analysis.comparisons.append(compare(name, approx, analysis, exact_direction))
    return analysis
