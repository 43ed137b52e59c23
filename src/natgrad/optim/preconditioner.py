"""K-FAC and EK-FAC as preconditioners that rewrite ``.grad`` in place.

After ``loss.backward()``, ``preconditioner.step()`` replaces the gradient of every Linear and
Conv2d layer by (F̂_l + δI)⁻¹ ∇_l L, so that any torch optimizer (SGD, Adam, a scheduler,
gradient clipping) then takes a K-FAC step. Parameters of other modules keep their gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad import distributed
from natgrad._precision import full_precision
from natgrad.capture import KFACLayer, Statistics, TrainingCapture, scan_layers
from natgrad.layers import registered_kinds
from natgrad.likelihoods import Likelihood, cotangent_rows, get_likelihood
from natgrad.normalisation import empirical_terms
from natgrad.optim._accumulate import Accumulate
from natgrad.optim._validation import (
    check_choice,
    check_generator_state,
    check_model,
    check_nonnegative,
    check_positive,
    grads_finite,
)
from natgrad.optim.curvature import CurvatureConfig, KroneckerCurvature, join_parts
from natgrad.outputs import OutputSelector, check_output_selector

__all__ = [
    "EKFACPreconditioner", "KFACPreconditioner", "layer_gradient", "layer_parts", "named_parts",
]


LearningRate = float | Callable[[], float] | Optimizer
"""η for ``kl_clip``: a float, a callable returning it, or the base optimizer (per group)."""


def layer_parts(layer: KFACLayer, tensors: dict[str, Tensor]) -> tuple[Tensor | None,
                                                                        Tensor | None]:
    """The layer's weight part (out, in) and bias part (out,) of [∇W | ∇b] (None if frozen)."""
    weight_name, bias_name = layer.param_names
    return (
        None if weight_name is None else layer.weight_matrix(tensors[weight_name]),
        None if bias_name is None else tensors[bias_name].reshape(layer.out_dim),
    )


def _layer_accumulators(
    layer: KFACLayer, into: dict[str, Accumulate] | None
) -> tuple[Accumulate | None, Accumulate | None]:
    """The accumulators of the layer's weight and bias, as views of shape (out, in) and (out,)."""
    found: list[Accumulate | None] = []
    for name, view in zip(layer.param_names,
                          (layer.weight_matrix, lambda t: t.view(layer.out_dim)), strict=True):
        if into is None or name is None or name not in into:
            found.append(None)
        else:
            target, beta, alpha = into[name]
            found.append((view(target), beta, alpha))
    return found[0], found[1]


def layer_gradient(layer: KFACLayer, tensors: dict[str, Tensor]) -> Tensor:
    """The layer's matrix [∇W | ∇b] of shape (out, in') from per-parameter tensors."""
    return join_parts(*layer_parts(layer, tensors))


def named_parts(layer: KFACLayer, W: Tensor | None, b: Tensor | None) -> dict[str, Tensor]:
    """The weight part W (out, in) and bias part b of a layer, by parameter name and shape."""
    weight_name, bias_name = layer.param_names
    out: dict[str, Tensor] = {}
    if weight_name is not None and W is not None:
        out[weight_name] = layer.weight_tensor(W)
    if bias_name is not None and b is not None:
        out[bias_name] = b.reshape(layer.out_dim)
    return out


def _rows_function(
    likelihood: Likelihood, fisher_type: str, mc_samples: int, generator: torch.Generator | None,
    model: nn.Module,
) -> Callable[[Tensor], Tensor] | None:
    """The cotangent rows of a training pass's outputs f ("mc": sampled, "true": the rows of
    D's square root; "empirical": none, the user's loss gradient is used).

    "true" sends the k-th row of every example's square root B through one backward pass:
    the statistics are Σ_k (Σ_n J_nᵀ B_n e_k)(…)ᵀ, whose cross terms J_nᵀ B_n B_mᵀ J_m vanish
    only when examples do not interact. A train-mode BatchNorm couples them (J_n depends on
    the whole batch), and the cross terms then depend on which square root is used, so "true"
    is refused there; "mc" stays unbiased (samples of different examples are independent).
    """
    if fisher_type == "empirical":
        return None
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def rows(f: Tensor) -> Tensor:
        likelihood.check_outputs(f)
        if fisher_type == "true" and any(m.training for m in norms):
            raise ValueError(
                "fisher_type='true' is not defined through a train-mode BatchNorm: the batch "
                "couples the examples, and the result would depend on the square root of D. "
                "Use fisher_type='mc' (the default, unbiased) or 'empirical', or put the "
                "BatchNorm layers in eval mode")
        return cotangent_rows(likelihood, f, fisher_type, None, mc_samples, generator)  # type: ignore[arg-type]

    return rows


