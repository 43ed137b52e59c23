"""The one place that installs hooks: each layer's input ā and its pre-activation a.

For a Kronecker-factored layer a = W h + b (Linear) or a = W ⋆ h + b (Conv2d), K-FAC needs

- ā = [h; 1] (h alone when the bias is absent or frozen, [1] alone when only the bias trains),
  one row per example and *position* (Conv2d: unfolded patches; Linear: extra leading dims);
- g = ∂ log p(ŷ|f)/∂a, obtained by differentiating f w.r.t. the recorded outputs a.

:class:`LayerCapture` records h and a during one forward pass and removes its hooks on every
exit path. Because g is computed here from explicit output cotangents (see
:func:`output_gradients`), never from the user's loss, nothing depends on the batch size or on
how a loss was reduced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad import distributed

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

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

_SUSPENDED = [0]


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


@dataclass(frozen=True)
class KFACLayer:
    """A Linear or Conv2d layer handled by Kronecker factors.

    ``has_weight``/``has_bias`` say which of its parameters train; ā carries h only if the
    weight trains and the ones column only if the bias trains.
    """

    name: str
    module: nn.Module
    has_weight: bool
    has_bias: bool

    @property
    def in_dim(self) -> int:
        """Width of ā: in·kh·kw for the weight (if it trains) plus 1 for the bias."""
        weight = self.module.weight
        return (weight[0].numel() if self.has_weight else 0) + int(self.has_bias)

    @property
    def out_dim(self) -> int:
        return self.module.weight.shape[0]

    @property
    def param_names(self) -> tuple[str | None, str | None]:
        """Names in ``model.named_parameters()`` of the trainable weight and bias (or None)."""
        prefix = "" if self.name == "<root>" else f"{self.name}."
        return (
            f"{prefix}weight" if self.has_weight else None,
            f"{prefix}bias" if self.has_bias else None,
        )


def scan_layers(model: nn.Module) -> tuple[list[KFACLayer], list[str]]:
    """The Linear/Conv2d layers owning trainable parameters, in θ's order, and a description
    of every other module with trainable parameters (other module types, grouped
    convolutions, parameters shared between modules).
    """
    layers: list[KFACLayer] = []
    unsupported: list[str] = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = name or "<root>"
        shared = [owner[id(p)] for p in own if id(p) in owner]
        for p in own:
            owner.setdefault(id(p), label)
        kind = type(module).__name__
        if shared:
            unsupported.append(f"{label} ({kind}, shares parameters with "
                               f"{', '.join(sorted(set(shared)))})")
        elif type(module) not in SUPPORTED_LAYERS:
            unsupported.append(f"{label} ({kind})")
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            unsupported.append(f"{label} (Conv2d with groups={module.groups}; only groups=1)")
        elif {id(p) for p in own} - {id(module.weight), id(module.bias)}:
            unsupported.append(f"{label} ({kind} with extra parameters)")
        else:
            layers.append(
                KFACLayer(
                    name=label,
                    module=module,
                    has_weight=module.weight.requires_grad,
                    has_bias=module.bias is not None and module.bias.requires_grad,
                )
            )
    return layers, unsupported


def find_kfac_layers(model: nn.Module) -> list[KFACLayer]:
    """The Linear/Conv2d layers of :func:`scan_layers`; ``ValueError`` listing every module
    with trainable parameters that Kronecker factors do not cover.
    """
    layers, unsupported = scan_layers(model)
    if unsupported:
        raise ValueError(
            "Kronecker-factored structures support nn.Linear and nn.Conv2d (groups=1) only; "
            "these modules have trainable parameters they do not cover: "
            + "; ".join(unsupported)
            + ". Use structure='dense', 'block_diagonal' or 'diagonal', or freeze them."
        )
    if not layers:
        raise ValueError("the model has no trainable Linear or Conv2d layers")
    return layers


def expand_inputs(layer: KFACLayer, h: Tensor) -> Tensor:
    """ā for every example and position: shape (N, S, in_dim).

    Linear with input (N, ..., in): S = product of the extra dims. Conv2d with input
    (N, C, H, W): the input is padded as the layer pads it and unfolded into S = H'·W' patches
    of length C·kh·kw, ordered like ``weight.flatten(1)``. The ones column comes last.
    """
    module = layer.module
    if isinstance(module, nn.Conv2d):
        if module.padding_mode == "zeros":
            h = F.pad(h, module._reversed_padding_repeated_twice)
        else:
            h = F.pad(h, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        patches = F.unfold(h, module.kernel_size, module.dilation, 0, module.stride)
        rows = patches.transpose(1, 2)  # (N, S, C·kh·kw)
    else:
        rows = h.reshape(h.shape[0], -1, h.shape[-1])
    parts = [rows] if layer.has_weight else []
    if layer.has_bias:
        parts.append(rows.new_ones(*rows.shape[:2], 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def expand_grads(layer: KFACLayer, g: Tensor) -> Tensor:
    """g for every cotangent row, example and position: (K, N, ..., out) → (K, N, S, out).

    Conv2d gradients (K, N, out, H', W') are moved to (K, N, H'·W', out).
    """
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


@dataclass
class _Record:
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


class InPlaceModificationError(RuntimeError):
    """A recorded layer output was modified in place later in the forward pass."""


class LayerCapture:
    """Context manager recording each layer's input h and output a in one forward pass.

    With ``protect=True`` the hook hands a copy of a to the rest of the network, so that an
    in-place operation downstream (``ReLU(inplace=True)``) cannot overwrite the recorded a.
    Hooks are removed on every exit path, exceptions included.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> layers = find_kfac_layers(model)
        >>> with LayerCapture(layers) as cap:
        ...     f = model(torch.randn(5, 3))
        >>> [tuple(cap.output(layer).shape) for layer in layers]
        [(5, 4), (5, 2)]
    """

    def __init__(self, layers: list[KFACLayer], protect: bool = False) -> None:
        self.layers = layers
        self.protect = protect
        self._records: dict[str, _Record] = {layer.name: _Record() for layer in layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerCapture:
        try:
            for layer in self.layers:
                hook = self._make_hook(self._records[layer.name])
                self._handles.append(layer.module.register_forward_hook(hook))
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

    def _make_hook(self, record: _Record) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            record.inputs.append(args[0].detach())
            record.outputs.append(output)
            record.versions.append(output._version)
            return output.clone() if self.protect else None

        return hook

    def _single(self, layer: KFACLayer) -> _Record:
        record = self._records[layer.name]
        calls = len(record.outputs)
        if calls != 1:
            raise ValueError(
                f"layer {layer.name!r} was called {calls} times in one forward pass; "
                "Kronecker factors need each layer called exactly once (a reused module would "
                "give silently wrong factors). Use structure='dense', 'block_diagonal' or "
                "'diagonal' for weight sharing."
            )
        if record.outputs[0]._version != record.versions[0]:
            raise InPlaceModificationError(
                f"the output of layer {layer.name!r} was modified in place after the layer ran"
            )
        return record

    def input(self, layer: KFACLayer) -> Tensor:
        """The layer's input h (detached)."""
        return self._single(layer).inputs[0]

    def output(self, layer: KFACLayer) -> Tensor:
        """The layer's pre-activation a, still attached to the graph."""
        return self._single(layer).outputs[0]

    def check(self) -> None:
        """Validate that every layer ran exactly once and kept its output intact."""
        for layer in self.layers:
            self._single(layer)

    def __iter__(self) -> Iterator[KFACLayer]:
        return iter(self.layers)


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
        grads = torch.autograd.grad(
            f,
            outputs,
            grad_outputs=rows,
            retain_graph=retain_graph,
            is_grads_batched=True,
            allow_unused=True,
        )
    return [
        torch.zeros(rows.shape[0], *a.shape, dtype=a.dtype, device=a.device) if g is None else g
        for g, a in zip(grads, outputs, strict=True)
    ]


