"""Predictive distributions p(y | f) that a network's output f parametrizes.

For each likelihood this module gives what the Fisher needs in output space:

| name          | f         | D(f) = E_ŷ[∇_f log p ∇_f log pᵀ] | B with B Bᵀ = D           |
|---------------|-----------|-----------------------------------|---------------------------|
| categorical   | logits z  | diag(p) − p pᵀ, p = softmax(z)    | diag(√p) − p √pᵀ          |
| gaussian      | mean μ    | I (unit variance)                 | I                         |
| bernoulli     | logits z  | diag(p(1 − p)), p = σ(z)          | diag(√(p(1 − p)))         |

All Fisher types reduce to *cotangent rows* r_{nk} in output space, one set per example n, such
that the Fisher is F = (1/N) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ (see :func:`cotangent_rows`).
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
]


class Likelihood(ABC):
    """A predictive distribution p(y | f) for a batch of outputs f of shape (N, ...)."""

    name: str

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


class Categorical(Likelihood):
    """Categorical over the last dimension of logits z of shape (N, C); targets: class indices.

    log p(y | z) = z_y − logsumexp(z);  ∇_z log p = onehot(y) − softmax(z);
    D = diag(p) − p pᵀ;  B = diag(√p) − p √pᵀ (B Bᵀ = D because Σ p = 1).
    """

    name = "categorical"

    def check_outputs(self, f: Tensor) -> None:
        if f.dim() != 2:
            raise ValueError(
                f"categorical likelihood expects logits of shape (N, C), got {tuple(f.shape)}"
            )
        _check_finite(f)

    def check_targets(self, f: Tensor, y: Tensor) -> None:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"categorical likelihood expects integer class indices as targets, got {y.dtype}"
            )
        if y.shape != f.shape[:1]:
            raise ValueError(
                f"categorical targets must have shape (N,) = {tuple(f.shape[:1])}, "
                f"got {tuple(y.shape)}"
            )
        num_classes = f.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"categorical targets must lie in [0, {num_classes}) for {num_classes} logits, "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )

    def sample(self, f: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        probs = torch.softmax(f.detach(), dim=-1)
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        return draws.T.contiguous()

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(f, dim=-1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def grad_log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        onehot = torch.nn.functional.one_hot(y.long(), f.shape[-1]).to(f.dtype)
        return onehot - torch.softmax(f, dim=-1)

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        sqrt_p = p.sqrt()
        return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)

    def fisher_rows(self, f: Tensor) -> Tensor:
        """C − 1 rows with Σₖ r_k r_kᵀ = D: D has rank C − 1 (B √p = 0), so one row of B is
        redundant. With b_k = √p_k (e_k − p) the columns of B and j = argmin p, a Householder
        reflection swapping e_j and √p gives r_k = b_k + b_j √p_k / (1 − √p_j), k ≠ j.
        """
        num, classes = f.shape
        if classes < 2:
            return super().fisher_rows(f)
        p = torch.softmax(f, dim=-1)
        sqrt_p = p.sqrt()
        B = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
        index = torch.arange(num, device=f.device)
        j = p.argmin(dim=-1)
        b_j = B[index, :, j]  # (N, C)
        coef = sqrt_p / (1 - sqrt_p[index, j]).unsqueeze(-1)  # (N, C)
        R = B + b_j.unsqueeze(-1) * coef.unsqueeze(-2)  # column k is r_k
        keep = torch.ones(num, classes, dtype=torch.bool, device=f.device)
        keep[index, j] = False
        rows = R.transpose(1, 2)[keep].view(num, classes - 1, classes)
        return rows.transpose(0, 1).contiguous()


class Gaussian(Likelihood):
    """Gaussian with mean μ = f (any shape (N, ...)) and unit variance.

    log p(y | μ) = −½‖y − μ‖² − (C/2) log 2π;  ∇_μ log p = y − μ;  D = B = I.
    """

    name = "gaussian"

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

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        c = f[0].numel()
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], c, c)


class Bernoulli(Likelihood):
    """Independent Bernoulli per output with logits z (any shape (N, ...)); targets in [0, 1].

    log p(y | z) = Σ y z − softplus(z);  ∇_z log p = y − σ(z);  D = diag(p(1 − p)), B = √D.
    """

    name = "bernoulli"

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


def cotangent_rows(
    likelihood: Likelihood,
    f: Tensor,
    fisher_type: FisherType,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rows r_{nk} such that F = (1/N) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ, shape (K, N, *f.shape[1:]).

    - ``"true"``: Σₖ r_{nk} r_{nk}ᵀ = D(fₙ) (the columns of B, or C − 1 rows for the
      categorical likelihood, see :meth:`Likelihood.fisher_rows`);
    - ``"mc"``: r_{ns} = ∇_f log p(ŷ_s | fₙ) / √S with ŷ_s ~ p(y | fₙ), s = 1..S;
    - ``"empirical"``: r_{n1} = ∇_f log p(yₙ | fₙ) with the training targets yₙ.

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
    """
    f = f.detach()
    if fisher_type == "true":
        return likelihood.fisher_rows(f)
    if fisher_type == "mc":
        y_hat = likelihood.sample(f, mc_samples, generator)  # (S, N, ...)
        grads = torch.stack([likelihood.grad_log_prob(f, y) for y in y_hat])
        return grads / math.sqrt(mc_samples)
    if fisher_type == "empirical":
        if targets is None:
            raise ValueError(
                "fisher_type='empirical' needs the training targets: pass data as "
                "(inputs, targets) batches"
            )
        likelihood.check_targets(f, targets)
        return likelihood.grad_log_prob(f, targets).unsqueeze(0)
    check_fisher_type(fisher_type, mc_samples)
    raise AssertionError("unreachable")
