"""``--device``: where the model and every batch live (``train``, ``compare``, ``fisher``).

The default is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``. Under torchrun with
several ranks on GPUs (NCCL), rank r of a node takes ``cuda:LOCAL_RANK`` — one device per rank,
so ``--device cuda`` (or the default) is all a data-parallel run needs; an explicit index
(``cuda:1``) is refused there, since every rank would share it. On CPU all ranks use gloo.

Everything the CLI draws at random uses generators on the run's device (Monte-Carlo Fisher
samples) or on the CPU (initialisation, data order), so the data order and the initial
parameters are the same on every device; the Monte-Carlo samples differ between CPU and CUDA.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

import torch

from natgrad.data import Dataset

__all__ = ["DeviceError", "add_device_option", "backend_for", "dataset_to", "device_spec",
           "resolve_device"]


class DeviceError(ValueError):
    """A ``--device`` that does not exist on this machine (the message says what does)."""


def device_spec(text: str) -> str:
    """argparse type of ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (checked for existence
    later, by :func:`resolve_device`)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(
            f"device type {device.type!r} is not supported (use cpu, cuda or cuda:N)")
    return text


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device."""
    parser.add_argument(
        "--device", type=device_spec, default=None, metavar="DEV",
        help="cpu, cuda or cuda:N: where the model and every batch go (default: cuda when "
             "available, else cpu; with --nproc-per-node on GPUs each rank takes "
             "cuda:LOCAL_RANK)")


@dataclass(frozen=True)
class _Machine:
    """What :func:`resolve_device` needs to know about the machine (injectable in tests)."""

    cuda_count: int
    local_rank: int | None  # set under torchrun with several ranks


def _machine() -> _Machine:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
    return _Machine(count, int(os.environ["LOCAL_RANK"]) if several else None)


def resolve_device(requested: str | None, machine: _Machine | None = None) -> torch.device:
    """The device a process uses for ``--device requested`` (``None``: the default).

    - ``None`` → ``cuda`` if there is a GPU, else ``cpu``;
    - ``cuda`` → ``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0`` (the current device);
    - ``cuda:N`` → itself (refused under torchrun with several ranks);
    - a CUDA device that does not exist → :class:`DeviceError`.
    """
    m = machine if machine is not None else _machine()
    text = requested if requested is not None else ("cuda" if m.cuda_count else "cpu")
    device = torch.device(text)
    if device.type == "cpu":
        return torch.device("cpu")
    if m.cuda_count == 0:
        raise DeviceError(f"--device {text}: no CUDA device is available (torch "
                          f"{torch.__version__}, cuda build: {torch.version.cuda or 'no'}); "
                          "use --device cpu")
    if m.local_rank is not None:
        if device.index is not None:
            raise DeviceError(f"--device {text} under --nproc-per-node: every rank would use "
                              "the same GPU; pass --device cuda (rank r takes cuda:LOCAL_RANK)")
        index = m.local_rank
    else:
        index = 0 if device.index is None else device.index
    if index >= m.cuda_count:
        raise DeviceError(f"--device {text}: this machine has {m.cuda_count} CUDA device(s) "
                          f"(cuda:0 … cuda:{m.cuda_count - 1}); a rank needs cuda:{index}")
    return torch.device("cuda", index)


def backend_for(requested: str | None, machine: _Machine | None = None) -> str:
    """The torch.distributed backend for ``--device requested``: NCCL on GPUs, gloo on CPU."""
    m = machine if machine is not None else _machine()
    text = requested if requested is not None else ("cuda" if m.cuda_count else "cpu")
    return "nccl" if torch.device(text).type == "cuda" else "gloo"


def dataset_to(data: Dataset, device: torch.device) -> Dataset:
    """``data`` with its four tensors on ``device`` (moved once: every batch and evaluation
    chunk is then taken on the device; ``data`` itself when it is already there)."""
    if data.x_train.device == device:
        return data
    return replace(data, x_train=data.x_train.to(device), y_train=data.y_train.to(device),
                   x_test=data.x_test.to(device), y_test=data.y_test.to(device))
