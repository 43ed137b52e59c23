"""Figures: ``comparison.png`` (loss curves), ``fisher_blocks.png`` (Fisher matrices) and
``diagnostics.png`` (a K-FAC run's step size, momentum, damping, ρ and predicted KL).

Drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
from torch import Tensor

from natgrad.cli.records import atomic_write, is_writer

__all__ = ["plot_comparison", "plot_fisher_blocks", "plot_step_diagnostics"]


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` (rank 0 only) through an exclusively created temporary
    file renamed into place, never following a link planted in the run folder."""
    if is_writer():
        atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_comparison(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Train loss against steps (left) and against training seconds (right), log-scale y,
    one line per optimizer; ``curves`` maps a name to its metrics rows."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for name, rows in curves.items():
        points = [(r["step"], r["seconds"], r["train_loss"]) for r in rows
                  if r.get("train_loss") is not None and math.isfinite(r["train_loss"])
                  and r["train_loss"] > 0]
        if not points:
            continue
        steps, seconds, loss = zip(*points, strict=True)
        line = axes[0].plot(steps, loss, label=name, lw=1.6)[0]
        axes[1].plot(seconds, loss, label=name, lw=1.6, color=line.get_color())
    from matplotlib.ticker import LogLocator, ScalarFormatter

    for ax, xlabel in zip(axes, ("step", "training time (s)"), strict=True):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(
            subs=(1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0), numticks=30))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter("")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("train loss")
    axes[0].legend()
    fig.suptitle(title)
    save_figure(fig, path)


def plot_step_diagnostics(rows: list[dict], path: Path, title: str) -> bool:
    """One panel per step quantity of metrics.csv (α, μ, δ, ρ, predicted KL) against the step;
    δ and the KL on a log scale. Returns False (nothing written) when no row has any."""
    names = {"alpha": "step size α", "mu": "momentum μ", "damping": "damping δ",
             "rho": "reduction ratio ρ", "predicted_kl": "predicted KL ½vᵀFv"}
    series = {key: [(r["step"], r[key]) for r in rows
                    if r.get(key) is not None and math.isfinite(r[key])] for key in names}
    if not any(series.values()):
        return False
    fig = _figure(14, 3.2)
    axes = fig.subplots(1, len(names))
    for ax, (key, label) in zip(axes, names.items(), strict=True):
        points = series[key]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, lw=1.4, marker="." if len(points) < 30 else None)
            if key in ("damping", "predicted_kl") and min(values) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)
    return True


def plot_fisher_blocks(exact: Tensor, approx: Tensor, bounds: list[int], labels: list[str],
                       path: Path, title: str, approx_name: str = "K-FAC") -> None:
    """|F| and |F̂| side by side on a shared grey scale (clipped at the 99.5th percentile of
    |F|), with the layer boundaries ``bounds`` (offsets into the shown region) drawn."""
    fig = _figure(11, 5.4)
    axes = fig.subplots(1, 2)
    a, b = exact.abs().cpu().numpy(), approx.abs().cpu().numpy()
    vmax = float(np.percentile(a, 99.5)) or float(a.max()) or 1.0
    for ax, matrix, name in zip(axes, (a, b), ("exact Fisher", approx_name), strict=True):
        image = ax.imshow(matrix, cmap="gray_r", vmin=0.0, vmax=vmax,
                          interpolation="nearest")
        for edge in bounds[1:-1]:
            ax.axhline(edge - 0.5, color="tab:red", lw=0.5, alpha=0.6)
            ax.axvline(edge - 0.5, color="tab:red", lw=0.5, alpha=0.6)
        ax.set_title(f"|{name}|")
        ticks = [(lo + hi) / 2 for lo, hi in itertools.pairwise(bounds)]
        ax.set_xticks(ticks, labels, fontsize=7, rotation=30, ha="right")
        ax.set_yticks(ticks, labels, fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="|entry| (clipped)")
    fig.suptitle(title)
    save_figure(fig, path)
