"""``natgrad fisher --subset K``: the Fisher on a random subset of parameters, across layers.

Above the dense limit, for a set S of K parameter indices drawn at random (seeded by
``--seed``) from all P, the principal submatrix

    F_SS = [F e_i]_S for i ∈ S

comes from K exact Fisher-vector products (``structure="matrix_free"``: one forward-mode
Jacobian-vector product and one vector-Jacobian product over the N examples each; no P × P
matrix is formed), and each approximation's F̂_SS the same way from F̂ e_i. The report gives the
relative Frobenius error ‖F̂_SS − F_SS‖ / ‖F_SS‖ and the best-scale error
min_α ‖αF̂_SS − F_SS‖ / ‖F_SS‖ = √(1 − ⟨F̂_SS, F_SS⟩² / (‖F̂_SS‖² ‖F_SS‖²)). Unlike the per-layer
blocks of :mod:`natgrad.cli.fisher_layers`, S spans every layer, so F_SS holds cross-layer
entries, which every layer-wise approximation sets to zero. The diagonal approximation is left
out: for a large model it needs per-example gradients of every parameter at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natgrad.cli.fisher_analysis import approximations
from natgrad.fisher import fisher_matrix
from natgrad.fisher.base import FisherMatrix

__all__ = ["SUBSET_APPROXIMATIONS", "SubsetReport", "analyse_subset", "principal_submatrix",
           "subset_markdown"]

SUBSET_APPROXIMATIONS = ("kfac", "ekfac", "prong")


@dataclass
class SubsetReport:
    """The chosen indices, F_SS, and per approximation (error, best-scale error)."""

    indices: Tensor
    exact: Tensor
    errors: dict[str, tuple[float, float]]


def principal_submatrix(F: FisherMatrix, indices: Tensor) -> Tensor:
    """F_SS: column j is (F e_{S_j}) restricted to the rows S (K matrix-vector products)."""
    out = torch.empty(indices.numel(), indices.numel(), dtype=F.dtype, device=F.device)
    for j, i in enumerate(indices.tolist()):
        e = torch.zeros(F.num_params, dtype=F.dtype, device=F.device)
        e[i] = 1.0
        out[:, j] = F.mv(e)[indices]
    return out


def analyse_subset(model: nn.Module, x: Tensor, likelihood: str, size: int,
                   seed: int) -> SubsetReport:
    """F_SS against K-FAC, EK-FAC and PRONG on ``size`` random parameters (module docstring)."""
    data: list[tuple[Tensor, Tensor | None]] = [(x, None)]
    exact_op = fisher_matrix(model, data, likelihood, "true", "matrix_free")
    count = min(size, exact_op.num_params)
    indices = torch.randperm(exact_op.num_params,
                             generator=torch.Generator().manual_seed(seed))[:count].sort().values
    indices = indices.to(exact_op.device)
    exact = principal_submatrix(exact_op, indices)
    norm = float(torch.linalg.matrix_norm(exact))
    errors = {}
    for name, approx in approximations(model, data, likelihood, SUBSET_APPROXIMATIONS).items():
        D = principal_submatrix(approx, indices).to(exact.dtype)
        inner = float((D * exact).sum())
        norms = float(torch.linalg.matrix_norm(D)) * norm
        errors[name] = (float(torch.linalg.matrix_norm(D - exact)) / norm if norm else math.inf,
                        math.sqrt(max(0.0, 1 - (inner / norms) ** 2)) if norms else math.inf)
    return SubsetReport(indices.cpu(), exact, errors)


def subset_markdown(report: SubsetReport, seed: int) -> str:
    """The subset section of fisher.md."""
    k = report.indices.numel()
    lines = ["", f"## Random subset of {k} parameters across all layers (seed {seed})", "",
             f"F_SS from {k} exact Fisher-vector products; it includes cross-layer entries, "
             "which layer-wise approximations set to zero.", "",
             "| approximation | ‖F̂_SS−F_SS‖/‖F_SS‖ | best-scale error |", "|---|---|---|"]
    for name, (error, scaled) in report.errors.items():
        lines.append(f"| {name} | {error:.3g} | {scaled:.3g} |")
    return "\n".join(lines) + "\n"
