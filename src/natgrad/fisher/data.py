"""Normalising the ``data`` argument: an iterable of batches into (inputs, targets) pairs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor

__all__ = ["Batch", "as_batches", "iter_examples"]

Batch = tuple[tuple[Tensor, ...], Tensor | None]


def _batch(item: object, position: int) -> Batch:
    if isinstance(item, Tensor):
        return (item,), None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        if len(item) == 1:
            return (item[0],), None
        if len(item) == 2 and (item[1] is None or isinstance(item[1], Tensor)):
            return (item[0],), item[1]
    raise TypeError(
        f"batch {position} of data is {type(item).__name__}; expected (inputs, targets), "
        "(inputs,) or an inputs tensor"
    )


def as_batches(data: Iterable | Tensor) -> list[Batch]:
    """The batches of ``data`` as a list of ((inputs,), targets-or-None).

    ``data`` is an iterable of batches (a DataLoader, a list of (x, y) pairs), a single inputs
    tensor, or a single (inputs, targets) pair of tensors. Raises ``ValueError`` when it holds
    no examples.
    """
    if isinstance(data, Tensor):
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
    batches = [_batch(item, i) for i, item in enumerate(items)]
    batches = [b for b in batches if b[0][0].shape[0] > 0]
    if not batches:
        raise ValueError("data is empty: the Fisher needs at least one example")
    for i, (inputs, targets) in enumerate(batches):
        if targets is not None and targets.shape[:1] != inputs[0].shape[:1]:
            raise ValueError(
                f"batch {i}: {inputs[0].shape[0]} inputs but {targets.shape[0]} targets"
            )
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
        take = min(remaining, inputs[0].shape[0])
        if take <= 0:
            continue
        remaining -= take
        yield tuple(x[:take] for x in inputs)
