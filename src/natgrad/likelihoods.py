"""Predictive distributions p(y | f) that a network's output f parametrizes.

For each likelihood this module gives what the Fisher needs in output space:

| name          | f         | D(f) = E_ŷ[∇_f log p ∇_f log pᵀ] | B with B Bᵀ = D           |
|---------------|-----------|-----------------------------------|---------------------------|
| categorical   | logits z  | diag(p) − p pᵀ, p = softmax(z)    | diag(√p) − p √pᵀ          |
| gaussian      | mean μ    | I (unit variance)                 | I                         |
| bernoulli     | logits z  | diag(p(1 − p)), p = σ(z)          | diag(√(p(1 − p)))         |

All Fisher types reduce to *cotangent rows* r_{nk} in output space, one set per example n, such
that the Fisher is F = (1/M) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ (see :func:`cotangent_rows`).

Sequence outputs (DESIGN.md §1): an *example* is dim 0 of f; a *loss term* is one position of
it. Each likelihood splits an example's outputs into positions and an event: categorical logits
(N, d₁, …, C) (or (N, C, d₁, …) with ``class_dim=1``, cross_entropy's layout) have one term per
position (n, d₁, …), the classes being the event; gaussian / bernoulli outputs are one term per
example unless ``event_dims`` says how many trailing dims form one term. M counts the terms
that are not ignored (categorical targets equal to ``ignore_index``, default -100), as
``cross_entropy(..., ignore_index=-100)``'s mean does; for (N, C) outputs M = N.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

LikelihoodName = Literal["categorical", "gaussian", "bernoulli"]
FisherType = Literal["true", "mc", "empirical"]

__all__ = [
    "Bernoulli",
    "Categorical",
    "FisherType",
    "Gaussian",
    "Likelihood",
    "LikelihoodName",
    "cotangent_rows",
    "get_likelihood",
    "num_terms",
]


class Likelihood(ABC):
    """A predictive distribution p(y | f) for a batch of outputs f of shape (N, ...).

    By default an example's whole output is one loss term (M = N); subclasses with positions
    override :meth:`term_shape` (and :meth:`term_mask` to ignore some of them).
    """

    name: str

    def term_shape(self, f: Tensor) -> tuple[int, ...]:
        """The shape (N, d₁, …) of f's loss terms: (N,) when each example is one term."""
        return tuple(f.shape[:1])

    def term_mask(self, f: Tensor, targets: Tensor | None) -> Tensor | None:
        """Boolean mask of shape :meth:`term_shape` of the terms that count (``None``: all of
        them). Checks ``targets`` where it uses them."""
        return None

    def term_gradient_mask(self, grad: Tensor) -> Tensor:
        """Which terms a loss gradient ∂L/∂f (f's shape) reaches: those with any nonzero
        entry, shape :meth:`term_shape`."""
        shape = self.term_shape(grad)
        return grad.detach().reshape(*shape, -1).ne(0).any(-1)

    def sample_terms(self, f: Tensor, num_samples: int, generator: torch.Generator | None,
                     mask: Tensor | None) -> Tensor:
        """ŷ ~ p(y | f) drawn only for the terms in ``mask`` where the likelihood can ignore
        terms (default: :meth:`sample`, the mask applied by the caller to the rows)."""
        return self.sample(f, num_samples, generator)

    def mask_rows(self, rows: Tensor, mask: Tensor | None) -> Tensor:
        """``rows`` (K, *f.shape) with the terms outside ``mask`` set to zero."""
        if mask is None:
            return rows
        shape = (1, *mask.shape, *([1] * (rows.dim() - 1 - mask.dim())))
        return rows * mask.reshape(shape).to(rows.dtype)

    def loss_gradient_problem(self, f: Tensor, grad: Tensor) -> str | None:
        """Why a loss gradient ∂L/∂f (``grad``, f's shape, accurate to its dtype's rounding of
        each entry) cannot come from this likelihood's negative log-likelihood (a mean or
        weighted sum of −log p(yₙ | fₙ) terms) at outputs ``f``, or None when it can or the
        likelihood cannot tell (the base)."""
        return None

    @abstractmethod
    def check_outputs(self, f: Tensor) -> None:
        """Raise ``ValueError`` if the model outputs ``f`` cannot parametrize this likelihood."""

    @abstractmethod
    def check_targets(self, f: Tensor, y: Tensor) -> None:
        """Raise ``ValueError`` naming the problem if targets ``y`` do not fit outputs ``f``."""

    @abstractmethod
    def sample(self, f: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Draw ŷ ~ p(y | f): shape (num_samples, *y_shape) for outputs f."""

    @abstractmethod
    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """log p(y | f) per example, shape (N,) (summed over output dimensions)."""

    @abstractmethod
    def grad_log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """∇_f log p(y | f) in closed form, same shape as ``f``."""

    @abstractmethod
    def sqrt_fisher(self, f: Tensor) -> Tensor:
        """B(f) with B Bᵀ = D(f): shape (N, C, C) with C = f[0].numel()."""

    def entropy(self, f: Tensor) -> Tensor | None:
        """H = Σ over f's loss terms of the entropy of p(· | f) in nats, a 0-d float64 tensor
        (None where the likelihood does not say: a custom subclass)."""
        return None

    def fisher_rows(self, f: Tensor) -> Tensor:
        """Rows r_k with Σₖ r_k r_kᵀ = D(f), shape (K, N, *f.shape[1:]): the columns of B."""
        B = self.sqrt_fisher(f)
        return B.permute(2, 0, 1).reshape(B.shape[2], *f.shape)

    def fisher(self, f: Tensor) -> Tensor:
        """Output-space Fisher D(f) = B Bᵀ, shape (N, C, C)."""
        B = self.sqrt_fisher(f)
        return B @ B.transpose(-1, -2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_finite(f: Tensor) -> None:
    if not torch.isfinite(f).all():
        bad = (~torch.isfinite(f)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"model outputs are non-finite (NaN or inf) for {len(bad)} example(s), "
            f"first indices {bad[:5]}; the Fisher is undefined there"
        )


_MAX_TRUE_ROW_ELEMENTS = 1 << 31  # refuse rather than exhaust memory (Categorical.fisher_rows)


class Categorical(Likelihood):
    """Categorical over the classes of logits z; targets: class indices.

    Layouts: (N, C); (N, d₁, …, C) with the classes last (``class_dim=-1``, the default, e.g.
    a language model's (N, T, C)); or (N, C, d₁, …) like ``F.cross_entropy`` with
    ``class_dim=1``. Internally the classes are moved last: (N, d₁, …, C) is the canonical
    layout, and every position (n, d₁, …) is one loss term with targets y of shape
    (N, d₁, …). Targets equal to ``ignore_index`` (default -100) mark terms that contribute
    nothing: zero rows, no sample, not counted in M.

    Per term: log p(y | z) = z_y − logsumexp(z);  ∇_z log p = onehot(y) − softmax(z);
    D = diag(p) − p pᵀ;  B = diag(√p) − p √pᵀ (B Bᵀ = D because Σ p = 1). An example's D is
    block diagonal over its positions.

    Example:
        >>> lik = Categorical(ignore_index=-1)
        >>> z, y = torch.zeros(2, 3, 4), torch.tensor([[0, 1, -1], [2, -1, -1]])
        >>> lik.term_mask(z, y).sum().item(), lik.log_prob(z, y).shape  # M = 3 terms
        (3, torch.Size([2]))
    """

    name = "categorical"

    def __init__(self, ignore_index: int = -100, class_dim: int = -1) -> None:
        for what, value in (("ignore_index", ignore_index), ("class_dim", class_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Categorical's {what} must be an integer, got {value!r}")
        if class_dim == 0:
            raise ValueError("Categorical's class_dim cannot be 0, the examples' dimension: "
                             "use -1 (logits (N, …, C)) or 1 (logits (N, C, …))")
        self.ignore_index = ignore_index
        self.class_dim = class_dim

    def __repr__(self) -> str:
        return f"Categorical(ignore_index={self.ignore_index}, class_dim={self.class_dim})"

    # -- layout -------------------------------------------------------------------------------
    def _dim(self, f: Tensor) -> int:
        return self.class_dim % f.dim()

    def canonical(self, f: Tensor) -> Tensor:
        """f with the classes last: (N, d₁, …, C)."""
        return f if self._dim(f) == f.dim() - 1 else f.movedim(self._dim(f), -1)

    def _restore(self, t: Tensor, lead: int = 0) -> Tensor:
        """The inverse of :meth:`canonical` for a tensor with ``lead`` extra leading dims."""
        dim = self.class_dim % (t.dim() - lead)
        if dim == t.dim() - lead - 1:
            return t
        return t.movedim(-1, lead + dim)

    def term_shape(self, f: Tensor) -> tuple[int, ...]:
        return tuple(self.canonical(f).shape[:-1])

    def _shape_text(self, f: Tensor) -> str:
        return "(N,)" if f.dim() == 2 else "(N, d1, …) (the logits' shape without classes)"

    def check_outputs(self, f: Tensor) -> None:
        if f.dim() < 2 or not -f.dim() <= self.class_dim < f.dim() or self._dim(f) == 0:
            raise ValueError(
                "categorical likelihood expects logits of shape (N, C), (N, T, C) or, with "
                f"class_dim=1, (N, C, d1, …); got {tuple(f.shape)} with class_dim="
                f"{self.class_dim}")
        if not f.is_floating_point():
            raise ValueError(f"categorical likelihood expects float logits, got {f.dtype}")
        if f.shape[self._dim(f)] == 1:
            raise ValueError(
                f"categorical likelihood over 1 class (logits {tuple(f.shape)}): its Fisher is "
                "zero, so every natural-gradient step would be the gradient over the damping; "
                "a model with one output is a regression (likelihood='gaussian') or a binary "
                "classifier (likelihood='bernoulli')")
        _check_finite(f)

    def check_targets(self, f: Tensor, y: Tensor) -> None:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"categorical likelihood expects integer class indices as targets, got {y.dtype}"
            )
        shape = self.term_shape(f)
        if tuple(y.shape) != shape:
            raise ValueError(
                f"categorical targets must have shape {self._shape_text(f)} = {shape}, "
                f"got {tuple(y.shape)}"
            )
        num_classes = f.shape[self._dim(f)]
        valid = y[y != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(
                f"categorical targets must lie in [0, {num_classes}) for {num_classes} logits "
                f"(or equal ignore_index={self.ignore_index}), got values in "
                f"[{int(valid.min())}, {int(valid.max())}]"
            )

    def term_mask(self, f: Tensor, targets: Tensor | None) -> Tensor | None:
        if targets is None:
            return None
        self.check_targets(f, targets)
        mask = targets != self.ignore_index
        return None if bool(mask.all()) else mask

    def term_gradient_mask(self, grad: Tensor) -> Tensor:
        return self.canonical(grad.detach()).ne(0).any(-1)

    def loss_gradient_problem(self, f: Tensor, grad: Tensor) -> str | None:
        """∂/∂f of −log softmax(f)_y is softmax(f) − e_y, whose entries sum to zero over the
        classes — as for every loss that sees f only through softmax(f) (label smoothing, soft
        targets, distillation, focal loss, class weights), since softmax ignores a shift of all
        logits: a gradient with Σₙ |Σ_c ∂L/∂f_nc| > τ Σₙ Σ_c |∂L/∂f_nc| (τ = 10⁻², 5·10⁻² for
        16-bit outputs) comes from another loss, e.g. ``mse_loss`` of a regression. Outputs
        that are already log-probabilities (logsumexp f = 0: a ``LogSoftmax`` model with
        ``nll_loss``) are not checked: there the loss need not be shift-invariant; nor are
        terms with a saturated softmax (max p > 1 − 10⁻³), whose gradient is rounding."""
        logits = self.canonical(f.detach()).float()
        if bool((torch.logsumexp(logits, -1).abs() < 1e-2).all()):
            return None
        # terms whose softmax is saturated (max p > 1 − 10⁻³: p_y may round to 1, its entry
        # to 0) carry only rounding: left out
        unsaturated = torch.softmax(logits, -1).amax(-1) < 1 - 1e-3
        if not bool(unsaturated.any()):
            return None
        g = self.canonical(grad.detach())[unsaturated]
        size = torch.linalg.vector_norm(g, 1, dtype=torch.float64)
        if not bool(torch.isfinite(size)) or float(size) == 0.0:
            return None
        share = float(g.sum(-1, dtype=torch.float64).abs().sum() / size)
        if share <= (5e-2 if grad.element_size() < 4 else 1e-2):
            return None
        return (
            f"the loss's gradient with respect to the model's outputs does not sum to zero over "
            f"the classes (|Σ_c| is {share:.2g} of its size), as it does for cross-entropy and "
            "any loss of softmax(f): the loss is not the categorical likelihood's negative "
            "log-likelihood (e.g. mse_loss of a regression). Pass the likelihood your loss is "
            "the negative log of (likelihood='gaussian' for ½‖f − y‖², 'bernoulli' for BCE with "
            "logits), or Categorical(class_dim=1) if the classes are not in the last dimension; "
            "otherwise natgrad's Fisher is not your loss's curvature (harmless only for a small "
            "deliberate extra term such as a z-loss)"
        )

    def mask_rows(self, rows: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return rows
        canonical = self.canonical_rows(rows)
        return self._restore(canonical * mask.unsqueeze(-1).to(rows.dtype), lead=1)

    def canonical_rows(self, rows: Tensor) -> Tensor:
        """Rows (K, *f.shape) with the classes last."""
        dim = self.class_dim % (rows.dim() - 1)
        return rows if dim == rows.dim() - 2 else rows.movedim(1 + dim, -1)

    # -- the distribution ---------------------------------------------------------------------
    def sample(self, f: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        return self.sample_terms(f, num_samples, generator, None)

    def sample_terms(self, f: Tensor, num_samples: int, generator: torch.Generator | None,
                     mask: Tensor | None) -> Tensor:
        """ŷ of shape (S, N, d₁, …): ``multinomial(softmax(z), S, replacement=True)`` over the
        terms in ``mask`` taken in row-major order (all terms if ``None``); the other terms
        get ``ignore_index``. For (N, C) logits: ``multinomial(softmax(z), S).T``."""
        z = self.canonical(f.detach())
        flat = z.reshape(-1, z.shape[-1])
        if mask is None:
            draws = torch.multinomial(torch.softmax(flat, dim=-1), num_samples,
                                      replacement=True, generator=generator)
            return draws.T.reshape(num_samples, *z.shape[:-1]).contiguous()
        keep = mask.reshape(-1)
        out = torch.full((num_samples, flat.shape[0]), self.ignore_index, dtype=torch.long,
                         device=f.device)
        if bool(keep.any()):
            draws = torch.multinomial(torch.softmax(flat[keep], dim=-1), num_samples,
                                      replacement=True, generator=generator)
            out[:, keep] = draws.T
        return out.reshape(num_samples, *z.shape[:-1])

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """Σ over an example's non-ignored terms of log p(y | z): shape (N,)."""
        z = self.canonical(f)
        y = y.long()
        keep = y != self.ignore_index
        picked = torch.log_softmax(z, dim=-1).gather(-1, torch.where(keep, y, 0).unsqueeze(-1))
        return (picked.squeeze(-1) * keep.to(z.dtype)).reshape(z.shape[0], -1).sum(1)

    def grad_log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """onehot(y) − softmax(z) at the non-ignored terms, 0 at the ignored ones."""
        z = self.canonical(f)
        y = y.long()
        keep = y != self.ignore_index
        onehot = torch.nn.functional.one_hot(torch.where(keep, y, 0), z.shape[-1]).to(z.dtype)
        grad = (onehot - torch.softmax(z, dim=-1)) * keep.unsqueeze(-1).to(z.dtype)
        return self._restore(grad)

    def entropy(self, f: Tensor) -> Tensor:
        """H = Σ over positions of −Σ_c p_c log p_c, p = softmax(z) (every position: the
        optimizers' statistics see no targets, so padding counts too)."""
        logp = torch.log_softmax(self.canonical(f.detach()).double(), dim=-1)
        return -(logp.exp() * logp).sum()

    def _position_roots(self, z: Tensor) -> Tensor:
        """B per term for canonical logits z (…, C): shape (…, C, C)."""
        p = torch.softmax(z, dim=-1)
        sqrt_p = p.sqrt()
        return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        """B (N, C', C') with C' = f[0].numel(): block diagonal over the positions, in f's
        flattened order (for (N, C) logits: diag(√p) − p √pᵀ)."""
        z = self.canonical(f)
        if z.dim() == 2:
            return self._position_roots(z)
        num, classes = z.shape[0], z.shape[-1]
        blocks = self._position_roots(z.reshape(num, -1, classes))  # (N, T, C, C)
        size = blocks.shape[1] * classes
        B = z.new_zeros(num, size, size)
        for t in range(blocks.shape[1]):
            B[:, t * classes:(t + 1) * classes, t * classes:(t + 1) * classes] = blocks[:, t]
        order = self.canonical(torch.arange(size, device=f.device).reshape(f.shape[1:])
                               .unsqueeze(0)).reshape(-1)  # canonical position -> f's
        out = torch.zeros_like(B)
        out[:, order.unsqueeze(1), order.unsqueeze(0)] = B
        return out

    def fisher_rows(self, f: Tensor) -> Tensor:
        """Rows with Σₖ r_k r_kᵀ = D, each nonzero at one position: (T·(C − 1), N, *f.shape[1:])
        for T positions per example (C − 1 rows for (N, C) logits).

        Per position D has rank C − 1 (B √p = 0), so one row of B is redundant. With
        b_k = √p_k (e_k − p) the columns of B and j = argmin p, a Householder reflection
        swapping e_j and √p gives r_k = b_k + b_j √p_k / (1 − √p_j), k ≠ j. A row spanning
        several positions would add cross terms between them to Σₖ r_k r_kᵀ, so row (t, k)
        holds r_k of position t and zeros elsewhere.
        """
        z = self.canonical(f)
        num, classes = z.shape[0], z.shape[-1]
        flat = z.reshape(-1, classes)
        rows = self._reduced_rows(flat)  # (K₀, N·T, C)
        T = flat.shape[0] // num if num else 1
        if T == 1:
            return self._restore(rows.reshape(rows.shape[0], *z.shape), lead=1)
        k0 = rows.shape[0]
        if T * k0 * z.numel() > _MAX_TRUE_ROW_ELEMENTS:
            raise ValueError(
                f"the true Fisher of logits {tuple(f.shape)} needs {T * k0} cotangent rows "
                f"(one per position and class, {T * k0 * z.numel():.3g} elements): use "
                "fisher_type='mc' for sequence outputs this large")
        rows = rows.reshape(k0, num, T, classes)
        eye = torch.eye(T, dtype=z.dtype, device=z.device)
        spread = torch.einsum("knti,ts->tknsi", rows, eye).reshape(T * k0, num, T, classes)
        return self._restore(spread.reshape(T * k0, *z.shape), lead=1)

    def _reduced_rows(self, z: Tensor) -> Tensor:
        """The C − 1 rows of each of the rows of z (M, C): (C − 1, M, C) (C rows if C < 2)."""
        num, classes = z.shape
        B = self._position_roots(z)
        if classes < 2:
            return B.permute(2, 0, 1)
        p = torch.softmax(z, dim=-1)
        sqrt_p = p.sqrt()
        index = torch.arange(num, device=z.device)
        j = p.argmin(dim=-1)
        b_j = B[index, :, j]  # (M, C)
        coef = sqrt_p / (1 - sqrt_p[index, j]).unsqueeze(-1)  # (M, C)
        R = B + b_j.unsqueeze(-1) * coef.unsqueeze(-2)  # column k is r_k
        keep = torch.ones(num, classes, dtype=torch.bool, device=z.device)
        keep[index, j] = False
        rows = R.transpose(1, 2)[keep].view(num, classes - 1, classes)
        return rows.transpose(0, 1).contiguous()


class _EventDims:
    """``event_dims``: how many trailing dims of the outputs form one loss term (None: an
    example's whole output is one term, M = N). With outputs (N, T, D) and ``event_dims=1``
    each of the N·T positions is a term (M = N·T); the Fisher of an example is unchanged (D is
    the same), only the normalisation 1/M."""

    event_dims: int | None

    def _set_event_dims(self, event_dims: int | None) -> None:
        if event_dims is not None and (isinstance(event_dims, bool)
                                       or not isinstance(event_dims, int) or event_dims < 1):
            raise ValueError(f"event_dims must be None or an integer >= 1, got {event_dims!r}")
        self.event_dims = event_dims

    def term_shape(self, f: Tensor) -> tuple[int, ...]:
        if self.event_dims is None:
            return tuple(f.shape[:1])
        if f.dim() < 1 + self.event_dims:
            raise ValueError(
                f"{self.name} likelihood with event_dims={self.event_dims} needs outputs with at "  # type: ignore[attr-defined]
                f"least {1 + self.event_dims} dims (N, …, event), got {tuple(f.shape)}")
        return tuple(f.shape[:f.dim() - self.event_dims])

    def __repr__(self) -> str:
        extra = "" if self.event_dims is None else f"event_dims={self.event_dims}"
        return f"{type(self).__name__}({extra})"


class Gaussian(_EventDims, Likelihood):
    """Gaussian with mean μ = f (any shape (N, ...)) and unit variance.

    log p(y | μ) = −½‖y − μ‖² − (C/2) log 2π;  ∇_μ log p = y − μ;  D = B = I.
    ``event_dims``: see :class:`_EventDims` (default: one loss term per example).
    """

    name = "gaussian"

    def __init__(self, event_dims: int | None = None) -> None:
        self._set_event_dims(event_dims)

    def check_outputs(self, f: Tensor) -> None:
        if f.dim() < 1 or not f.is_floating_point():
            raise ValueError(f"gaussian likelihood expects float outputs (N, ...), got {f.shape}")
        _check_finite(f)

    def check_targets(self, f: Tensor, y: Tensor) -> None:
        if not y.is_floating_point():
            raise ValueError(f"gaussian targets must be floating point, got {y.dtype}")
        if y.shape != f.shape:
            raise ValueError(
                f"gaussian targets must have the outputs' shape {tuple(f.shape)}, "
                f"got {tuple(y.shape)}"
            )
        if not torch.isfinite(y).all():
            raise ValueError("gaussian targets contain NaN or inf")

    def sample(self, f: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(
            (num_samples, *f.shape), generator=generator, device=f.device, dtype=f.dtype
        )
        return f.detach().unsqueeze(0) + noise

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        sq = (y - f).pow(2).flatten(1).sum(1)
        return -0.5 * sq - 0.5 * f[0].numel() * math.log(2 * math.pi)

    def grad_log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        return y - f

    def entropy(self, f: Tensor) -> Tensor:
        """H = ½ log(2πe) per output (unit variance: independent of f)."""
        return torch.tensor(0.5 * math.log(2 * math.pi * math.e) * f.numel(),
                            dtype=torch.float64, device=f.device)

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        c = f[0].numel()
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], c, c)


class Bernoulli(_EventDims, Likelihood):
    """Independent Bernoulli per output with logits z (any shape (N, ...)); targets in [0, 1].

    log p(y | z) = Σ y z − softplus(z);  ∇_z log p = y − σ(z);  D = diag(p(1 − p)), B = √D.
    ``event_dims``: see :class:`_EventDims` (default: one loss term per example).
    """

    name = "bernoulli"

    def __init__(self, event_dims: int | None = None) -> None:
        self._set_event_dims(event_dims)

    def check_outputs(self, f: Tensor) -> None:
        if f.dim() < 1 or not f.is_floating_point():
            raise ValueError(f"bernoulli likelihood expects float logits (N, ...), got {f.shape}")
        _check_finite(f)

    def check_targets(self, f: Tensor, y: Tensor) -> None:
        if y.shape != f.shape:
            raise ValueError(
                f"bernoulli targets must have the logits' shape {tuple(f.shape)}, "
                f"got {tuple(y.shape)}"
            )
        yf = y.to(f.dtype)
        if not torch.isfinite(yf).all() or (yf < 0).any() or (yf > 1).any():
            raise ValueError("bernoulli targets must lie in [0, 1]")

    def sample(self, f: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = torch.sigmoid(f.detach()).unsqueeze(0).expand(num_samples, *f.shape)
        return torch.bernoulli(p, generator=generator)

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        y = y.to(f.dtype)
        return (y * f - torch.nn.functional.softplus(f)).flatten(1).sum(1)

    def grad_log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        return y.to(f.dtype) - torch.sigmoid(f)

    def entropy(self, f: Tensor) -> Tensor:
        """H = Σ over outputs of softplus(z) − z σ(z) (the binary entropy of p = σ(z))."""
        z = f.detach().double()
        return (torch.nn.functional.softplus(z) - z * torch.sigmoid(z)).sum()

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f.flatten(1))
        return torch.diag_embed((p * (1 - p)).sqrt())


_LIKELIHOODS: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """The :class:`Likelihood` for a name in {"categorical", "gaussian", "bernoulli"}; a
    :class:`Likelihood` instance (e.g. a custom subclass) is returned as is.

    Raises:
        ValueError: an unknown name, listing the known ones.

    Example:
        >>> lik = get_likelihood("categorical")
        >>> lik.fisher(torch.zeros(1, 2))  # D = diag(p) − p pᵀ at p = (½, ½)
        tensor([[[ 0.2500, -0.2500],
                 [-0.2500,  0.2500]]])
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    try:
        return _LIKELIHOODS[likelihood]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown likelihood {likelihood!r}; choose one of {sorted(_LIKELIHOODS)}"
        ) from None


_FISHER_TYPES = ("true", "mc", "empirical")


def check_fisher_type(fisher_type: str, mc_samples: int) -> None:
    """Raise ``ValueError`` for an unknown fisher_type or a bad sample count."""
    if fisher_type not in _FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; choose one of {_FISHER_TYPES}")
    if fisher_type == "mc" and (not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")


def num_terms(likelihood: Likelihood, f: Tensor, targets: Tensor | None = None) -> int:
    """M, the number of loss terms of outputs f that count: the non-ignored positions when
    ``targets`` are given (categorical ``ignore_index``), else every position
    (:meth:`Likelihood.term_shape`); M = N for outputs with one term per example."""
    mask = likelihood.term_mask(f, targets)
    if mask is not None:
        return int(mask.sum())
    return math.prod(likelihood.term_shape(f))


def cotangent_rows(
    likelihood: Likelihood,
    f: Tensor,
    fisher_type: FisherType,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rows r_{nk} such that F = (1/M) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ, shape (K, N, *f.shape[1:]),
    M = :func:`num_terms` (the caller divides by it).

    - ``"true"``: Σₖ r_{nk} r_{nk}ᵀ = D(fₙ) (the columns of B, or C − 1 rows per position for
      the categorical likelihood, see :meth:`Likelihood.fisher_rows`);
    - ``"mc"``: r_{ns} = ∇_f log p(ŷ_s | fₙ) / √S with ŷ_s ~ p(y | fₙ), s = 1..S, one ŷ per
      position (so r_{ns} is the gradient of the sampled sequence's log-likelihood);
    - ``"empirical"``: r_{n1} = ∇_f log p(yₙ | fₙ) with the training targets yₙ.

    Terms that ``targets`` mark as ignored (categorical ``ignore_index``) get zero rows and no
    sample, for every type; without targets ("true", "mc") every term counts.
    ``f`` is detached: the rows are constants for the backward pass through the network.

    Raises:
        ValueError: "empirical" without ``targets``, targets that do not fit the likelihood, or
            an unknown ``fisher_type``.

    Example:
        >>> f = torch.zeros(4, 3)  # 4 examples, 3 logits
        >>> tuple(cotangent_rows(get_likelihood("categorical"), f, "true").shape)  # K = C − 1
        (2, 4, 3)
        >>> rows = cotangent_rows(get_likelihood("categorical"), f, "mc", mc_samples=5,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> tuple(rows.shape)  # K = S rows, each ∇_f log p(ŷ | f) / √S
        (5, 4, 3)
        >>> tuple(cotangent_rows(get_likelihood("categorical"), torch.zeros(4, 7, 3),
        ...                      "true").shape)  # (N, T, C) logits: K = T·(C − 1)
        (14, 4, 7, 3)
    """
    f = f.detach()
    if fisher_type == "empirical" and targets is None:
        raise ValueError(
            "fisher_type='empirical' needs the training targets: pass data as "
            "(inputs, targets) batches"
        )
    if fisher_type not in _FISHER_TYPES:
        check_fisher_type(fisher_type, mc_samples)
    mask = likelihood.term_mask(f, targets) if targets is not None else None
    if fisher_type == "true":
        return likelihood.mask_rows(likelihood.fisher_rows(f), mask)
    if fisher_type == "mc":
        y_hat = likelihood.sample_terms(f, mc_samples, generator, mask)  # (S, N, ...)
        grads = torch.stack([likelihood.grad_log_prob(f, y) for y in y_hat])
        return likelihood.mask_rows(grads, mask) / math.sqrt(mc_samples)
    likelihood.check_targets(f, targets)  # type: ignore[arg-type]
    rows = likelihood.grad_log_prob(f, targets).unsqueeze(0)  # type: ignore[arg-type]
    return likelihood.mask_rows(rows, mask)
