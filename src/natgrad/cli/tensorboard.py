"""TensorBoard event files next to ``metrics.csv`` when the ``tensorboard`` package is installed
(``pip install natgrad[tensorboard]``; ``--no-tensorboard`` turns them off).

Each metrics row becomes the scalars ``loss/train``, ``loss/test``, ``loss/batch`` and
``accuracy/test`` at its step, and every step's learning rate ``lr`` (of the first parameter
group). A resumed run purges the events past its checkpoint's step, so an interrupted stretch is
not shown twice. Only rank 0 writes. View with ``tensorboard --logdir OUT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from natgrad.cli.records import is_writer

__all__ = ["EventLog", "available", "clear_events"]

_TAGS = (("train_loss", "loss/train"), ("test_loss", "loss/test"),
         ("batch_loss", "loss/batch"), ("test_accuracy", "accuracy/test"),
         ("alpha", "step/alpha"), ("mu", "step/mu"), ("damping", "step/damping"),
         ("rho", "step/rho"), ("predicted_kl", "step/predicted_kl"))


def available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class EventLog:
    """A ``SummaryWriter`` on ``out``, or nothing when disabled, unavailable or not rank 0."""

    def __init__(self, out: Path, enabled: bool, start_step: int) -> None:
        self.writer: Any = None
        if enabled and is_writer() and available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out),
                                        purge_step=start_step if start_step else None)

    def row(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, tag in _TAGS:
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], int(row["step"]))
        self.writer.flush()

    def lr(self, step: int, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("lr", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def clear_events(out: Path) -> None:
    """Remove an earlier run's event files from ``out`` (a fresh run, not a resume)."""
    for old in out.glob("events.out.tfevents.*"):
        old.unlink()
