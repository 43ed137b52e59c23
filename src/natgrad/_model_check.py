"""The first argument of natgrad's entry points: the network itself."""

from __future__ import annotations

from torch import nn

__all__ = ["check_model"]


def check_model(model: object, owner: str) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module``: natgrad's optimizers need the
    network (its layers and forward passes), not an iterable of its parameters."""
    if not isinstance(model, nn.Module):
        what = ("an iterable of parameters (as torch.optim takes)"
                if not isinstance(model, (str, bytes)) and hasattr(model, "__iter__")
                else type(model).__name__)
        raise TypeError(
            f"{owner} takes the model (an nn.Module) as its first argument, got {what}: "
            f"pass the model itself, {owner}(model)")
