"""The Fisher as a matrix-free operator: Fisher-vector products by forward-mode JVPs.

F v = (1/M) Σₙ Jₙᵀ (Σₖ r_{nk} r_{nk}ᵀ) Jₙ v (M loss terms, :mod:`natgrad.normalisation`): one
Jacobian-vector product (forward mode) gives
Jₙ v for every example, the cotangent rows weight it in output space, one vector-Jacobian
product brings it back. No P × P matrix is formed; ``solve`` runs conjugate gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from natgrad._linalg import conjugate_gradient
from natgrad.fisher.base import FisherMatrix, ParameterLayout
from natgrad.fisher.data import ModelInputs
from natgrad.fisher.evaluation import evaluation
from natgrad.fisher.per_example import gradient_rows
from natgrad.outputs import OutputSelector

__all__ = ["MatrixFreeFisher"]


class MatrixFreeFisher(FisherMatrix):
    """The exact Fisher (of the given type) on fixed batches, applied without forming it.

    ``batches`` holds (inputs, rows) with rows (K, N, *f.shape[1:]) the cotangent rows of
    :func:`natgrad.likelihoods.cotangent_rows`; ``num_terms`` is M (default: the number of
    examples); ``output`` selects f from the model's return value. ``solve`` stops at
    relative residual ``cg_rtol`` or ``cg_max_iter`` iterations; the last solve's iteration
    count and residual are in ``last_cg``. θ, frozen parameters and buffers are copied at
    construction: the operator stays the Fisher at that point when the model trains on. Every
    later evaluation of the model (``mv``, ``solve``, ``trace``, ``to_dense``) runs, like
    ``fisher_matrix``, on the eval-mode function with natgrad's training hooks suspended
    (:func:`natgrad.fisher.evaluation.evaluation`): the operator is deterministic and
    symmetric whatever mode the model is in by then, and no buffer changes.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParameterLayout,
        batches: list[tuple[ModelInputs, Tensor]],
        cg_rtol: float = 1e-10,
        cg_max_iter: int | None = None,
        num_terms: int | None = None,
        output: OutputSelector = None,
    ) -> None:
        p = next(p for p in model.parameters() if p.requires_grad)
        super().__init__(layout, p.dtype, p.device)
        self.model = model
        self.batches = batches
        self.cg_rtol = cg_rtol
        self.cg_max_iter = cg_max_iter
        self.output = output
        self.num_examples = sum(inputs.num_examples for inputs, _ in batches)
        self.num_terms = self.num_examples if num_terms is None else num_terms
        self.last_cg: tuple[int, float] | None = None
        # θ, the frozen parameters and the buffers as they are now: the operator stays the
        # Fisher at this point (with the rows computed here) when the model trains on.
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self._state = {n: t.detach().clone() for n, t in state.items()}
        self._params = {n: self._state[n] for n in layout.names}
        self._transpose_jvp = _backward_is_not_derivative(model)

    def _unflatten(self, v: Tensor) -> dict[str, Tensor]:
        return {
            name: v[self.layout.slice(name)].view(shape)
            for name, shape in zip(self.layout.names, self.layout.shapes, strict=True)
        }

    def _mv(self, v: Tensor) -> Tensor:
        with evaluation(self.model):
            return self._mv_eval(v)

    def _mv_eval(self, v: Tensor) -> Tensor:
        tangent = self._unflatten(v)
        total = torch.zeros_like(v)
        for inputs, rows in self.batches:
            def output(p: dict[str, Tensor], inputs: ModelInputs = inputs) -> Tensor:
                return inputs.functional(self.model, {**self._state, **p}, self.output)

            if self._transpose_jvp:
                f, pullback = vjp(output, self._params)
                Jv = _transposed_pullback(pullback, f, tangent)
            else:
                _, Jv = jvp(output, (self._params,), (tangent,))
                _, pullback = vjp(output, self._params)
            weights = (rows * Jv.unsqueeze(0)).flatten(2).sum(-1)  # (K, N): r_{nk}ᵀ Jₙ v
            u = (weights.view(*weights.shape, *([1] * (rows.dim() - 2))) * rows).sum(0)
            (grads,) = pullback(u)
            total += torch.cat([grads[name].flatten() for name in self.layout.names])
        return total / self.num_terms

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        with evaluation(self.model):
            x, iterations, residual = conjugate_gradient(
                self._mv_eval, v, damping, self.cg_rtol, self.cg_max_iter
            )
        self.last_cg = (iterations, residual)
        return x

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        with evaluation(self.model):
            return torch.stack([self._mv_eval(e) for e in eye], dim=1)

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with evaluation(self.model):
            for inputs, rows in self.batches:
                for M in gradient_rows(self.model, self.layout, inputs, rows, self._state,
                                       self.output):
                    total = total + M.square().sum()
        return total / self.num_terms


def _backward_is_not_derivative(model: nn.Module) -> bool:
    """Whether the model has a layer whose backward is a convention, not the derivative of its
    forward: ``nn.Embedding`` with ``padding_idx`` (the padding row's gradient is 0 though the
    row is used) or ``scale_grad_by_freq``. There forward mode's J v and the gradients' Jᵀ u
    are not transposes of each other, and F v built from both is neither the dense Fisher nor
    symmetric."""
    return any(isinstance(m, nn.Embedding) and (m.padding_idx is not None
                                                or m.scale_grad_by_freq)
               for m in model.modules())


def _transposed_pullback(pullback: Callable, f: Tensor, tangent: dict[str, Tensor]) -> Tensor:
    """J v as the transpose of the gradients' map u ↦ Jᵀ u (reverse over reverse): the J that
    the gradients (and the dense Fisher) use, whatever conventions the backward has."""
    _, transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(f))
    (Jv,) = transpose(tangent)
    return Jv