Statistics = list[tuple[Tensor, Tensor]]
"""Per layer (ā of shape (N, S, in'), g of shape (K, N, S, out)) for one forward pass."""


class TrainingCapture:
    """Hooks that compute K-FAC statistics during the user's own training forward passes.

    While ``active`` is set and autograd records a graph, every forward pass of ``model``
    records the layers' inputs and pre-activations. Then

    - for ``fisher_type`` "mc" or "true", right after the forward pass, the cotangent rows
      r_{nk} of the model's own predictive distribution are sent through one extra backward
      pass to the pre-activations (the graph is kept for the user's ``loss.backward()``);
    - for "empirical", the gradients of the user's loss reach the pre-activations during the
      user's backward pass, and are rescaled by −N: g = −N ∂L/∂a, exact when L is the batch mean
      of −log p(yₙ | fₙ).

    Each completed set of statistics goes to ``sink(stats, num_examples)``; a pass with
    non-finite outputs gives none and calls ``on_nonfinite()`` instead. If a layer's output
    is overwritten in place downstream, that pass's statistics are dropped with a warning and
    later passes hand a copy of the output to the rest of the network.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[KFACLayer],
        rows: Callable[[Tensor], Tensor] | None,
        sink: Callable[[Statistics, int], None],
        on_nonfinite: Callable[[], None] | None = None,
    ) -> None:
        self.layers = layers
        self.on_nonfinite = on_nonfinite
        self.rows = rows  # f -> cotangent rows (K, *f.shape), or None for "empirical"
        self.sink = sink
        self.active = False
        self.protect = False
        self._records: dict[str, list[tuple[Tensor, Tensor, int]]] = {}
        self._grads: dict[str, Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._model_pre_hook)]
        self._handles.append(model.register_forward_hook(self._model_hook))
        for layer in layers:
            self._handles.append(layer.module.register_forward_hook(self._layer_hook(layer)))

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recording(self) -> bool:
        return self.active and torch.is_grad_enabled() and not training_suspended()

    def _model_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._recording():  # a pass that records: start afresh
            self._records = {}
            self._grads = {}

    def _layer_hook(self, layer: KFACLayer) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if not (self._recording() and output.requires_grad):
                return None
            self._records.setdefault(layer.name, []).append(
                (args[0].detach(), output, output._version)
            )
            if self.rows is None:
                output.register_hook(lambda grad: self._empirical_grad(layer, grad))
            return output.clone() if self.protect else None

        return hook

    def _complete(self) -> list[tuple[Tensor, Tensor]] | None:
        """Each layer's single (h, a) record, or None (with a warning) if a was overwritten."""
        records = []
        for layer in self.layers:
            entries = self._records.get(layer.name, [])
            if len(entries) != 1:
                self._records = {}
                advice = (
                    "it has trainable parameters but the forward pass does not use it: freeze "
                    "it (requires_grad_(False)) so K-FAC does not wait for its statistics"
                    if not entries else
                    "K-FAC needs each registered layer called exactly once (a reused module "
                    "would give silently wrong factors)"
                )
                raise ValueError(
                    f"layer {layer.name!r} was called {len(entries)} times in one forward pass; "
                    + advice
                )
            h, a, version = entries[0]
            if a._version != version:
                warnings.warn(
                    f"the output of layer {layer.name!r} was modified in place (e.g. "
                    "ReLU(inplace=True)); these statistics are dropped and later passes keep "
                    "a copy of the output",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.protect = True
                self._records = {}
                return None
            records.append((h, a))
        return records

    def _model_hook(self, module: nn.Module, args: tuple, f: Tensor) -> None:
        if not self._records:
            return
        if not isinstance(f, Tensor):
            raise TypeError(f"K-FAC needs the model to return one tensor, got {type(f)}")
        if not bool(torch.isfinite(f.detach()).all()):
            self._records = {}  # no statistics from a diverged pass; the step will be skipped
            if self.on_nonfinite is not None:
                self.on_nonfinite()
            return
        if self.rows is None:
            return  # "empirical": the gradients arrive in the user's backward pass
        records = self._complete()
        if records is None:
            return
        rows = self.rows(f)
        grads = output_gradients(f, [a for _, a in records], rows, retain_graph=True)
        stats = [
            (expand_inputs(layer, h), expand_grads(layer, g))
            for layer, (h, _), g in zip(self.layers, records, grads, strict=True)
        ]
        self._records = {}
        self.sink(stats, f.shape[0])

    def _empirical_grad(self, layer: KFACLayer, grad: Tensor) -> None:
        self._grads[layer.name] = grad.detach()
        if len(self._grads) < len(self.layers):
            return
        records = self._complete()
        if records is None:
            return
        num = records[0][0].shape[0]
        stats = [
            (expand_inputs(lay, h), expand_grads(lay, -num * self._grads[lay.name].unsqueeze(0)))
            for lay, (h, _) in zip(self.layers, records, strict=True)
        ]
        self._records, self._grads = {}, {}
        self.sink(stats, num)


class InputRecorder:
    """Keeps the positional and keyword arguments of every forward pass of the model run with
    gradients enabled, outside :class:`suspended`, since the last :meth:`take` (what a Fisher
    of the micro-batches accumulated before ``step()`` needs). Tensors are kept detached, not
    copied. ``close()`` removes the hook.
    """

    def __init__(self, model: nn.Module) -> None:
        self.passes: list[tuple[tuple, dict]] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not training_suspended():
            from torch.utils._pytree import tree_map

            detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
            self.passes.append(tree_map(detach, (tuple(args), dict(kwargs))))

    def take(self) -> list[tuple[tuple, dict]]:
        """The recorded (args, kwargs) of each pass, oldest first; the record starts afresh."""
        passes, self.passes = self.passes, []
        return passes

    def close(self) -> None:
        self._handle.remove()


class InputMoments:
    """Context manager accumulating, in float64, the first and second moments of the inputs
    of some modules over the forward passes run inside it: per module, the count n, Σ x and
    Σ x xᵀ of the rows ``rows(module, h)`` (e.g. features, or channels at every position).
    Hooks are removed on every exit path.
    """

    def __init__(
        self, modules: dict[str, nn.Module], rows: Callable[[nn.Module, Tensor], Tensor]
    ) -> None:
        self.modules = modules
        self.rows = rows
        self.count: dict[str, int] = dict.fromkeys(modules, 0)
        self.sum: dict[str, Tensor] = {}
        self.outer: dict[str, Tensor] = {}
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

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = self.rows(module, args[0].detach()).to(torch.float64)
            if name in self.sum:
                self.sum[name] += x.sum(0)
                self.outer[name] += x.T @ x
            else:
                self.sum[name] = x.sum(0)
                self.outer[name] = x.T @ x
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
