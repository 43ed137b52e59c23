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
- a stack holds at most ``examples`` (2,048) examples and, measured on the first batch (which
  is always used alone), no more statistics elements (ā and g of every layer) than the larger
  of that batch's own and ``elements`` (2²⁴, 64 MiB in float32): a batch size chosen to fit
  memory is never multiplied;
- stacking must not change the function: for the first 8 examples x₁, x₂ of the first two
  batches that would be stacked, f(x₁ ⊕ x₂) must equal f(x₁) ⊕ f(x₂) to within 1000 float
  epsilons of the outputs' scale (float32 and float64 outputs only). A model whose dim 0 is
  not the examples (a sequence-first transformer: dim 0 is time, and stacking would lengthen
  the sequences) or whose examples interact fails the check, and nothing is stacked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.fisher.data import Batch, ModelInputs
from natgrad.outputs import OutputSelector

__all__ = ["StackPlan", "concatenable", "concatenate"]

_EXAMPLES = 2048
_ELEMENTS = 1 << 24
_TOLERANCE = 1000  # float epsilons of the outputs' scale
_CHECKED_ROWS = 8  # examples of each batch the check stacks

Statistics = list[tuple[Tensor, Tensor]]


def _layout(inputs: ModelInputs) -> tuple[list[Any], Any, list[int]]:
    leaves, spec = inputs._leaves()
    n = inputs.num_examples
    return leaves, spec, [i for i, leaf in enumerate(leaves) if inputs._batched(leaf, n)]


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
    leaves1, spec1, rows1 = _layout(x1)
    leaves2, spec2, rows2 = _layout(x2)
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


def _elements(stats: Statistics) -> int:
    return sum(a.numel() + g.numel() for a, g in stats)


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


class StackPlan:
    """Which consecutive batches of ``batches`` are stacked, decided on the first pass over
    them (:meth:`run`) and kept, so that a second pass (EK-FAC's scales, replaying the same
    Monte-Carlo draws) sees the same stacks.

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
                 examples: int | None = None, elements: int | None = None) -> None:
        self.model = model
        self.batches = batches
        self.output = output
        self.examples = _EXAMPLES if examples is None else examples
        self.elements = _ELEMENTS if elements is None else elements
        self.groups: list[list[int]] | None = None

    def _plan(self, first_elements: int) -> list[list[int]]:
        """Groups of batch indices after the first batch (whose statistics held
        ``first_elements`` elements)."""
        n0 = self.batches[0][0].num_examples
        per_example = first_elements / max(1, n0)
        budget = max(first_elements, self.elements)
        groups: list[list[int]] = []
        examples = 0
        for i in range(1, len(self.batches)):
            n = self.batches[i][0].num_examples
            if groups and (examples + n <= self.examples
                           and (examples + n) * per_example <= budget
                           and concatenable(self.batches[groups[-1][-1]], self.batches[i])):
                groups[-1].append(i)
                examples += n
            else:
                groups.append([i])
                examples = n
        stacked = next((g for g in groups if len(g) > 1), None)
        if stacked is not None and not _stacking_keeps_function(
                self.model, self.batches[stacked[0]], self.batches[stacked[1]], self.output):
            groups = [[i] for i in range(1, len(self.batches))]
        return groups

    def run(self, statistics: Callable[[Batch], tuple[Statistics, int]]
            ) -> Iterator[tuple[Statistics, int]]:
        """``statistics`` of every stack in order (the first batch alone first)."""
        if self.groups is None:
            stats, count = statistics(self.batches[0])
            first_elements = _elements(stats)
            yield stats, count
            del stats
            self.groups = [[0], *self._plan(first_elements)]
            groups = self.groups[1:]
        else:
            groups = self.groups
        for group in groups:
            yield statistics(concatenate([self.batches[i] for i in group]))
