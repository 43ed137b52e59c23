"""``natgrad train``: one run of one optimizer on one task.

Writes ``config.json`` (the full configuration), ``metrics.csv`` and ``checkpoint.pt`` in the
output folder; ``--resume`` continues a run exactly where it stopped (Ctrl-C or SIGTERM saves
first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from natgrad.cli.device import resolve_device
from natgrad.cli.optimizers import (
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
from natgrad.cli.plots import plot_step_diagnostics
from natgrad.cli.records import (
    CONFIG,
    DIAGNOSTICS,
    RunConfig,
    RunFileError,
    prepare_folder,
    read_config,
)
from natgrad.cli.runner import Outcome, ResumeError, run_training
from natgrad.cli.schedule import loop_settings
from natgrad.cli.user_code import CUSTOM, resolve_task

__all__ = ["RUN_DEFAULTS", "add_parser", "exit_status", "final_line", "merge_saved", "run"]

RUN_DEFAULTS: dict[str, Any] = {"task": "digits-autoencoder", "optimizer": "kfac", "seed": 0,
                                "steps": 500, "eval_every": 25, "data_dir": None,
                                "threads": None}
EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143


def exit_status(outcome: Outcome) -> int:
    """0 finished, 1 diverged, 130 stopped by Ctrl-C, 143 stopped by SIGTERM."""
    if outcome.status == "diverged":
        return EXIT_DIVERGED
    if outcome.status == "interrupted":
        return EXIT_TERMINATED if outcome.reason == "SIGTERM" else EXIT_INTERRUPTED
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train one optimizer on one task",
        description="Train one optimizer on one task. Results: OUT/config.json, "
                    "OUT/metrics.csv (step, seconds, batch_loss, train_loss, test_loss, "
                    "test_accuracy, and for kfac/ekfac each row's last step: alpha, mu, "
                    "damping, rho, predicted_kl), OUT/checkpoint.pt and, for kfac/ekfac, "
                    "OUT/diagnostics.png.",
        epilog=defaults_help() + "\n\nngd solves with conjugate gradient on Fisher-vector "
               "products (--structure matrix_free); kfac/ekfac use the Monte-Carlo Fisher "
               "(one sample per example). prong = whitened model + SGD with momentum, "
               "prong-adam = whitened model + Adam.\nCtrl-C or SIGTERM saves a checkpoint; "
               "continue with --resume (optionally with a larger --steps).\nA run counts as "
               "diverged (exit status 1) when a batch loss is not finite or its train loss "
               "exceeds 10× its value at step 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(parser, None)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="optimizer (default: kfac)")
    add_schedule_options(parser)
    add_hyperparameter_options(parser, per_optimizer=False)
    add_output_options(parser, "(default: runs/TASK-OPTIMIZER)")
    parser.set_defaults(handler=lambda args: run(args, parser))
    return parser


def merge_saved(saved: RunConfig, args: argparse.Namespace, hp_given: dict[str, Any],
                names: tuple[str, ...] = ("task", "optimizer", "seed", "batch_size",
                                          "eval_every", "data_dir", "model", "data")
                ) -> None:
    """Refuse, for ``--resume``, any explicit setting that differs from the saved run's."""
    for name in names:
        value = getattr(args, name, None)
        kept = getattr(saved, name + "_spec" if name in ("model", "data") else name)
        if value is not None and value != kept:
            raise ValueError(f"{option_name(name)} {value} differs from the saved run's "
                             f"{kept}; a resumed run keeps its configuration")
    for key, value in hp_given.items():
        if value is not None and value != saved.hyperparameters.get(key):
            raise ValueError(f"{option_name(key)} {value} differs from the saved run's "
                             f"{saved.hyperparameters.get(key)}; a resumed run keeps its "
                             "configuration")


def _steps(args: argparse.Namespace, steps_per_epoch: int, default: int) -> tuple[int, int | None]:
    if args.epochs is not None:
        return args.epochs * steps_per_epoch, args.epochs
    return (args.steps if args.steps is not None else default), None


