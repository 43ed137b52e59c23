"""Accumulating a computed tensor into another in place: T ← β T + α d.

The K-FAC step adds its preconditioned gradient d to the momentum buffer (or, without momentum,
to the parameter) this way, inside the last matrix product where the damping form allows
(``addmm`` with β and α), so that the update costs no extra pass over memory.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["Accumulate", "accumulate"]

Accumulate = tuple[Tensor, float, float]
"""(T, β, α): a result d is accumulated in place as T ← β T + α d, and T returned."""


def accumulate(result: Tensor, into: Accumulate | None) -> Tensor:
    """``result`` itself, or T ← β T + α·result for ``into`` = (T, β, α)."""
    if into is None:
        return result
    target, beta, alpha = into
    if beta != 1:
        target.mul_(beta)
    return target.add_(result.to(target.dtype), alpha=alpha)
