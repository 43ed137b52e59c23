"""K-FAC as a drop-in ``torch.optim`` optimizer (Martens & Grosse 2015).

Each step: Δθ_l = −η m_l with m ← μ m + d (m = d on the first step) and
d_l = ν (F̂_l + δI)⁻¹ ∇_l L + λ θ_l for Linear/Conv2d layers (F̂_l = G ⊗ Ā, see
:class:`~natgrad.optim.preconditioner.KFACPreconditioner`; ν the KL clip, with each parameter's
own group lr), d = ∇L + λ θ for the parameters of other modules (the documented fallback: plain
SGD with the same lr and momentum).
This is exactly ``KFACPreconditioner`` followed by ``torch.optim.SGD``. With
``fallback="adam"`` the parameters of other modules take an Adam-style diagonal step instead
(:mod:`natgrad.optim.fallback`).

Without ``lr`` (the default), the step is adaptive (Martens & Grosse 2015 §6.5, §7): with
Δ = −(d + λθ) the preconditioned direction (per group scaled by its ``lr``, 1 by default) and
δ₀ the previous update, the update is v = α Δ_K + β Δ_F + μ δ₀ (Δ_K: the K-FAC layers' part
of Δ, Δ_F: the fallback parameters', each with its own coefficient) with α, β, μ minimising the
quadratic model
M(v) = gᵀ v + ½ vᵀ (F + (δ + λ) I) v of the exact Fisher F of the batch (g = ∇L + λθ; see
:mod:`natgrad.optim.adaptive`), and every k steps the Levenberg–Marquardt rule moves δ by
ρ = [L(θ + v) − L(θ)] / [M(v) − M(0)] (L including the weight decay ½λ‖θ‖²; the new loss on
the same batch from the closure of ``step(closure)``, or, without one, from the labels of a
cross-entropy read off its gradient at the model's output: :mod:`natgrad.optim._loss_targets`;
other losses keep δ without a closure).

With ``lr`` given, the fixed step above; its ``adaptive_damping`` (every k steps) uses
ρ = [L(θ + Δ) − L(θ)] / M(Δ) with the frozen K-FAC curvature, M(Δ) = ∇Lᵀ Δ + ½ Δᵀ (F̂ + δI) Δ
(no extra pass; docs/math.md). Both rules: ρ > 3/4 ⇒ δ ← ω δ, ρ < 1/4 ⇒ δ ← δ / ω,
ω = (19/20)^k; the fixed step's rule needs ``step(closure)``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad import distributed
from natgrad.capture import InputRecorder, KFACLayer, suspended
from natgrad.likelihoods import Categorical, Likelihood, get_likelihood
from natgrad.optim._loss_targets import LossTargets, loss_slopes, loss_sum, read_targets
from natgrad.optim._object import BuiltOnce
from natgrad.optim._validation import (
    check_choice,
    check_model,
    check_nonnegative,
    check_optimizer_state,
    check_own_parameters,
    check_positive,
    grads_finite,
    tensors_finite,
)
from natgrad.optim.adaptive import (
    QuadraticModel,
    RngState,
    fisher_gram_entropy,
    fisher_sees,
    merge_directions,
    minimize_quadratic_model,
    replay_passes,
    replay_rng,
)
from natgrad.optim.fallback import (
    ADAM_STATE_KEYS,
    AdamFallback,
    adam_step,
    check_adam_state,
    parse_fallback,
)
from natgrad.optim.preconditioner import KFACPreconditioner, layer_gradient
from natgrad.outputs import output_tensor

__all__ = ["ADAPTIVE_DAMPING", "ADAPTIVE_TRUST_REGION", "ADAPTIVE_TRUST_REGION_ENTROPY", "KFAC"]

ADAPTIVE_DAMPING = 1e-2
"""The initial damping δ of the adaptive step (``lr`` not given)."""
ADAPTIVE_TRUST_REGION = 0.1
"""r of the adaptive step's trust region ½ vᵀ(F + (δ + λ)I)v ≤ r (``trust_region``). Without
it ``KFAC(model)`` diverged on a Fashion-MNIST CNN: the first step's predicted KL was 0.73
nats per example, the next batch's loss rose 2.3 → 4.2, the softmax saturated, F vanished
along the previous update, and μ grew −1.6, −2.0, −11, −980 until the loss was NaN at step 6
(benchmarks/defaults.py). Measured with KFAC and EKFAC (trailing-mean training loss at the
end; r = none / 0.1 / 0.01): Fashion CNN, 60 steps: NaN / 0.45 / 0.46 (EKFAC NaN / 0.44 /
0.44); digits CNN, 300 steps: 0.0043 / 0.0011 / 0.0025; digits MLP, 300 steps: 0.0024 /
0.0024 / 0.0041. r = 0.001 was slower everywhere (Fashion CNN 0.73)."""
ADAPTIVE_TRUST_REGION_ENTROPY = 0.005
"""κ of the adaptive step's trust region r = max(r₀, κ H̄) (``trust_region_entropy``), H̄ the
mean entropy per loss term of the model's predictive distribution on the batch (nats): the
step may change the predictions by a KL of r₀, or by a fraction κ of their uncertainty where
that is larger. A fixed r₀ = 0.1 bound cost the Fashion-MNIST autoencoder (784 Bernoulli
outputs per loss term, H̄ ≈ 543 nats at initialisation) a third of its progress; with κ
(KFAC seeds 0, 1 / EKFAC seed 0, trailing-mean training loss after 60 steps at batch 1000):
r₀ only: 351 / – / 336; κ = 0.005: 283 / 279 / 255; κ = 0.01: 284 / 281 / 260; κ = 0.02:
463 / 281 (a spike to 603 on the way) / –; no bound: 261 / – / 248. For a classifier over
C ≤ e^20 classes κ H̄ ≤ 0.1: r₀ alone decides (the Fashion CNN and digits results above)."""
_DAMPING_RANGE = (1e-3, 1e8)
"""Where the Levenberg–Marquardt rule of the adaptive step keeps δ (the floor: at most the
initial δ). ρ from the same batch's exact-Fisher model is ≈ 1 step after step, so the rule
lowers δ without end; a batch Fisher has rank ≤ N·C, and with δ → 0 the model lets the step
grow freely where the batch has no curvature: on the digits CNN δ reached 1e-7 and the
training-set loss became NaN. 1e-3 trained as well as or better than 1e-4 on the digits tasks."""


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """aᵀb in float64, a 0-d tensor on their device (no synchronisation)."""
    return torch.dot(a.flatten().double(), b.flatten().double())


SMALL_BATCH = 16
"""Below this many loss terms per step (examples; a sequence's positions each count) the
adaptive step warns (once) and its Levenberg–Marquardt rule may raise δ but not lower it: the
exact Fisher of one or two examples is nearly 0 along a confidently wrong prediction, so α is
set by δ alone and the step memorises the batch, which ρ, measured on that same batch,
rewarded by lowering δ (a red team's 16-64-4 MLP ended at held-out losses 9–36 at batch 1
and 1.1–52 at batch 2, Adam about 1.2; with δ only raised there: 1.0–1.8 (K-FAC) and
2.4–2.5 (EK-FAC) at batch 1, 0.7–0.9 at batch 2, better than Adam's 1.1)."""


def _empty(args: tuple) -> bool:
    """Whether a recorded pass's first tensor argument has 0 rows (an empty batch)."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return first is not None and first.dim() > 0 and first.shape[0] == 0


def _solve(fisher: Tensor, damping_gram: Tensor, b: Tensor, both: bool, mu: float | None,
           radius: float | None) -> tuple[QuadraticModel, bool]:
    """The adaptive step's coefficients over the directions [Δ_K, Δ_F (if ``both``), δ₀ (if
    present)], and whether Δ_K and Δ_F share one α (then the model is over Δ_K + Δ_F).

    Δ_F keeps a β of its own only where the model can be trusted with it: the Fisher sees
    every combination of Δ_K and Δ_F (:func:`~natgrad.optim.adaptive.fisher_sees`) and the
    solution moves along both, α > 0 and β > 0. Opposing coefficients (a LayerNorm scale
    moved up its gradient to cancel the Linear after it: BERT's β swung between −46 and 5)
    fit the batch's model but not the loss. ``mu``: μ held (None: chosen)."""
    def solve(f: Tensor, d: Tensor, g: Tensor) -> QuadraticModel:
        fixed = {g.shape[0] - 1: mu} if mu is not None else None
        return minimize_quadratic_model(f, d, g, fixed, radius)

    if both and fisher_sees(fisher, damping_gram, (0, 1)):
        model = solve(fisher, damping_gram, b)
        if min(model.coefficients[:2]) > 0:
            return model, False
    if both:
        return solve(*merge_directions(fisher, damping_gram, b, 0, 1)), True
    return solve(fisher, damping_gram, b), False


def _watcher(optimizer: KFAC) -> Callable[[InputRecorder, int, object], None]:
    """The recorder's ``on_output`` calling ``optimizer._watch_output`` through a weak
    reference (a plain function: a deep copy of the model keeps it and does not copy the
    optimizer; the optimizer ignores recorders other than its own)."""
    ref = weakref.ref(optimizer)

    def on_output(recorder: InputRecorder, index: int, output: object) -> None:
        opt = ref()
        if opt is not None:
            opt._watch_output(recorder, index, output)

    return on_output


class KFAC(BuiltOnce, Optimizer):
    """K-FAC optimizer for a model's Linear and Conv2d layers.

    Args:
        model: the network; its Linear/Conv2d layers are found automatically.
        lr: learning rate η (per parameter group). ``None`` (default) and no group giving an
            ``lr``: the adaptive step, α and μ from the exact-Fisher quadratic model every step
            (module docstring). A group giving an ``lr`` at construction selects the fixed
            step (the others default to 1e-2); in adaptive mode every group's ``lr`` is 1 and,
            if changed later, scales that group's part of the direction before α, β are
            chosen (which absorb a scale common to all K-FAC layers or all fallback
            parameters: a scheduler has no effect; 0 freezes the group).
        damping: δ in (F̂ + δI)⁻¹ (adapted when ``adaptive_damping``); default 1e-3 with
            ``lr``, :data:`ADAPTIVE_DAMPING` without.
        likelihood: "categorical", "gaussian" or "bernoulli": the model's predictive law.
        momentum, weight_decay: as in ``torch.optim.SGD`` (weight decay is not
            preconditioned). Without ``lr``, ``momentum=None`` (default) lets the model
            choose μ; a number holds μ there (0: no momentum, α alone is chosen).
        fisher_type: "mc" (default, one sample ŷ per example), "true" or "empirical".
        ema_decay, factor_update_period, inverse_update_period, damping_mode, mc_samples,
            kl_clip, generator, grad_scaler: see :class:`KFACPreconditioner`. With a
            ``torch.amp.GradScaler`` the standard loop (``scaler.scale(loss).backward();
            scaler.step(opt); scaler.update()``) takes the same steps as without it: the scaler
            hands the scale to ``step()``, which unscales the gradients (and the empirical
            Fisher's statistics) itself and skips the steps the scaler skips; only a loop that
            calls ``scaler.unscale_(opt)`` before ``step()`` with ``fisher_type="empirical"``
            needs ``grad_scaler=scaler``.
        trust_region: without ``lr``, the bound r (at least; see ``trust_region_entropy``)
            on the damped quadratic model's change
            ½ vᵀ(F + (δ + λ)I)v of the update v (α and μ are scaled by one factor to meet it;
            :func:`~natgrad.optim.adaptive.minimize_quadratic_model`): a trust region in KL
            where the Fisher is informative, ‖v‖ ≤ √(2r / δ) where it vanishes; None: no
            bound. Unused with ``lr``.
        trust_region_entropy: κ: the bound is r = max(``trust_region``, κ H̄), H̄ the mean
            entropy (nats) per loss term of the model's predictive distribution on the batch
            (:meth:`~natgrad.likelihoods.Likelihood.entropy`; a likelihood without one: r =
            ``trust_region``). Outputs with many independent terms (an autoencoder's pixels)
            may move further than one class label. 0: a fixed r.
        adaptive_damping: Levenberg–Marquardt adaptation every ``damping_adaptation_period``
            steps (default: on without ``lr``, where the new loss comes from
            ``step(closure)`` or, without a closure, from the labels of a plain cross-entropy
            read off its gradient (other losses keep δ there; ``damping_note`` says why);
            off with ``lr``, where it needs the closure).
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
        lr: float | None = None,
        damping: float | None = None,
        likelihood: str | Likelihood = "categorical",
        *,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        adaptive_damping: bool | None = None,
        damping_adaptation_period: int = 5,
        trust_region: float | None = ADAPTIVE_TRUST_REGION,
        trust_region_entropy: float = ADAPTIVE_TRUST_REGION_ENTROPY,
        nonfinite: str = "skip",
        param_groups: Iterable[dict[str, Any]] | None = None,
        fallback: str | AdamFallback = "sgd",
        **curvature: Any,
    ) -> None:
        check_model(model, type(self).__name__)
        if lr is not None and not isinstance(lr, (int, float)) and hasattr(lr, "__iter__"):
            raise TypeError(
                f"lr must be a number, got an iterable ({type(lr).__name__}): "
                f"{type(self).__name__} takes the model and no parameter list, "
                f"{type(self).__name__}(model) or {type(self).__name__}(model, lr=0.1)")
        self.fallback = parse_fallback(fallback)
        self._all_trainable = param_groups is None  # θ: every parameter training now
        self._unoptimized_warned: set[str] = set()
        self._unscale_warned = False
        self._small_batch_warned = False
        groups = list(param_groups) if param_groups is not None else [
            {"params": [p for p in model.parameters() if p.requires_grad]}
        ]
        # a learning rate given anywhere (argument or param group) asks for the fixed step
        self.adaptive = lr is None and not any(isinstance(g, dict) and "lr" in g for g in groups)
        self.adaptive_momentum = self.adaptive and momentum is None
        own_momentum = [g["momentum"] for g in groups if isinstance(g, dict) and "momentum" in g]
        if self.adaptive and any(m != momentum for m in own_momentum):
            raise ValueError(
                f"param groups give their own momentum {own_momentum}, but the adaptive step "
                "(no lr given) takes one μ for the whole update: pass momentum=... (one value, "
                "or None to let the step choose it) instead, or lr=... for the fixed step, "
                "where each group keeps its momentum")
        if self.adaptive and self.fallback is not None:
            raise ValueError(
                "fallback='adam' is an option of the fixed step: pass lr=... (the adaptive "
                "step, taken when no lr is given, moves the fallback parameters along their "
                "gradient by a coefficient β it chooses from the exact-Fisher model)")
        defaults = {
            "lr": 1.0 if self.adaptive else check_positive("lr", 1e-2 if lr is None else lr),
            "damping": check_nonnegative("damping", damping if damping is not None else (
                ADAPTIVE_DAMPING if self.adaptive else 1e-3)),
            "momentum": check_nonnegative("momentum", 0.0 if momentum is None else momentum),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
        }
        self.adaptive_damping = (self.adaptive if adaptive_damping is None
                                 else bool(adaptive_damping))
        if (isinstance(damping_adaptation_period, bool)
                or not isinstance(damping_adaptation_period, int)
                or damping_adaptation_period < 1):
            raise ValueError("damping_adaptation_period must be an integer >= 1, "
                             f"got {damping_adaptation_period!r}")
        self.damping_adaptation_period = damping_adaptation_period
        self.trust_region = (None if trust_region is None
                             else check_positive("trust_region", trust_region))
        self.trust_region_entropy = check_nonnegative("trust_region_entropy",
                                                      trust_region_entropy)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("skip", "raise"))
        if self.adaptive_damping and defaults["damping"] == 0:
            raise ValueError("adaptive_damping needs damping > 0")
        super().__init__(groups, defaults)
        for group in self.param_groups:
            for key in ("lr", "damping", "momentum", "weight_decay"):
                check = check_positive if key == "lr" else check_nonnegative
                group[key] = check(key, group[key])
        self.model = distributed.unwrap(model)
        self._index_parameters()
        check_own_parameters(self.param_groups, self._names, type(self).__name__)
        try:
            self.preconditioner = self._preconditioner_class(
                model, defaults["damping"], likelihood,
                lr=lambda: self.param_groups[0]["lr"], **curvature
            )
        except TypeError as err:
            raise ValueError(f"unknown option for {type(self).__name__}: {err}") from None
        self._built = True
        self.preconditioner.fallback_description = (
            "gradient step scaled by an adaptive coefficient (its own β, or the K-FAC "
            "layers' α where the model cannot tell them apart), with momentum μ and weight "
            "decay (fallback, not preconditioned)" if self.adaptive else
            "plain SGD step with its group's lr, momentum and weight decay (fallback, not "
            "preconditioned)") if self.fallback is None else self.fallback.describe()
        self.likelihood = get_likelihood(likelihood)
        self._recorder = InputRecorder(self.model, record_rng=True,
                                       on_output=_watcher(self)) if self.adaptive else None
        self.damping_note: str | None = None
        """Why the last adaptation step left δ where it was (no closure, and the labels could
        not be read off the loss gradient), else None."""
        self._info: dict[str, float | None] = {}
        self._loss_scale = 1.0  # a GradScaler's, read at each step (_backward_scale)
        self._first_order: tuple[Tensor, Tensor, Tensor] | None = None
        """(slopes through f, ∇Lᵀuᵢ, coefficients) of the last adaptive step without a
        closure, for :meth:`_outside_terms`."""
        self._initial_damping = [float(g["damping"]) for g in self.param_groups]

    def _adapts(self, steps: int) -> bool:
        """Whether step number ``steps`` (0-based) adapts δ (Levenberg–Marquardt)."""
        return self.adaptive_damping and (steps + 1) % self.damping_adaptation_period == 0

    def _watch_output(self, recorder: InputRecorder, index: int, output: object) -> None:
        """Before a step that adapts δ: read the targets of the user's loss off the gradient
        that reaches the recorded pass's output (:mod:`natgrad.optim._loss_targets`), so that
        ρ needs no closure; kept in the recorder's notes (a reason string where they cannot
        be read, or where several backward passes reach the output)."""
        if recorder is not self._recorder or not self._adapts(
                self.preconditioner.curvature.steps):
            return  # (another recorder: a deep copy of the model, hooks included)
        try:
            f = output_tensor(output, self.preconditioner.output)
        except (TypeError, ValueError) as err:
            recorder.notes[index] = f"the output cannot be selected: {err}"
            return
        if not f.requires_grad:
            recorder.notes[index] = "the output does not require a gradient"
            return
        values = f.detach()
        version = values._version

        def read(grad: Tensor) -> None:
            if recorder.notes.get(index) is not None:
                recorder.notes[index] = "several backward passes reached the output"
                return
            if values._version != version:  # the loss saw other values than the replay will
                recorder.notes[index] = ("the output was modified in place after the forward "
                                         "pass (e.g. logits masked before the loss)")
                return
            try:
                recorder.notes[index] = read_targets(self.likelihood, values, grad)
            except Exception as err:  # never break the user's backward pass
                recorder.notes[index] = f"reading the targets failed: {err!r}"

        f.register_hook(read)

    def _targets_change(self, passes: list[tuple[tuple, dict]], rngs: list[RngState]
                        ) -> tuple[float, float] | str:
        """(L(θ + v) − L(θ), ⟨∂L/∂f, J v⟩) on the recorded passes from the targets read off
        the loss gradient (θ + v: the current parameters; the second, the loss's slope along
        v through the output f, is checked against ∇Lᵀv by :meth:`_outside_terms`), or why
        they cannot be computed."""
        recorder = self._recorder
        assert recorder is not None
        notes = [recorder.notes.get(i) for i in range(len(passes))]
        for note in notes:
            if not isinstance(note, LossTargets):
                return note if isinstance(note, str) else (
                    "no loss gradient reached the output of a recorded forward pass")
        scale = self._loss_scale  # a GradScaler's: s read off s_amp ∂L/∂f
        if scale is None:
            note = ("GradScaler.unscale_() ran before step(), so the scale of the loss gradient "
                    f"is unknown: pass grad_scaler=scaler to {type(self).__name__}(...)")
            if not self._unscale_warned:  # a habit, not a loss natgrad cannot read: say it
                self._unscale_warned = True
                warnings.warn(f"the damping δ is not adapted: {note}", RuntimeWarning,
                              stacklevel=4)
            return note
        first_order = self._first_order
        if first_order is None:
            return "the loss's slope through the output was not computed"
        slopes, _, x = first_order
        through_f = float(slopes @ x) / scale
        likelihood = self.likelihood
        assert isinstance(likelihood, Categorical)
        new = replay_passes(self.model, passes, rngs or None, self.preconditioner.output,
                            lambda i, f: loss_sum(likelihood, f, notes[i]))  # type: ignore[arg-type]
        change = (sum(new) - sum(note.loss for note in notes)) / scale  # type: ignore[union-attr]
        return change, through_f

    def _outside_terms(self, through_f: float) -> str | None:
        """Why the loss has terms that do not pass through the model's output f (a penalty on
        θ, another head's loss), which its change read through f would miss: its slope along
        the step through f, ⟨∂L/∂f, J v⟩, differs from ∇Lᵀv by more than 10⁻³ of
        Σᵢ |xᵢ ∇Lᵀuᵢ|; None when they agree."""
        assert self._first_order is not None
        _, raw, x = self._first_order
        total = float(raw @ x)
        if abs(through_f - total) <= 1e-3 * float((raw * x).abs().sum()):
            return None
        return ("the loss has terms that do not pass through the model's output (a penalty "
                f"on the parameters, another head's loss): its slope along the step is "
                f"{total:.4g}, through the output {through_f:.4g}")

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
        if self._recorder is not None:
            self._recorder.close()

    @property
    def last_step_info(self) -> dict[str, float | None]:
        """The last step taken: ``alpha`` (α, the lr with a fixed step), ``alpha_fallback``
        (β, the adaptive step's coefficient of the fallback parameters' direction; None when
        there are none or with a fixed step), ``mu`` (μ, the momentum), ``damping`` (the δ it
        used), ``rho`` (the reduction ratio ρ if δ was adapted at that step, else None) and
        ``predicted_kl`` (½ vᵀ F v for the update v with
        the batch's exact Fisher; None with a fixed step). Empty before the first step."""
        return dict(self._info)

    def diagnostics(self) -> dict[str, float | None]:
        """:attr:`last_step_info`."""
        return self.last_step_info

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
        self._discard()
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{reason}; step not taken, state unchanged")
        self.preconditioner.skipped_steps += 1
        warnings.warn(f"{reason}: step skipped ({self.skipped_steps} so far)", RuntimeWarning,
                      stacklevel=3)

    def _discard(self) -> None:
        """Forget the statistics and recorded passes gathered since the last step."""
        self.preconditioner.curvature.discard_pending()
        self.preconditioner._arm()
        if self._recorder is not None:
            self._recorder.take()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One K-FAC step; ``closure`` re-evaluates the loss (required for adaptive damping)."""
        self.preconditioner.check_open(f"{type(self).__name__}.step()")
        self.preconditioner.check_layers()
        self._warn_unoptimized()
        self.preconditioner.collect_statistics()
        if self.fallback is not None:
            self._check_dense_fallback_grads([p for g in self.param_groups for p in g["params"]])
        self._loss_scale = self._backward_scale()
        if self._amp_unscale():
            if self._recorder is not None:
                self._recorder.take()
            return None
        loss = None
        if closure is not None:
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:  # a step whose closure raised leaves nothing behind
                self._discard()
                raise
        steps = self.preconditioner.curvature.steps
        adapt = self.adaptive_damping and (steps + 1) % self.damping_adaptation_period == 0
        if adapt and closure is None and not self.adaptive:
            raise ValueError("adaptive_damping needs step(closure) to evaluate the new loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._skip(f"non-finite loss {float(loss)}")
            return loss
        params = [p for g in self.param_groups for p in g["params"]]
        if not grads_finite(params) or not self.preconditioner.curvature.pending_finite():
            self._skip("non-finite gradient or curvature statistics")
            return loss
        if self.adaptive:
            self._adaptive_step(closure, loss, steps)
            return loss
        grads = {self._names[id(p)]: p.grad for p in params if p.grad is not None}
        # every direction is computed before any parameter or buffer moves: a step that
        # raises part-way (refused damping 0 on a singular curvature, out of memory) leaves
        # the model and the optimizer as they were
        directions = self.preconditioner.directions(
            damping=lambda layer: self._layer_group(layer)["damping"],
            lr=self._lr_of,
            check_finite=False,  # checked just above
        )
        assert directions is not None  # finiteness was checked above
        damping = self.param_groups[0]["damping"]
        deltas = self._apply(directions, keep_deltas=adapt)
        if adapt:
            self._adapt_damping(closure, loss, grads, deltas)  # type: ignore[arg-type]
        group = self.param_groups[0]
        self._info = {"alpha": float(group["lr"]), "alpha_fallback": None,
                      "mu": float(group["momentum"]), "damping": float(damping),
                      "rho": float(self.last_reduction_ratio) if adapt else None,
                      "predicted_kl": None}
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        """After a copy (:class:`~natgrad.optim._object.BuiltOnce`): the maps keyed by
        ``id(p)`` are rebuilt for the copy's parameters."""
        super().__setstate__(state)
        if "model" in self.__dict__:
            self._index_parameters()
            if self._recorder is not None:  # its weak reference pointed at the original
                self._recorder.on_output = _watcher(self)
                self._recorder.rehook(self.model)

    def _index_parameters(self) -> None:
        """The maps by ``id(p)`` (parameter → name) and by name (→ its group), rebuilt where
        the parameter objects or the groups change (a copy, a loaded state). A parameter
        foreign to the model has no name: ``check_own_parameters`` then refuses it."""
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._group_of = {self._names[id(p)]: g for g in self.param_groups
                          for p in g["params"] if id(p) in self._names}

    def _warn_unoptimized(self) -> None:
        """Warn (once per parameter) when a parameter of the model has a gradient but no
        group: frozen when the optimizer was created (without ``param_groups``) and unfrozen
        since. It is not stepped, where ``torch.optim.SGD(model.parameters())`` would."""
        if not self._all_trainable:
            return  # explicit groups: the others may be another optimizer's
        new = [n for n, p in self.model.named_parameters()
               if p.requires_grad and p.grad is not None and n not in self._group_of
               and n not in self._unoptimized_warned]
        if new:
            self._unoptimized_warned.update(new)
            warnings.warn(
                f"{type(self).__name__} does not step {new}: they did not require gradients "
                "when it was created (the parameters it trains are fixed then). To train them "
                "too, create the optimizer after unfreezing them; if another optimizer steps "
                "them, pass param_groups=... explicitly, which turns this check off",
                RuntimeWarning, stacklevel=3)

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

    def _adaptive_step(self, closure: Callable[[], Tensor] | None, loss: Tensor | None,
                       steps: int) -> None:
        """v = α Δ + μ δ₀ minimising the exact-Fisher model (module docstring); θ ← θ + v;
        with a closure every k-th step, the Levenberg–Marquardt update of δ by ρ."""
        recorder = self._recorder
        assert recorder is not None
        passes, rngs = list(recorder.passes), list(recorder.rng_states)
        if not passes:
            raise RuntimeError(
                f"the adaptive step of {type(self).__name__} (no lr given) needs a forward pass "
                "of the model with gradients enabled before step(): it evaluates the exact "
                "Fisher of that batch; pass lr=... for a fixed step")
        if all(_empty(args) for args, _ in passes):
            self._discard()
            raise ValueError(
                "the forward passes since the last step had empty batches (0 examples): the "
                "adaptive step has no Fisher to evaluate; step not taken, state unchanged")
        sparse = [self._names[id(p)] for g in self.param_groups for p in g["params"]
                  if p.grad is not None and p.grad.is_sparse]
        if sparse:  # nothing changed: this step's statistics are dropped
            self._discard()
            raise ValueError(
                f"the adaptive step (no lr given) needs dense gradients, but {sparse} have "
                "sparse ones (nn.Embedding(sparse=True)): pass lr=... for the fixed step, whose "
                "fallback steps them as torch.optim.SGD does; step not taken")
        directions = self.preconditioner.directions(
            damping=lambda layer: self._layer_group(layer)["damping"], lr=self._lr_of,
            check_finite=False)
        assert directions is not None
        step_dir: dict[str, Tensor] = {}
        previous: dict[str, Tensor] = {}
        entries: list[tuple[Tensor, str, float, float]] = []  # p, name, δ + λ, λ
        gradients: dict[str, Tensor] = {}  # g = ∇L + λθ
        for group in self.param_groups:
            lr, wd, damping = group["lr"], group["weight_decay"], group["damping"]
            for p in group["params"]:
                name = self._names[id(p)]
                d = directions.get(name, p.grad)
                if d is None:
                    continue
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if wd:
                    d, g = d.add(p, alpha=wd), g.add(p, alpha=wd)
                step_dir[name], gradients[name] = d.mul(-lr), g
                prev = self.state.get(p, {}).get("previous_update")
                if prev is not None:
                    previous[name] = prev
                entries.append((p, name, damping + wd, wd))
        if not step_dir:  # no parameter has a gradient: nothing to step
            recorder.take()
            return
        # the preconditioned part and the fallback part of Δ are two directions, each with
        # its own coefficient where the model can be trusted with it (_solve): one α for both
        # let a tied embedding/head barely move (its raw gradient scaled by the K-FAC α)
        covered = {n: u for n, u in step_dir.items() if n in directions}
        fallback = {n: u for n, u in step_dir.items() if n not in directions}
        mu_fixed = None if self.adaptive_momentum else float(self.param_groups[0]["momentum"])
        use_previous = bool(previous) and mu_fixed != 0.0
        dirs = [u for u in (covered, fallback) if u]
        fallback_index = len(dirs) - 1  # its coefficient, when there is a fallback part
        if use_previous:
            dirs.append(previous)
        k = len(dirs)
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
        b_terms: list[list[Tensor]] = [[] for _ in range(k)]  # gᵀuᵢ
        gram_terms: list[list[Tensor]] = [[] for _ in pairs]  # Σ (δ + λ) uᵢᵀuⱼ
        for _, name, shift, _ in entries:
            for i in range(k):
                ui = dirs[i].get(name)
                if ui is not None:
                    b_terms[i].append(_dot(gradients[name], ui))
            for terms, (i, j) in zip(gram_terms, pairs, strict=True):
                ui, uj = dirs[i].get(name), dirs[j].get(name)
                if ui is not None and uj is not None:
                    terms.append(_dot(ui, uj) * shift)
        device = next(iter(step_dir.values())).device
        sums = torch.stack([torch.stack([t.to(device) for t in terms]).sum() if terms else
                            torch.zeros((), dtype=torch.float64, device=device)
                            for terms in [*b_terms, *gram_terms]]).cpu()  # one transfer
        b = sums[:k]
        damping_gram = torch.zeros(k, k, dtype=torch.float64)
        for value, (i, j) in zip(sums[k:], pairs, strict=True):
            damping_gram[i, j] = damping_gram[j, i] = value
        # without a closure, the labels read off ∂L/∂f give the loss's slope along each uᵢ
        # through f, ⟨∂L/∂f, J uᵢ⟩, from the same forward-mode passes (checked in
        # _targets_change against ∇Lᵀuᵢ)
        slopes = torch.zeros(k, dtype=torch.float64, device=device)
        notes = recorder.notes
        likelihood = self.likelihood

        def add_slopes(index: int, f: Tensor, U: Tensor) -> None:
            note = notes.get(index)
            if isinstance(note, LossTargets) and isinstance(likelihood, Categorical):
                slopes.add_(loss_slopes(likelihood, f, U, note).to(device))

        watch = closure is None and self._adapts(steps) and bool(notes)
        fisher, entropy, terms = fisher_gram_entropy(
            self.model, passes, self.likelihood, dirs, rngs, self.preconditioner.output,
            add_slopes if watch else None)
        if not self._small_batch_warned and terms < SMALL_BATCH:
            self._small_batch_warned = True
            warnings.warn(
                f"{type(self).__name__}'s adaptive step (no lr given) fits α, μ and δ to the "
                f"exact Fisher of the batch, which has {terms:g} loss term(s): below "
                f"{SMALL_BATCH} that estimate is too poor to bound the step (it can memorise "
                "single examples; δ is then only ever raised). Use batches of at least 16 "
                "examples (or accumulate micro-batches before step()), or pass lr=... for "
                "the fixed step",
                RuntimeWarning, stacklevel=3)
        raw = [sum((_dot(p.grad, u[name]) for p, name, _, _ in entries
                    if p.grad is not None and name in u), torch.zeros((), dtype=torch.float64,
                                                                      device=device))
               for u in dirs] if watch else []
        self._first_order = None
        both = bool(covered and fallback)
        fixed_mu = mu_fixed if use_previous else None
        model, shared = _solve(fisher, damping_gram, b, both, fixed_mu, self._radius(entropy))
        coefficients = model.coefficients
        alpha = coefficients[0] if covered else None
        alpha_fallback = (coefficients[0] if shared else coefficients[fallback_index]
                          ) if fallback else None
        mu = coefficients[-1] if use_previous else 0.0
        if watch:  # the step's coefficient of each uᵢ, in the order of dirs
            x = [c for c, present in ((alpha, bool(covered)), (alpha_fallback, bool(fallback)),
                                      (mu, use_previous)) if present]
            self._first_order = (slopes.cpu(), torch.stack(raw).cpu(),
                                 torch.tensor(x, dtype=torch.float64))
        self._apply_adaptive(entries, step_dir, previous, alpha, alpha_fallback, set(fallback),
                             mu, closure, loss, steps, model, passes, rngs, terms)
        recorder.take()

    def _radius(self, entropy: float | None) -> float | None:
        """The trust region's r = max(r₀, κ H̄) (r₀ = ``trust_region``, κ =
        ``trust_region_entropy``, H̄ the batch's mean predictive entropy per loss term; r₀ where
        the likelihood gives no entropy); None without a trust region."""
        if self.trust_region is None:
            return None
        if entropy is None or not math.isfinite(entropy):
            return self.trust_region
        return max(self.trust_region, self.trust_region_entropy * entropy)

    def _apply_adaptive(
        self, entries: list[tuple[Tensor, str, float, float]], step_dir: dict[str, Tensor],
        previous: dict[str, Tensor], alpha: float | None, alpha_fallback: float | None,
        fallback: set[str], mu: float, closure: Callable[[], Tensor] | None,
        loss: Tensor | None, steps: int, model: QuadraticModel,
        passes: list[tuple[tuple, dict]], rngs: list[RngState], terms: float = math.inf,
    ) -> None:
        """θ ← θ + v, v = α Δ_K + β Δ_F + μ δ₀ (Δ_F: the ``fallback`` parameters' part) kept as
        the next δ₀; then Levenberg–Marquardt (on a batch of fewer than :data:`SMALL_BATCH`
        loss ``terms`` δ may rise but not fall: ρ there says how well the step fits those few
        examples, not the loss), the new
        loss from the closure run with the random state its first recorded pass began with
        (the same dropout masks; the caller's random state is left as it was)."""
        regulariser = 0.0  # Σ λ (θᵀ v + ½ ‖v‖²): the change of ½ λ ‖θ‖²
        updates = {}
        for _, name, _, _ in entries:
            v = updates[name] = step_dir[name].mul_(
                (alpha_fallback if name in fallback else alpha) or 0.0)
            if name in previous and mu:  # |μ| ≲ 1e12 α: a negligible δ₀ drops out of the model
                v.add_(previous[name], alpha=mu)
        if updates and not tensors_finite(updates.values()):
            # a finite model whose v overflows the parameters' precision: no step
            model = QuadraticModel((0.0, 0.0), 0.0, 0.0, "the update overflows")
            alpha = None if alpha is None else 0.0
            alpha_fallback = None if alpha_fallback is None else 0.0
            mu = 0.0
            for v in updates.values():
                v.zero_()
        for p, name, _, wd in entries:
            v = updates[name]
            if wd:
                regulariser += wd * float((p.double() * v.double()).sum()
                                          + 0.5 * v.double().square().sum())
            p.add_(v)
            self.state[p]["previous_update"] = v
        damping = float(self.param_groups[0]["damping"])
        rho: float | None = None
        change: float | str | None = None
        through_f: float | None = None
        if self._adapts(steps) and model.value < 0:
            device = entries[0][0].device
            if closure is not None and loss is not None:
                with suspended(), torch.enable_grad(), torch.random.fork_rng(
                        devices=[device] if device.type == "cuda" else []):
                    replay_rng(rngs[0] if rngs else None)
                    new_loss = float(closure().detach())
                change = new_loss - float(loss)
            else:  # no closure: the loss read off its gradient, where it can be
                read = self._targets_change(passes, rngs)
                change, through_f = read if isinstance(read, tuple) else (read, None)
            if distributed.is_distributed():  # the mean over ranks: ρ and δ agree everywhere
                known = not isinstance(change, str)
                summed = distributed.sum_across_ranks([torch.tensor(
                    [change if known else 0.0, float(known), through_f or 0.0],
                    dtype=torch.float64, device=device)])[0]
                if int(summed[1]) == distributed.world_size():
                    change = float(summed[0]) / distributed.world_size()
                    if through_f is not None:
                        through_f = float(summed[2]) / distributed.world_size()
                elif known:
                    change = "the targets could not be read on every rank"
            if through_f is not None and not isinstance(change, str):
                change = self._outside_terms(through_f) or change
            self.damping_note = change if isinstance(change, str) else None
        if isinstance(change, float):
            rho = (change + regulariser) / model.value
            if not math.isfinite(rho):
                rho = -math.inf
            omega = (19 / 20) ** self.damping_adaptation_period
            factor = omega if rho > 0.75 else (1 / omega if rho < 0.25 else 1.0)
            if terms < SMALL_BATCH:
                factor = max(factor, 1.0)
            low, high = _DAMPING_RANGE
            for group, initial in zip(self.param_groups, self._initial_damping, strict=True):
                group["damping"] = min(max(group["damping"] * factor, min(low, initial)), high)
            self.preconditioner.damping = self.param_groups[0]["damping"]
            self.last_reduction_ratio = rho
        self._info = {"alpha": alpha if alpha is not None else alpha_fallback,
                      "alpha_fallback": alpha_fallback, "mu": mu, "damping": damping,
                      "rho": rho, "predicted_kl": model.kl}

    def _backward_scale(self) -> float | None:
        """The factor a ``torch.amp.GradScaler`` multiplied this step's loss by before its
        backward pass (1 without one), or None where it cannot be known (``unscale_`` ran
        before ``step()`` and no ``grad_scaler`` was given)."""
        scaler = self.preconditioner.grad_scaler
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        if getattr(self, "found_inf", None) is None:  # not called by a GradScaler
            return 1.0
        scale = getattr(self, "grad_scale", None)
        return None if scale is None else float(scale)

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

    def _apply(self, directions: dict[str, Tensor], keep_deltas: bool) -> dict[str, Tensor]:
        """θ ← θ − η m with m ← μ m + d; returns the applied Δθ by name if ``keep_deltas``."""
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
        if self.adaptive:
            state["adaptive"] = {"last_step_info": dict(self._info),
                                 "last_reduction_ratio": getattr(self, "last_reduction_ratio",
                                                                 None)}
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
        adaptive = state.pop("adaptive", None)
        if (adaptive is not None) != self.adaptive:
            saved, this = ("adaptive (no lr)", "a fixed lr") if adaptive is not None else (
                "a fixed lr", "the adaptive step (no lr)")
            raise ValueError(f"the state was saved by a {owner} with {saved}, this one has "
                             f"{this}: build it the same way")
        if adaptive is not None and not (isinstance(adaptive, dict)
                                         and isinstance(adaptive.get("last_step_info"), dict)):
            raise ValueError("the state's 'adaptive' entry needs a last_step_info dict")
        self.preconditioner.check_state_dict(natgrad_state)
        entries = state.get("state")
        stripped = state if not isinstance(entries, dict) else {**state, "state": {
            i: {k: v for k, v in e.items() if k not in ADAM_STATE_KEYS}
            if isinstance(e, dict) else e for i, e in entries.items()}}
        check_optimizer_state(self, stripped, owner, lambda i, j, p: tuple(p.shape),
                              keys=("momentum_buffer", "previous_update"))
        self._check_fallback_state(state, natgrad_state)
        super().load_state_dict(state)
        self.preconditioner.load_state_dict(natgrad_state)
        if adaptive is not None:
            self._info = dict(adaptive["last_step_info"])
            if adaptive.get("last_reduction_ratio") is not None:
                self.last_reduction_ratio = adaptive["last_reduction_ratio"]
        self._index_parameters()

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
