"""Which dimensions of a layer's rows index the examples.

A layer's rows have leading dimensions ``lead`` (examples and positions in the layer's own
layout: (N, S) for Conv2d, (N, T) batch-first, (T, N) sequence-first). The examples are those
of the model's output f, whose dim 0 indexes them: N = f.shape[0]. The example axis of the
layer is one dimension of size N, or a leading run of dimensions whose sizes multiply to N
(an output flattened to (N·T, C) makes every position an example); where neither exists, a
dimension of size N·k holding each example's k rows one after the other (a layer applied to
hidden states flattened to (N·T, d), as Hugging Face OPT's feed-forward layers are), accepted
only when the gradients below confirm it. When several fit, the
gradients of the first and the last example's outputs decide: they are nonzero only at index
0, resp. N − 1, of the example axis (examples do not interact); if that does not single one
out, the axis is unknown and per-example quantities refuse rather than guess.
Per-example quantities (EK-FAC) need the axis; K-FAC does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ExampleAxis", "candidate_axes", "group_rows", "resolve_axis"]


@dataclass(frozen=True)
class ExampleAxis:
    """The dimensions of ``lead`` that index examples (a single one, or a leading run);
    ``known=False``: none could be identified (every row is then its own group).
    ``block`` k > 1: ``dims`` is one dimension of size N·k, example n owning its rows
    [n k, (n + 1) k)."""

    dims: tuple[int, ...]
    known: bool = True
    block: int = 1


def candidate_axes(lead: tuple[int, ...], examples: int) -> list[ExampleAxis]:
    """Every axis of ``lead`` that could index ``examples`` examples."""
    found = [ExampleAxis((d,)) for d, n in enumerate(lead) if n == examples]
    if examples == 1 and found:
        return found[:1]  # any size-1 dimension groups the rows the same way
    for p in range(2, len(lead) + 1):
        if math.prod(lead[:p]) == examples:
            # a run that is one of the single dims padded with size-1 dims groups the rows
            # the same way: not a second candidate
            if not any(axis.dims[0] < p and all(lead[d] == 1 for d in range(p)
                                                 if d != axis.dims[0]) for axis in found):
                found.append(ExampleAxis(tuple(range(p))))
            break
    if not found and examples > 1:  # each example's rows one after the other in one dim
        found = [ExampleAxis((d,), block=n // examples) for d, n in enumerate(lead)
                 if n > examples and n % examples == 0]
    return found


def _groups(shape: tuple[int, ...], axis: ExampleAxis) -> int:
    """How many examples ``axis`` indexes in rows whose leading sizes are ``shape``."""
    return math.prod(shape[d] for d in axis.dims) // axis.block


def _confined_to(probe: Tensor, axis: ExampleAxis, index: int) -> bool:
    """Whether ``probe`` (*lead, …) is nonzero somewhere, and only at ``index`` of ``axis``."""
    moved = probe.movedim(axis.dims, tuple(range(len(axis.dims))))
    flat = moved.reshape(_groups(tuple(probe.shape), axis), -1).abs().sum(1)
    rest = torch.cat([flat[:index], flat[index + 1:]])
    return bool(flat[index] > 0) and bool((rest == 0).all())


def resolve_axis(candidates: list[ExampleAxis], probes: tuple[Tensor, Tensor] | None,
                 verify_single: bool = False) -> ExampleAxis:
    """The axis among ``candidates``: the only one (with ``verify_single``, only if the probes
    confirm it), else the one where ``probes`` — the
    gradients of the first and of the last example's outputs w.r.t. the rows, each
    (*lead, …) — sit at index 0 and at index N − 1 alone. Examples that interact (train-mode
    BatchNorm) or dependence on positions that hides the axis leave it unknown
    (``known=False``), never guessed."""
    if len(candidates) == 1 and candidates[0].block == 1 and not (
            verify_single and probes is not None):
        return candidates[0]
    if candidates and probes is not None:
        first, last = probes
        confined = [axis for axis in candidates
                    if _confined_to(first, axis, 0) and _confined_to(
                        last, axis, _groups(tuple(first.shape), axis) - 1)]
        if len(confined) == 1:
            return confined[0]
    return ExampleAxis((), known=False)


def group_rows(rows: Tensor, axis: ExampleAxis, first: int = 0) -> Tensor:
    """Rows (…, *lead, width) with ``lead`` starting at dim ``first`` → (…, N, S, width):
    the example axis first, every other leading dimension flattened into positions S."""
    lead_end = rows.dim() - 1
    lead = rows.shape[first:lead_end]
    if not axis.known:  # every row its own group
        return rows.reshape(*rows.shape[:first], math.prod(lead), 1, rows.shape[-1])
    dims = tuple(first + d for d in axis.dims)
    moved = rows.movedim(dims, tuple(range(first, first + len(dims))))
    n = _groups(tuple(lead), axis)
    s = math.prod(lead) // n if n else 0
    return moved.reshape(*rows.shape[:first], n, s, rows.shape[-1])
