"""torch.distributed glue: summing statistics across ranks and spreading eigendecompositions.

Everything here is a no-op without an initialised default process group, so single-process
training pays nothing. With one (``torchrun``, any backend: gloo on CPU, NCCL on GPUs):

- statistics (K-FAC factor sums, EK-FAC scale sums, PRONG moments) are summed with one
  ``all_reduce`` of a packed buffer, so every rank holds the global-batch statistics;
- the eigendecompositions are assigned to ranks by cost (≈ n³ per factor, largest first onto the
  least-loaded rank) and broadcast from their owner, so each is computed exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "assign_by_cost",
    "broadcast_from",
    "check_same_layers",
    "is_distributed",
    "rank",
    "sum_across_ranks",
    "unwrap",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or ``DataParallel``), else ``model``:
    hooks and parameter names then match a single-process run, so checkpoints move freely."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def sum_across_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Σ over ranks of each tensor, one all_reduce per dtype (each tensor travels in its own
    precision: float32 factors are not widened by a float64 count); identity when alone."""
    if not is_distributed() or not tensors:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        dist.all_reduce(flat)
        offset = 0
        for i in members:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


def assign_by_cost(costs: Sequence[float], ranks: int) -> list[int]:
    """Owner rank of each job: largest cost first onto the least-loaded rank (LPT).

    Ties go to the lower job index and the lower rank. Here jobs 0 (cost 8) and 3 (cost 7) go
    to ranks 0 and 1, job 1 to the then lighter rank 1 (load 7), job 2 to rank 0 (both at 8):

    Example:
        >>> assign_by_cost([8.0, 1.0, 1.0, 7.0], 2)
        [0, 1, 0, 1]
    """
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        target = min(range(ranks), key=lambda r: (load[r], r))
        owner[job] = target
        load[target] += costs[job]
    return owner


def broadcast_from(tensors: Sequence[Tensor], src: int) -> None:
    """Broadcast ``tensors`` in place from rank ``src`` (no-op when alone)."""
    if not is_distributed():
        return
    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t, src=src)
        else:  # e.g. eigh's column-major eigenvectors: send row-major, copy back
            buffer = t.contiguous()
            dist.broadcast(buffer, src=src)
            t.copy_(buffer)


def check_same_layers(signature: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Raise ``ValueError`` on every rank if the ranks' registered layers (names and shapes)
    differ, instead of hanging in a mismatched collective later."""
    if not is_distributed():
        return
    digest = hashlib.sha256(repr(list(signature)).encode()).hexdigest()
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) != 1:
        differing = [r for r, d in enumerate(gathered) if d != gathered[0]]
        raise ValueError(
            f"ranks disagree on the model's registered layers (rank 0 differs from ranks "
            f"{differing}); every rank must build the same model"
        )
