"""``natgrad compare --seeds 0,1,2``: every optimizer once per seed, summarised over the seeds.

Each (optimizer, seed) run trains into OUT/<optimizer>/seed-<s>/ with that seed's
initialisation and data order (the same for every optimizer). ``summary.md`` reports per
optimizer, over the n seeds whose run finished, the mean ± the sample standard deviation
s = √(Σ (xᵢ − x̄)² / (n − 1)) of the final train loss, test loss and test accuracy, the mean
time per step, and the steps and seconds to the target (the best baseline's mean final train
loss) averaged over the seeds that reach it ("k/n" says how many). ``comparison.png`` draws the
mean train loss (over the finished seeds at each evaluation step) with a band from the smallest
to the largest seed's loss.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from natgrad.cli.plots import _figure, save_figure
from natgrad.cli.runner import Outcome

__all__ = ["seed_folder", "seed_list", "seeds_plot", "seeds_summary", "spread"]

BASELINES = ("sgd", "adam")


def seed_list(text: str) -> list[int]:
    """argparse type of ``--seeds``: distinct integers >= 0, comma-separated."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return seeds


def seed_folder(out: Path, optimizer: str, seed: int, seeds: list[int] | None) -> Path:
    """OUT/<optimizer>/seed-<s> with several seeds, OUT/<optimizer> with one."""
    return out / optimizer / f"seed-{seed}" if seeds and len(seeds) > 1 else out / optimizer


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _final(outcome: Outcome) -> dict | None:
    from natgrad.cli.compare import last_evaluated  # compare imports this module

    return last_evaluated(outcome.rows) if outcome.status == "finished" else None


def _cell(values: list[float], digits: str = ".4g") -> str:
    if not values:
        return "—"
    mean, sd = spread(values)
    return f"{mean:{digits}} ± {sd:{digits}}"


def seeds_summary(task: str, classification: bool, settings: dict[str, Any],
                  outcomes: dict[str, dict[int, Outcome]]) -> str:
    """The multi-seed comparison table (see the module docstring) as Markdown."""
    seeds = settings["seeds"]
    finals = {name: {s: f for s, o in runs.items() if (f := _final(o)) is not None}
              for name, runs in outcomes.items()}
    means = {name: statistics.fmean(f["train_loss"] for f in found.values())
             for name, found in finals.items() if found and name in BASELINES}
    best = min(means, key=means.__getitem__) if means else None
    target = means[best] if best else None
    lines = [f"# natgrad compare: {task}", "",
             f"Seeds {', '.join(map(str, seeds))}: {settings['steps']} steps of "
             f"{settings['batch_size']} examples per run (each seed's initialisation and data "
             "order shared by every optimizer); mean ± sample standard deviation over the seeds "
             "whose run finished.", ""]
    lines.append(f"Target: train loss {target:.4g}, the best mean final train loss among the "
                 f"baselines ({best})." if best else
                 "Target: none (no sgd or adam run finished), so the last columns are empty.")
    head = ["optimizer", "finished", "final train loss", "final test loss"]
    head += ["test accuracy"] if classification else []
    head += ["ms/step", "reached target", "steps to target", "seconds to target"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in outcomes.items():
        found = finals[name]
        failed = [f"seed {s} {o.status}" for s, o in runs.items() if o.status != "finished"]
        cells = [f"{len(found)}/{len(runs)}" + (f" ({'; '.join(failed)})" if failed else ""),
                 _cell([f["train_loss"] for f in found.values()]),
                 _cell([f["test_loss"] for f in found.values()])]
        if classification:
            cells.append(_cell([f["test_accuracy"] for f in found.values()], ".3f"))
        per_step = [1000 * o.seconds / o.step for o in runs.values() if o.step]
        cells.append(f"{statistics.fmean(per_step):.1f}" if per_step else "—")
        from natgrad.cli.compare import first_reaching  # compare imports this module

        reached = [r for s in found if target is not None
                   and (r := first_reaching(runs[s].rows, target)) is not None]
        cells += [f"{len(reached)}/{len(runs)}" if target is not None else "—",
                  _cell([float(r[0]) for r in reached], ".0f"),
                  _cell([r[1] for r in reached], ".1f")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _curves(runs: dict[int, Outcome]) -> list[tuple[int, float, float, float, float]]:
    """Per evaluation step present in every finished seed: (step, mean seconds, mean loss,
    min loss, max loss)."""
    tables = []
    for outcome in runs.values():
        if outcome.status == "finished":
            tables.append({r["step"]: r for r in outcome.rows
                           if r.get("train_loss") is not None and r["train_loss"] > 0})
    if not tables:
        return []
    steps = sorted(set.intersection(*(set(t) for t in tables)))
    points = []
    for step in steps:
        losses = [t[step]["train_loss"] for t in tables]
        seconds = statistics.fmean(t[step]["seconds"] for t in tables)
        points.append((step, seconds, statistics.fmean(losses), min(losses), max(losses)))
    return points


def seeds_plot(outcomes: dict[str, dict[int, Outcome]], path: Path, title: str) -> None:
    """Mean train loss with a min–max band over the seeds, against steps and seconds."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for name, runs in outcomes.items():
        points = _curves(runs)
        if not points:
            continue
        step, seconds, mean, low, high = zip(*points, strict=True)
        line = axes[0].plot(step, mean, label=f"{name} (mean)", lw=1.6)[0]
        axes[0].fill_between(step, low, high, color=line.get_color(), alpha=0.2, lw=0)
        axes[1].plot(seconds, mean, lw=1.6, color=line.get_color())
        axes[1].fill_between(seconds, low, high, color=line.get_color(), alpha=0.2, lw=0)
    for ax, xlabel in zip(axes, ("step", "training time (s), mean over seeds"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("train loss (band: min–max over seeds)")
    axes[0].legend()
    fig.suptitle(title)
    save_figure(fig, path)
