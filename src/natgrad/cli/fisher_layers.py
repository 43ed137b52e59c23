"""``natgrad fisher`` above the dense limit: each layer's exact Fisher block on its own.

When the model has more than ``--max-params`` parameters its dense P × P Fisher does not fit,
but the diagonal block of one layer l does whenever P_l <= ``--max-params``:

    F_l = (1/N) Σₙ J_{n,l}ᵀ D(fₙ) J_{n,l},   J_{n,l} = ∂fₙ/∂θ_l,

the exact block of the full Fisher for that layer's parameters θ_l (computed, like every
approximation of it, with all other parameters held fixed: ``requires_grad`` off while the
layer is analysed). For each such layer the report gives what :mod:`natgrad.cli.fisher_analysis`
gives for a whole small model — the relative Frobenius error of the K-FAC, EK-FAC, PRONG and
diagonal blocks (the block-diagonal approximation is the exact block here, so it is left
out), the best-scale error, and the cosine between (F̂_l + δI)⁻¹ g_l and (F_l + δI)⁻¹ g_l with
g_l the layer's gradient. Layers larger than the
limit are listed as skipped; cross-layer blocks are not measured in this mode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from natgrad.cli.fisher_analysis import APPROXIMATIONS, FisherAnalysis, analyse, layer_blocks
from natgrad.cli.plots import plot_fisher_blocks
from natgrad.cli.records import write_text
from natgrad.fisher import ParameterLayout

LAYERWISE = tuple(a for a in APPROXIMATIONS if a != "block_diagonal")
"""Within one layer the block-diagonal approximation is the exact block: not repeated."""

__all__ = ["LayerwiseReport", "analyse_layers", "largest", "layers_json", "layers_markdown",
           "write_layerwise"]


@dataclass
class LayerwiseReport:
    """Per analysed layer its :class:`FisherAnalysis`; the skipped layers with their sizes."""

    analysed: dict[str, FisherAnalysis]
    sizes: dict[str, int]
    skipped: dict[str, int]


def analyse_layers(model: nn.Module, x: Tensor, targets: Tensor, likelihood: str,
                   loss_fn: Callable[[Tensor, Tensor], Tensor], damping: float,
                   max_params: int) -> LayerwiseReport:
    """Analyse every layer block of at most ``max_params`` parameters on its own (see the
    module docstring); the model's ``requires_grad`` flags are restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    blocks = layer_blocks(model, ParameterLayout.of(model))
    sizes = {name: sl.stop - sl.start for name, sl in blocks}
    report = LayerwiseReport({}, sizes, {n: s for n, s in sizes.items() if s > max_params})
    try:
        for name, size in sizes.items():
            if size > max_params:
                continue
            module = model.get_submodule("" if name == "<root>" else name)
            own = {id(p) for p in module.parameters(recurse=False)}
            for p in params:
                p.requires_grad_(id(p) in own)
            report.analysed[name] = analyse(model, x, targets, likelihood, loss_fn, damping,
                                            LAYERWISE)
    finally:
        for p in params:
            p.requires_grad_(True)
    return report


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def layers_markdown(report: LayerwiseReport, header: str) -> str:
    """One table row per (layer, approximation); then the skipped layers."""
    head = ["layer", "parameters", "approximation", "‖F̂_l−F_l‖/‖F_l‖", "best-scale error",
            "cosine to exact NG"]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, analysis in report.analysed.items():
        for c in analysis.comparisons:
            lines.append("| " + " | ".join([name, str(report.sizes[name]), c.name,
                                            _fmt(c.error), _fmt(c.scaled_error),
                                            f"{c.cosine:.4f}"]) + " |")
    if report.skipped:
        lines += ["", "Skipped (block larger than --max-params): " + ", ".join(
            f"layer {n} ({s} parameters)" for n, s in report.skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def layers_json(report: LayerwiseReport) -> dict[str, Any]:
    """The per-layer results for fisher.json."""
    return {
        "mode": "layerwise",
        "skipped": report.skipped,
        "layers": {name: {"num_params": report.sizes[name], "approximations": {
            c.name: {"error": c.error, "scaled_error": c.scaled_error, "cosine": c.cosine}
            for c in analysis.comparisons}} for name, analysis in report.analysed.items()},
    }


def largest(report: LayerwiseReport) -> str:
    """The analysed layer with the most parameters (the one the blocks plot shows)."""
    return max(report.analysed, key=report.sizes.__getitem__)


def write_layerwise(report: LayerwiseReport, out: Path, header: str, info: dict[str, Any],
                    title: str, appendix: str = "") -> str:
    """Write fisher.md (the table, then ``appendix``), fisher.json and fisher_blocks.png
    (|F_l| and |F̂_l K-FAC| of the largest analysed layer, at most its first 1600
    parameters) into ``out``; returns the Markdown report."""
    text = layers_markdown(report, header) + appendix
    write_text(out / "fisher.md", text)
    write_text(out / "fisher.json", json.dumps({**info, **layers_json(report)}, indent=2) + "\n")
    name = largest(report)
    analysis = report.analysed[name]
    size = min(report.sizes[name], 1600)
    assert analysis.kfac_dense is not None
    plot_fisher_blocks(analysis.exact[:size, :size], analysis.kfac_dense[:size, :size],
                       [0, size], [f"layer {name}"], out / "fisher_blocks.png",
                       f"{title}: layer {name} ({report.sizes[name]} parameters)")
    return text
