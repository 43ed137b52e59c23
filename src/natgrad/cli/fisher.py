"""``natgrad fisher``: the exact Fisher of a model against its approximations.

On a freshly initialised model (``--seed``) or a trained one (``--checkpoint`` of a ``natgrad
train`` run; a PRONG run is unwhitened first) and ``--examples`` training examples: per-layer and
whole-matrix relative Frobenius errors of block_diagonal, kfac, ekfac, PRONG's Ā ⊗ I and
diagonal, and the cosine of each damped natural-gradient direction with the exact one (see
:mod:`natgrad.cli.fisher_analysis`). Writes ``fisher.md``, ``fisher.json`` and
``fisher_blocks.png`` (|F| and |F̂_K-FAC| over the middle layers, as Fig. 2 of Martens &
Grosse 2015).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from natgrad.cli.device import resolve_device
from natgrad.cli.fisher_analysis import FisherAnalysis, analyse
from natgrad.cli.fisher_layers import analyse_layers, write_layerwise
from natgrad.cli.fisher_subset import analyse_subset, subset_markdown
from natgrad.cli.optimizers import PRONG_OPTIMIZERS
from natgrad.cli.options import add_data_options, int_at_least, positive_float
from natgrad.cli.plots import plot_fisher_blocks
from natgrad.cli.records import (
    CHECKPOINT,
    CONFIG,
    load_checkpoint,
    prepare_folder,
    read_config,
    read_json,
    state_mismatch,
    write_text,
)
from natgrad.cli.tasks import Task, batch_targets
from natgrad.cli.user_code import resolve_task
from natgrad.data import Dataset
from natgrad.nn import unwhiten, whiten

__all__ = ["add_parser", "markdown", "middle_region", "run"]

REPORT_FILES = ("fisher.md", "fisher.json", "fisher_blocks.png")
DEFAULT_DAMPING = 1e-3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fisher", help="exact Fisher against its approximations on a model",
        description="Compare the exact Fisher of a model with its block-diagonal, K-FAC, "
                    "EK-FAC, PRONG (Ā ⊗ I) and diagonal approximations on N training "
                    "examples. Writes OUT/fisher.md, OUT/fisher.json and "
                    "OUT/fisher_blocks.png.")
    add_data_options(parser, None)
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="a train run's folder or checkpoint.pt (default: a fresh model)")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="seed of the fresh model and of the choice of examples (default 0)")
    parser.add_argument("--examples", type=int_at_least(1), default=100,
                        help="training examples the Fisher averages over (default 100)")
    parser.add_argument("--damping", type=positive_float, default=None,
                        help="δ in the directions (F + δI)⁻¹ g (default: the --damping the "
                             f"checkpoint's run trained with, else {DEFAULT_DAMPING:g})")
    parser.add_argument("--subset", type=int_at_least(0), default=0, metavar="K",
                        help="above --max-params, also compare on K random parameters across "
                             "all layers, exactly by K Fisher-vector products (default 0: off)")
    parser.add_argument("--max-params", type=int_at_least(1), default=12_000,
                        help="the largest dense Fisher formed, P×P float64 (default 12000, "
                             "about 1.2 GB); a larger model is analysed layer by layer, each "
                             "layer block of at most this size on its own")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: CHECKPOINT_RUN/fisher or "
                             "runs/fisher-TASK)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report in an existing output folder")
    parser.set_defaults(handler=lambda args: run(args, parser))
    return parser


def _load_model(args: argparse.Namespace, parser: argparse.ArgumentParser
                ) -> tuple[Task, dict[str, Any] | None, str | None, Path | None, Dataset | None]:
    """(task, checkpoint or None, data folder, the checkpoint's run folder or None, the
    ``--data`` factory's data or None)."""
    if args.checkpoint is None:
        try:
            task, user_data = resolve_task(args.task, args.model, args.data)
        except ValueError as err:
            parser.error(str(err))
        return task, None, args.data_dir, None, user_data
    path = Path(args.checkpoint)
    folder = path if path.is_dir() else path.parent
    ckpt_path = folder / CHECKPOINT if path.is_dir() else path
    if not ckpt_path.exists() or not (folder / CONFIG).exists():
        parser.error(f"--checkpoint: {ckpt_path} or {folder / CONFIG} does not exist")
    config = read_json(folder / CONFIG)
    expected = read_config(folder / CONFIG)
    for name, key in (("task", "task"), ("model", "model_spec"), ("data", "data_spec")):
        if getattr(args, name) is not None and getattr(args, name) != config.get(key):
            parser.error(f"--{name} {getattr(args, name)} differs from the checkpoint's "
                         f"{config.get(key)}")
    try:
        task, user_data = resolve_task(config["task"], config.get("model_spec"),
                                       config.get("data_spec"))
    except ValueError as err:
        parser.error(str(err))
    return (task, load_checkpoint(ckpt_path, expected), args.data_dir or config.get("data_dir"),
            folder, user_data)


def _model(task: Task, image_shape: tuple[int, int], seed: int, checkpoint: dict | None,
           optimizer: str | None, path: Path | None = None) -> nn.Module:
    """A fresh model (seeded as ``natgrad train`` seeds it) or the checkpoint's, with plain
    Linear/Conv2d layers (a PRONG run's whitened layers are unwhitened: same function)."""
    torch.manual_seed(seed)
    model = task.build_model(image_shape)
    if checkpoint is None:
        return model
    try:
        if optimizer in PRONG_OPTIMIZERS:
            model = whiten(model)
            model.load_state_dict(checkpoint["model"])
            return unwhiten(model)
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise state_mismatch(path, err) from None
    return model


def choose_damping(given: float | None, run_config: dict[str, Any] | None) -> tuple[float, str]:
    """(δ, where it comes from): ``--damping`` if given, else the damping the checkpoint's run
    trained with (K-FAC, EK-FAC, NGD), else :data:`DEFAULT_DAMPING`."""
    if given is not None:
        return given, "--damping"
    trained = (run_config or {}).get("hyperparameters", {}).get("damping")
    if trained:
        return float(trained), f"the damping the {run_config['optimizer']} run trained with"
    return DEFAULT_DAMPING, "the default: the run has no damping" if run_config else (
        "the default")


def middle_region(blocks: list[tuple[str, slice]], limit: int = 1600) -> list[int]:
    """Indices of a run of consecutive blocks around the middle with at most ``limit``
    parameters in all (at least one block)."""
    sizes = [sl.stop - sl.start for _, sl in blocks]
    lo = hi = (len(blocks) - 1) // 2
    while True:
        grew = False
        for candidate in (hi + 1, lo - 1):
            if 0 <= candidate < len(blocks) and sum(sizes[min(lo, candidate):max(
                    hi, candidate) + 1]) <= limit:
                lo, hi, grew = min(lo, candidate), max(hi, candidate), True
        if not grew:
            return list(range(lo, hi + 1))


def _label(model: nn.Module, name: str) -> str:
    """A block's name with its layer's shape, e.g. "2: 32→16"."""
    module = model.get_submodule("" if name == "<root>" else name)
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return f"{name}: {module.in_features}→{module.out_features}"
    if isinstance(module, nn.Conv2d):
        return f"{name}: conv {module.in_channels}→{module.out_channels}"
    return name if weight is None else f"{name}: {tuple(weight.shape)}"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def markdown(analysis: FisherAnalysis, header: str) -> str:
    """The report table: one row per approximation."""
    names = [n for n, _ in analysis.blocks]
    head = ["approximation", "‖F̂−F‖/‖F‖", "best-scale error", "cosine to exact NG",
            *[f"layer {n}" for n in names]]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in analysis.comparisons:
        cells = [c.name, _fmt(c.error), _fmt(c.scaled_error), f"{c.cosine:.4f}",
                 *[_fmt(c.layer_errors.get(n)) for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _layerwise(args: argparse.Namespace, parser: argparse.ArgumentParser, name: str,
               model: nn.Module, x: torch.Tensor, targets: torch.Tensor, task: Task,
               source: str, out: Path, num_params: int, n: int,
               damping: tuple[float, str]) -> int:
    """Above --max-params: each layer block that fits, on its own (natgrad.cli.fisher_layers);
    ``damping`` is (δ, where it comes from)."""
    report = analyse_layers(model, x, targets, task.likelihood, task.loss, damping[0],
                            args.max_params)
    if not report.analysed:
        parser.error(f"{name}'s model has {num_params} parameters and no layer block of at "
                     f"most --max-params {args.max_params} (the smallest has "
                     f"{min(report.sizes.values())}); raise --max-params (a block of P "
                     "parameters needs P² float64 entries)")
    header = (f"# natgrad fisher: {name}\n\n{source}; {n} training examples; {num_params} "
              f"parameters, more than --max-params {args.max_params}, so the dense Fisher is "
              "not formed: each layer block of at most that size is compared on its own (its "
              "exact block F_l, all other parameters fixed; cross-layer terms not measured); "
              f"damping δ = {damping[0]:g} ({damping[1]}). Errors are relative Frobenius errors "
              "within the "
              "block; the cosine compares (F̂_l + δI)⁻¹g_l with (F_l + δI)⁻¹g_l.")
    info = {"task": name, "source": source, "examples": n, "num_params": num_params,
            "damping": damping[0], "damping_source": damping[1], "max_params": args.max_params}
    appendix = ""
    if args.subset:  # cross-layer entries on a random subset (natgrad.cli.fisher_subset)
        subset = analyse_subset(model, x, task.likelihood, args.subset, args.seed)
        appendix = subset_markdown(subset, args.seed)
        info["subset"] = {"seed": args.seed, "indices": subset.indices.tolist(), "errors": {
            k: {"error": e, "scaled_error": sc} for k, (e, sc) in subset.errors.items()}}
    prepare_folder(out, args.overwrite, False, known=REPORT_FILES)
    text = write_layerwise(report, out, header, info, name, appendix)
    print(text)
    print(f"Fisher report: {out / 'fisher.md'}\nFisher blocks plot: {out / 'fisher_blocks.png'}")
    return 0


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``fisher`` subcommand."""
    task, checkpoint, data_dir, folder, user_data = _load_model(args, parser)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out) if args.out else (folder / "fisher" if folder else
                                           Path(f"runs/fisher-{task.name}"))
    try:
        prepare_folder(out, args.overwrite, False, known=REPORT_FILES, create=False)
    except FileExistsError as err:
        parser.error(str(err))
    if data_dir is not None and task.dataset != "fashion":
        parser.error("--data-dir applies to the fashion-* tasks only")
    if args.threads or task.threads:
        torch.set_num_threads(args.threads or task.threads)
    data = user_data or task.load(data_dir)
    run_config = read_json(folder / CONFIG) if folder else None
    optimizer = run_config["optimizer"] if run_config else None
    damping, damping_source = choose_damping(args.damping, run_config)
    ckpt_path = None if folder is None else (
        Path(args.checkpoint) if Path(args.checkpoint).is_file() else folder / CHECKPOINT)
    model = _model(task, data.image_shape, args.seed, checkpoint, optimizer,
                   ckpt_path).double().to(device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = min(args.examples, data.x_train.shape[0])
    order = torch.randperm(data.x_train.shape[0],
                           generator=torch.Generator().manual_seed(args.seed))[:n]
    x = data.x_train[order].to(device)
    x = x.double() if x.is_floating_point() else x  # token ids stay integers
    y = data.y_train[order].to(device)
    targets = batch_targets(task, x, y.double() if y.is_floating_point() else y)
    source = f"checkpoint {args.checkpoint}" if checkpoint else f"fresh model (seed {args.seed})"
    if num_params > args.max_params:
        return _layerwise(args, parser, task.name, model, x, targets, task, source, out,
                          num_params, n, (damping, damping_source))
    analysis = analyse(model, x, targets, task.likelihood, task.loss, damping)
    header = (f"# natgrad fisher: {task.name}\n\n{source}; {n} training examples; "
              f"{num_params} parameters; exact = dense true Fisher; damping δ = "
              f"{damping:g} ({damping_source}). Errors are relative Frobenius errors; the "
              "cosine compares (F̂ + δI)⁻¹g with (F + δI)⁻¹g.")
    prepare_folder(out, args.overwrite, False, known=REPORT_FILES)
    report = markdown(analysis, header)
    write_text(out / "fisher.md", report)
    write_text(out / "fisher.json", json.dumps({
        "task": task.name, "source": source, "examples": n, "num_params": num_params,
        "damping": damping, "damping_source": damping_source,
        "layers": {b: s.stop - s.start for b, s in analysis.blocks},
        "approximations": {c.name: {"error": c.error, "scaled_error": c.scaled_error,
                                    "cosine": c.cosine, "layer_errors": c.layer_errors}
                           for c in analysis.comparisons}}, indent=2) + "\n")
    region = middle_region(analysis.blocks)
    start = analysis.blocks[region[0]][1].start
    stop = min(analysis.blocks[region[-1]][1].stop, start + 1600)
    bounds = [analysis.blocks[i][1].start - start for i in region] + [stop - start]
    assert analysis.kfac_dense is not None
    plot_fisher_blocks(analysis.exact[start:stop, start:stop],
                       analysis.kfac_dense[start:stop, start:stop], bounds,
                       [_label(model, analysis.blocks[i][0]) for i in region],
                       out / "fisher_blocks.png",
                       f"{task.name}: layers {', '.join(analysis.blocks[i][0] for i in region)}"
                       f" ({source}, {n} examples)")
    print(report)
    print(f"Fisher report: {out / 'fisher.md'}\nFisher blocks plot: {out / 'fisher_blocks.png'}")
    return 0