def final_line(name: str, outcome: Outcome) -> str:
    """One line: steps, time per step and the last losses of a run."""
    last = next((r for r in reversed(outcome.rows) if r.get("train_loss") is not None), None)
    per_step = 1000 * outcome.seconds / outcome.step if outcome.step else float("nan")
    text = f"{name}: {outcome.step} steps, {outcome.seconds:.1f} s ({per_step:.1f} ms/step)"
    if last is not None:
        text += f", train loss {last['train_loss']:.4g}, test loss {last['test_loss']:.4g}"
        if last.get("test_accuracy") is not None:
            text += f", test accuracy {last['test_accuracy']:.3f}"
    return text


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``train`` subcommand; returns the exit status (1 diverged, 130 interrupted)."""
    given = hyperparameters_given(args)
    task_name = args.task or (CUSTOM if args.data else RUN_DEFAULTS["task"])
    optimizer = args.optimizer or RUN_DEFAULTS["optimizer"]
    out = Path(args.out or f"runs/{task_name}-{optimizer}")
    saved = None
    try:
        prepare_folder(out, args.overwrite, args.resume, create=False)
        if args.resume:
            saved = read_config(out / CONFIG)
            merge_saved(saved, args, given)
            task_name, optimizer, hp = saved.task, saved.optimizer, saved.hyperparameters
        else:
            hp = resolve_hyperparameters(optimizer, given)
        model_spec, data_spec = ((saved.model_spec, saved.data_spec) if saved
                                 else (args.model, args.data))
        task, user_data = resolve_task(task_name, model_spec, data_spec)
        validate_hyperparameters(optimizer, hp, task.likelihood)
        device = args.device if args.device is not None else (saved.device if saved else None)
        resolve_device(device)
        loop = loop_settings(args, saved.loop if saved else None)
    except RunFileError:
        raise
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.data_dir is not None and task.dataset != "fashion":
        parser.error("--data-dir applies to the fashion-* tasks only")
    data_dir = saved.data_dir if saved else args.data_dir
    data = user_data or task.load(data_dir)
    batch_size = (saved.batch_size if saved else args.batch_size) or task.batch_size
    if batch_size > data.x_train.shape[0]:
        parser.error(f"argument --batch-size: {batch_size} is larger than the "
                     f"{data.x_train.shape[0]} training examples")
    steps, epochs = _steps(args, data.x_train.shape[0] // batch_size,
                           saved.steps if saved else RUN_DEFAULTS["steps"])
    config = RunConfig(
        task=task_name, optimizer=optimizer,
        seed=saved.seed if saved else (args.seed if args.seed is not None else 0),
        steps=steps, batch_size=batch_size,
        eval_every=(saved.eval_every if saved else args.eval_every) or RUN_DEFAULTS[
            "eval_every"],
        hyperparameters=hp, data_dir=data_dir,
        epochs=epochs if epochs is not None else (saved.epochs if saved and args.steps is None
                                                  else None),
        threads=args.threads if args.threads is not None else (saved.threads if saved
                                                               else None),
        model_spec=model_spec, data_spec=data_spec, device=device, loop=loop)
    prepare_folder(out, args.overwrite, args.resume)
    try:
        outcome = run_training(config, data, out, resume=args.resume, task=task,
                               progress_every=args.progress_every)
    except ResumeError as err:
        parser.error(str(err))
    if outcome.status == "diverged":
        print(f"natgrad train: {outcome.message}", file=sys.stderr)
        return EXIT_DIVERGED
    if outcome.status == "interrupted":
        print(f"natgrad train: {outcome.message}\nresume with: natgrad train --out {out} "
              "--resume", file=sys.stderr)
        return exit_status(outcome)
    print(final_line(optimizer, outcome))
    plotted = plot_step_diagnostics(outcome.rows, out / DIAGNOSTICS,
                                    f"{task_name}, {optimizer}: the last step of each row")
    print(f"results in {out}/ (metrics.csv, config.json, checkpoint.pt"
          + (f", {DIAGNOSTICS})" if plotted else ")"))
    return 0

