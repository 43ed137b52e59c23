"""Normalising the ``data`` argument: an iterable of batches into (inputs, targets) pairs.

A batch's inputs are a :class:`ModelInputs`: the positional and keyword arguments of one call
``model(*args, **kwargs)``. Its tensors whose leading dimension is the batch size N (that of the
first tensor among the arguments) hold one row per example; everything else (non-tensor
options, tensors of another leading size) is passed unchanged to every example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from natgrad.outputs import OutputSelector, output_tensor

__all__ = ["Batch", "ModelInputs", "as_batches", "iter_examples"]


@dataclass(frozen=True)
class ModelInputs:
    """The arguments of one forward pass ``model(*args, **kwargs)`` of a batch.

    Example:
        >>> import torch
        >>> inputs = ModelInputs((torch.zeros(5, 3),), {"mask": torch.ones(5, 3), "k": 2})
        >>> inputs.num_examples, inputs.rows(1, 3).args[0].shape[0]
        (5, 2)
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def _leaves(self) -> tuple[list[Any], pytree.TreeSpec]:
        return pytree.tree_flatten((self.args, self.kwargs))

    @property
    def num_examples(self) -> int:
        """N: the leading size of the first tensor among the arguments (``ValueError`` if
        there is none)."""
        for leaf in self._leaves()[0]:
            if isinstance(leaf, Tensor) and leaf.dim() > 0:
                return leaf.shape[0]
        raise ValueError(
            "the model's inputs contain no tensor with a batch dimension: natgrad takes the "
            "number of examples from the first tensor argument's leading dimension"
        )

    def _batched(self, leaf: Any, n: int) -> bool:
        return isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == n

    def layout(self) -> tuple[list[Any], pytree.TreeSpec, list[int]]:
        """The arguments' leaves, their tree structure, and the positions of the per-example
        tensors (leading size N) among the leaves."""
        leaves, spec = self._leaves()
        n = self.num_examples
        return leaves, spec, [i for i, leaf in enumerate(leaves) if self._batched(leaf, n)]

    def per_example(self) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], ModelInputs]]:
        """The per-example tensors (batch first) and a function rebuilding the arguments with
        those tensors replaced (e.g. by one example each, inside ``vmap``)."""
        leaves, spec, positions = self.layout()

        def rebuild(tensors: Sequence[Tensor]) -> ModelInputs:
            new = list(leaves)
            for i, t in zip(positions, tensors, strict=True):
                new[i] = t
            args, kwargs = pytree.tree_unflatten(new, spec)
            return ModelInputs(tuple(args), dict(kwargs))

        return [leaves[i] for i in positions], rebuild

    def rows(self, start: int, stop: int) -> ModelInputs:
        """The arguments of examples start … stop − 1."""
        tensors, rebuild = self.per_example()
        return rebuild([t[start:stop] for t in tensors])

    def call(self, model: nn.Module, output: OutputSelector = None) -> Tensor:
        """f = model(*args, **kwargs), or the output ``output`` selects (by default the
        ``"logits"`` of a dict or ModelOutput, see :func:`natgrad.outputs.output_tensor`)."""
        return output_tensor(model(*self.args, **self.kwargs), output)

    def functional(self, model: nn.Module, params: dict[str, Tensor],
                   output: OutputSelector = None) -> Tensor:
        """f with the parameters ``params`` substituted (``torch.func.functional_call``)."""
        return output_tensor(functional_call(model, params, self.args, self.kwargs), output)


Batch = tuple[ModelInputs, Tensor | None]


def _batch(item: object, position: int) -> tuple[tuple[Tensor, ...] | ModelInputs, Tensor | None]:
    if isinstance(item, (Tensor, ModelInputs)):
        return (item,) if isinstance(item, Tensor) else item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (Tensor, ModelInputs)):
        first = (item[0],) if isinstance(item[0], Tensor) else item[0]
        if len(item) == 1:
            return first, None
        if len(item) == 2 and (item[1] is None or isinstance(item[1], Tensor)):
            return first, item[1]
    raise TypeError(
        f"batch {position} of data is {type(item).__name__}; expected (inputs, targets), "
        "(inputs,) or an inputs tensor (inputs: a tensor, or a natgrad.fisher.ModelInputs "
        "for several or keyword arguments)"
    )


def as_batches(data: Iterable | Tensor) -> list[Batch]:
    """The batches of ``data`` as a list of (ModelInputs, targets-or-None).

    ``data`` is an iterable of batches (a DataLoader, a list of (x, y) pairs), a single inputs
    tensor, or a single (inputs, targets) pair of tensors; inputs are a tensor or a
    :class:`ModelInputs`. Raises ``ValueError`` when it holds no examples.
    """
    if isinstance(data, (Tensor, ModelInputs)):
        items: list[object] = [data]
    elif (
        isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
    ):
        items = [data]
    else:
        try:
            items = list(data)
        except TypeError:
            raise TypeError(
                f"data must be an iterable of (inputs, targets) batches, got {type(data)}"
            ) from None
    batches: list[Batch] = []
    for i, item in enumerate(items):
        inputs, targets = _batch(item, i)
        if not isinstance(inputs, ModelInputs):
            inputs = ModelInputs(inputs)
        if inputs.num_examples > 0:
            batches.append((inputs, targets))
    if not batches:
        raise ValueError("data is empty: the Fisher needs at least one example")
    for i, (inputs, targets) in enumerate(batches):
        if targets is not None and targets.shape[:1] != (inputs.num_examples,):
            raise ValueError(f"batch {i}: {inputs.num_examples} inputs but "
                             f"{targets.shape[0] if targets.dim() else 0} targets")
    return batches


def iter_examples(data: Iterable | Tensor, limit: int) -> Iterator[tuple[Tensor, ...]]:
    """Yield the inputs of ``data``'s batches, lazily, until ``limit`` examples were given
    (the last batch trimmed). A fresh pass over ``data`` each call (a shuffling DataLoader
    gives new examples).
    """
    items = [data] if isinstance(data, Tensor) or (
        isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
    ) else data
    remaining = limit
    for i, item in enumerate(items):
        if remaining <= 0:
            return
        inputs, _ = _batch(item, i)
        if isinstance(inputs, ModelInputs):
            raise TypeError(f"batch {i}: these statistics take plain input tensors")
        take = min(remaining, inputs[0].shape[0])
        if take <= 0:
            continue
        remaining -= take
        yield tuple(x[:take] for x in inputs)
