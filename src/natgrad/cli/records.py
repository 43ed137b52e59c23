"""What a run leaves in its folder: ``config.json``, ``metrics.csv`` and ``checkpoint.pt``.

Written atomically: into a new temporary file beside the target, created exclusively under a
random name (``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink planted under that name is
never followed or reused), then renamed into place, so an interrupted write never leaves a
half file behind and nothing outside the folder is ever written through a link. A file that
cannot be read back (truncated, another program's, another run's) raises
:class:`RunFileError`, a one-line message naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from natgrad import distributed
from natgrad.data import DataError

__all__ = [
    "CHECKPOINT",
    "COLUMNS",
    "CONFIG",
    "METRICS",
    "RunConfig",
    "RunFileError",
    "atomic_write",
    "load_checkpoint",
    "prepare_folder",
    "read_config",
    "read_metrics",
    "save_checkpoint",
    "write_json",
    "write_metrics",
]

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.csv", "checkpoint.pt"
DIAGNOSTICS = "diagnostics.png"
COMPARE = "compare.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, DIAGNOSTICS)
START_FILES = (CONFIG, COMPARE)
"""What a run or comparison writes before its first checkpoint: a folder holding only natgrad's
own copies of these (recognised by their content), natgrad's temporary files and TensorBoard
event files is an unfinished start, which may be restarted without --overwrite (see
:func:`startup_files`)."""
EVENTS_PREFIX = "events.out.tfevents."
COLUMNS = ("step", "seconds", "batch_loss", "train_loss", "test_loss", "test_accuracy",
           "alpha", "mu", "damping", "rho", "predicted_kl")
"""metrics.csv: ``seconds`` is training time only (evaluation excluded); ``batch_loss`` the mean
training batch loss over the steps since the previous row; ``train_loss`` the loss on a fixed
evaluation subset of at most 10000 training examples; ``test_accuracy`` empty for
autoencoders. The last five describe the row's last step for kfac/ekfac (the optimizer's
``last_step_info``: step size α, momentum μ, damping δ, reduction ratio ρ when δ was adapted,
predicted KL ½ vᵀ F v with the adaptive step), empty otherwise."""

STEP_INFO = ("alpha", "mu", "damping", "rho", "predicted_kl")

Row = dict[str, float | int | None]
COMMAND: list[str] = ["natgrad"]
"""The command line being run (set by :func:`natgrad.cli.main.main`), saved with each run."""


@dataclass(frozen=True)
class RunConfig:
    """The configuration of one training run (validated on creation)."""

    task: str
    optimizer: str
    seed: int
    steps: int
    batch_size: int
    eval_every: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    epochs: int | None = None
    threads: int | None = None
    model_spec: str | None = None  # --model SPEC (natgrad.cli.user_code)
    data_spec: str | None = None  # --data SPEC
    device: str | None = None  # --device as given (None: cuda when available, else cpu)
    loop: dict[str, Any] = field(default_factory=dict)  # natgrad.cli.schedule.LoopSettings

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The configuration stored in a ``config.json`` (extra keys are ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


class SettingsError(DataError):
    """The optimizer refused a step for its settings (e.g. damping 0 on a singular curvature),
    changing nothing; the message is one line. The CLI exits with status 2."""


class RunFileError(DataError):
    """A run's file that cannot be used (unreadable, corrupt, or another run's); the message
    is one line naming the file and what to do. The CLI exits with status 2."""


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def is_writer() -> bool:
    """Whether this process writes results: always, except on ranks other than 0 of a
    data-parallel run."""
    return distributed.rank() == 0


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a new temporary file beside ``path``, then rename it onto ``path``.

    The temporary file ``<name>.<random>.tmp`` is created with ``O_CREAT | O_EXCL |
    O_NOFOLLOW``, so an existing file or symlink of that name is an error, never a target;
    ``os.replace`` then swaps the directory entry (a symlink at ``path`` is replaced, not
    followed). On any error the temporary file is removed and ``path`` is left as it was.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"could not create a temporary file beside {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (rank 0 only)."""
    if not is_writer():
        return
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_json(path: Path, config: RunConfig | dict[str, Any], **info: Any) -> None:
    """``config`` as JSON, with ``info`` (derived facts) and the software versions."""
    data = asdict(config) if isinstance(config, RunConfig) else dict(config)
    data.update(info)
    data["versions"] = {"natgrad": _version(), "torch": torch.__version__,
                        "python": platform.python_version()}
    data["command"] = shlex.join(COMMAND)
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _version() -> str:
    from natgrad import __version__

    return __version__


