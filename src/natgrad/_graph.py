"""Reading the autograd graph: how often each parameter is used by a computation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from torch import Tensor

__all__ = ["parameter_uses"]


def parameter_uses(roots: Iterable[Tensor], params: Iterable[Tensor]
                   ) -> tuple[Counter[int], set[object]]:
    """For each of ``params`` (by ``id``), the number of edges of the graph behind ``roots``
    that lead into its gradient accumulator: how many operations consumed it directly; and
    the set of graph nodes reached (a tensor t feeds the roots iff ``t.grad_fn`` is in it).

    A layer's weight used once by the layer gives 1; a weight also used through ``F.linear``
    elsewhere, or tied to another module, gives more. A compiled region counts as one use.
    """
    wanted = {id(p) for p in params}
    uses: Counter[int] = Counter()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[object] = set(stack)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if id(variable) in wanted:
                    uses[id(variable)] += 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return uses, seen
