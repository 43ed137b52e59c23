"""Benchmark tasks: a data set, a model, its likelihood and the matching loss.

Autoencoders reconstruct their input with a Bernoulli likelihood: the loss is the sigmoid
cross-entropy summed over pixels and averaged over the batch, −(1/N) Σₙ log p(xₙ | f(xₙ)).
Classifiers use a categorical likelihood and the mean cross-entropy. Both are batch means of
−log p(y | f), the scaling that natgrad's Fisher and optimizers assume (DESIGN.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.data import DEFAULT_FASHION_DIR, Dataset, load_digits, load_idx_folder
from natgrad.models import (
    AUTOENCODER_SIZES,
    DIGITS_AUTOENCODER_SIZES,
    autoencoder,
    mlp,
    small_cnn,
)

__all__ = ["TASKS", "Task", "batch_targets", "evaluate", "get_task"]

EVAL_TRAIN_EXAMPLES = 10_000
"""At most this many training examples (the first ones) give the logged train loss."""


@dataclass(frozen=True)
class Task:
    """One benchmark: ``dataset`` is "digits" or "fashion", ``kind`` "autoencoder", "mlp" or
    "cnn"; ``batch_size`` is the default batch size, ``threads`` the default number of torch
    CPU threads (1 for the tiny digits models, whose small matrix products only lose time
    to thread synchronisation; ``None``: torch's choice)."""

    name: str
    dataset: str
    kind: str
    batch_size: int
    description: str
    threads: int | None = None

    @property
    def likelihood(self) -> str:
        """"bernoulli" for autoencoders, "categorical" for classifiers."""
        return "bernoulli" if self.kind == "autoencoder" else "categorical"

    @property
    def classification(self) -> bool:
        return self.kind != "autoencoder"

    def load(self, data_dir: str | Path | None = None) -> Dataset:
        """The data set (images shaped (N, 1, H, W) for CNNs); raises ``DataError``."""
        if self.dataset == "digits":
            data = load_digits()
        else:
            data = load_idx_folder(data_dir or DEFAULT_FASHION_DIR, name="fashion")
        return data.images() if self.kind == "cnn" else data

    def build_model(self, image_shape: tuple[int, int]) -> nn.Module:
        """A freshly initialised model (seed torch's RNG first for a reproducible init)."""
        pixels = image_shape[0] * image_shape[1]
        if self.kind == "autoencoder":
            sizes = DIGITS_AUTOENCODER_SIZES if self.dataset == "digits" else AUTOENCODER_SIZES
            if sizes[0] != pixels:
                sizes = (pixels, *sizes[1:])
            return autoencoder(sizes)
        if self.kind == "mlp":
            hidden = (32,) if self.dataset == "digits" else (256, 128)
            return mlp((pixels, *hidden, 10))
        return small_cnn(image_shape, 10, channels=8 if self.dataset == "digits" else 16)

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """The batch mean of −log p(targets | output) (summed over pixels for autoencoders)."""
        if self.kind == "autoencoder":
            return F.binary_cross_entropy_with_logits(
                output, targets, reduction="sum") / output.shape[0]
        return F.cross_entropy(output, targets)


_TASKS = (
    Task("digits-autoencoder", "digits", "autoencoder", 100,
         "8x8 digits, deep autoencoder 64-32-16-8 (mirrored), Bernoulli pixels", 1),
    Task("digits-mlp", "digits", "mlp", 100, "8x8 digits, tanh MLP 64-32-10", 1),
    Task("digits-cnn", "digits", "cnn", 100, "8x8 digits, small CNN (8 channels)", 1),
    Task("fashion-autoencoder", "fashion", "autoencoder", 250,
         "Fashion-MNIST, deep autoencoder 784-1000-500-250-30 (mirrored), Bernoulli pixels"),
    Task("fashion-mlp", "fashion", "mlp", 250, "Fashion-MNIST, tanh MLP 784-256-128-10"),
    Task("fashion-cnn", "fashion", "cnn", 250, "Fashion-MNIST, small CNN (16 channels)"),
)
TASKS: dict[str, Task] = {task.name: task for task in _TASKS}


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def batch_targets(task: Task, x: Tensor, y: Tensor) -> Tensor:
    """What the model must predict: the inputs themselves for autoencoders, else labels."""
    return x if task.kind == "autoencoder" else y


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2000
) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) of ``model`` on (x, y), in eval mode, without gradients.

    The loss is the same per-example quantity as the training loss, averaged over all examples.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total, correct = 0.0, 0
    try:
        for start in range(0, x.shape[0], chunk):
            xb, yb = x[start:start + chunk], y[start:start + chunk]
            out = model(xb)
            total += float(task.loss(out, batch_targets(task, xb, yb))) * xb.shape[0]
            if task.classification:
                correct += int((out.argmax(1) == yb).sum())
    finally:
        for module, mode in modes.items():
            module.training = mode
    n = x.shape[0]
    return total / n, (correct / n if task.classification else None)