def read_json(path: Path, what: str = "run") -> dict[str, Any]:
    """The JSON object in ``path``; :class:`RunFileError` if it is unreadable or not an
    object (``what`` names the thing it records, for the message)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(
            f"{path} is unreadable or not valid JSON ({_one_line(err)}): the {what}'s settings "
            f"are lost; restore the file, or start again with --overwrite") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path} does not hold the {what}'s settings (a JSON object); "
                           "restore the file, or start again with --overwrite")
    return data


def read_config(path: Path) -> RunConfig:
    """The :class:`RunConfig` saved in a run's ``config.json``; :class:`RunFileError` if the
    file is unreadable or lacks valid settings."""
    data = read_json(path)
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise RunFileError(f"{path} does not hold valid run settings ({_one_line(err)}); "
                           "restore the file, or start again with --overwrite") from None


def _cell(value: float | int | None) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_metrics(path: Path, rows: list[Row]) -> None:
    """The rows as CSV with :data:`COLUMNS` (floats written exactly, by ``repr``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in COLUMNS])
    write_text(path, buffer.getvalue())


def read_metrics(path: Path) -> list[Row]:
    """The rows of a ``metrics.csv`` (empty cells as ``None``)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = []
        for record in csv.DictReader(f):
            row: Row = {}
            for c in COLUMNS:
                text = record.get(c, "")
                row[c] = None if text in ("", None) else (int(text) if c == "step"
                                                          else float(text))
            rows.append(row)
    return rows


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file renamed into place (rank 0 only)."""
    if not is_writer():
        return
    atomic_write(path, lambda f: torch.save(payload, f))


CHECKPOINT_KEYS = ("config", "step", "seconds", "rows", "pending", "model", "optimizer", "rng")


RUN_DEFINING = ("task", "optimizer", "seed", "batch_size", "eval_every", "hyperparameters",
                "data_dir", "model_spec", "data_spec", "loop")
"""The settings that define a run: a checkpoint continues only the run whose config.json has
the same ones. ``steps``/``epochs`` (extended at --resume), ``threads`` and ``device`` may
change, and so may the loop's checkpoint and TensorBoard options."""
LOOP_MAY_CHANGE = ("checkpoint_every", "keep_last", "tensorboard")
"""The loop settings (``RunConfig.loop``) a resumed run may change."""


