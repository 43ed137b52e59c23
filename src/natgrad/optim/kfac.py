"""K-FAC as a drop-in ``torch.optim`` optimizer (Martens & Grosse 2015).

Each step: Δθ_l = −η m_l with m ← μ m + d (m = d on the first step) and
d_l = ν (F̂_l + δI)⁻¹ ∇_l L + λ θ_l for Linear/Conv2d layers (F̂_l = G ⊗ Ā, see
:class:`~natgrad.optim.preconditioner.KFACPreconditioner`; ν the KL clip, with each parameter's
own group lr), d = ∇L + λ θ for the parameters of other modules (the documented fallback: plain
SGD with the same lr and momentum).
This is exactly ``KFACPreconditioner`` followed by ``torch.optim.SGD``. With
``fallback="adam"`` the parameters of other modules take an Adam-style diagonal step instead
(:mod:`natgrad.optim.fallback`).

With ``adaptive_damping`` (Martens & Grosse 2015 §6.5), every k steps the reduction ratio
ρ = [L(θ + Δ) − L(θ)] / M(Δ), M(Δ) = ∇Lᵀ Δ + ½ Δᵀ (F̂ + δI) Δ, adapts the damping:
ρ > 3/4 ⇒ δ ← ω δ, ρ < 1/4 ⇒ δ ← δ / ω, with ω = (19/20)^k; it needs ``step(closure)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad import distributed
from natgrad.capture import KFACLayer
from natgrad.likelihoods import Likelihood
from natgrad.optim._accumulate import Accumulate
from natgrad.optim._validation import (
    check_choice,
    check_nonnegative,
    check_optimizer_state,
    check_own_parameters,
    check_positive,
    grads_finite,
)
from natgrad.optim.fallback import (
    ADAM_STATE_KEYS,
    AdamFallback,
    adam_step,
    check_adam_state,
    parse_fallback,
)
from natgrad.optim.preconditioner import KFACPreconditioner, layer_gradient

__all__ = ["KFAC"]


class KFAC(Optimizer):
    """K-FAC optimizer for a model's Linear and Conv2d layers.

    Args:
        model: the network; its Linear/Conv2d layers are found automatically.
        lr: learning rate η (per parameter group).
        damping: δ in (F̂ + δI)⁻¹ (adapted when ``adaptive_damping``).
        likelihood: "categorical", "gaussian" or "bernoulli": the model's predictive law.
        momentum, weight_decay: as in ``torch.optim.SGD`` (weight decay is not
            preconditioned).
        fisher_type: "mc" (default, one sample ŷ per example), "true" or "empirical".
        ema_decay, factor_update_period, inverse_update_period, damping_mode, mc_samples,
            kl_clip, generator, grad_scaler: see :class:`KFACPreconditioner`. With a
            ``torch.amp.GradScaler`` the standard loop (``scaler.scale(loss).backward();
            scaler.step(opt); scaler.update()``) takes the same steps as without it: the scaler
            hands the scale to ``step()``, which unscales the gradients (and the empirical
            Fisher's statistics) itself and skips the steps the scaler skips; only a loop that
            calls ``scaler.unscale_(opt)`` before ``step()`` with ``fisher_type="empirical"``
            needs ``grad_scaler=scaler``.
        adaptive_damping: Levenberg–Marquardt adaptation every ``damping_adaptation_period``
            steps.
        nonfinite: "skip" (warn, count in ``skipped_steps``, leave everything unchanged) or
            "raise" (``FloatingPointError``, state unchanged) for a non-finite loss or gradient.
        param_groups: optional list of torch param-group dicts (subsets of the model's
            parameters with their own ``lr``, ``momentum``, …).
        fallback: the step of the parameters K-FAC does not cover (norms, embeddings, tied
            weights, layers moved to the fallback at run time): ``"sgd"`` (default: the SGD
            step above, so that KFAC stays ``KFACPreconditioner`` + ``torch.optim.SGD``) or
            ``"adam"`` / ``AdamFallback(betas, eps, lr_scale)``: ``torch.optim.AdamW``'s step
            with its group's lr × ``lr_scale`` and decoupled weight decay, its state in
            ``state_dict`` (see :mod:`natgrad.optim.fallback`).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = KFAC(model, lr=0.1, damping=1e-2)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
    """

    _preconditioner_class: type[KFACPreconditioner] = KFACPreconditioner
    # GradScaler.step then calls step() itself, with the attributes grad_scale and found_inf
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        damping: float = 1e-3,
        likelihood: str | Likelihood = "categorical",
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        adaptive_damping: bool = False,
        damping_adaptation_period: int = 5,
        nonfinite: str = "skip",
        param_groups: Iterable[dict[str, Any]] | None = None,
        fallback: str | AdamFallback = "sgd",
        **curvature: Any,
    ) -> None:
        self.fallback = parse_fallback(fallback)
        defaults = {
            "lr": check_positive("lr", lr),
            "damping": check_nonnegative("damping", damping),
            "momentum": check_nonnegative("momentum", momentum),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
        }
        self.adaptive_damping = bool(adaptive_damping)
        if (isinstance(damping_adaptation_period, bool)
                or not isinstance(damping_adaptation_period, int)
                or damping_adaptation_period < 1):
            raise ValueError("damping_adaptation_period must be an integer >= 1, "
                             f"got {damping_adaptation_period!r}")
        self.damping_adaptation_period = damping_adaptation_period
        self.nonfinite = check_choice("nonfinite", nonfinite, ("skip", "raise"))
        if self.adaptive_damping and defaults["damping"] == 0:
            raise ValueError("adaptive_damping needs damping > 0")
        groups = list(param_groups) if param_groups is not None else [
            {"params": [p for p in model.parameters() if p.requires_grad]}
        ]
        super().__init__(groups, defaults)
        for group in self.param_groups:
            for key in ("lr", "damping", "momentum", "weight_decay"):
                check = check_positive if key == "lr" else check_nonnegative
                group[key] = check(key, group[key])
        self.model = distributed.unwrap(model)
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        check_own_parameters(self.param_groups, self._names, type(self).__name__)
        try:
            self.preconditioner = self._preconditioner_class(
                model, damping, likelihood, lr=lambda: self.param_groups[0]["lr"], **curvature
            )
        except TypeError as err:
            raise ValueError(f"unknown option for {type(self).__name__}: {err}") from None
        self._group_of = {self._names[id(p)]: g for g in self.param_groups for p in g["params"]}
        self.preconditioner.fallback_description = (
            "plain SGD step with its group's lr, momentum and weight decay (fallback, not "
            "preconditioned)") if self.fallback is None else self.fallback.describe()

    @property
    def _preconditioned(self) -> set[str]:
        """Names of the parameters K-FAC preconditions (layers can move to the fallback at
        the first forward pass, see :class:`~natgrad.capture.TrainingCapture`)."""
        return {n for layer in self.preconditioner.layers for n in layer.param_names
                if n is not None}

    def close(self) -> None:
        """Remove natgrad's hooks from the model; a later ``step()`` raises ``RuntimeError``
        (without the hooks no new curvature is gathered)."""
        self.preconditioner.close()

    # ------------------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite values."""
        return self.preconditioner.skipped_steps

    def _layer_group(self, layer: KFACLayer) -> dict[str, Any]:
        name = next(n for n in layer.param_names if n is not None)
        return self._group_of.get(name, self.param_groups[0])

    def _lr_of(self, name: str) -> float:
        """The learning rate η_p of parameter ``name`` (0 if no group steps it)."""
        group = self._group_of.get(name)
        return 0.0 if group is None else float(group["lr"])

    def _skip(self, reason: str) -> None:
        self.preconditioner.curvature.discard_pending()
        self.preconditioner._arm()
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{reason}; step not taken, state unchanged")
        self.preconditioner.skipped_steps += 1
        warnings.warn(f"{reason}: step skipped ({self.skipped_steps} so far)", RuntimeWarning,
                      stacklevel=3)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One K-FAC step; ``closure`` re-evaluates the loss (required for adaptive damping)."""
        self.preconditioner.check_open(f"{type(self).__name__}.step()")
        self.preconditioner.check_layers()
        self.preconditioner.collect_statistics()
        if self.fallback is not None:
            self._check_dense_fallback_grads([p for g in self.param_groups for p in g["params"]])
        if self._amp_unscale():
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = self.preconditioner.curvature.steps
        adapt = self.adaptive_damping and (steps + 1) % self.damping_adaptation_period == 0
        if adapt and closure is None:
            raise ValueError("adaptive_damping needs step(closure) to evaluate the new loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._skip(f"non-finite loss {float(loss)}")
            return loss
        params = [p for g in self.param_groups for p in g["params"]]
        if not grads_finite(params) or not self.preconditioner.curvature.pending_finite():
            self._skip("non-finite gradient or curvature statistics")
            return loss
        grads = {self._names[id(p)]: p.grad for p in params if p.grad is not None}
        # unless ν (KL clip) or Δθ (adaptive damping) is needed, the momentum buffer (or the
        # parameter) is updated inside the preconditioning product
        fresh = [p for p in params if "momentum_buffer" not in self.state.get(p, {})]
        into = None if adapt or self.preconditioner.kl_clip is not None else self._accumulators()
        try:
            directions = self.preconditioner.directions(
                damping=lambda layer: self._layer_group(layer)["damping"],
                lr=self._lr_of,
                check_finite=False,  # checked just above
                into=into,
            )
        except ValueError:  # refused (damping 0 on a singular curvature): leave no trace
            for p in fresh:
                if p in self.state and self.state[p].pop("momentum_buffer", None) is not None \
                        and not self.state[p]:
                    del self.state[p]
            raise
        assert directions is not None  # finiteness was checked above
        deltas = self._apply(directions, keep_deltas=adapt, accumulated=set(into or ()))
        if adapt:
            self._adapt_damping(closure, loss, grads, deltas)  # type: ignore[arg-type]
        return loss

    def _check_dense_fallback_grads(self, params: list[Tensor]) -> None:
        """``ValueError`` (before anything changes) for a sparse gradient of a parameter that
        takes the Adam fallback (e.g. ``nn.Embedding(sparse=True)``), as ``torch.optim.Adam``."""
        covered = self._preconditioned
        for p in params:
            name = self._names[id(p)]
            if p.grad is not None and p.grad.is_sparse and name not in covered:
                self.preconditioner.curvature.discard_pending()
                self.preconditioner._arm()
                raise ValueError(f"parameter {name!r} has a sparse gradient, which the Adam "
                                 "fallback does not support (use fallback='sgd' or a dense "
                                 "gradient); step not taken")

    def _amp_unscale(self) -> bool:
        """The work ``torch.amp.GradScaler.step`` leaves to this optimizer, which sets
        ``found_inf`` and ``grad_scale`` (the scale s, None if ``unscale_`` already ran) on it:
        when the scaler found inf/NaN, drop this step's statistics and return True (no step);
        else divide the gradients by s and, for the empirical Fisher (statistics from the
        scaled loss, unless the ``grad_scaler`` argument unscaled them as they came), g by s.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:  # not called by a GradScaler
            return False
        pre = self.preconditioner
        if float(found_inf) > 0:
            pre.curvature.discard_pending()
            pre._arm()
            return True
        scale = getattr(self, "grad_scale", None)
        scaled_statistics = pre.fisher_type == "empirical" and pre.grad_scaler is None
        if scale is None:
            if scaled_statistics:
                raise ValueError(
                    "GradScaler.unscale_() ran before step(), so the scale of the empirical "
                    "Fisher's statistics is unknown: pass grad_scaler=scaler to "
                    f"{type(self).__name__}(...)"
                )
            return False
        inverse = 1.0 / float(scale)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inverse)
        if scaled_statistics:
            pre.curvature.rescale_pending_gradients(inverse)
        return False

    def _accumulators(self) -> dict[str, Accumulate]:
        """Per preconditioned parameter, where its direction d goes: with momentum into the
        buffer, m ← μ m + d (created as zeros: the first m is d); without, into θ itself,
        θ ← (1 − ηλ) θ − η d (weight decay λ included)."""
        into: dict[str, Accumulate] = {}
        names = self._preconditioned
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                name = self._names[id(p)]
                if name not in names:
                    continue
                if mu:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    into[name] = (state["momentum_buffer"], mu, 1.0)
                else:
                    into[name] = (p, 1.0 - lr * wd, -lr)
        return into

    def _apply(self, directions: dict[str, Tensor], keep_deltas: bool,
               accumulated: set[str]) -> dict[str, Tensor]:
        """θ ← θ − η m with m ← μ m + d; returns the applied Δθ by name if ``keep_deltas``.
        For ``accumulated`` names the preconditioned gradient was already added in place (see
        :meth:`_accumulators`): with momentum the buffer holds μ m + (F̂ + δI)⁻¹∇ and weight
        decay and the step remain; without momentum θ has already moved."""
        deltas: dict[str, Tensor] = {}
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                name = self._names[id(p)]
                if self.fallback is not None and name not in directions:
                    if p.grad is not None:
                        self._adam_fallback(p, lr, wd, deltas if keep_deltas else None, name)
                    continue
                d = directions.get(name, p.grad)
                if d is None:
                    continue
                if name in accumulated:
                    if mu:
                        if wd:
                            d.add_(p, alpha=wd)
                        p.add_(d, alpha=-lr)
                    continue
                if wd:
                    d = d.add(p, alpha=wd)
                if mu:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mu).add_(d)
                    d = buf
                if keep_deltas:
                    deltas[name] = d * -lr
                    p.add_(deltas[name])
                else:
                    p.add_(d, alpha=-lr)
        return deltas

    def _adam_fallback(self, p: Tensor, lr: float, wd: float,
                       deltas: dict[str, Tensor] | None, name: str) -> None:
        """The Adam-style fallback step of :mod:`natgrad.optim.fallback` on ``p`` (a K-FAC
        momentum buffer left by a layer that moved to the fallback is dropped)."""
        assert self.fallback is not None and p.grad is not None
        state = self.state[p]
        state.pop("momentum_buffer", None)
        before = p.detach().clone() if deltas is not None else None
        adam_step(p, p.grad, state, lr * self.fallback.lr_scale, wd, self.fallback)
        if deltas is not None:
            deltas[name] = p.detach() - before

    def _adapt_damping(
        self, closure: Callable[[], Tensor], loss: Tensor, grads: dict[str, Tensor],
        deltas: dict[str, Tensor],
    ) -> None:
        """Levenberg–Marquardt: ρ = ΔL / M(Δ) decides whether δ shrinks or grows."""
        pre = self.preconditioner
        damping = self.param_groups[0]["damping"]
        model_change = sum(float((grads[n] * d).sum()) for n, d in deltas.items() if n in grads)
        quad = damping * sum(float(d.square().sum()) for d in deltas.values())
        zero = {n: torch.zeros_like(g) for n, g in grads.items()}
        for layer in pre.layers:
            D = layer_gradient(layer, {**zero, **deltas})
            quad += float((D * pre.curvature.curvature_mv(layer, D)).sum())
        predicted = model_change + 0.5 * quad
        active, pre._capture.active = pre._capture.active, False
        try:
            with torch.enable_grad():
                new_loss = float(closure().detach())
        finally:
            pre._capture.active = active
        rho = (new_loss - float(loss)) / predicted if predicted < 0 else -math.inf
        omega = (19 / 20) ** self.damping_adaptation_period
        factor = omega if rho > 0.75 else (1 / omega if rho < 0.25 else 1.0)
        for group in self.param_groups:
            group["damping"] *= factor
        pre.damping = self.param_groups[0]["damping"]
        self.last_reduction_ratio = rho

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (momentum, param groups with the current damping) plus the
        preconditioner's factors, eigendecompositions, step counter and skip count."""
        state = super().state_dict()
        state["natgrad"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved, all or nothing: every part (kind, groups and
        their hyperparameters, momentum buffer shapes, layer names, curvature shapes and
        dtypes) is checked first; a mismatch is a ``ValueError`` naming it, state unchanged."""
        owner = type(self).__name__
        if not isinstance(state_dict, dict) or "natgrad" not in state_dict:
            raise ValueError(f"the state has no 'natgrad' entry: it was not saved by {owner} "
                             "(a torch optimizer's state?)")
        state = dict(state_dict)
        natgrad_state = state.pop("natgrad")
        self.preconditioner.check_state_dict(natgrad_state)
        entries = state.get("state")
        stripped = state if not isinstance(entries, dict) else {**state, "state": {
            i: {k: v for k, v in e.items() if k not in ADAM_STATE_KEYS}
            if isinstance(e, dict) else e for i, e in entries.items()}}
        check_optimizer_state(self, stripped, owner, lambda i, j, p: tuple(p.shape))
        self._check_fallback_state(state, natgrad_state)
        super().load_state_dict(state)
        self.preconditioner.load_state_dict(natgrad_state)
        self._group_of = {self._names[id(p)]: g for g in self.param_groups for p in g["params"]}

    def _check_fallback_state(self, state: dict[str, Any], natgrad_state: dict) -> None:
        """``ValueError`` for a saved Adam fallback state (see
        :func:`~natgrad.optim.fallback.check_adam_state`) that is incomplete, misshapen, kept
        for a parameter K-FAC covers (after the saved run's moves to the fallback), or loaded
        into an optimizer with ``fallback="sgd"``."""
        moved = set(natgrad_state.get("fallback", {}))
        covered = {n for layer in self.preconditioner.layers if layer.name not in moved
                   for n in layer.param_names if n is not None}
        by_index: dict[object, Tensor] = {}
        for old, new in zip(state["param_groups"], self.param_groups, strict=True):
            by_index.update(zip(old["params"], new["params"], strict=True))
        for index, entry in state["state"].items():
            p = by_index[index]
            name = self._names[id(p)]
            why_not = ("this optimizer was built with fallback='sgd'" if self.fallback is None
                       else "K-FAC covers that parameter")
            check_adam_state(entry, p, f"parameter {name!r} (shape {tuple(p.shape)})",
                             self.fallback is not None and name not in covered, why_not)

    def __repr__(self) -> str:
        head = super().__repr__()
        text = f"{head}\n{self.preconditioner!r}".replace("Preconditioner(", "(")
        stepped = {id(p) for g in self.param_groups for p in g["params"]}
        idle = [n for n, p in self.model.named_parameters()
                if p.requires_grad and id(p) not in stepped]
        return text + "".join(f"\n  {n}: in no parameter group (not stepped)" for n in idle)
