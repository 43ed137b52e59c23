"""Small batches of a DataLoader stacked into larger ones for K-FAC's statistics.

K-FAC's factors are sums over examples, Ā = Σₙ ā ā ᵀ / (N·S) and G = Σₙ g gᵀ / M, and with the
eval-mode function (:mod:`natgrad.fisher.evaluation`) each example's ā and g depend on that
example alone: the batches of ``data`` may be concatenated before the forward and backward
passes without changing the factors (Monte-Carlo draws change, not their distribution). One
pass over 2,048 examples costs less than 16 passes over 128 (16 small GEMMs per layer instead
of one, and per-batch Python; benchmarks/RESULTS.md, issue 16).

Rules (:class:`StackPlan`):

- batches are stacked only with their neighbours and only when they are **concatenable**:
  the same arguments, the per-example tensors (leading size N) of the same trailing shapes,
  dtypes and devices, every other argument identical, targets alike (sequences of different
  lengths are not stacked);
- the first batch of each shape is used alone and measured; a stack then holds at most
  ``examples`` (2,048) examples, at most max(2,048, one batch's) rows per layer (examples ×
  positions: a sequence of T tokens is T rows, an image N·H·W) and at most max(2²⁴, one
  batch's) statistics elements: GEMMs gain little beyond ~2,048 rows, and the memory a pass
  holds grows with its rows, so a batch size chosen to fit memory is multiplied by at most
  2,048 / its rows (MLP batches of 128: 16; sequences of 2 × 512 tokens: 2; images: 1);
- stacking must not change the function: for the first 8 examples x₁, x₂ of the first two
  batches that would be stacked, f(x₁ ⊕ x₂) must equal f(x₁) ⊕ f(x₂) to within 1000 float
  epsilons of the outputs' scale (float32 and float64 outputs only). A model whose dim 0 is
  not the examples (a sequence-first transformer: dim 0 is time, and stacking would lengthen
  the sequences) or whose examples interact fails the check, and nothing is stacked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.fisher.data import Batch, ModelInputs  # noqa: F401 (the doctest uses it)
from natgrad.outputs import OutputSelector

__all__ = ["StackPlan", "concatenable", "concatenate"]

_EXAMPLES = 2048
_ROWS = 2048
_ELEMENTS = 1 << 24
_TOLERANCE = 1000  # float epsilons of the outputs' scale
_CHECKED_ROWS = 8  # examples of each batch the check stacks

Statistics = list[tuple[Tensor, Tensor]]


def _alike(a: Tensor, b: Tensor, trailing: bool) -> bool:
    shape_a, shape_b = (a.shape[1:], b.shape[1:]) if trailing else (a.shape, b.shape)
    return shape_a == shape_b and a.dtype == b.dtype and a.device == b.device


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and _alike(a, b, False)
                and bool(torch.equal(a, b)))
    try:
        return bool(a == b)
    except Exception:
        return False


def concatenable(first: Batch, second: Batch) -> bool:
    """Whether two batches can be concatenated along their examples: the same argument
    structure, per-example tensors alike but for their leading size, every other argument
    identical (``is``, equal tensors, or ``==``), targets both absent or alike."""
    (x1, y1), (x2, y2) = first, second
    leaves1, spec1, rows1 = x1.layout()
    leaves2, spec2, rows2 = x2.layout()
    if spec1 != spec2 or rows1 != rows2:
        return False
    for i, (a, b) in enumerate(zip(leaves1, leaves2, strict=True)):
        if not (_alike(a, b, True) if i in rows1 else _same(a, b)):
            return False
    if y1 is None or y2 is None:
        return y1 is None and y2 is None
    return y1.dim() > 0 and y2.dim() > 0 and _alike(y1, y2, True)


def concatenate(batches: list[Batch]) -> Batch:
    """One batch holding the examples of ``batches`` (concatenable) in order."""
    if len(batches) == 1:
        return batches[0]
    tensors, rebuild = batches[0][0].per_example()
    parts = [x.per_example()[0] for x, _ in batches]
    inputs = rebuild([torch.cat([p[j] for p in parts]) for j in range(len(tensors))])
    targets = None if batches[0][1] is None else torch.cat([y for _, y in batches])  # type: ignore[misc]
    return inputs, targets


def _first_rows(batch: Batch, k: int) -> Batch:
    inputs, targets = batch
    k = min(k, inputs.num_examples)
    return inputs.rows(0, k), None if targets is None else targets[:k]


def _stacking_keeps_function(model: nn.Module, first: Batch, second: Batch,
                             output: OutputSelector) -> bool:
    """f(x₁ ⊕ x₂) = f(x₁) ⊕ f(x₂) to within :data:`_TOLERANCE` epsilons (no gradients), on
    the first :data:`_CHECKED_ROWS` examples of each batch."""
    first, second = _first_rows(first, _CHECKED_ROWS), _first_rows(second, _CHECKED_ROWS)
    try:
        with torch.no_grad():
            apart = [first[0].call(model, output), second[0].call(model, output)]
            together = concatenate([first, second])[0].call(model, output)
    except Exception:
        return False
    if any(not isinstance(f, Tensor) or f.dtype not in (torch.float32, torch.float64)
           for f in [*apart, together]):
        return False
    if apart[0].dim() == 0 or apart[0].shape[1:] != apart[1].shape[1:]:
        return False
    expected = torch.cat(apart)
    if together.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not math.isfinite(scale):
        return False
    tol = _TOLERANCE * torch.finfo(expected.dtype).eps * max(1.0, scale)
    return bool((together - expected).abs().max() <= tol)


@dataclass(frozen=True)
class _Cost:
    """Per example of one batch shape: rows a layer sees at most (positions S), and
    statistics elements (ā and g of every layer); the measured batch's own totals."""

    rows: float
    elements: float
    batch_rows: float
    batch_elements: float


