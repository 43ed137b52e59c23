"""The one place that installs hooks: each layer's input ā and its pre-activation a.

For a Kronecker-factored layer a = W ā (see :mod:`natgrad.layers`), K-FAC needs

- ā = [h; 1] (h alone when the bias is absent or frozen, [1] alone when only the bias trains),
  one row per example and *position* (Conv2d: unfolded patches; Linear: extra leading dims);
- g = ∂ log p(ŷ|f)/∂a, obtained by differentiating f w.r.t. the recorded outputs a.

Statistics come as (ā of shape (N, S, in'), g of shape (K, N, S, out)) per layer, N the
examples of the model's output f (its dim 0) wherever the layer keeps them
(:mod:`natgrad.layers.examples`). Because g is computed here from explicit output cotangents
(see :func:`output_gradients`), never from the user's loss, nothing depends on the batch size
or on how a loss was reduced.

Outputs overwritten in place downstream (``ReLU(inplace=True)``): the first recording pass
hands every layer's successor a copy of a and learns which layers need one; later passes copy
only for those. Parameters used outside their layer (tied weights, ``F.linear`` on a layer's
weight) are found in the autograd graph of that first pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from natgrad import distributed
from natgrad._graph import parameter_uses
from natgrad._hooks import OwnHook
from natgrad._precision import full_precision
from natgrad.layers.calls import call_problem
from natgrad.layers.examples import ExampleAxis, candidate_axes, group_rows, resolve_axis
from natgrad.layers.scan import KFACLayer, find_kfac_layers, scan_layers
from natgrad.outputs import OutputSelector, output_tensor

__all__ = [
    "InputMoments",
    "InputRecorder",
    "KFACLayer",
    "LayerCapture",
    "Statistics",
    "TrainingCapture",
    "expand_grads",
    "expand_inputs",
    "find_kfac_layers",
    "output_gradients",
    "scan_layers",
    "suspended",
    "training_suspended",
]

_SUSPENDED = [0]
_LOSS_CHECKS = 8
"""How many training passes :class:`TrainingCapture` checks the loss gradient ∂L/∂f of (against
the likelihood's, :meth:`~natgrad.likelihoods.Likelihood.loss_gradient_problem`)."""


class suspended:  # noqa: N801 (a context manager used like a function)
    """Context manager: inside it, the training hooks of every natgrad optimizer and
    preconditioner record nothing (analysis such as ``fisher_matrix`` runs the model without
    feeding the optimizer's next factor update). Re-entrant.
    """

    def __enter__(self) -> suspended:
        _SUSPENDED[0] += 1
        return self

    def __exit__(self, *exc: object) -> None:
        _SUSPENDED[0] -= 1


def training_suspended() -> bool:
    """Whether a :class:`suspended` block is active."""
    return _SUSPENDED[0] > 0


def _eager(fn: Callable) -> Callable:
    """Run a training hook eagerly under ``torch.compile`` (its Python bookkeeping — lists of
    calls, tensor versions, extra backward passes — breaks the compiled graph there instead
    of being traced into it)."""
    return torch.compiler.disable(fn, recursive=True)


Statistics = list[tuple[Tensor, Tensor]]
"""Per layer (ā of shape (N, S, in'), g of shape (K, N, S, out)) for one forward pass."""


def expand_inputs(layer: KFACLayer, h: Tensor, axis: ExampleAxis | None = None) -> Tensor:
    """ā for every example and position: shape (N, S, in_dim), the ones column last.

    ``axis`` says which leading dims of the layer's rows index the examples (default: dim 0).
    """
    rows = group_rows(layer.kind.input_rows(layer.module, h), axis or ExampleAxis((0,)))
    parts = [rows] if layer.has_weight else []
    if layer.has_bias:
        parts.append(rows.new_ones(*rows.shape[:2], 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def expand_grads(layer: KFACLayer, g: Tensor, axis: ExampleAxis | None = None) -> Tensor:
    """g for every cotangent row, example and position: (K, *a.shape) → (K, N, S, out)."""
    return group_rows(layer.kind.output_rows(layer.module, g), axis or ExampleAxis((0,)), 1)


def output_gradients(
    f: Tensor, outputs: list[Tensor], rows: Tensor, retain_graph: bool = False
) -> list[Tensor]:
    """g_k = J_aᵀ r_k for each cotangent row r_k of f: a list of (K, *a.shape) tensors.

    ``rows`` has shape (K, *f.shape). All K rows go through one batched backward pass
    (``is_grads_batched``), not one backward per row; only gradients w.r.t. the recorded
    outputs are formed, never w.r.t. the weights.
    """
    if rows.shape[0] == 1:
        grads = torch.autograd.grad(
            f, outputs, grad_outputs=rows[0], retain_graph=retain_graph, allow_unused=True
        )
        grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
    else:
        grads = batched_grad(f, outputs, rows)
    return [
        torch.zeros(rows.shape[0], *a.shape, dtype=a.dtype, device=a.device) if g is None else g
        for g, a in zip(grads, outputs, strict=True)
    ]


@contextlib.contextmanager
def _vmap_fallback_quiet() -> Iterator[None]:
    """Silence torch's notice that an operation's backward has no batching rule (e.g.
    scaled_dot_product_attention's on CPU, behind attention's projections): torch then runs
    that operation row by row itself, with the same result."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we "
                                "have not yet implemented the batching rule")
        yield


def batched_grad(f: Tensor, outputs: list[Tensor], rows: Tensor) -> tuple[Tensor | None, ...]:
    """(J_aᵀ r_k)_k for each output a (None where f does not depend on it): one batched
    backward pass (``is_grads_batched``, the graph kept), or, for a graph that cannot be
    vmapped (torch.compile's backward kernels: out= variants, tensors without storage), one
    backward pass per row."""
    try:
        with _vmap_fallback_quiet():
            return torch.autograd.grad(f, outputs, grad_outputs=rows, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)
    except torch.OutOfMemoryError:
        raise  # not a graph that cannot be vmapped: fewer rows or a smaller batch are needed
    except RuntimeError:
        try:
            return _row_by_row(f, outputs, rows)
        except RuntimeError:
            pass
        raise


def _row_by_row(f: Tensor, outputs: list[Tensor], rows: Tensor) -> tuple[Tensor | None, ...]:
    """The batched backward pass of :func:`output_gradients` as K separate ones (for graphs
    that cannot be vmapped, such as torch.compile's backward kernels)."""
    per_row = [torch.autograd.grad(f, outputs, grad_outputs=row, retain_graph=True,
                                   allow_unused=True) for row in rows]
    return tuple(None if parts[0] is None else torch.stack(parts)
                 for parts in zip(*per_row, strict=True))


class _LayerHook:
    """A forward hook on the module that computes a layer's pre-activation
    (``kind.hook_module``), after ``kind.attach`` prepared it; ``remove()`` undoes both."""

    def __init__(self, layer: KFACLayer,
                 hook: Callable[[nn.Module], Callable[..., Tensor | None]]) -> None:
        """``hook(target)``: the hook to register on the prepared module ``target``."""
        self._detach = layer.kind.attach(layer.module)
        try:
            target = layer.kind.hook_module(layer.module)
            self._handle = target.register_forward_hook(hook(target), prepend=True)
        except BaseException:
            if self._detach is not None:
                self._detach()
            raise

    def remove_hook_only(self) -> None:
        """Remove the hook but leave the module as prepared (a copy's module keeps the copied
        preparation, which the original's undo function must not touch)."""
        self._handle.remove()
        self._detach = None

    def remove(self) -> None:
        self._handle.remove()
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()


@dataclass(eq=False)
class _Call:
    """One call of a layer: its input h, its output a (attached), a's version, and the copy
    handed downstream (when protected) with its version."""

    h: Tensor | None  # None: the layer was not called with its input as first argument
    a: Tensor
    version: int
    handed: Tensor | None
    handed_version: int


@dataclass(eq=False)
class _Pass:
    """The layer calls of one recording forward pass (and, for the empirical Fisher, the
    gradients of the user's loss w.r.t. their outputs as they arrive)."""

    calls: dict[str, list[_Call]] = field(default_factory=dict)
    without_grad: set[str] = field(default_factory=set)
    grads: dict[str, Tensor] = field(default_factory=dict)
    examples: int = 0
    axes: list[ExampleAxis] = field(default_factory=list)
    f: Tensor | None = None  # "empirical": the model's output, and the loss gradient ∂L/∂f
    f_grad: Tensor | None = None


class InPlaceModificationError(RuntimeError):
    """A recorded layer output was modified in place later in the forward pass."""


def _probe(f: Tensor, outputs: list[Tensor]) -> list[tuple[Tensor, Tensor] | None]:
    """(∂⟨w, f[0]⟩/∂a, ∂⟨w, f[N−1]⟩/∂a) for each recorded output a (w fixed
    pseudo-random), in one batched backward pass: the positions of a that the first and the
    last example depend on."""
    gen = torch.Generator(device=f.device).manual_seed(0)
    w = torch.randn(f[0].shape, generator=gen, device=f.device, dtype=f.dtype)
    rows = torch.zeros(2, *f.shape, dtype=f.dtype, device=f.device)
    rows[0, 0] = w
    rows[1, -1] = w
    grads = batched_grad(f, outputs, rows)
    return [None if g is None else (g[0], g[1]) for g in grads]


class _ExampleAxes:
    """Per layer, the example axis of its rows, found once per (row shape, N) and cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, tuple[int, ...], int], ExampleAxis] = {}

    def find(self, layers: list[KFACLayer], f: Tensor, outputs: list[Tensor]
             ) -> list[ExampleAxis]:
        n = f.shape[0] if f.dim() else 1
        keys, candidates = [], []
        for layer, a in zip(layers, outputs, strict=True):  # lead: a's rows without copying
            lead = tuple(layer.kind.output_rows(layer.module, a.detach()[None]).shape[1:-1])
            keys.append((layer.name, lead, n))
            candidates.append(None if keys[-1] in self._cache else candidate_axes(lead, n))
        # an embedding's single candidate is verified too: a positional embedding applied to
        # arange(T) and broadcast over the batch has rows (T,), a candidate when T = N
        # so is a dimension holding each example's rows one after the other (block > 1)
        verify = [c is not None and (len(c) > 1 or (len(c) == 1 and (
            layer.diagonal_inputs or c[0].block > 1)))
                  for layer, c in zip(layers, candidates, strict=True)]
        probes = _probe(f, outputs) if any(verify) else [None] * len(layers)
        for layer, key, cands, probe, check in zip(layers, keys, candidates, probes, verify,
                                                   strict=True):
            if cands is None:
                continue
            rows = None if probe is None or not check else tuple(
                layer.kind.output_rows(layer.module, p.unsqueeze(0))[0] for p in probe)
            self._cache[key] = resolve_axis(cands, rows, verify_single=check)  # type: ignore[arg-type]
        return [self._cache[key] for key in keys]


def graph_problems(f: Tensor, layers: list[KFACLayer], outputs: list[Tensor],
                   reach: bool) -> dict[str, str]:
    """Layers the graph behind f shows K-FAC would get wrong, with a reason each: a trainable
    weight or bias used more than once (tied to another module, or also used outside the
    layer, e.g. through ``F.linear``) and, with ``reach``, an output a that does not feed f
    (an auxiliary head used only in the loss: the Fisher of f gives it no curvature)."""
    params = {n: p for layer in layers for n, p in zip(
        layer.param_names, (layer.kind.weight(layer.module), layer.kind.bias(layer.module)),
        strict=True) if n is not None and p is not None}
    uses, reached = parameter_uses([f], params.values())
    found: dict[str, str] = {}
    for layer, a in zip(layers, outputs, strict=True):
        extra = [n for n in layer.param_names if n is not None and uses[id(params[n])] > 1]
        if extra:
            found[layer.name] = (f"{', '.join(extra)} also used outside the layer in the "
                                 "forward pass (tied or shared weights)")
        elif reach and a.grad_fn not in reached:
            found[layer.name] = ("its output does not reach the model's output (e.g. an "
                                 "auxiliary head used only in the loss), so the Fisher of the "
                                 "model's outputs gives it no curvature")
    return found


def check_axes(layers: list[KFACLayer], axes: list[ExampleAxis]) -> None:
    """``ValueError`` naming the layers whose example axis is unknown (per-example quantities
    such as EK-FAC's scales need it)."""
    unknown = [layer.name for layer, axis in zip(layers, axes, strict=True) if not axis.known]
    if unknown:
        raise ValueError(
            f"cannot tell which dimension of the inputs of layers {unknown} indexes the "
            "model's examples (dim 0 of its output): EK-FAC's scales and K-FAC-reduce need "
            "the rows of each example. "
            "Keep the examples in one dimension of every layer's input (or a leading run "
            "of dimensions flattened into the output's dim 0)."
        )


_UNKNOWN_AXIS = (
    "which dimension of its rows indexes the model's examples cannot be told (two fit and the "
    "examples interact, e.g. through a train-mode BatchNorm): EK-FAC's scales and K-FAC-reduce "
    "need each example's rows")


def _shared_layers(layers: list[KFACLayer], f: Tensor, outputs: list[Tensor],
                   axes: _ExampleAxes | None = None) -> dict[str, str]:
    """Layers whose output has no dimension of the examples' count N = f.shape[0] (nor a
    leading run of that size): one output shared by every example, such as a positional
    embedding applied to ``torch.arange(T)`` and broadcast over the batch. Its output
    gradients are sums over the examples, so per-example statistics (EK-FAC, reduce, the
    empirical and the true Fisher's rows) do not exist; only Monte-Carlo K-FAC, whose cross
    terms between examples vanish in expectation, stays unbiased. With ``axes``, an
    embedding's output whose only fitting dimension is not confirmed by the examples'
    gradients (rows (T,) with T = N), and any output whose examples could only own blocks of
    rows of one dimension (size N·k) that the gradients do not confirm, count as shared too."""
    n = f.shape[0]
    found = {}
    for layer, a in zip(layers, outputs, strict=True):
        lead = tuple(layer.kind.output_rows(layer.module, a.detach()[None]).shape[1:-1])
        candidates = candidate_axes(lead, n)
        shared = n > 1 and not candidates
        if n > 1 and not shared and axes is not None and (
                layer.diagonal_inputs or candidates[0].block > 1):
            shared = not axes.find([layer], f, [a])[0].known
        if shared:
            found[layer.name] = (
                f"its output (rows {lead}) is shared by all {n} examples of the batch (e.g. a "
                "positional embedding applied to torch.arange(T)), or does not keep each "
                "example's rows together (flattened position-major): its gradients are sums "
                "over the examples, so only fisher_type='mc' with K-FAC-expand can estimate its "
                "factors")
    return found


def _first_argument(args: tuple) -> Tensor | None:
    """The input h a layer hook records: its first positional argument, if a tensor."""
    return args[0].detach() if args and isinstance(args[0], Tensor) else None


def _call_problems(layers: list[KFACLayer], calls: dict[str, list[_Call]],
                   without_grad: set[str] | frozenset[str] = frozenset(),
                   check_values: bool = False) -> dict[str, str]:
    """Layers not called exactly once in a forward pass, or (``check_values``) whose call
    does not compute a = W h + b from its first argument (:mod:`natgrad.layers.calls`), with
    the reason."""
    found: dict[str, str] = {}
    for layer in layers:
        count = len(calls.get(layer.name, []))
        if count == 1:
            call = calls[layer.name][0]
            if call.h is None:
                found[layer.name] = (
                    "called without its input as the first positional argument (e.g. "
                    "layer(input=x)): its hook cannot see the input h")
            elif check_values:
                problem = call_problem(layer.kind, layer.module, call.h, call.a)
                if problem is not None:
                    found[layer.name] = problem
            continue
        if count == 0 and layer.name in without_grad:
            found[layer.name] = (
                "ran without gradients (its parameters were frozen after the optimizer was "
                "created, or it runs under torch.no_grad() or reentrant activation "
                "checkpointing: use torch.utils.checkpoint.checkpoint(..., use_reentrant=False))")
        elif count == 0:
            found[layer.name] = layer.kind.not_called_reason(layer.module) or (
                "not called in the forward pass (unused, or its weight used directly, e.g. "
                "through F.linear)")
        elif count > 1:
            found[layer.name] = (f"called {count} times in one forward pass (a reused module: "
                                 "Kronecker factors need one call per pass)")
    return found


class LayerCapture:
    """Context manager recording each layer's input h and output a in one forward pass.

    Every layer hands the rest of the network a copy of a, so that an in-place operation
    downstream (``ReLU(inplace=True)``) cannot overwrite the recorded a. Hooks are removed on
    every exit path, exceptions included.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
        >>> layers = find_kfac_layers(model)
        >>> with LayerCapture(layers) as cap:
        ...     f = model(torch.randn(5, 3))
        >>> [tuple(cap.output(layer).shape) for layer in layers]
        [(5, 4), (5, 2)]
    """

    def __init__(self, layers: list[KFACLayer]) -> None:
        self.layers = layers
        self._calls: dict[str, list[_Call]] = {}
        self._handles: list[_LayerHook] = []

    def __enter__(self) -> LayerCapture:
        try:
            for layer in self.layers:
                self._handles.append(_LayerHook(layer, lambda _, layer=layer: self._hook(layer)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: KFACLayer) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            handed = output.clone()
            self._calls.setdefault(layer.name, []).append(
                _Call(_first_argument(args), output, output._version, handed,
                      handed._version))
            return handed

        return hook

    def check(self, f: Tensor) -> None:
        """``ValueError`` unless every layer ran exactly once and its weight is used only by
        the layer (f: the model's output)."""
        problems = _call_problems(self.layers, self._calls, check_values=True)
        if not problems:
            problems = graph_problems(f, self.layers, [self.output(lay) for lay in self.layers],
                                      reach=True)
        if problems:
            raise ValueError(
                "Kronecker factors would be silently wrong for these layers: "
                + "; ".join(f"{name!r} {why}" for name, why in problems.items())
                + ". Use structure='dense', 'block_diagonal' or 'diagonal', or freeze them."
            )

    def statistics(self, f: Tensor, rows: Tensor, per_example: bool = False) -> Statistics:
        """Per layer (ā (N, S, in'), g (K, N, S, out)) with g_{nk} = J_aᵀ r_{nk} for the
        cotangent rows ``rows`` (K, *f.shape), in one batched backward pass; ``per_example``:
        ``ValueError`` unless every layer's example axis is known."""
        outputs = [self.output(layer) for layer in self.layers]
        inputs = [self.input(layer) for layer in self.layers]
        axes = _ExampleAxes().find(self.layers, f, outputs)
        if per_example:
            check_axes(self.layers, axes)
        grads = output_gradients(f, outputs, rows)
        return [(expand_inputs(layer, h, axis), expand_grads(layer, g, axis))
                for layer, h, g, axis in zip(self.layers, inputs, grads, axes, strict=True)]

    def input(self, layer: KFACLayer) -> Tensor:
        """The layer's input h (detached)."""
        return self._calls[layer.name][0].h

    def output(self, layer: KFACLayer) -> Tensor:
        """The layer's pre-activation a, still attached to the graph."""
        return self._calls[layer.name][0].a

    def __iter__(self) -> Iterator[KFACLayer]:
        return iter(self.layers)


class TrainingCapture:
    """Hooks that compute K-FAC statistics during the user's own training forward passes.

    While ``active`` is set and autograd records a graph (and no :class:`suspended` block
    runs), every forward pass of ``model`` records the layers' inputs and pre-activations.
    Then

    - for ``fisher_type`` "mc" or "true", right after the forward pass, the cotangent rows
      r_{nk} of the model's own predictive distribution are sent through one extra backward
      pass to the pre-activations (the graph is kept for the user's ``loss.backward()``);
    - for "empirical", the gradients of the user's loss reach the pre-activations during the
      user's backward pass, and are rescaled by −M: g = −M ∂L/∂a, exact when L is the mean of
      −log p over the M loss terms (M = N for (N, C) outputs; for sequence outputs the
      positions that ∂L/∂f reaches, see :func:`natgrad.normalisation.empirical_terms`).
      Several forward passes may share one backward pass, and one
      forward pass several backward passes (their gradients add up); a pass is completed at
      the next recording forward pass or at the step (:meth:`flush`).

    Each completed set of statistics goes to ``sink(stats, num_terms)`` (M, from
    ``terms(f, ∂L/∂f or None)``; default N); a pass with
    non-finite outputs gives none and calls ``on_nonfinite()`` instead; an empty batch gives
    none. Layers that cannot be Kronecker-factored correctly — not called exactly once, or
    with a weight also used elsewhere (tied) — are handed to ``on_fallback({name: reason})``
    and no longer recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[KFACLayer],
        rows: Callable[[Tensor], Tensor] | None,
        sink: Callable[[Statistics, int], None],
        on_nonfinite: Callable[[], None] | None = None,
        on_fallback: Callable[[dict[str, str]], None] | None = None,
        per_example: bool = False,
        terms: Callable[[Tensor, Tensor | None], int] | None = None,
        output: OutputSelector = None,
        shared_ok: bool = False,
        loss_gradient_problem: Callable[[Tensor, Tensor], str | None] | None = None,
    ) -> None:
        self.layers = layers
        self.loss_gradient_problem = loss_gradient_problem
        self._loss_checks = _LOSS_CHECKS if loss_gradient_problem is not None else 0
        self.shared_ok = shared_ok and not per_example
        self.terms = terms or (lambda f, grad: f.shape[0])
        self.output = output
        self.on_nonfinite = on_nonfinite
        self.on_fallback = on_fallback
        self.rows = rows  # f -> cotangent rows (K, *f.shape), or None for "empirical"
        self.sink = sink
        self.per_example = per_example
        self.active = False
        self.protect: set[str] | None = None  # None: not learned yet, protect every layer
        self.checked_sharing = False
        self._axes = _ExampleAxes()
        self._pass: _Pass | None = None
        self._waiting: list[_Pass] = []  # "empirical": passes waiting for the backward pass
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layer_handles: dict[str, _LayerHook] = {}
        self._hook_into(model)

    def _hook_into(self, model: nn.Module) -> None:
        self._handles = [model.register_forward_pre_hook(
            OwnHook(self, "_model_pre_hook", model))]
        self._handles.append(model.register_forward_hook(OwnHook(self, "_model_hook", model)))
        self._layer_handles = {}
        try:
            for layer in self.layers:  # prepended: before the user's hooks and ours
                self._layer_handles[layer.name] = _LayerHook(layer, self._layer_hook(layer))
        except BaseException:
            self.close()
            raise

    def rehook(self, model: nn.Module) -> None:
        """After a copy together with its model: the copied hooks (inert, see
        :mod:`natgrad._hooks`) are removed and this capture's own registered on ``model``."""
        if self.closed:
            return
        for handle in self._handles:
            handle.remove()
        for hook in self._layer_handles.values():
            hook.remove_hook_only()
        self._hook_into(model)

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in [*self._handles, *self._layer_handles.values()]:
            handle.remove()
        self._handles.clear()
        self._layer_handles.clear()
        self._waiting.clear()
        self._pass = None

    @property
    def closed(self) -> bool:
        return not self._handles

    def drop(self, names: set[str]) -> None:
        """Stop recording these layers (they take the fallback)."""
        for name in names:
            handle = self._layer_handles.pop(name, None)
            if handle is not None:
                handle.remove()
        self.layers = [layer for layer in self.layers if layer.name not in names]
        if self.protect is not None:
            self.protect -= names
        self._waiting.clear()

    def _recording(self) -> bool:
        return self.active and torch.is_grad_enabled() and not training_suspended()

    @_eager
    def _model_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._recording():  # a pass that records: start afresh
            self._pass = _Pass()
            for waiting in list(self._waiting):  # "empirical": backward passes done
                if len(waiting.grads) == len(self.layers):
                    self._complete_empirical(waiting)

    def _layer_hook(self, layer: KFACLayer
                    ) -> Callable[[nn.Module], Callable[..., Tensor | None]]:
        return lambda target: OwnHook(self, "_layer_output", target, layer)

    @_eager
    def _layer_output(self, layer: KFACLayer, module: nn.Module, args: tuple[Tensor, ...],
                      output: Tensor) -> Tensor | None:
        """The forward hook of one layer (an :class:`~natgrad._hooks.OwnHook`): its call recorded in
        the current pass, and the copy of its output handed on where it is protected."""
        current = self._pass
        if current is None or not self.active or training_suspended() or (
                torch._C._functorch.is_functorch_wrapped_tensor(output)):
            return None  # not a training pass (e.g. torch.func transforms of the model)
        if not (torch.is_grad_enabled() and output.requires_grad):
            current.without_grad.add(layer.name)
            return None
        handed = None
        if self.protect is None or layer.name in self.protect:
            handed = output.clone()
        current.calls.setdefault(layer.name, []).append(_Call(
            _first_argument(args), output, output._version, handed,
            -1 if handed is None else handed._version))
        if self.rows is None:
            output.register_hook(lambda grad: self._empirical_grad(current, layer, grad))
        return handed

    @_eager
    def _model_hook(self, module: nn.Module, args: tuple, f: object) -> None:
        current, self._pass = self._pass, None
        if current is None or not current.calls:
            return
        f = output_tensor(f, self.output)
        if f.dim() == 0:
            raise ValueError(
                "K-FAC needs the model to return its outputs with the examples in dim 0 (e.g. "
                "logits (N, C)), not a 0-dim tensor: compute the loss outside the model")
        if f.shape[0] == 0:
            return  # an empty batch: nothing to learn from
        try:
            self._record(current, f)
        finally:  # after our own backward passes through f: the hook sees the user's
            # a 16-bit output's gradient is checked under autocast only: a loss computed in
            # 16 bits (a pure bf16 model) rounds softmax(f) − e_y beyond the entries' own precision
            precise = f.element_size() >= 4 or torch.is_autocast_enabled(f.device.type)
            if self._loss_checks and f.requires_grad and precise:
                self._loss_checks -= 1
                output = f.detach()
                f.register_hook(lambda grad: self._check_loss_gradient(output, grad))

    def _record(self, current: _Pass, f: Tensor) -> None:
        """The statistics of one training pass with output ``f`` (or the reasons for the
        fallback of its layers)."""
        if not bool(torch.isfinite(f.detach()).all()):
            if self.on_nonfinite is not None:  # no statistics; the step will be skipped
                self.on_nonfinite()
            return
        if any(layer.trains_now() != (layer.has_weight, layer.has_bias)
               for layer in self.layers):
            return  # frozen/unfrozen since construction: the step refuses it (check_layers)
        problems = _call_problems(self.layers, current.calls, current.without_grad,
                                  check_values=not self.checked_sharing)
        if not self.checked_sharing:
            self.checked_sharing = True
            rest = [layer for layer in self.layers if layer.name not in problems]
            problems.update(graph_problems(f, rest, [current.calls[lay.name][0].a
                                                     for lay in rest], self.rows is not None))
        if problems:
            self._fallback(problems)
        if not self.layers or not self._intact(current):
            return
        calls = [current.calls[layer.name][0] for layer in self.layers]
        current.examples = f.shape[0]
        if not self.shared_ok:
            shared = _shared_layers(self.layers, f, [c.a for c in calls], self._axes)
            if shared:
                self._fallback(shared)
                if not self.layers:
                    return
                calls = [current.calls[layer.name][0] for layer in self.layers]
        if self.per_example:  # K-FAC's factors do not need the example axis
            current.axes = self._axes.find(self.layers, f, [c.a for c in calls])
            unknown = {layer.name: _UNKNOWN_AXIS for layer, axis in zip(
                self.layers, current.axes, strict=True) if not axis.known}
            if unknown:
                self._fallback(unknown)
                if not self.layers:
                    return
                kept = [i for i, axis in enumerate(current.axes) if axis.known]
                calls = [calls[i] for i in kept]
                current.axes = [current.axes[i] for i in kept]
        else:
            current.axes = [ExampleAxis((), known=False)] * len(self.layers)
        if self.rows is None:
            self._waiting.append(current)  # "empirical": the gradients arrive in backward
            current.f = f
            if f.requires_grad:
                f.register_hook(lambda grad: self._output_grad(current, grad))
            return
        terms = self.terms(f, None)
        if terms == 0:
            return
        grads = output_gradients(f, [c.a for c in calls], self.rows(f), retain_graph=True)
        with full_precision(f.device):
            self.sink(self._statistics(current, grads), terms)

    def _check_loss_gradient(self, f: Tensor, grad: Tensor) -> None:
        """Warn (once) when the user's ∂L/∂f cannot come from the likelihood natgrad assumes
        (:meth:`~natgrad.likelihoods.Likelihood.loss_gradient_problem`); checked on the first
        :data:`_LOSS_CHECKS` training passes only."""
        if self.loss_gradient_problem is None:
            return
        try:
            problem = self.loss_gradient_problem(f, grad)
        except RuntimeError:  # a batched backward pass (vmap) through f: not the user's loss
            return
        if problem is not None:
            self._loss_checks = 0
            self.loss_gradient_problem = None
            warnings.warn(problem, RuntimeWarning, stacklevel=2)

    def _fallback(self, problems: dict[str, str]) -> None:
        self.drop(set(problems))
        warnings.warn(
            "K-FAC cannot precondition these layers correctly; they take the fallback step "
            "from now on: " + "; ".join(f"{name!r} {why}" for name, why in problems.items()),
            RuntimeWarning, stacklevel=4,
        )
        if self.on_fallback is not None:
            self.on_fallback(problems)

    def _intact(self, current: _Pass) -> bool:
        """Whether no recorded output was overwritten in place; learns which layers need a
        copy handed downstream (all were protected on the first pass)."""
        needs: set[str] = set()
        lost: list[str] = []
        for layer in self.layers:
            call = current.calls[layer.name][0]
            if call.handed is not None and call.handed._version != call.handed_version:
                needs.add(layer.name)
            elif call.a._version != call.version:
                needs.add(layer.name)
                lost.append(layer.name)
        self.protect = needs if self.protect is None else self.protect | needs
        if lost:
            warnings.warn(
                f"the output of layers {lost} was modified in place (e.g. ReLU(inplace=True)) "
                "although it was not on the first pass; this pass's statistics are dropped "
                "and later passes keep a copy of the output",
                RuntimeWarning, stacklevel=4,
            )
            return False
        return True

    def _statistics(self, current: _Pass, grads: list[Tensor]) -> Statistics:
        return [
            (expand_inputs(layer, current.calls[layer.name][0].h, axis),
             expand_grads(layer, g, axis))
            for layer, g, axis in zip(self.layers, grads, current.axes, strict=True)
        ]

    def _empirical_grad(self, current: _Pass, layer: KFACLayer, grad: Tensor) -> None:
        """Sum the gradients reaching a recorded output (one or several backward passes);
        the pass is completed at the next recording forward pass or at the step."""
        if current not in self._waiting or layer not in self.layers:
            return
        previous = current.grads.get(layer.name)
        current.grads[layer.name] = grad.detach() if previous is None else previous + grad

    def _output_grad(self, current: _Pass, grad: Tensor) -> None:
        """Sum the loss gradients ∂L/∂f reaching the model's output (for M)."""
        if current in self._waiting:
            grad = grad.detach()
            current.f_grad = grad if current.f_grad is None else current.f_grad + grad

    def _complete_empirical(self, current: _Pass) -> None:
        """g = −M ∂L/∂a for every layer (zero for outputs the loss does not reach)."""
        self._waiting.remove(current)
        assert current.f is not None
        terms = self.terms(current.f, current.f_grad)
        if terms == 0:
            return
        grads = []
        for layer in self.layers:
            a = current.calls[layer.name][0].a
            grad = current.grads.get(layer.name)
            grad = torch.zeros_like(a) if grad is None else grad
            grads.append(-terms * grad.unsqueeze(0))
        with full_precision(grads[0].device):
            self.sink(self._statistics(current, grads), terms)

    def flush(self) -> None:
        """Before a step: complete the "empirical" passes that received some gradients (the
        outputs the loss never reached count as zero) and forget those that received none."""
        for current in list(self._waiting):
            if current.grads:
                self._complete_empirical(current)
        self._waiting.clear()


class InputRecorder:
    """Keeps the positional and keyword arguments of every forward pass of the model run with
    gradients enabled, outside :class:`suspended`, since the last :meth:`take` (what a Fisher
    of the micro-batches accumulated before ``step()`` needs). ``close()`` removes the hook.
    With ``record_rng``, ``rng_states`` holds, per pass,
    the random-number states (CPU, and CUDA of the inputs' device) as the pass began, so that
    re-running it can draw the same dropout masks.

    ``on_output(recorder, i, output)`` is called as pass i completes (after the hooks registered
    before this recorder, e.g. natgrad's own backward passes through the output), and may
    keep what it learns in ``notes[i]``.

    Tensors are kept as detached copies taken as the pass begins: a model that changes its
    input in place (``nn.Dropout(inplace=True)`` first) or a loop that refills one input
    buffer per micro-batch does not change what was recorded, and re-running a pass leaves
    the caller's tensors alone (the memory of one batch of inputs per recorded pass).
    """

    def __init__(self, model: nn.Module, record_rng: bool = False,
                 on_output: Callable[[InputRecorder, int, object], None] | None = None
                 ) -> None:
        self.passes: list[tuple[tuple, dict]] = []
        self.rng_states: list[tuple[Tensor, torch.device | None, Tensor | None]] = []
        self.record_rng = record_rng
        self.on_output = on_output
        self.notes: dict[int, object] = {}
        """What ``on_output`` noted about pass i (cleared by :meth:`take`)."""
        self._pending: tuple | None = None
        self._hook_into(model)

    def _hook_into(self, model: nn.Module) -> None:
        self._handle = model.register_forward_pre_hook(OwnHook(self, "_hook", model),
                                                       with_kwargs=True)
        self._done = model.register_forward_hook(OwnHook(self, "_commit", model))

    def rehook(self, model: nn.Module) -> None:
        """After a copy together with its model: this recorder's hooks on ``model`` instead of
        the copied, inert ones (:mod:`natgrad._hooks`)."""
        self._handle.remove()
        self._done.remove()
        self._hook_into(model)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Note the pass's inputs; they are kept only when the pass completes (a forward
        pass that raises — a malformed batch the loop catches — leaves nothing behind)."""
        self._pending = None
        if torch.is_grad_enabled() and not training_suspended():
            from torch.utils._pytree import tree_flatten, tree_map

            detach = lambda t: t.detach().clone() if isinstance(t, Tensor) else t  # noqa: E731
            rng = None
            if self.record_rng:
                leaves = tree_flatten((args, kwargs))[0]
                device = next((t.device for t in leaves if isinstance(t, Tensor)
                               and t.device.type == "cuda"), None)
                rng = (torch.get_rng_state(), device, None if device is None
                       else torch.cuda.get_rng_state(device))
            self._pending = (tree_map(detach, (tuple(args), dict(kwargs))), rng)

    def _commit(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._pending is not None:
            record, rng = self._pending
            self._pending = None
            self.passes.append(record)
            if rng is not None:
                self.rng_states.append(rng)
            if self.on_output is not None:
                self.on_output(self, len(self.passes) - 1, output)

    def take(self) -> list[tuple[tuple, dict]]:
        """The recorded (args, kwargs) of each pass, oldest first; the record starts afresh."""
        passes, self.passes, self.rng_states = self.passes, [], []
        self.notes = {}
        return passes

    def close(self) -> None:
        self._handle.remove()
        self._done.remove()


_SHIFTED_FROM = 128
"""Rows at least this wide are accumulated in float32 around a shift (:class:`InputMoments`);
narrower ones in float64: cheap there, and reproducible across process layouts to rounding
(float32 rounding rotated the near-degenerate eigenvectors of 64-pixel digits inputs, so a
PRONG run's V differed by 0.4 between 1 and 2 ranks at the same loss)."""


class InputMoments:
    """Context manager accumulating the first and second moments of the inputs of some
    modules over the forward passes run inside it: per module, the count n, Σ x and Σ x xᵀ of
    the rows ``rows(module, h)`` (e.g. features, or channels at every position), float64.
    Hooks are removed on every exit path.

    Rows of a float32 (or narrower) model, at least :data:`_SHIFTED_FROM` wide, are
    accumulated around a shift s, the first batch's mean: Σ (x − s) in float64 and
    Σ (x − s)(x − s)ᵀ by float32 products summed in float64 (about twice as fast as float64
    products; centring first leaves no cancellation to the float32 rounding, relative ~1e-7
    of the covariance), converted on exit to Σ x = Σ (x − s) + n s and
    Σ x xᵀ = Σ (x − s)(x − s)ᵀ + s dᵀ + d sᵀ + n s sᵀ, d = Σ (x − s),
    in float64. float64 rows are accumulated as they are.
    """

    def __init__(
        self, modules: dict[str, nn.Module], rows: Callable[[nn.Module, Tensor], Tensor]
    ) -> None:
        self.modules = modules
        self.rows = rows
        self.count: dict[str, int] = dict.fromkeys(modules, 0)
        self.sum: dict[str, Tensor] = {}
        self.outer: dict[str, Tensor] = {}
        self._shift: dict[str, Tensor] = {}  # s per module (float32 rows)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputMoments:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, s in self._shift.items():  # back to the moments of x (class docstring)
            d, n = self.sum[name], self.count[name]
            self.outer[name] += torch.outer(s, d) + torch.outer(d, s) + n * torch.outer(s, s)
            self.sum[name] = d + n * s
        self._shift.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = self.rows(module, args[0].detach())
            shift = self._shift.get(name)
            if (shift is None and name not in self.sum and x.dtype != torch.float64
                    and x.shape[0] > 0 and x.shape[1] >= _SHIFTED_FROM):
                # s: float32 values, exact in float64 too
                shift = self._shift[name] = x.float().mean(0).double()
            if shift is None:
                x = x.to(torch.float64)
                gram, total = x.T @ x, x.sum(0)
            else:
                x = x - shift if x.dtype == torch.float64 else x.float() - shift.float()
                gram, total = (x.T @ x).double(), x.sum(0, dtype=torch.float64)
            if name in self.sum:
                self.sum[name] += total
                self.outer[name] += gram
            else:
                self.sum[name] = total
                self.outer[name] = gram
            self.count[name] += x.shape[0]

        return hook

    def sum_across_ranks(self, dims: dict[str, int]) -> None:
        """Sum the moments over all ranks (a no-op in one process); a module that saw no
        input on this rank contributes zeros of its input width ``dims[name]``."""
        if not distributed.is_distributed():
            return
        tensors: list[Tensor] = []
        for name in self.modules:
            dim = dims[name]
            zeros = torch.zeros(dim, dtype=torch.float64)
            tensors += [
                torch.tensor([float(self.count[name])], dtype=torch.float64),
                self.sum.get(name, zeros),
                self.outer.get(name, torch.zeros(dim, dim, dtype=torch.float64)),
            ]
        reduced = distributed.sum_across_ranks(tensors)
        for i, name in enumerate(self.modules):
            count, total, outer = reduced[3 * i: 3 * i + 3]
            self.count[name] = int(count.item())
            self.sum[name], self.outer[name] = total, outer
