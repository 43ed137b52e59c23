"""How ``fisher_matrix`` evaluates a model: the eval-mode function, nothing written back.

The Fisher F = (1/N) Σₙ Jₙᵀ D(fₙ) Jₙ needs a function fₙ = f(xₙ; θ) of one example. In train
mode some layers are not one: Dropout (and RReLU, an LSTM's inter-layer dropout) draw a random
mask on every call, and BatchNorm normalises with the statistics of the whole batch, coupling
the examples (and updates its running statistics). natgrad therefore defines the Fisher of a
model as that of its **eval-mode function** for every structure and type: inside
:func:`evaluation` every module runs with ``training=False`` (Dropout is the identity,
BatchNorm uses its running statistics), whatever mode the model is in; the modes are restored
on every exit path, so no buffer is written. A BatchNorm without running statistics
(``track_running_stats=False``) normalises with batch statistics even in eval mode: there is no
per-example function, and it is refused. Training hooks of natgrad's optimizers are suspended
(:class:`natgrad.capture.suspended`): analysis never feeds their statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from natgrad.capture import suspended

__all__ = ["check_per_example", "evaluation"]


def check_per_example(model: nn.Module) -> None:
    """``ValueError`` naming every BatchNorm that normalises with batch statistics in eval
    mode (``track_running_stats=False``): the examples of a batch are coupled there."""
    coupled = [
        name or "<root>"
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.running_mean is None
    ]
    if coupled:
        raise ValueError(
            f"BatchNorm layer(s) {coupled} have no running statistics "
            "(track_running_stats=False): they normalise every batch with its own statistics, "
            "coupling the examples, so a per-example Fisher is undefined. natgrad uses the "
            "eval-mode function (BatchNorm with running statistics): construct them with "
            "track_running_stats=True, or use GroupNorm/LayerNorm"
        )


@contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode and natgrad's training hooks suspended; the
    modes are restored afterwards, exceptions included. ``training`` is set directly (not via
    ``train()``), so user overrides of ``train()`` do not run."""
    check_per_example(model)
    modules = [m for m in model.modules() if m.training]
    with suspended():
        try:
            for m in modules:
                m.training = False
            yield model
        finally:
            for m in modules:
                m.training = True
