"""Data-parallel runs: ``--nproc-per-node N`` relaunches the command under torchrun.

Each of the N processes (ranks) trains on its own shard of every global batch (the batch is
split into N contiguous parts whose sizes differ by at most one), the model wrapped in
``DistributedDataParallel``; each rank's loss is weighted by its shard's size, so the averaged
gradient and the logged loss are those of the whole batch whether or not N divides it, and
natgrad's optimizers sum their statistics over the ranks (see :mod:`natgrad.distributed`).
Only rank 0 writes files and prints. The same works when the user starts ``torchrun`` directly:
``torchrun --standalone --nproc-per-node N -m natgrad.cli.main train ...``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from natgrad.cli.device import DeviceError, backend_for, resolve_device

__all__ = ["add_launch_options", "finish", "init_from_environment", "relaunch", "under_torchrun"]


def add_launch_options(parser) -> None:
    """--nproc-per-node."""
    parser.add_argument(
        "--nproc-per-node", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine (torch.distributed, gloo on CPU, NCCL "
             "on GPUs; each rank takes a 1/N share of every batch, weighted by its size; "
             "default 1)")


def under_torchrun() -> bool:
    """Whether torchrun started this process as one of several ranks."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(argv: Sequence[str], nproc: int) -> int:
    """Run ``natgrad argv`` (without --nproc-per-node) under torchrun with ``nproc`` ranks."""
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = i + 1 < len(argv)
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "natgrad.cli.main", *rest]
    process = subprocess.Popen(command)
    # Ctrl-C reaches every process of the terminal's group: the ranks handle it (stop, save);
    # this parent waits for them. A SIGTERM sent to this process alone is passed on.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM,
                                              lambda signum, frame: process.terminate())}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def init_from_environment(device: str | None = None) -> int:
    """Initialise the default process group from torchrun's environment; returns the rank.

    ``device`` is the command's ``--device`` (see :mod:`natgrad.cli.device`): NCCL with rank r
    on ``cuda:LOCAL_RANK`` for GPUs, gloo for ``cpu``. Non-zero ranks print nothing on
    standard output.
    """
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            try:
                torch.cuda.set_device(resolve_device(device))
            except DeviceError as err:
                print(f"natgrad: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return rank


def finish() -> None:
    """After a command that returned normally: wait for every rank, then tear the process group
    down (a rank leaving while another still writes its files can abort that one). A no-op
    without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