class KFACPreconditioner:
    """K-FAC preconditioning of the gradients of a model's Linear and Conv2d layers.

    On ``step()``: Ā and G are updated from the statistics captured in the last forward pass
    (every ``factor_update_period`` steps, EMA with ``ema_decay``), the eigendecompositions
    refreshed every ``inverse_update_period`` steps, and each layer's gradient replaced by
    (F̂_l + δI)⁻¹ ∇_l L (``damping_mode="exact"``) or the factored Tikhonov form. With
    ``kl_clip`` κ the preconditioned gradients d_p = (F̂_l + δI)⁻¹∇_p are scaled by
    ν = min(1, √(κ / Σ_p η_p² ⟨d_p, ∇_p⟩)) (Ba et al. 2017), η_p the learning rate of
    parameter p; the sum is Δᵀ(F̂ + δI)Δ for the step Δ_p = −η_p d_p when a layer's weight and
    bias share their lr.

    The Fisher is the Monte-Carlo Fisher of the model's own predictive distribution by default
    (one ŷ per example, or per position of sequence outputs), computed in one extra backward
    pass during the forward pass on factor-update steps; "true" sends all rows of D's square
    root (T·(C − 1) rows for logits (N, T, C)), "empirical" reuses the gradients of the
    user's loss (assumed the mean of −log p over its loss terms). Normalisation
    (:mod:`natgrad.normalisation`): G and EK-FAC's scales are divided by the number of loss
    terms M: every position of the output for "mc" / "true" (the capture has no targets, so
    padding positions count too), the positions the loss gradient reaches for "empirical"
    (those with ``ignore_index`` do not).

    Args:
        model: the network (or its DDP wrapper); its Linear/Conv2d layers are found
            automatically, other modules keep their gradients. Hooks are installed at once:
            construct it before the first training forward pass; ``close()`` removes them.
        damping: δ in (F̂_l + δI)⁻¹.
        likelihood: "categorical", "gaussian", "bernoulli" or a ``Likelihood`` (e.g.
            ``Categorical(class_dim=1)`` for logits (N, C, d…)).
        output: which output of the model parametrizes the likelihood when it returns a dict /
            ``ModelOutput``, tuple or other object: a key, an index or a callable
            ``f(model_output) -> Tensor`` (default: the tensor itself, or "logits"; see
            :func:`natgrad.outputs.output_tensor`).
        fisher_type: "mc" (default), "true" or "empirical"; ``mc_samples`` ŷ per example.
        ema_decay: β of the moving averages Ā ← βĀ + (1 − β)Ā_t, G ← βG + (1 − β)G_t.
        factor_update_period: steps between factor updates (statistics are captured only on
            those steps).
        inverse_update_period: steps between eigendecompositions of the factors.
        damping_mode: "exact" ((G ⊗ Ā + δI)⁻¹ in the eigenbasis) or "factored"
            ((G + √δ/π I)⁻¹ ⊗ (Ā + π√δ I)⁻¹, π² = (tr Ā/dim Ā)/(tr G/dim G)).
        kfac_approx: "expand" (default) or "reduce": the factors of a layer applied at
            several positions per example (:mod:`natgrad.layers.sharing`).
        kl_clip: κ of the scaling ν above (None: no clipping); needs ``lr``.
        lr: η for ``kl_clip``: a float, a callable returning the base optimizer's current lr,
            or the base optimizer itself (each parameter then gets its own group's lr; a
            parameter the optimizer does not step counts with η = 0).
        generator: ``torch.Generator`` for the Monte-Carlo samples (saved in ``state_dict``).
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop. Needed with
            ``fisher_type="empirical"``, whose statistics are gradients of the scaled loss
            (they are divided by the scaler's scale as they are captured); call
            ``scaler.unscale_(optimizer)`` before ``step()`` as for any use of ``.grad``.

    Raises:
        ValueError: a bad hyperparameter (named), no Linear/Conv2d layer, ``kl_clip``
            without ``lr``, different models on different ranks, or (at the forward pass) a
            layer called more or fewer times than once.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> pre = KFACPreconditioner(model, damping=1e-2)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> nn.functional.cross_entropy(model(x), y).backward()
        >>> pre.step(); opt.step()
        True
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        likelihood: str | Likelihood = "categorical",
        *,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        ema_decay: float = 0.95,
        factor_update_period: int = 1,
        inverse_update_period: int = 10,
        damping_mode: str = "exact",
        kfac_approx: str = "expand",
        kl_clip: float | None = None,
        lr: LearningRate | None = None,
        generator: torch.Generator | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        output: OutputSelector = None,
    ) -> None:
        config = CurvatureConfig(
            ema_decay=ema_decay,
            factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period,
            damping_mode=damping_mode,  # type: ignore[arg-type]
            kfac_approx=kfac_approx,  # type: ignore[arg-type]
        )
        self._setup(model, damping, likelihood, fisher_type, mc_samples, config, kl_clip, lr,
                    generator, grad_scaler, output)

    def _setup(
        self,
        model: nn.Module,
        damping: float,
        likelihood: str | Likelihood,
        fisher_type: str,
        mc_samples: int,
        config: CurvatureConfig,
        kl_clip: float | None,
        lr: LearningRate | None,
        generator: torch.Generator | None,
        grad_scaler: torch.amp.GradScaler | None = None,
        output: OutputSelector = None,
    ) -> None:
        check_model(model, type(self).__name__)
        self.damping = check_nonnegative("damping", damping)
        self.likelihood = get_likelihood(likelihood)
        self.output = check_output_selector(output)
        self.fisher_type = check_choice("fisher_type", fisher_type, ("mc", "true", "empirical"))
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        self.kl_clip = None if kl_clip is None else check_positive("kl_clip", kl_clip)
        if self.kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs the learning rate: pass lr (a float or a callable)")
        if lr is not None and not (callable(lr) or isinstance(lr, Optimizer)):
            check_positive("lr", lr)
        self.lr = lr
        model = distributed.unwrap(model)
        self.model = model
        self.generator = generator
        self.layers, self.unsupported = scan_layers(model)
        if not self.layers:
            raise ValueError(
                "the model has no trainable layer that K-FAC can precondition (layer kinds: "
                + ", ".join(sorted({k.name for k in registered_kinds()}))
                + "); modules with trainable parameters: "
                + ("; ".join(self.unsupported) or "none")
                + ". Register an adapter with natgrad.layers.register_layer_kind."
            )
        self.fallback: dict[str, str] = {}  # layers moved to the fallback after construction
        distributed.check_same_layers(
            [(layer.name, (layer.out_dim, layer.in_dim)) for layer in self.layers]
        )
        self.curvature = KroneckerCurvature(self.layers, config)
        self.skipped_steps = 0
        self.closed = False
        rows = _rows_function(self.likelihood, fisher_type, mc_samples, generator, model)
        self.grad_scaler = grad_scaler
        lik = self.likelihood
        self._capture = TrainingCapture(model, self.layers, rows, self._add_statistics,
                                        self.curvature.mark_nonfinite, self._to_fallback,
                                        per_example=config.per_example,
                                        terms=lambda f, grad: empirical_terms(lik, f, grad),
                                        output=output, shared_ok=fisher_type == "mc",
                                        loss_gradient_problem=lik.loss_gradient_problem)
        self._arm()

    def _to_fallback(self, reasons: dict[str, str]) -> None:
        """Move layers to the fallback (their gradients are not preconditioned)."""
        names = set(reasons)
        moved = [layer for layer in self.layers if layer.name in names]
        self.layers = [layer for layer in self.layers if layer.name not in names]
        self.curvature.remove_layers(names)
        self._capture.drop(names)
        for layer in moved:
            self.fallback[layer.name] = reasons[layer.name]
            self.unsupported.append(
                f"{layer.name} ({type(layer.module).__name__}, {reasons[layer.name]})")

    # ------------------------------------------------------------------------------------------
    def _add_statistics(self, stats: Statistics, num_terms: int) -> None:
        """Hand one forward pass's (ā, g) and its M loss terms to the curvature. With the
        empirical Fisher and an
        enabled ``grad_scaler`` the captured g are gradients of the scaled loss s·L: they are
        divided by s, the scale of this very backward pass, first."""
        scaler = self.grad_scaler
        if self.fisher_type == "empirical" and scaler is not None and scaler.is_enabled():
            inverse = 1.0 / scaler.get_scale()
            stats = [(a, g * inverse) for a, g in stats]
        self.curvature.add(stats, num_terms)

    def _arm(self) -> None:
        self._capture.active = self.curvature.wants_statistics()

    def close(self) -> None:
        """Remove the hooks from the model; later steps raise ``RuntimeError``."""
        self._capture.close()
        self.closed = True

    def collect_statistics(self) -> None:
        """Hand the statistics still held by the capture (empirical Fisher: forward passes
        whose backward passes are done) to the curvature; called at the start of a step."""
        self._capture.flush()

    def check_layers(self) -> None:
        """``ValueError`` if a layer's weight or bias changed ``requires_grad`` since
        construction: its factors are sized for the parameters that trained then (freezing a
        weight later would silently mix its zero gradient into the bias's direction)."""
        for layer in self.layers:
            now = layer.trains_now()
            if now != (layer.has_weight, layer.has_bias):
                raise ValueError(
                    f"the trainable parameters of layer {layer.name!r} changed after "
                    f"{type(self).__name__} was created (weight trains: {layer.has_weight} -> "
                    f"{now[0]}, bias trains: {layer.has_bias} -> {now[1]}); its Kronecker "
                    "factors are sized for the parameters that trained then. Set "
                    "requires_grad before creating the optimizer, or create a new one; "
                    "nothing was changed")

    def __setstate__(self, state: dict) -> None:
        """A copy (``copy.deepcopy((model, optimizer))``) hooks its capture into its own copy of
        the model: the copied hooks stay inert (:mod:`natgrad._hooks`)."""
        self.__dict__.update(state)
        self._capture.rehook(self.model)

    def check_open(self, what: str) -> None:
        """``RuntimeError`` if :meth:`close` was called: without its hooks no statistics are
        gathered, so a step would silently reuse stale curvature."""
        if self.closed:
            raise RuntimeError(
                f"{what} after close(): the hooks that gather curvature were removed, so the "
                "step would use stale curvature; create a new optimizer (and load this one's "
                "state_dict() into it) to continue training"
            )

    @property
    def params(self) -> list[Tensor]:
        """The parameters this preconditioner rewrites, in θ's order."""
        names = {n for layer in self.layers for n in layer.param_names if n is not None}
        return [p for n, p in self.model.named_parameters() if n in names]

    def _learning_rates(self, lr: float | Callable[[str], float] | None
                        ) -> Callable[[str], float]:
        """η_p by parameter name: ``lr`` if given (a float or name → η), else from ``self.lr``:
        the base optimizer's group lr when it is an optimizer (0 for a parameter it does not
        step), or the one current value."""
        if lr is not None:
            return lr if callable(lr) else (lambda name, value=float(lr): value)
        if isinstance(self.lr, Optimizer):
            named = dict(self.model.named_parameters())
            by_id = {id(p): float(g["lr"]) for g in self.lr.param_groups for p in g["params"]}
            return lambda name: by_id.get(id(named[name]), 0.0)
        eta = float(self.lr()) if callable(self.lr) else float(self.lr)  # type: ignore[arg-type]
        return lambda name: eta

    def directions(
        self, damping: float | Callable[[KFACLayer], float] | None = None,
        lr: float | Callable[[str], float] | None = None, check_finite: bool = True,
        into: dict[str, Accumulate] | None = None,
    ) -> dict[str, Tensor] | None:
        """Update the curvature for this step and return the preconditioned gradients by
        parameter name, or ``None`` (the step skipped, state untouched) when a gradient or
        the captured statistics are not finite (``check_finite=False``: the caller checked).

        ``into`` (parameter name → (T, β, α), T shaped like the parameter): accumulate that
        parameter's preconditioned gradient d as T ← β T + α d, inside the last matrix
        product where the damping mode allows, and return T for it. Not with ``kl_clip``,
        whose scale needs every d first.
        """
        self.check_open(f"{type(self).__name__}.directions()")
        self.check_layers()
        if into and self.kl_clip is not None:
            raise ValueError("directions(into=...) cannot be combined with kl_clip")
        with full_precision(self.layers[0].weight.device if self.layers else
                            torch.device("cpu")):
            return self._directions(damping, lr, check_finite, into)

    def _directions(
        self, damping: float | Callable[[KFACLayer], float] | None,
        lr: float | Callable[[str], float] | None, check_finite: bool,
        into: dict[str, Accumulate] | None,
    ) -> dict[str, Tensor] | None:
        self.collect_statistics()
        named = dict(self.model.named_parameters())
        params = self.params
        if check_finite and (not grads_finite(params) or not self.curvature.pending_finite()):
            self.curvature.discard_pending()
            self.skipped_steps += 1
            warnings.warn(
                "non-finite gradient or curvature statistics: step skipped "
                f"({self.skipped_steps} so far)", RuntimeWarning, stacklevel=3,
            )
            self._arm()
            return None
        deltas = [damping(layer) if callable(damping) else (
            self.damping if damping is None else damping) for layer in self.layers]
        self._update_curvature(deltas)
        # a parameter without a gradient (no backward reached it) gets no direction, as in
        # torch.optim; within its layer its gradient counts as zero for the others' directions
        grads = {n: (named[n].grad if named[n].grad is not None else torch.zeros_like(named[n]))
                 for layer in self.layers for n in layer.param_names if n is not None}
        no_grad = {n for n in grads if named[n].grad is None}
        out: dict[str, Tensor] = {}
        inner = 0.0  # Σ_p η_p² ⟨d_p, ∇_p⟩ for kl_clip
        eta = self._learning_rates(lr) if self.kl_clip is not None else None
        for layer, delta in zip(self.layers, deltas, strict=True):
            W, b = layer_parts(layer, grads)
            dW, db = self.curvature.precondition_parts(layer, W, b, delta,
                                                       into=_layer_accumulators(layer, into))
            if self.kl_clip is not None:
                inner += sum(eta(name) ** 2 * float((d * g).sum())  # type: ignore[misc]
                             for name, d, g in zip(layer.param_names, (dW, db), (W, b),
                                                   strict=True)
                             if name is not None and g is not None and d is not None)
            out.update((n, t) for n, t in named_parts(layer, dW, db).items()
                       if n not in no_grad)
        if self.kl_clip is not None:
            scale = min(1.0, math.sqrt(self.kl_clip / abs(inner))) if inner else 1.0
            out = {n: t * scale for n, t in out.items()}
        self._arm()
        return out

    def _update_curvature(self, deltas: list[float]) -> None:
        """:meth:`KroneckerCurvature.update`; where a layer's damping is 0, its curvature must
        be invertible, else ``ValueError`` with the curvature restored (nothing changed)."""
        undamped = [layer for layer, delta in zip(self.layers, deltas, strict=True)
                    if delta == 0]
        restore = self.curvature.snapshot() if undamped else None
        self.curvature.update()
        try:
            for layer in undamped:
                self.curvature.check_undamped(layer)
        except ValueError:
            assert restore is not None
            restore()
            raise

    def step(self) -> bool:
        """Rewrite ``.grad`` of every handled parameter with its preconditioned gradient.

        Returns ``False`` (and leaves gradients and state untouched) when the step is skipped
        for non-finite values.
        """
        self.check_open(f"{type(self).__name__}.step()")
        directions = self.directions()
        if directions is None:
            return False
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, d in directions.items():
                p = named[name]
                if p.grad is None:
                    p.grad = d.clone()
                else:
                    p.grad.copy_(d)
        return True

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Factors, eigendecompositions, scales, step counter, damping and skip count."""
        return {
            "curvature": self.curvature.state_dict(),
            "damping": self.damping,
            "skipped_steps": self.skipped_steps,
            "protect": None if self._capture.protect is None else sorted(self._capture.protect),
            "fallback": dict(self.fallback),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def check_state_dict(self, state: object) -> None:
        """``ValueError`` naming the first way ``state`` does not fit this preconditioner
        (not a K-FAC state, a bad damping, skip count or generator state, other layers, shapes
        or kind: see :meth:`KroneckerCurvature.check_state_dict`); loads nothing."""
        if not isinstance(state, dict) or "curvature" not in state:
            raise ValueError("the state has no K-FAC curvature: it was not saved by KFAC, EKFAC "
                             "or a K-FAC preconditioner (an NGD or torch optimizer state?)")
        check_nonnegative("the state's damping", state.get("damping"))
        skipped = state.get("skipped_steps")
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"the state's skipped_steps must be an integer >= 0, got {skipped!r}")
        check_generator_state(state.get("generator"), self.generator, "the state's generator")
        fallback = state.get("fallback", {})
        known = {layer.name for layer in self.layers} | set(self.fallback)
        if not isinstance(fallback, dict) or not set(fallback) <= known:
            raise ValueError(f"the state's fallback layers {fallback!r} are not layers of this "
                             f"model ({sorted(known)})")
        self.curvature.check_state_dict(state["curvature"], frozenset(fallback))

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (onto this model's devices), all or nothing:
        ``ValueError`` naming the mismatch (see :meth:`check_state_dict`), state unchanged.
        Layers the saved run had moved to the fallback move there too."""
        self.check_state_dict(state)
        fallback = {n: r for n, r in state.get("fallback", {}).items()
                    if n not in self.fallback}
        if fallback:
            self._to_fallback(fallback)
        self.curvature.load_state_dict(state["curvature"])
        self.damping = float(state["damping"])
        self.skipped_steps = int(state["skipped_steps"])
        protect = state.get("protect")
        self._capture.protect = None if protect in (None, False, True) else set(protect)
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self._arm()

    fallback_description = "gradient left unchanged (not preconditioned)"

    def __repr__(self) -> str:
        kind = type(self).__name__
        lines = [f"{kind}(damping={self.damping:g}, fisher_type={self.fisher_type!r}, "
                 f"likelihood={self.likelihood.name!r}, {self.curvature.config})"]
        for layer in self.layers:
            lines.append(f"  {layer.name}: {type(layer.module).__name__} "
                         f"{layer.out_dim}x{layer.in_dim} -> {kind.replace('Preconditioner', '')}")
        for desc in self.unsupported:
            lines.append(f"  {desc}: {self.fallback_description}")
        return "\n".join(lines)


class EKFACPreconditioner(KFACPreconditioner):
    """EK-FAC preconditioning: K-FAC's eigenbasis (refreshed every ``inverse_update_period``
    steps) with the eigenvalues re-estimated from per-example projected gradients every
    ``scale_update_period`` steps (George et al. 2018):
    (F̂_l + δI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) ⊘ (S + δ)] Q_Aᵀ, with
    S_ij = (1/M) Σₙ Σₖ [(Q_Gᵀ Γₙₖ Q_A)_ij]², Γₙₖ the per-example (per-sequence) gradient of
    V = [W | b], M the loss terms (:mod:`natgrad.normalisation`).

    Arguments as :class:`KFACPreconditioner` (damping is always exact), plus
    ``scale_update_period``: steps between re-estimates of S (S ← β S + (1 − β) S_t, and
    S ← S_t whenever the eigenbasis changes); default: ``factor_update_period`` (the scales
    are re-fitted on the steps that capture statistics anyway).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> pre = EKFACPreconditioner(model, damping=1e-2, scale_update_period=1)
        >>> nn.functional.cross_entropy(model(torch.randn(16, 4)),
        ...                             torch.randint(0, 3, (16,))).backward()
        >>> pre.step()
        True
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        likelihood: str | Likelihood = "categorical",
        *,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        ema_decay: float = 0.95,
        factor_update_period: int = 1,
        inverse_update_period: int = 10,
        scale_update_period: int | None = None,
        kfac_approx: str = "expand",
        kl_clip: float | None = None,
        lr: LearningRate | None = None,
        generator: torch.Generator | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        output: OutputSelector = None,
    ) -> None:
        config = CurvatureConfig(
            ema_decay=ema_decay,
            factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period,
            kfac_approx=kfac_approx,  # type: ignore[arg-type]
            scale_update_period=(factor_update_period if scale_update_period is None
                                 else scale_update_period),
        )
        self._setup(model, damping, likelihood, fisher_type, mc_samples, config, kl_clip, lr,
                    generator, grad_scaler, output)