def load_checkpoint(path: Path, expected: RunConfig | None = None) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, loaded with ``weights_only=True``.

    Raises:
        RunFileError: the file is missing, unreadable (empty, truncated, not a checkpoint), or
            written by another run than ``expected`` (other task, optimizer, seed, batch
            size, hyperparameters, ...: see :data:`RUN_DEFINING`).
    """
    hint = "move it away and start again with --overwrite, or restore the file"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFileError(f"no checkpoint at {path}") from None
    except Exception as err:  # torch raises many types for a bad file
        raise RunFileError(f"{path} is not a readable natgrad checkpoint ({_one_line(err)}): "
                           f"it is truncated or not a checkpoint; {hint}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS) or not (
            isinstance(ckpt["config"], dict)):
        raise RunFileError(f"{path} is not a natgrad checkpoint (it lacks a run's state); "
                           f"{hint}")
    if expected is not None:
        _check_same_run(path, ckpt["config"], expected)
    return ckpt


def _check_same_run(path: Path, saved: dict[str, Any], expected: RunConfig) -> None:
    """:class:`RunFileError` naming what differs if the checkpoint's settings ``saved`` are
    not those of the run ``expected`` (its config.json)."""
    hint = ("put this run's checkpoint back (or copy one of its checkpoints/step-*.pt over "
            "it), or move it away and start again with --overwrite; nothing was changed")
    if any(saved.get(name) != getattr(expected, name) for name in ("task", "optimizer")):
        raise RunFileError(
            f"{path} was written by a {saved.get('task')} {saved.get('optimizer')} run, "
            f"but {path.parent / CONFIG} describes a {expected.task} "
            f"{expected.optimizer} run; {hint}")
    differences = run_differences(saved, asdict(expected))
    if differences:
        raise RunFileError(
            f"{path} belongs to another run: it differs from the run {path.parent / CONFIG} "
            f"describes in {', '.join(differences)}; {hint}")


def run_differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``"NAME SAVED (not EXPECTED)"`` for each setting of :data:`RUN_DEFINING` (a
    hyperparameter or loop setting by its own name) in which two runs' configs differ."""
    found = []
    for name in RUN_DEFINING:
        old, new = saved.get(name), expected.get(name)
        if name in ("hyperparameters", "loop"):
            if name == "loop":
                old, new = _loop_defining(old), _loop_defining(new)
            old, new = old or {}, new or {}
            found += [f"{key} {old.get(key)} (not {new.get(key)})"
                      for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        elif old != new:
            found.append(f"{name} {old} (not {new})")
    return found


def _loop_defining(loop: dict[str, Any] | None) -> dict[str, Any]:
    """The loop settings (defaults filled in) that a resumed run must keep."""
    from natgrad.cli.schedule import LoopSettings  # schedule imports this module

    try:
        full = asdict(LoopSettings.from_dict(loop))
    except (TypeError, ValueError):
        full = dict(loop or {})
    return {k: v for k, v in full.items() if k not in LOOP_MAY_CHANGE}


def state_mismatch(path: Path, err: BaseException) -> RunFileError:
    """The error for a checkpoint whose state does not fit the model or optimizer built from
    the run's settings."""
    return RunFileError(f"{path} does not fit the run described by {path.parent / CONFIG} "
                        f"({_one_line(err)}); move it away and start again with --overwrite, "
                        "or restore the matching checkpoint")


def prepare_folder(out: Path, overwrite: bool, resume: bool,
                   known: tuple[str, ...] = RUN_FILES, create: bool = True,
                   marker: str = CONFIG) -> None:
    """Make sure ``out`` may receive a run's files (only check, without ``create``).

    A folder that exists and is not empty is refused unless ``overwrite`` (then the files in
    ``known`` are removed, nothing else) or ``resume`` (which needs the file ``marker``), or
    unless it holds only an unfinished start of natgrad's (see :func:`startup_files`), which
    is cleared.

    Raises:
        FileExistsError: the folder holds files and neither flag was given.
        FileNotFoundError: ``resume`` but there is no run in the folder.
    """
    if not is_writer():  # rank 0 checks and prepares; the others only read
        return
    if resume:
        if not (out / marker).exists():
            raise FileNotFoundError(f"--resume: {out} holds no run ({marker} is missing)")
        return
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        unfinished = startup_files(out, marker)
        if not overwrite and unfinished is None:
            raise FileExistsError(
                f"output folder {out} already exists and is not empty (nothing was changed); "
                "pass --overwrite to replace its results or --resume to continue the run in it")
        if not create:
            return
        if unfinished is not None:  # a start killed before its first checkpoint
            _clear_startup(unfinished)
        for name in known:
            target = out / name
            if target.is_file() or target.is_symlink():
                target.unlink()
        remove_temporary(out, known)
    if create:
        out.mkdir(parents=True, exist_ok=True)


def remove_temporary(out: Path, known: tuple[str, ...] = RUN_FILES) -> None:
    """Delete temporary files left beside ``known`` files by a killed write (rank 0 only;
    links are removed, never followed)."""
    if not is_writer() or not out.is_dir():
        return
    for name in known:
        for extra in (*out.glob(name + ".tmp"), *out.glob(name + ".*.tmp")):
            if _is_temporary(extra):
                extra.unlink()


def _is_temporary(entry: Path) -> bool:
    return entry.name.endswith(".tmp") and (entry.is_symlink() or entry.is_file())


def _natgrad_temporary(entry: Path) -> bool:
    """Whether ``entry`` is a temporary file :func:`atomic_write` leaves beside one of
    natgrad's files when killed (``<file>.tmp`` or ``<file>.<hex>.tmp``)."""
    return _is_temporary(entry) and any(
        re.fullmatch(re.escape(name) + r"(\.[0-9a-f]+)?\.tmp", entry.name)
        for name in (*RUN_FILES, *START_FILES))


def _event_file(entry: Path) -> bool:
    return entry.name.startswith(EVENTS_PREFIX) and entry.is_file() and not entry.is_symlink()


def natgrad_json(path: Path, marker: str = CONFIG) -> bool:
    """Whether ``path`` is a config.json (``marker`` CONFIG) or compare.json (COMPARE) that
    :func:`write_json` wrote: a plain file holding a JSON object with natgrad's ``versions``
    and a ``natgrad …`` ``command`` (and, for a run's config.json, its task, optimizer and
    seed; for a compare.json, its task and optimizers)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = read_json(path)
    except RunFileError:
        return False
    if not isinstance(data.get("versions"), dict):
        return False
    command = data.get("command")
    wrote = "natgrad" in data["versions"] and isinstance(command, str) and (
        command.split(" ", 1)[0] == "natgrad")
    keys = ("task", "optimizer", "seed") if marker == CONFIG else ("task", "optimizers")
    return wrote and all(k in data for k in keys)


def startup_files(folder: Path, marker: str = CONFIG) -> list[Path] | None:
    """What a start killed before its first checkpoint left in ``folder`` (contents before
    their folders), or ``None`` if the folder holds anything else: then it is not natgrad's to
    clear.

    A run's start (``marker`` config.json) leaves natgrad's config.json; a comparison's
    (``marker`` compare.json) natgrad's compare.json and, in ``<optimizer>/`` or
    ``<optimizer>/seed-<s>/``, its runs' starts. Only these files (recognised by their content,
    see :func:`natgrad_json`), natgrad's temporary files and, beside natgrad's JSON file,
    TensorBoard event files count: a user's own config.json, here or below, makes it a user's
    folder."""
    if marker == COMPARE:
        return _start_files(folder, COMPARE, _comparison_run)
    return _start_files(folder, CONFIG, _no_subfolder)


def _no_subfolder(entry: Path) -> None:
    """A run's start writes no sub-folder: any is not a start."""
    return None


