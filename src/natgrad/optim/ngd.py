"""Natural gradient descent with the Fisher of the current batch.

Δθ = −η (F + δI)⁻¹ (∇L + λθ), F the Fisher (DESIGN.md §1) of the inputs of every forward pass
run with gradients enabled since the last step (micro-batches b with M_b loss terms under
gradient accumulation: F = Σ_b M_b F_b / Σ_b M_b, the Fisher of their union; M_b = N_b for
(N, C) outputs; with ``step(targets=...)`` positions labelled ``ignore_index`` do not count,
for every fisher type), each pass's positional and
keyword arguments reused as given: the minimiser of ∇Lᵀ Δ + (δ/2η)‖Δ‖² + (1/2η) Δᵀ F Δ.
With ``structure`` "dense", "block_diagonal" or "diagonal" the solve is direct and exact for
that structure; "matrix_free" solves with conjugate gradient on Fisher-vector products
(forward-mode JVPs, no P × P matrix).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad.capture import InputRecorder
from natgrad.fisher import fisher_matrix
from natgrad.fisher.base import FisherMatrix
from natgrad.fisher.data import ModelInputs
from natgrad.likelihoods import Likelihood, get_likelihood
from natgrad.optim._object import BuiltOnce
from natgrad.optim._validation import (
    check_choice,
    check_model,
    check_ngd_state,
    check_nonnegative,
    check_positive,
    grads_finite,
)
from natgrad.outputs import OutputSelector, check_output_selector

__all__ = ["NGD"]

_STRUCTURES = ("dense", "block_diagonal", "diagonal", "kfac", "ekfac", "matrix_free")


class NGD(BuiltOnce, Optimizer):
    """Natural gradient descent: θ ← θ − η m, m ← μ m + (F + δI)⁻¹ (∇L + λθ).

    Args:
        model: the network (all its trainable parameters form one group).
        lr, damping: η and δ.
        likelihood: the model's predictive distribution.
        structure: how F is represented and solved (see module docstring).
        fisher_type: "mc" (default), "true" or "empirical" (then pass ``targets`` to
            ``step``: those of all micro-batches since the last step, concatenated in order,
            or a list with one tensor per forward pass).
        momentum, weight_decay: as in ``torch.optim.SGD``.
        cg_rtol, cg_max_iter: conjugate gradient stopping rule for "matrix_free".
        nonfinite: "skip" (warn and count) or "raise" for a non-finite loss or gradient.
        output: which output of the model parametrizes the likelihood when it returns a dict /
            ``ModelOutput``, tuple or other object (a key, an index or a callable; see
            :func:`natgrad.outputs.output_tensor`).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> opt = NGD(model, lr=0.5, damping=1e-2, structure="dense")
        >>> nn.functional.cross_entropy(model(torch.randn(8, 3)),
        ...                             torch.randint(0, 2, (8,))).backward()
        >>> opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-3,
        likelihood: str | Likelihood = "categorical",
        *,
        structure: str = "dense",
        fisher_type: str = "mc",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        cg_rtol: float = 1e-6,
        cg_max_iter: int | None = 100,
        nonfinite: str = "skip",
        generator: torch.Generator | None = None,
        output: OutputSelector = None,
        **unknown: Any,
    ) -> None:
        check_model(model, "NGD")
        if unknown:
            raise ValueError(f"unknown option(s) for NGD: {sorted(unknown)}")
        defaults = {
            "lr": check_positive("lr", lr),
            "damping": check_nonnegative("damping", damping),
            "momentum": check_nonnegative("momentum", momentum),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
        }
        self.structure = check_choice("structure", structure, _STRUCTURES)
        self.fisher_type = check_choice("fisher_type", fisher_type, ("mc", "true", "empirical"))
        self.likelihood = get_likelihood(likelihood)
        self.cg_rtol = check_positive("cg_rtol", cg_rtol)
        if cg_max_iter is not None and (not isinstance(cg_max_iter, int) or cg_max_iter < 1):
            raise ValueError(f"cg_max_iter must be a positive integer or None, got {cg_max_iter!r}")
        self.cg_max_iter = cg_max_iter
        self.nonfinite = check_choice("nonfinite", nonfinite, ("skip", "raise"))
        self.generator = generator
        self.output = check_output_selector(output)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self._built = True
        self.model = model
        self.skipped_steps = 0
        self.last_fisher: FisherMatrix | None = None
        self._recorder = InputRecorder(model)
        self.closed = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        """After a copy together with the model: the input recorder hooks into the copy."""
        super().__setstate__(state)
        if "_recorder" in self.__dict__ and not self.closed:
            self._recorder.rehook(self.model)

    def close(self) -> None:
        """Remove the input-recording hook from the model (the optimizer cannot step
        afterwards)."""
        self._recorder.close()
        self.closed = True

    def _skip(self, reason: str) -> None:
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{reason}; step not taken, state unchanged")
        self.skipped_steps += 1
        warnings.warn(f"{reason}: step skipped ({self.skipped_steps} so far)", RuntimeWarning,
                      stacklevel=3)

    def batch_fisher(
        self, targets: Tensor | list[Tensor] | tuple[Tensor, ...] | None = None
    ) -> FisherMatrix:
        """The Fisher, in this optimizer's structure, of the inputs of every forward pass run
        with gradients enabled since the last step: F = Σ_b N_b F_b / Σ_b N_b over those
        micro-batches b (the Fisher of their union; fisher_matrix suspends the recording),
        N_b replaced by the loss terms M_b for sequence outputs."""
        inputs = [ModelInputs(args, kwargs) for args, kwargs in self._recorder.passes]
        if not inputs:
            raise RuntimeError("NGD needs a forward pass of the model (with gradients enabled) "
                               "before step()")
        batches = list(zip(inputs, _split_targets(targets, inputs), strict=True))
        F = fisher_matrix(self.model, batches, self.likelihood,  # type: ignore[arg-type]
                          self.fisher_type, self.structure, 1, self.generator,  # type: ignore[arg-type]
                          output=self.output)
        if self.structure == "matrix_free":
            F.cg_rtol, F.cg_max_iter = self.cg_rtol, self.cg_max_iter  # type: ignore[attr-defined]
        return F

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the sampling generator's state and the skip count."""
        state = super().state_dict()
        state["natgrad"] = {
            "skipped_steps": self.skipped_steps,
            "generator": None if self.generator is None else self.generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved, all or nothing: ``ValueError`` naming the
        mismatch (another optimizer's state, groups, the flat momentum buffer's shape (P,),
        the generator state), state unchanged."""
        state, extra = check_ngd_state(self, state_dict, self.generator)
        super().load_state_dict(state)
        if extra is not None:
            self.skipped_steps = int(extra["skipped_steps"])
            if self.generator is not None and extra["generator"] is not None:
                self.generator.set_state(extra["generator"])

    def _check_trainable(self, params: list[Tensor]) -> None:
        """``ValueError`` (nothing changed) when parameters were frozen or unfrozen since
        construction: θ (the Fisher's parameters) is the set that trained then."""
        frozen, unfrozen = _changed_trainable(self.model, params)
        if frozen or unfrozen:
            raise ValueError(
                f"the trainable parameters changed after NGD was created (frozen since: "
                f"{frozen}, unfrozen since: {unfrozen}); θ and the momentum are sized for the "
                "parameters that trained then. Set requires_grad before creating the "
                "optimizer, or create a new one; nothing was changed")

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        targets: Tensor | list[Tensor] | tuple[Tensor, ...] | None = None,
    ) -> Tensor | None:
        """One natural-gradient step with the Fisher of the forward passes since the last step
        (those of ``closure`` included). After a step, taken or skipped, the record of passes
        starts afresh; an exception keeps it (fix the call and step again)."""
        if self.closed:
            raise RuntimeError(
                "NGD.step() after close(): the hook that records the forward passes was "
                "removed, so the step would use stale inputs; create a new NGD (and load "
                "this one's state_dict() into it) to continue training")
        loss = self._step(closure, targets)
        self._recorder.take()
        return loss

    def _step(
        self,
        closure: Callable[[], Tensor] | None,
        targets: Tensor | list[Tensor] | tuple[Tensor, ...] | None,
    ) -> Tensor | None:
        group = self.param_groups[0]
        params = group["params"]
        self._check_trainable(params)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is not None and not math.isfinite(float(loss)):
            self._skip(f"non-finite loss {float(loss)}")
            return loss
        if not grads_finite(params):
            self._skip("non-finite gradient")
            return loss
        with torch.enable_grad():
            F = self.batch_fisher(targets)
        self.last_fisher = F
        grad = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params
        ])
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * torch.cat([p.flatten() for p in params])
        direction = F.solve(grad.to(F.dtype), group["damping"]).to(grad.dtype)
        if group["momentum"]:
            state: dict[str, Any] = self.state[params[0]]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = direction.clone()
            else:
                buf.mul_(group["momentum"]).add_(direction)
            direction = buf
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(direction[offset:offset + n].view_as(p), alpha=-group["lr"])
            offset += n
        return loss


