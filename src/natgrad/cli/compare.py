"""``natgrad compare``: several optimizers on one task with the same data order.

Each optimizer trains into OUT/<optimizer>/ (as ``natgrad train`` would); then OUT gets
``comparison.png`` (train loss against steps and against seconds) and ``summary.md``: final
losses, time per step, and the steps and seconds each optimizer needs to reach the final train
loss of the best baseline (sgd or adam). The comparison's settings go to ``compare.json``.
A run that diverges (see :mod:`natgrad.cli.runner`) is marked so in the summary, and the
command then exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from natgrad.cli.device import resolve_device
from natgrad.cli.optimizers import (
    DEFAULTS,
    OPTIMIZERS,
    defaults_help,
    option_name,
    resolve_hyperparameters,
    validate_hyperparameters,
)
from natgrad.cli.options import (
    add_data_options,
    add_hyperparameter_options,
    add_output_options,
    add_schedule_options,
    hyperparameters_given,
)
from natgrad.cli.plots import plot_comparison
from natgrad.cli.records import (
    CHECKPOINT,
    COMPARE,
    CONFIG,
    RunConfig,
    RunFileError,
    is_writer,
    prepare_folder,
    read_json,
    write_json,
    write_text,
)
from natgrad.cli.runner import DIVERGENCE_FACTOR, Outcome, ResumeError, run_training
from natgrad.cli.schedule import loop_settings, refuse_lost_checkpoint
from natgrad.cli.seeds import seed_folder, seed_list, seeds_plot, seeds_summary
from natgrad.cli.tasks import Task, get_task
from natgrad.cli.train import EXIT_DIVERGED, RUN_DEFAULTS, exit_status, final_line
from natgrad.cli.user_code import CUSTOM, resolve_task

__all__ = ["add_parser", "first_reaching", "last_evaluated", "run", "summary_markdown"]

PLOT, SUMMARY = "comparison.png", "summary.md"
BASELINES = ("sgd", "adam")


def optimizer_list(text: str) -> list[str]:
    """A comma-separated list of distinct optimizer names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"invalid optimizer(s) {', '.join(bad) or repr(text)} (choose from "
            f"{', '.join(OPTIMIZERS)})")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"optimizers listed twice in {text!r}")
    return names


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare", help="train several optimizers on one task and compare them",
        description="Train several optimizers on one task with the same initialisation and "
                    "data order, each into OUT/<optimizer>/, then write OUT/comparison.png "
                    "and OUT/summary.md.",
        epilog=defaults_help() + "\n\nExample: natgrad compare --optimizers sgd,adam,kfac "
               "--lr sgd=0.1,adam=0.003,kfac=0.2 --steps 300 --out runs/cmp",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(parser, None)
    parser.add_argument("--optimizers", type=optimizer_list, default=None,
                        metavar="LIST", help="comma-separated optimizers (default "
                        "sgd,adam,kfac,ekfac,prong; choose from " + ", ".join(OPTIMIZERS) + ")")
    add_schedule_options(parser)
    parser.add_argument("--seeds", type=seed_list, default=None, metavar="LIST",
                        help="run every optimizer once per seed (e.g. 0,1,2) into "
                             "OUT/<optimizer>/seed-<s>/; summary.md gives mean ± standard "
                             "deviation, comparison.png the mean with a min–max band")
    add_hyperparameter_options(parser, per_optimizer=True)
    add_output_options(parser, "(default: runs/compare-TASK)")
    parser.set_defaults(handler=lambda args: run(args, parser))
    return parser


