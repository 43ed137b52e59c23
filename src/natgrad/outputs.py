"""The model's outputs f from what a forward pass returns.

natgrad's Fisher is that of the predictive distribution p(y | f) the model's outputs f
parametrize (logits for the categorical likelihood). Models return f as a tensor, or — as
Hugging Face models do — inside a ``ModelOutput`` or a dict, next to a loss and hidden states;
there f is the ``"logits"`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["output_tensor"]


def output_tensor(out: object) -> Tensor:
    """f: ``out`` itself if it is a tensor, else the ``"logits"`` tensor of a mapping (a dict,
    a transformers ``ModelOutput``); ``TypeError`` naming what was returned otherwise.

    Example:
        >>> import torch
        >>> output_tensor({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, Tensor):
            return logits
        keys = ", ".join(repr(k) for k in out)
        raise TypeError(
            f"the model returned a {type(out).__name__} with entries {keys} but no 'logits' "
            "tensor: natgrad needs the outputs that parametrize the likelihood; wrap the "
            "model so that it returns them as one tensor")
    raise TypeError(
        f"the model must return its outputs as one tensor (or a dict / ModelOutput with "
        f"'logits'), got {type(out).__name__}: wrap the model so that it returns the tensor "
        "that parametrizes the likelihood")