def _cost(stats: Statistics, examples: int) -> _Cost:
    n = max(1, examples)
    rows = max((a.shape[0] * a.shape[1] for a, _ in stats), default=0)
    elements = sum(a.numel() + g.numel() for a, g in stats)
    return _Cost(rows / n, elements / n, rows, elements)


class StackPlan:
    """Which consecutive batches of ``batches`` are stacked, decided on the first pass over
    them (:meth:`run`) and kept, so that a second pass (EK-FAC's scales, replaying the same
    Monte-Carlo draws) sees the same stacks.

    A batch of a shape not seen before (not concatenable with any batch measured so far) is
    used alone and measured; the following alike batches are stacked while the stack holds
    at most ``examples`` examples, its layers see at most max(``rows``, one such batch's) rows
    (examples × positions: GEMMs are efficient from about 2,048 rows, and what the backward
    pass keeps — attention's N·T² included — grows with them), and its statistics hold at
    most max(``elements``, one such batch's) elements.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> data = [(ModelInputs((torch.randn(4, 3),)), None) for _ in range(5)]
        >>> def stats(batch):
        ...     n = batch[0].num_examples
        ...     return [(torch.zeros(n, 1, 4), torch.zeros(1, n, 1, 2))], n
        >>> plan = StackPlan(model, data)
        >>> [count for _, count in plan.run(stats)], plan.groups
        ([4, 16], [[0], [1, 2, 3, 4]])
    """

    def __init__(self, model: nn.Module, batches: list[Batch], output: OutputSelector = None,
                 examples: int | None = None, elements: int | None = None,
                 rows: int | None = None) -> None:
        self.model = model
        self.batches = batches
        self.output = output
        self.examples = _EXAMPLES if examples is None else examples
        self.elements = _ELEMENTS if elements is None else elements
        self.rows = _ROWS if rows is None else rows
        self.groups: list[list[int]] | None = None
        self._stacks_keep_function: bool | None = None  # checked at the first stack

    def _group(self, start: int, cost: _Cost) -> list[int]:
        """Indices of the stack that begins at batch ``start`` (alike batches, in budget)."""
        first = self.batches[start]
        group, examples = [start], first[0].num_examples
        rows_cap = max(self.rows, cost.batch_rows)
        elements_cap = max(self.elements, cost.batch_elements)
        for i in range(start + 1, len(self.batches)):
            n = self.batches[i][0].num_examples
            total = examples + n
            if (total > self.examples or total * cost.rows > rows_cap
                    or total * cost.elements > elements_cap
                    or not concatenable(first, self.batches[i])):
                break
            group.append(i)
            examples = total
        if len(group) > 1 and self._stacks_keep_function is None:
            self._stacks_keep_function = _stacking_keeps_function(
                self.model, first, self.batches[group[1]], self.output)
        return group if self._stacks_keep_function is not False else [start]

    def run(self, statistics: Callable[[Batch], tuple[Statistics, int]]
            ) -> Iterator[tuple[Statistics, int]]:
        """``statistics`` of every stack in order."""
        if self.groups is not None:
            for group in self.groups:
                yield statistics(concatenate([self.batches[i] for i in group]))
            return
        groups: list[list[int]] = []
        measured: list[tuple[Batch, _Cost]] = []
        i = 0
        while i < len(self.batches):
            batch = self.batches[i]
            cost = next((c for b, c in measured if concatenable(b, batch)), None)
            if cost is None:  # a new shape: alone, and measured
                stats, count = statistics(batch)
                measured.append((batch, _cost(stats, batch[0].num_examples)))
                groups.append([i])
                yield stats, count
                del stats
                i += 1
                continue
            group = self._group(i, cost)
            groups.append(group)
            yield statistics(concatenate([self.batches[j] for j in group]))
            i = group[-1] + 1
        self.groups = groups