def _hyperparameters(optimizers: list[str], given: dict[str, Any]) -> dict[str, dict]:
    """Per optimizer, its defaults updated by VALUE (if it uses the setting) or OPT=VALUE."""
    result = {}
    for key, spec in given.items():
        if spec is None:
            continue
        for name in spec:
            if name != "*" and name not in optimizers:
                raise ValueError(f"{option_name(key)} names {name}, which is not among "
                                 f"--optimizers {','.join(optimizers)}")
            if name != "*" and key not in DEFAULTS[name]:
                resolve_hyperparameters(name, {key: spec[name]})  # raises, naming the users
        if "*" in spec and not any(key in DEFAULTS[opt] for opt in optimizers):
            users = [o for o, d in DEFAULTS.items() if key in d]
            raise ValueError(f"{option_name(key)} applies to none of --optimizers "
                             f"{','.join(optimizers)} (it applies to: {', '.join(users)})")
    everyone = {k: v["*"] for k, v in given.items() if v is not None and "*" in v}
    for opt in optimizers:
        own = {k: v[opt] for k, v in given.items() if v is not None and opt in v}
        hp = resolve_hyperparameters(opt, everyone, strict=False)  # VALUE: where it applies
        result[opt] = resolve_hyperparameters(opt, {**hp, **own})  # OPT=VALUE wins
    return result


