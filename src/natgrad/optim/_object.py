"""What natgrad's optimizers add to ``torch.optim.Optimizer``'s object protocol: copies keep
every attribute, and the parameter groups are fixed once the optimizer is built."""

from __future__ import annotations

from typing import Any

__all__ = ["BuiltOnce"]


class BuiltOnce:
    """Mixin for a ``torch.optim.Optimizer`` subclass with attributes of its own.

    ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, so a
    copy of natgrad's optimizers (``copy.deepcopy((model, opt))``, a snapshot before a risky
    phase) lost its preconditioner, hooks and counters and failed at its first step. Every
    attribute is kept instead; copied together with its model, the copy's hooks and
    parameters are the copied model's (``deepcopy``'s memo), and it steps exactly as the
    original would.

    :meth:`add_param_group` after construction is refused: the curvature blocks, hooks and
    parameter names are set up for the parameters given at construction, and a group added
    later (gradual unfreezing, a new head) would fail at the next step or, for a layer frozen
    at construction, silently take the plain-gradient fallback.
    """

    _built = False  # set by the subclass once its own bookkeeping exists

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._built:  # Optimizer.__init__ adds the groups given at construction
            super().add_param_group(param_group)  # type: ignore[misc]
            return
        name = type(self).__name__
        raise ValueError(
            f"{name}.add_param_group(): the parameter groups of {name} are fixed when it is "
            "built (its curvature blocks and hooks cover the parameters given then); nothing "
            f"was changed. To train new or unfrozen parameters, build a new {name} over the "
            "model with param_groups=[...] and load this one's state_dict() into it where the "
            "groups agree, or step the new parameters with a separate torch optimizer")
