"""Per-example, per-row gradients Jₙᵀ r_{nk} of any model, with torch.func.

These are the rows of a matrix M (one row per example n and cotangent row k, P columns in θ's
order) with F = Mᵀ M / N: the dense, block-diagonal and diagonal structures are built from it
for any module that owns parameters (weight sharing included).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from natgrad.fisher.base import ParameterLayout

__all__ = ["gradient_rows"]

_CHUNK_ELEMENTS = 1 << 24  # bound on the elements of one chunk of M


def gradient_rows(
    model: nn.Module, layout: ParameterLayout, inputs: tuple[Tensor, ...], rows: Tensor
) -> Iterator[Tensor]:
    """Yield chunks of M: for examples n and rows k, Jₙᵀ r_{nk}, each chunk (n_chunk·K, P).

    ``inputs`` are the model's positional inputs with the batch first; ``rows`` is
    (K, N, *f.shape[1:]) from :func:`natgrad.likelihoods.cotangent_rows`.
    """
    params = dict(model.named_parameters())
    trainable = {name: params[name].detach() for name in layout.names}

    def output(p: dict[str, Tensor], *x: Tensor) -> Tensor:
        batched = tuple(t.unsqueeze(0) for t in x)
        return functional_call(model, p, batched).squeeze(0)

    def example_rows(r: Tensor, *x: Tensor) -> Tensor:
        _, pullback = vjp(lambda p: output(p, *x), trainable)
        (grads,) = vmap(pullback)(r)  # each (K, *param.shape)
        return torch.cat([grads[name].flatten(1) for name in layout.names], dim=1)

    num_rows, num_examples = rows.shape[:2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_rows * layout.num_params))
    per_example = vmap(example_rows)
    by_example = rows.transpose(0, 1)  # (N, K, ...)
    for start in range(0, num_examples, chunk):
        stop = min(start + chunk, num_examples)
        block = per_example(by_example[start:stop], *(x[start:stop] for x in inputs))
        yield block.reshape(-1, layout.num_params)