def first_reaching(rows: list[dict], target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first metrics row whose train loss is ≤ ``target``, or None."""
    for row in rows:
        loss = row.get("train_loss")
        if loss is not None and math.isfinite(loss) and loss <= target:
            return int(row["step"]), float(row["seconds"])
    return None


def last_evaluated(rows: list[dict]) -> dict | None:
    """The last metrics row that has a train loss, or None."""
    return next((r for r in reversed(rows) if r.get("train_loss") is not None), None)


def summary_markdown(task: str | Task, settings: dict[str, Any], outcomes: dict[str, Outcome],
                     hps: dict[str, dict]) -> str:
    """The comparison table (see the module docstring) as Markdown."""
    spec = get_task(task) if isinstance(task, str) else task
    classification, task = spec.classification, spec.name
    finals = {n: last_evaluated(o.rows) for n, o in outcomes.items() if o.status == "finished"}
    baseline = {n: finals[n]["train_loss"] for n in BASELINES
                if finals.get(n) is not None and math.isfinite(finals[n]["train_loss"])}
    best = min(baseline, key=baseline.__getitem__) if baseline else None
    target = baseline[best] if best else None
    lines = [f"# natgrad compare: {task}", "",
             f"Seed {settings['seed']}, {settings['steps']} steps of {settings['batch_size']} "
             "examples (the same initialisation and data order for every optimizer), train "
             f"and test loss evaluated every {settings['eval_every']} steps.", ""]
    lines.append(f"Target: train loss {target:.4g}, the best final train loss among the "
                 f"baselines ({best})." if best else
                 "Target: none (no sgd or adam run finished), so the last columns are empty.")
    lines.append(f"A run counts as diverged (and stops) when a batch loss is not finite or its "
                 f"train loss exceeds {DIVERGENCE_FACTOR:g}× its value at step 0.")
    head = ["optimizer", "settings", "final train loss", "final test loss"]
    head += ["test accuracy"] if classification else []
    head += ["ms/step", "steps to target", "seconds to target"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, outcome in outcomes.items():
        settings_text = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in hps[name].items() if k != "weight_decay" or v)
        last = finals.get(name)
        if outcome.status != "finished" or last is None:
            cells = [(outcome.reason or f"diverged at step {outcome.step + 1}")
                     if outcome.status == "diverged" else outcome.status, "—"]
            cells += ["—"] if classification else []
        else:
            cells = [f"{last['train_loss']:.4g}", f"{last['test_loss']:.4g}"]
            cells += [f"{last['test_accuracy']:.3f}"] if classification else []
        per_step = 1000 * outcome.seconds / outcome.step if outcome.step else math.nan
        reached = first_reaching(outcome.rows, target) if target is not None else None
        cells += [f"{per_step:.1f}", str(reached[0]) if reached else "—",
                  f"{reached[1]:.1f}" if reached else "—"]
        lines.append("| " + " | ".join([name, settings_text, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _settings(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    saved = read_json(out / COMPARE, "comparison") if args.resume else None
    if saved is not None:
        for name in ("task", "optimizers", "seed", "seeds", "batch_size", "eval_every",
                     "data_dir", "model", "data"):
            value = getattr(args, name)
            if value is not None and value != saved.get(name):
                raise ValueError(f"{option_name(name)} differs from the saved comparison's "
                                 f"{saved[name]}; a resumed comparison keeps its settings")
        if any(v is not None for v in hyperparameters_given(args).values()):
            raise ValueError("optimizer settings cannot change when resuming a comparison")
        saved["loop"] = loop_settings(args, saved.get("loop"))
        if args.device is not None:
            saved["device"] = args.device
        return saved
    task = args.task or (CUSTOM if args.data else RUN_DEFAULTS["task"])
    optimizers = args.optimizers or ["sgd", "adam", "kfac", "ekfac", "prong"]
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seed and --seeds exclude each other (--seeds 0,1,2 runs each "
                         "optimizer once per seed)")
    seed = args.seeds[0] if args.seeds else args.seed
    return {"task": task, "optimizers": optimizers, "model": args.model, "data": args.data,
            "device": args.device, "seeds": args.seeds, "loop": loop_settings(args),
            "seed": seed if seed is not None else RUN_DEFAULTS["seed"],
            "batch_size": args.batch_size,
            "eval_every": args.eval_every or RUN_DEFAULTS["eval_every"],
            "data_dir": args.data_dir, "threads": args.threads,
            "hyperparameters": _hyperparameters(optimizers, hyperparameters_given(args))}


def remove_runs(out: Path) -> None:
    """Delete the optimizer folders of an earlier comparison in ``out`` (``--overwrite``):
    every ``out/<optimizer>`` holding a run's ``config.json`` or ``checkpoint.pt`` (itself or in
    its ``seed-<s>`` folders), so that no
    stale run is left beside the new ones. Other files and folders are kept."""
    if not is_writer() or not out.is_dir():
        return
    for name in OPTIMIZERS:
        folder = out / name
        if folder.is_dir() and not folder.is_symlink() and any(
                (run / f).exists() for run in (folder, *folder.glob("seed-*"))
                for f in (CONFIG, CHECKPOINT)):
            shutil.rmtree(folder)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``compare`` subcommand; returns the exit status (1 if a run diverged, 130/143 if
    interrupted)."""
    default_task = args.task or (CUSTOM if args.data else RUN_DEFAULTS["task"])
    out = Path(args.out or f"runs/compare-{default_task}")
    try:
        prepare_folder(out, args.overwrite, args.resume, create=False, marker=COMPARE)
        settings = _settings(args, out)
        task, user_data = resolve_task(settings["task"], settings.get("model"),
                                       settings.get("data"))
        settings["batch_size"] = settings["batch_size"] or task.batch_size
        for name, hp in settings["hyperparameters"].items():
            validate_hyperparameters(name, hp, task.likelihood)
        resolve_device(settings.get("device"))
    except RunFileError:
        raise
    except (KeyError, TypeError) as err:  # a compare.json without the expected settings
        raise RunFileError(f"{out / COMPARE} does not hold a comparison's settings ({err!r}); "
                           "restore the file, or start again with --overwrite") from None
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        parser.error(str(err))
    if settings["data_dir"] is not None and task.dataset != "fashion":
        parser.error("--data-dir applies to the fashion-* tasks only")
    data = user_data or task.load(settings["data_dir"])
    if settings["batch_size"] > data.x_train.shape[0]:
        parser.error(f"argument --batch-size: {settings['batch_size']} is larger than the "
                     f"{data.x_train.shape[0]} training examples")
    per_epoch = data.x_train.shape[0] // settings["batch_size"]
    if args.epochs is not None:
        settings.update(steps=args.epochs * per_epoch, epochs=args.epochs)
    elif args.steps is not None or "steps" not in settings:
        settings.update(steps=args.steps or RUN_DEFAULTS["steps"], epochs=None)
    if args.threads is not None:
        settings["threads"] = args.threads
    if args.resume:  # before anything is written: a run with a lost checkpoint stops it all
        for folder in _run_folders(out, settings):
            if folder.is_dir() and not (folder / CHECKPOINT).exists():
                refuse_lost_checkpoint(folder)
    if args.overwrite:
        remove_runs(out)
    prepare_folder(out, args.overwrite, args.resume, known=(COMPARE, PLOT, SUMMARY),
                   marker=COMPARE)
    write_json(out / COMPARE, settings)
    seeds = settings.get("seeds") or [settings["seed"]]
    runs: dict[str, dict[int, Outcome]] = {}
    for name, seed in ((n, s) for n in settings["optimizers"] for s in seeds):
        config = RunConfig(task=task.name, optimizer=name, seed=seed,
                           steps=settings["steps"], batch_size=settings["batch_size"],
                           eval_every=settings["eval_every"],
                           hyperparameters=settings["hyperparameters"][name],
                           data_dir=settings["data_dir"], epochs=settings.get("epochs"),
                           threads=settings["threads"], model_spec=settings.get("model"),
                           data_spec=settings.get("data"), device=settings.get("device"),
                           loop=settings.get("loop", {}))
        folder = seed_folder(out, name, seed, settings.get("seeds"))
        resume = args.resume and (folder / CONFIG).exists() and (folder / CHECKPOINT).exists()
        prepare_folder(folder, True, resume)
        try:
            outcome = run_training(config, data, folder, resume=resume, task=task,
                                   progress_every=args.progress_every)
        except ResumeError as err:
            parser.error(str(err))
        runs.setdefault(name, {})[seed] = outcome
        if outcome.status == "interrupted":
            print(f"natgrad compare: {outcome.message}\nresume with: natgrad compare --out "
                  f"{out} --resume", file=sys.stderr)
            return exit_status(outcome)
        label = name if len(seeds) == 1 else f"{name} (seed {seed})"
        print(final_line(label, outcome) if outcome.status == "finished"
              else f"{label}: {outcome.message}")
    diverged = sorted({n if len(seeds) == 1 else f"{n} (seed {s})"
                       for n, found in runs.items() for s, o in found.items()
                       if o.status == "diverged"})
    if len(seeds) > 1:
        seeds_plot(runs, out / PLOT, f"{task.name}: train loss (seeds "
                   f"{','.join(map(str, seeds))}, batch {settings['batch_size']})")
        summary = seeds_summary(task.name, task.classification, settings, runs)
        write_text(out / SUMMARY, summary)
        print("\n" + summary)
        print(f"comparison plot: {out / PLOT}\nsummary: {out / SUMMARY}")
        return _diverged_status(diverged, out)
    outcomes = {name: found[seeds[0]] for name, found in runs.items()}
    plot_comparison({n: o.rows for n, o in outcomes.items()}, out / PLOT,
                    f"{task.name}: train loss (seed {settings['seed']}, batch "
                    f"{settings['batch_size']})")
    summary = summary_markdown(task, settings, outcomes, settings["hyperparameters"])
    write_text(out / SUMMARY, summary)
    print("\n" + summary)
    print(f"comparison plot: {out / PLOT}\nsummary: {out / SUMMARY}")
    return _diverged_status(diverged, out)


def _run_folders(out: Path, settings: dict[str, Any]) -> list[Path]:
    """The folder of every run of the comparison ``settings`` in ``out``."""
    seeds = settings.get("seeds") or [settings["seed"]]
    return [seed_folder(out, name, seed, settings.get("seeds"))
            for name in settings["optimizers"] for seed in seeds]


def _diverged_status(diverged: list[str], out: Path) -> int:
    """0, or 1 after naming the diverged runs."""
    if diverged:
        print(f"natgrad compare: diverged: {', '.join(diverged)} (see {out / SUMMARY})",
              file=sys.stderr)
        return EXIT_DIVERGED
    return 0
