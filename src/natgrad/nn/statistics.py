"""The statistics pass shared by PRONG and its preconditioner: moments of layer inputs.

The model runs without gradients over ``num_samples`` examples in eval mode, except that batch
norms normalise with the statistics of the batch (as in training) while their running
statistics are left exactly as they were; the input rows of each chosen layer are accumulated
in float64 and, under torch.distributed, summed over ranks (each rank reads
⌈num_samples / world size⌉ examples of its own data).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from natgrad import distributed
from natgrad.capture import InputMoments
from natgrad.fisher.data import iter_examples
from natgrad.nn.layers import WhitenedLayer, whitening_rows

__all__ = ["collect_moments", "input_width"]


def input_width(module: nn.Module) -> int:
    """Width of the rows :func:`~natgrad.nn.layers.whitening_rows` gives for ``module``."""
    if isinstance(module, WhitenedLayer):
        return module.c.shape[0]
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def collect_moments(
    model: nn.Module, modules: dict[str, nn.Module], data: Iterable | Tensor, num_samples: int,
) -> InputMoments:
    """Moments of the input rows of ``modules`` over ``num_samples`` examples of ``data``.

    Warns when the data holds fewer examples than asked; raises ``ValueError`` below 2.
    """
    modes = {m: m.training for m in model.modules()}
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in batchnorms]
    moments = InputMoments(modules, whitening_rows)
    local = math.ceil(num_samples / distributed.world_size())
    seen = 0
    try:
        model.eval()
        for bn in batchnorms:
            bn.train()
        with torch.no_grad(), moments:
            for inputs in iter_examples(data, local):
                model(*inputs)
                seen += inputs[0].shape[0]
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for bn, state in zip(batchnorms, saved, strict=True):
                for key, value in state.items():
                    getattr(bn, key).copy_(value)
    if seen < local:
        warnings.warn(f"asked for {local} examples but the data holds {seen}; using those",
                      RuntimeWarning, stacklevel=3)
    moments.sum_across_ranks({name: input_width(m) for name, m in modules.items()})
    total = distributed.sum_across_ranks([torch.tensor([float(seen)], dtype=torch.float64)])
    if total[0].item() < 2:
        raise ValueError(f"at least 2 examples are needed to estimate covariances, got {seen}")
    return moments