def _changed_trainable(model: nn.Module, params: list[Tensor]) -> tuple[list[str], list[str]]:
    """(frozen, unfrozen): names of the parameters of ``params`` that no longer require a
    gradient, and of the model's others that now do."""
    ids = {id(p) for p in params}
    named = list(model.named_parameters())
    frozen = [n for n, p in named if id(p) in ids and not p.requires_grad]
    unfrozen = [n for n, p in named if id(p) not in ids and p.requires_grad]
    return frozen, unfrozen


def _split_targets(
    targets: Tensor | list[Tensor] | tuple[Tensor, ...] | None, inputs: list[ModelInputs]
) -> list[Tensor | None]:
    """One targets tensor (or None) per recorded pass: a list is taken as given, a tensor is
    cut into the passes' sizes N_b (``ValueError`` when the counts disagree)."""
    if targets is None:
        return [None] * len(inputs)
    sizes = [i.num_examples for i in inputs]
    if isinstance(targets, (list, tuple)):
        if len(targets) != len(inputs):
            raise ValueError(
                f"targets holds {len(targets)} tensors but {len(inputs)} forward passes ran since "
                "the last step: pass one targets tensor per forward pass, in order"
            )
        return list(targets)
    if targets.dim() == 0 or targets.shape[0] != sum(sizes):
        got = targets.shape[0] if targets.dim() else 0
        raise ValueError(
            f"targets has {got} examples but the {len(sizes)} forward pass(es) since the last "
            f"step had {' + '.join(map(str, sizes))} = {sum(sizes)}: pass the targets of every "
            "micro-batch since the last step, concatenated in order (or a list, one per pass)"
        )
    return list(targets.split(sizes))
