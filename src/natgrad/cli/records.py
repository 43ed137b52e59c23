"""What a run leaves in its folder: ``config.json``, ``metrics.csv`` and ``checkpoint.pt``.

Written atomically (a temporary file renamed into place), so an interrupted write never
leaves a half file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from natgrad import distributed

__all__ = [
    "CHECKPOINT",
    "COLUMNS",
    "CONFIG",
    "METRICS",
    "RunConfig",
    "load_checkpoint",
    "prepare_folder",
    "read_metrics",
    "save_checkpoint",
    "write_json",
    "write_metrics",
]

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.csv", "checkpoint.pt"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT)
COLUMNS = ("step", "seconds", "batch_loss", "train_loss", "test_loss", "test_accuracy")
"""metrics.csv: ``seconds`` is training time only (evaluation excluded); ``batch_loss`` the mean
training batch loss over the steps since the previous row; ``train_loss`` the loss on a fixed
evaluation subset of at most 10000 training examples; ``test_accuracy`` empty for
autoencoders."""

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


def is_writer() -> bool:
    """Whether this process writes results: always, except on ranks other than 0 of a
    data-parallel run."""
    return distributed.rank() == 0


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (rank 0 only)."""
    if not is_writer():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def prepare_folder(out: Path, overwrite: bool, resume: bool,
                   known: tuple[str, ...] = RUN_FILES, create: bool = True,
                   marker: str = CONFIG) -> None:
    """Make sure ``out`` may receive a run's files (only check, without ``create``).

    A folder that exists and is not empty is refused unless ``overwrite`` (then the files in
    ``known`` are removed, nothing else) or ``resume`` (which needs the file ``marker``).

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
        if not overwrite:
            raise FileExistsError(
                f"output folder {out} already exists and is not empty; pass --overwrite to "
                "replace its results or --resume to continue the run in it")
        if not create:
            return
        for name in known:
            target = out / name
            if target.is_file():
                target.unlink()
            for extra in out.glob(name + ".tmp"):
                extra.unlink()
    if create:
        out.mkdir(parents=True, exist_ok=True)