def _start_files(folder: Path, marker: str, subfolder: Callable[[Path], list[Path] | None]
                 ) -> list[Path] | None:
    """:func:`startup_files` of one folder whose JSON file is ``marker``; ``subfolder`` gives
    a sub-folder's start files (``None``: not a start)."""
    found: list[Path] = []
    events = False
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            inner = subfolder(entry)
            if inner is None:
                return None
            found += [*inner, entry]
        elif (entry.name == marker and natgrad_json(entry, marker)) or _natgrad_temporary(
                entry):
            found.append(entry)
        elif _event_file(entry):
            events = True
            found.append(entry)
        else:
            return None
    if events and folder / marker not in found:
        return None  # event files without natgrad's JSON file: another program's
    return found


def _comparison_run(entry: Path) -> list[Path] | None:
    """The start files of a comparison's ``<optimizer>`` folder (its ``seed-<s>`` folders
    included), or ``None``."""
    from natgrad.cli.optimizers import OPTIMIZERS  # it imports the optimizers: only if needed

    if entry.name not in OPTIMIZERS:
        return None
    return _start_files(entry, CONFIG, _seed_run)


def _seed_run(entry: Path) -> list[Path] | None:
    """The start files of a comparison's ``seed-<s>`` run folder, or ``None``."""
    if not re.fullmatch(r"seed-\d+", entry.name):
        return None
    return _start_files(entry, CONFIG, _no_subfolder)


def _clear_startup(files: list[Path]) -> None:
    """Remove what :func:`startup_files` found (links removed, never followed)."""
    for entry in files:
        if entry.is_dir() and not entry.is_symlink():
            entry.rmdir()
        else:
            entry.unlink()
