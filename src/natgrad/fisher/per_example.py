"""Per-example, per-row gradients Jₙᵀ r_{nk} of any model, with torch.func.

These are the rows of a matrix M (one row per example n and cotangent row k, P columns in θ's
order) with F = Mᵀ M / M_terms (the number of loss terms, see
:mod:`natgrad.normalisation`): the dense, block-diagonal and diagonal structures are built from it
for any module that owns parameters (weight sharing included).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from natgrad.fisher.base import ParameterLayout
from natgrad.fisher.data import ModelInputs
from natgrad.outputs import OutputSelector

__all__ = ["gradient_rows"]

_CHUNK_ELEMENTS = 1 << 24  # bound on the elements of one chunk of M


def gradient_rows(
    model: nn.Module,
    layout: ParameterLayout,
    inputs: ModelInputs,
    rows: Tensor,
    state: dict[str, Tensor] | None = None,
    output: OutputSelector = None,
) -> Iterator[Tensor]:
    """Yield chunks of M: for examples n and rows k, Jₙᵀ r_{nk}, each chunk (n_chunk·K, P).

    ``inputs`` are the model's arguments for the batch (per-example tensors batch first);
    ``rows`` is (K, N, *f.shape[1:]) from :func:`natgrad.likelihoods.cotangent_rows`;
    ``state`` (parameters and buffers by name) replaces the model's own where given;
    ``output`` selects f from what the model returns (:func:`natgrad.outputs.output_tensor`).
    Examples are vectorised with ``vmap``; where torch has no batching rule for an operation
    (e.g. float64 ``nn.LSTM``), the same per-example function runs in a loop over examples.
    Random operations (a model random even in eval mode) are refused: the Fisher of a random
    function is undefined.
    """
    fixed = {**dict(model.named_parameters()), **(state or {})}
    trainable = {name: fixed[name].detach() for name in layout.names}
    fixed = {name: t for name, t in (state or {}).items() if name not in trainable}
    tensors, rebuild = inputs.per_example()

    select = output

    def example_output(p: dict[str, Tensor], *x: Tensor) -> Tensor:
        return rebuild([t.unsqueeze(0) for t in x]).functional(model, {**fixed, **p},
                                                            select).squeeze(0)

    def example_rows(r: Tensor, *x: Tensor) -> Tensor:
        _, pullback = vjp(lambda p: example_output(p, *x), trainable)
        (grads,) = vmap(pullback)(r)  # each (K, *param.shape)
        return torch.cat([grads[name].flatten(1) for name in layout.names], dim=1)

    def looped(r: Tensor, *x: Tensor) -> Tensor:
        return torch.stack([example_rows(r[i], *(t[i] for t in x)) for i in range(r.shape[0])])

    num_rows, num_examples = rows.shape[:2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_rows * layout.num_params))
    per_example = vmap(example_rows)
    by_example = rows.transpose(0, 1)  # (N, K, ...)
    for start in range(0, num_examples, chunk):
        stop = min(start + chunk, num_examples)
        args = (by_example[start:stop], *(t[start:stop] for t in tensors))
        try:
            block = per_example(*args)
        except RuntimeError as error:
            if "random" in str(error):
                raise ValueError(
                    "the model draws random numbers in eval mode (fisher_matrix evaluates the "
                    "eval-mode function): the Fisher of a random function is undefined; make "
                    "its randomness depend on module.training, as nn.Dropout does"
                ) from error
            per_example = looped  # no batching rule for some operation: one example at a time
            block = per_example(*args)
        yield block.reshape(-1, layout.num_params)
