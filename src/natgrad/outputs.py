"""The model's outputs f from what a forward pass returns.

natgrad's Fisher is that of the predictive distribution p(y | f) the model's outputs f
parametrize (logits for the categorical likelihood). Models return f as a tensor, or — as
Hugging Face models do — inside a ``ModelOutput``, a dict or a tuple, next to a loss and hidden
states. The ``output`` argument of ``fisher_matrix``, the optimizers and the preconditioners
says which one is f (:data:`OutputSelector`); by default a tensor is f itself and a dict /
``ModelOutput`` gives its ``"logits"`` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

__all__ = ["OutputError", "OutputSelector", "check_output_selector", "output_tensor"]

OutputSelector = str | int | Callable[[object], Tensor] | None
"""Which output of the model is f: a key (of a dict / ``ModelOutput``, or an attribute
name), an index (of a tuple / list, e.g. 0 for ``(logits, hidden)``), a callable
``f(model_output) -> Tensor``, or None (the tensor itself, else the "logits" entry)."""


class OutputError(ValueError, TypeError):
    """The model's output does not give f (a ``ValueError``; also a ``TypeError``, what
    earlier versions raised)."""


def check_output_selector(output: object) -> OutputSelector:
    """``ValueError`` unless ``output`` is a valid :data:`OutputSelector`; returns it."""
    if output is None or callable(output) or (
            isinstance(output, (str, int)) and not isinstance(output, bool)):
        return output  # type: ignore[return-value]
    raise ValueError(f"output must be a key (str), an index (int), a callable "
                     f"f(model_output) -> Tensor or None, got {output!r}")


def _describe(out: object) -> str:
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with entries {', '.join(repr(k) for k in out)}"
    if isinstance(out, Sequence) and not isinstance(out, str):
        kinds = ", ".join(type(v).__name__ for v in out)
        return f"a {type(out).__name__} of {len(out)} ({kinds})"
    return f"a {type(out).__name__}"


def output_tensor(out: object, output: OutputSelector = None) -> Tensor:
    """f from what the model returned: ``output`` selects it (see :data:`OutputSelector`);
    with ``output=None``, ``out`` itself if it is a tensor, else the ``"logits"`` tensor of a
    mapping (a dict, a transformers ``ModelOutput``).

    Raises:
        OutputError: (a ``ValueError``) the selection is missing or not a tensor, naming what
            the model returned.

    Example:
        >>> import torch
        >>> output_tensor({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
        >>> output_tensor((torch.zeros(2, 3), torch.ones(2, 5)), output=1).shape
        torch.Size([2, 5])
    """
    if output is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping):
            logits = out.get("logits")
            if isinstance(logits, Tensor):
                return logits
            raise OutputError(
                f"the model returned {_describe(out)} but no 'logits' tensor: natgrad needs "
                "the outputs that parametrize the likelihood; say which with output=<key>, "
                "or wrap the model so that it returns them as one tensor")
        raise OutputError(
            f"the model must return its outputs as one tensor (or a dict / ModelOutput with "
            f"'logits'), got {type(out).__name__}: say which output parametrizes the "
            "likelihood with output=<key, index or callable>, or wrap the model so that it "
            "returns that tensor")
    if callable(output):
        f = output(out)
        if not isinstance(f, Tensor):
            raise OutputError(f"the output callable returned {type(f).__name__}, not a tensor "
                              f"(the model returned {_describe(out)})")
        return f
    f = _select(out, output)
    if not isinstance(f, Tensor):
        raise OutputError(f"output={output!r} selects a {type(f).__name__}, not a tensor, "
                          f"from {_describe(out)}")
    return f


def _select(out: object, output: str | int) -> object:
    if isinstance(output, str):
        if isinstance(out, Mapping):
            if output in out:
                return out[output]
        elif hasattr(out, output) and not isinstance(out, Tensor):
            return getattr(out, output)
        raise OutputError(f"output={output!r}: the model returned {_describe(out)}, which has "
                          f"no entry {output!r}")
    if isinstance(out, Sequence) and not isinstance(out, (str, Mapping)):
        if -len(out) <= output < len(out):
            return out[output]
        raise OutputError(f"output={output}: the model returned {_describe(out)}, index out "
                          "of range")
    if isinstance(out, Mapping):  # a ModelOutput is also indexable by position
        values = list(out.values())
        if -len(values) <= output < len(values):
            return values[output]
    raise OutputError(f"output={output}: the model returned {_describe(out)}, which cannot be "
                      "indexed by position")
