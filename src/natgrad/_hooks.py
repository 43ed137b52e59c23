"""Forward hooks that belong to one object and one module, and stay behind on copies.

natgrad registers hooks on the user's modules (curvature statistics, recorded inputs). A
bound method or closure registered there is copied along with the model by
``copy.deepcopy``: a copy of the model alone (an EMA, a teacher, a best-model snapshot) then
either drags along a live copy of the optimizer's bookkeeping (recording inputs nobody reads,
extra backward passes that draw random numbers) or reports into the original's. An
:class:`OwnHook` holds its owner and its module through weak references, which ``deepcopy``
does not copy: on a copied module it sees a module other than its own and does nothing. An
owner copied together with its model registers fresh hooks on the copy (``rehook``).
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["OwnHook"]


class OwnHook:
    """Calls ``getattr(owner, method)(*extra, module, *args)`` when called as a forward hook
    (or pre-hook) of ``module`` itself while ``owner`` is alive; returns None otherwise."""

    __slots__ = ("_extra", "_method", "_module", "_owner")

    def __init__(self, owner: object, method: str, module: object, *extra: Any) -> None:
        self._owner = weakref.ref(owner)
        self._method = method
        self._module = weakref.ref(module)
        self._extra = extra

    def __call__(self, module: object, *args: Any) -> Any:
        owner = self._owner()
        if owner is None or module is not self._module():
            return None
        return getattr(owner, self._method)(*self._extra, module, *args)
