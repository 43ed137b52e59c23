"""Running Kronecker curvature for K-FAC and EK-FAC optimizers.

Per Linear/Conv2d layer l, on factor-update steps the batch statistics
Ā_t = Σ ā āᵀ / (N·S) and G_t = Σ g gᵀ / M (M loss terms, M = N for (N, C) outputs; see
:mod:`natgrad.normalisation` and :mod:`natgrad.fisher.kfac`) enter exponential
moving averages Ā ← β Ā + (1 − β) Ā_t, G ← β G + (1 − β) G_t (the first update copies them);
every ``inverse_update_period`` steps the eigendecompositions Ā = Q_A diag(s_A) Q_Aᵀ and
G = Q_G diag(s_G) Q_Gᵀ are refreshed (Martens & Grosse 2015, §8). EK-FAC (George et al. 2018)
replaces the eigenvalues s_G s_Aᵀ by S, the second moment of per-example gradients projected
into the basis, re-estimated every ``scale_update_period`` steps (S ← β S + (1 − β) S_t, and
S ← S_t whenever the basis changes). A layer with one-hot inputs (``nn.Embedding``) keeps Ā as
the vector f of Ā = diag(f), its own eigenvalues (no Q_A): see :mod:`natgrad._diagonal_inputs`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from natgrad import _diagonal_inputs as diagonal_inputs
from natgrad import distributed
from natgrad._linalg import EigenDecompositionError, sym_eig
from natgrad.capture import KFACLayer, Statistics
from natgrad.fisher.ekfac import projected_second_moment
from natgrad.layers.sharing import KFACApprox, check_kfac_approx, factor_sums
from natgrad.normalisation import kfac_divisors, per_example_divisor
from natgrad.optim import eigenbasis, factored
from natgrad.optim._accumulate import Accumulate, accumulate

__all__ = ["CurvatureConfig", "KroneckerCurvature", "join_parts"]

DampingMode = Literal["exact", "factored"]


def _check_period(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class CurvatureConfig:
    """How the Kronecker curvature is estimated and damped (validated on creation).

    ``damping_mode="exact"`` solves (G ⊗ Ā + δI)⁻¹ exactly in the Kronecker eigenbasis;
    ``"factored"`` uses Tikhonov damping split between the factors,
    (Ā + π√δ I)⁻¹ ⊗ (G + √δ/π I)⁻¹ with π² = (tr Ā / dim Ā)/(tr G / dim G). EK-FAC uses
    ``scale_update_period``; K-FAC leaves it ``None``. ``kfac_approx`` ("expand" or
    "reduce") builds the factors of layers applied at several positions per example
    (:mod:`natgrad.layers.sharing`).
    """

    ema_decay: float = 0.95
    factor_update_period: int = 1
    inverse_update_period: int = 10
    damping_mode: DampingMode = "exact"
    scale_update_period: int | None = None
    kfac_approx: KFACApprox = "expand"

    def __post_init__(self) -> None:
        check_kfac_approx(self.kfac_approx)
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        _check_period("factor_update_period", self.factor_update_period)
        _check_period("inverse_update_period", self.inverse_update_period)
        if self.scale_update_period is not None:
            _check_period("scale_update_period", self.scale_update_period)
        if self.damping_mode not in ("exact", "factored"):
            raise ValueError(
                f"damping_mode must be 'exact' or 'factored', got {self.damping_mode!r}"
            )
        if self.scale_update_period is not None and self.damping_mode != "exact":
            raise ValueError("EK-FAC supports damping_mode='exact' only")

    @property
    def ekfac(self) -> bool:
        return self.scale_update_period is not None

    @property
    def per_example(self) -> bool:
        """Whether the statistics must be grouped by example (EK-FAC's scales, K-FAC-reduce)."""
        return self.ekfac or self.kfac_approx == "reduce"


class _Pending:
    """Statistics of the forward passes since the last step, summed."""

    def __init__(self) -> None:
        self.A: list[Tensor] = []
        self.G: list[Tensor] = []
        self.positions: list[int] = []
        self.terms = 0  # M: loss terms (N for (N, C) outputs)
        self.raw: list[Statistics] = []
        self.synchronized = False
        self.nonfinite = 0

    def empty(self) -> bool:
        return self.terms == 0


class KroneckerCurvature:
    """Running K-FAC / EK-FAC curvature of a list of layers, with its preconditioning.

    ``state`` per layer name holds ``A``, ``G``, the eigendecompositions ``s_A, Q_A, s_G, Q_G``
    and, for EK-FAC, ``S``; ``steps`` counts completed optimizer steps.
    """

    def __init__(self, layers: list[KFACLayer], config: CurvatureConfig) -> None:
        self.layers = layers
        self.config = config
        self.steps = 0
        self.state: dict[str, dict[str, Tensor]] = {layer.name: {} for layer in layers}
        self.eigen_failures = 0
        self.eigendecompositions_computed = 0
        self._pending = _Pending()
        self._inverses: dict[str, tuple[float, Tensor, factored.InverseBlocks]] = {}
        self._bases: dict[str, tuple[float, eigenbasis.PaddedBasis]] = {}  # derived data
        # the last damped inverse of each (layer, factor) that succeeded: the fallback if a
        # later one fails; derived data, so not checkpointed
        self._last_inverse: dict[tuple[str, str], factored.InverseBlocks] = {}
        # per layer, the curvature tensors check_undamped found invertible (held, compared by
        # identity: the state replaces, never mutates, them)
        self._invertible: dict[str, tuple[Tensor, ...]] = {}

    # -- scheduling -------------------------------------------------------------------------
    def _due(self, period: int | None) -> bool:
        return period is not None and self.steps % period == 0

    def wants_statistics(self) -> bool:
        """Whether the coming step updates factors or EK-FAC scales (so needs statistics)."""
        return self._due(self.config.factor_update_period) or self._due(
            self.config.scale_update_period
        )

    # -- statistics ----------------------------------------------------------------------------
    def add(self, stats: Statistics, num_terms: int) -> None:
        """Accumulate one forward pass's per-layer (ā, g) and its M loss terms into the
        pending sums."""
        pending = self._pending
        first = pending.empty()
        for i, (layer, (a, g)) in enumerate(zip(self.layers, stats, strict=True)):
            dtype = self._dtype(layer)
            A, G, rows = factor_sums(a, g, self.config.kfac_approx, layer.in_dim,
                                     layer.diagonal_inputs, dtype, layer.kind.supports_reduce)
            if first:
                pending.A.append(A)
                pending.G.append(G)
                pending.positions.append(rows)
            else:
                pending.A[i] += A
                pending.G[i] += G
                pending.positions[i] += rows
        pending.terms += num_terms
        if self.config.ekfac:
            pending.raw.append([(a.detach(), g.detach()) for a, g in stats])

    def synchronize(self) -> None:
        """Sum the pending statistics over all ranks (once per step; a no-op in one process).

        Every rank calls this on the same steps (those where :meth:`wants_statistics`), so the
        collective always matches; a rank without statistics contributes zeros.
        """
        pending = self._pending
        if pending.synchronized or not distributed.is_distributed():
            return
        pending.synchronized = True
        if not self.wants_statistics():
            return
        if pending.empty():
            pending.A = [diagonal_inputs.empty_input_factor(
                layer.in_dim, layer.diagonal_inputs,
                layer.weight.new_zeros((), dtype=self._dtype(layer))) for layer in self.layers]
            pending.G = [layer.weight.new_zeros(layer.out_dim, layer.out_dim)
                         .to(self._dtype(layer)) for layer in self.layers]
            pending.positions = [0] * len(self.layers)
        counts = torch.tensor(
            [float(pending.nonfinite), float(pending.terms), *map(float, pending.positions)],
            dtype=torch.float64, device=pending.A[0].device,
        )
        reduced = distributed.sum_across_ranks([counts, *pending.A, *pending.G])
        counts, rest = reduced[0], reduced[1:]
        n = len(self.layers)
        pending.A, pending.G = rest[:n], rest[n:]
        pending.nonfinite = int(counts[0].item())
        pending.terms = int(counts[1].item())
        pending.positions = [int(c) for c in counts[2:].tolist()]

    @staticmethod
    def _dtype(layer: KFACLayer) -> torch.dtype:
        return torch.promote_types(layer.weight.dtype, torch.float32)

    def remove_layers(self, names: set[str]) -> None:
        """Forget these layers (they take the fallback step from now on)."""
        keep = [i for i, layer in enumerate(self.layers) if layer.name not in names]
        pending = self._pending
        if not pending.empty():
            pending.A = [pending.A[i] for i in keep]
            pending.G = [pending.G[i] for i in keep]
            pending.positions = [pending.positions[i] for i in keep]
            pending.raw = [[stats[i] for i in keep] for stats in pending.raw]
        self.layers = [self.layers[i] for i in keep]
        for name in names:
            self.state.pop(name, None)
            self._inverses.pop(name, None)
            self._bases.pop(name, None)
            self._last_inverse.pop((name, "A"), None)
            self._last_inverse.pop((name, "G"), None)

    def mark_nonfinite(self) -> None:
        """Record a forward pass whose outputs were not finite: this step will be skipped."""
        self._pending.nonfinite += 1

    def rescale_pending_gradients(self, factor: float) -> None:
        """Multiply the output gradients g of the pending statistics by ``factor`` (G by its
        square), e.g. 1/s for statistics captured from a loss scaled by s."""
        pending = self._pending
        pending.G = [G.mul_(factor * factor) for G in pending.G]
        pending.raw = [[(a, g * factor) for a, g in stats] for stats in pending.raw]

    def discard_pending(self) -> None:
        """Drop the statistics gathered since the last step (e.g. for a skipped step)."""
        self._pending = _Pending()

    def pending_finite(self) -> bool:
        """Whether the pending statistics are all finite (after summing over ranks).

        Ā and G are sums of Gram matrices Σ x xᵀ, so their diagonals decide: a non-finite
        x_j makes the j-th diagonal entry non-finite, and |M_ij| ≤ √(M_ii M_jj).
        """
        self.synchronize()
        pending = self._pending
        if pending.nonfinite:
            return False
        diagonals = [diagonal_inputs.factor_diagonal(t) for t in pending.A + pending.G]
        return not diagonals or bool(torch.isfinite(torch.cat(diagonals)).all())

    @property
    def _factored(self) -> bool:
        return self.config.damping_mode == "factored" and not self.config.ekfac

    def has_curvature(self) -> bool:
        key = "A_frozen" if self._factored else "s_A"
        return all(key in self.state[layer.name] for layer in self.layers)

    # -- updates -------------------------------------------------------------------------------
    def update(self) -> None:
        """Apply this step's factor, eigenbasis and scale updates, then count the step."""
        self.synchronize()
        config, pending = self.config, self._pending
        factors_due = self._due(config.factor_update_period)
        if factors_due and not pending.empty():
            beta = config.ema_decay
            for i, layer in enumerate(self.layers):
                st = self.state[layer.name]
                # the pending sums are this step's own tensors: scaled in place into the new
                # averages (new tensors for the state: frozen factors may share the old ones)
                rows, terms = kfac_divisors(pending.positions[i], pending.terms)
                for key, total, count in (("A", pending.A[i], rows), ("G", pending.G[i], terms)):
                    if key in st:
                        st[key] = total.mul_((1 - beta) / count).add_(st[key], alpha=beta)
                    else:
                        st[key] = total.div_(count)
        new_basis = self._due(config.inverse_update_period) or not self.has_curvature()
        if new_basis:
            if not all("A" in self.state[layer.name] for layer in self.layers):
                raise RuntimeError(
                    "no curvature statistics were captured before the first step: run the "
                    "model's forward pass with gradients enabled before step()"
                )
            self._refresh_bases()
        if config.ekfac and not pending.empty() and (
            new_basis or self._due(config.scale_update_period)
        ):
            self._update_scales(reset=new_basis)
        elif config.ekfac and new_basis:
            for layer in self.layers:  # no per-example data: start from K-FAC's eigenvalues
                st = self.state[layer.name]
                st["S"] = torch.outer(st["s_G"], st["s_A"])
            self._bases.clear()
        self._pending = _Pending()
        self.steps += 1

    def _refresh_bases(self) -> None:
        """Eigendecompose every factor; across ranks each is computed once, by cost (n³).

        Factored damping needs no eigendecomposition: the factors are frozen as they are now
        (with π) and inverted by Cholesky when a damping value is first used.
        """
        self._inverses.clear()
        self._bases.clear()
        if self._factored:
            for layer in self.layers:
                st = self.state[layer.name]
                st["A_frozen"], st["G_frozen"] = st["A"], st["G"]  # EMA makes new tensors
                st["pi"] = torch.tensor(_pi(st["A"], st["G"]), dtype=torch.float64)
            return
        for layer in self.layers:  # a diagonal Ā is its own eigenvalues, its basis I
            if layer.diagonal_inputs:
                st = self.state[layer.name]
                st["s_A"] = st["A"].clamp(min=0)
        jobs = [(layer, factor) for layer in self.layers for factor in ("A", "G")
                if not (factor == "A" and layer.diagonal_inputs)]
        owners = distributed.assign_by_cost(
            [float(self.state[lay.name][f].shape[0]) ** 3 for lay, f in jobs],
            distributed.world_size(),
        )
        me = distributed.rank()
        for (layer, factor), owner in zip(jobs, owners, strict=True):  # all ranks at once
            st = self.state[layer.name]
            if owner == me:
                self._eigendecompose(layer, factor)
            elif f"Q_{factor}" not in st:
                dim = st[factor].shape[0]
                st[f"s_{factor}"] = st[factor].new_empty(dim)
                st[f"Q_{factor}"] = st[factor].new_empty(dim, dim)
        for (layer, factor), owner in zip(jobs, owners, strict=True):  # then share them
            st = self.state[layer.name]
            distributed.broadcast_from([st[f"s_{factor}"], st[f"Q_{factor}"]], owner)

    def _eigendecompose(self, layer: KFACLayer, factor: str) -> None:
        """s, Q of one factor; on failure keep the previous ones (or the diagonal) and warn."""
        st = self.state[layer.name]
        self.eigendecompositions_computed += 1
        try:
            s, Q = sym_eig(st[factor], f"the {factor} factor of {layer.name!r}")
        except EigenDecompositionError as err:
            self.eigen_failures += 1
            keep = f"Q_{factor}" in st
            warnings.warn(
                f"{err}; "
                + ("keeping the previous eigendecomposition" if keep
                   else "using the factor's diagonal until a decomposition succeeds"),
                RuntimeWarning,
                stacklevel=4,
            )
            if keep:
                return
            s = torch.nan_to_num(st[factor].diagonal(), nan=0.0, posinf=0.0)
            Q = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        st[f"s_{factor}"], st[f"Q_{factor}"] = s.clamp(min=0), Q

    def _update_scales(self, reset: bool) -> None:
        """S_t = Σ (Q_Gᵀ Γ Q_A)² / M over this step's examples (summed over ranks)."""
        self._bases.clear()
        pending, beta = self._pending, self.config.ema_decay
        sums = []
        for i, layer in enumerate(self.layers):
            st = self.state[layer.name]
            total = torch.zeros(layer.out_dim, layer.in_dim, dtype=st["Q_G"].dtype,
                                device=st["Q_G"].device)
            for stats in pending.raw:
                a, g = stats[i]
                if layer.diagonal_inputs:  # a holds indices; the basis is Q_G ⊗ I
                    total += diagonal_inputs.projected_second_moment(
                        a, g.to(total.dtype), st["Q_G"], layer.in_dim)
                    continue
                total += projected_second_moment(
                    a.to(total.dtype), g.to(total.dtype), st["Q_A"], st["Q_G"]
                )
            sums.append(total)
        for layer, total in zip(self.layers, distributed.sum_across_ranks(sums), strict=True):
            st = self.state[layer.name]
            S_t = total / per_example_divisor(pending.terms)
            st["S"] = S_t if reset or "S" not in st else beta * st["S"] + (1 - beta) * S_t

    # -- undamped solves ---------------------------------------------------------------------
    def check_undamped(self, layer: KFACLayer) -> None:
        """``ValueError`` if the layer's curvature F̂_l is numerically singular, so that
        (F̂_l + 0·I)⁻¹ does not exist: λ_min ≤ d·ε·λ_max for its eigenvalues (Λ = s_G s_Aᵀ for
        K-FAC, S for EK-FAC, those of G and Ā for factored damping; d the dimensions added, ε
        of the curvature's dtype). Call it after :meth:`update`, for damping 0."""
        st = self.state[layer.name]
        keys = (("G_frozen", "A_frozen") if self._factored
                else ("S",) if self.config.ekfac else ("s_G", "s_A"))
        checked = self._invertible.get(layer.name)
        if checked is not None and all(a is st[k] for a, k in zip(checked, keys, strict=True)):
            return  # these very tensors passed before
        if self._factored:
            spectra = [(f"factor {factor} of the K-FAC curvature",
                        st[f"{factor}_frozen"] if st[f"{factor}_frozen"].dim() == 1  # diagonal
                        else sym_eig(st[f"{factor}_frozen"])[0]) for factor in ("G", "A")]
        else:
            Lam = st["S"] if self.config.ekfac else torch.outer(st["s_G"], st["s_A"])
            spectra = [("EK-FAC curvature" if self.config.ekfac else "K-FAC curvature G ⊗ Ā",
                        Lam.flatten())]
        dims = st["G"].shape[0] + st["A"].shape[0]
        for what, s in spectra:
            low, high = float(s.min()), float(s.max())
            if low <= dims * torch.finfo(s.dtype).eps * max(high, 0.0):
                raise ValueError(
                    f"damping=0 but the {what} of layer {layer.name!r} is singular "
                    f"(smallest eigenvalue {low:.3g}, largest {high:.3g}): a rank-deficient "
                    "factor, from inputs that are always zero, dead units or duplicated "
                    "features, has no inverse; pass damping > 0 (nothing was changed)"
                )
        self._invertible[layer.name] = tuple(st[k] for k in keys)

    def snapshot(self) -> Callable[[], None]:
        """Save the state :meth:`update` changes (pending sums cloned: update consumes them
        in place); the returned function restores it."""
        self.synchronize()
        pending = copy.copy(self._pending)
        pending.A = [t.clone() for t in pending.A]
        pending.G = [t.clone() for t in pending.G]
        pending.positions = list(pending.positions)
        pending.raw = list(pending.raw)
        saved = ({name: dict(st) for name, st in self.state.items()}, self.steps,
                 self.eigen_failures, self.eigendecompositions_computed)

        def restore() -> None:
            state, self.steps, self.eigen_failures, self.eigendecompositions_computed = saved
            self.state = {name: dict(st) for name, st in state.items()}
            self._pending = pending
            self._inverses.clear()
            self._bases.clear()

        return restore

    # -- preconditioning -----------------------------------------------------------------------
    def precondition(self, layer: KFACLayer, V: Tensor, damping: float) -> Tensor:
        """(F̂_l + δI)⁻¹ V for the layer's gradient matrix V = [∇W | ∇b] (out, in'), through
        :meth:`precondition_parts`."""
        weight = V[:, : V.shape[1] - int(layer.has_bias)] if layer.has_weight else None
        bias = V[:, -1] if layer.has_bias else None
        return join_parts(*self.precondition_parts(layer, weight, bias, damping))

    def precondition_parts(
        self, layer: KFACLayer, W: Tensor | None, b: Tensor | None, damping: float,
        into: tuple[Accumulate | None, Accumulate | None] = (None, None),
    ) -> tuple[Tensor | None, Tensor | None]:
        """(F̂_l + δI)⁻¹ [W | b] for the parts W (out, in) of the weight (None if frozen) and
        b (out,) of the bias (None if absent or frozen), never forming [W | b].

        Exact damping: Q_G [(Q_Gᵀ V Q_A) ⊘ (Λ + δ)] Q_Aᵀ with Λ = s_G s_Aᵀ (K-FAC) or S
        (EK-FAC), see :mod:`natgrad.optim.eigenbasis`. Factored Tikhonov damping:
        (G + √δ/π I)⁻¹ V (Ā + π√δ I)⁻¹ with cached inverses of the frozen factors, see
        :mod:`natgrad.optim.factored`. ``into`` = (for W, for b): accumulate each part into a
        tensor, T ← β T + α·part (:data:`natgrad.optim._accumulate.Accumulate`), and return T.
        """
        if self._factored:
            G_inv, A_inv = self._factored_inverses(layer, damping)
            dtype = G_inv.dtype
            fused = self._fusable(into, dtype)
            if layer.diagonal_inputs:  # (G_inv W) ⊙ A_invᵀ, A_inv = 1 ⊘ (f + π√δ)
                assert W is not None and A_inv.P is not None  # no bias: the weight trains
                parts = (diagonal_inputs.factored_precondition(G_inv, A_inv.P, W.to(dtype),
                                                               fused[0]), None)
            else:
                parts = factored.precondition(G_inv, A_inv, *self._cast(W, b, dtype), *fused)
        else:
            Q_G = self.state[layer.name]["Q_G"]
            dtype = Q_G.dtype
            fused = self._fusable(into, dtype)
            basis = self._padded_basis(layer, damping)
            if layer.diagonal_inputs:  # Q_G [(Q_Gᵀ W) ⊙ C]
                assert W is not None  # no bias: the weight trains
                parts = (diagonal_inputs.eigen_apply(Q_G, basis.scale, W.to(dtype), fused[0]),
                         None)
            else:
                parts = eigenbasis.precondition(Q_G, basis, *self._cast(W, b, dtype), *fused)
        results: list[Tensor | None] = []
        for part, like, acc, done in zip(parts, (W, b), into, fused, strict=True):
            if part is None or like is None or done is not None:  # absent or accumulated
                results.append(part)
            else:
                results.append(accumulate(part.to(like.dtype), acc))
        return results[0], results[1]

    @staticmethod
    def _fusable(
        into: tuple[Accumulate | None, Accumulate | None], dtype: torch.dtype
    ) -> list[Accumulate | None]:
        """The accumulators whose tensor has the curvature's dtype (the others are served
        after a cast)."""
        return [acc if acc is not None and acc[0].dtype == dtype else None for acc in into]

    @staticmethod
    def _cast(W: Tensor | None, b: Tensor | None, dtype: torch.dtype
              ) -> tuple[Tensor | None, Tensor | None]:
        return (None if W is None else W.to(dtype), None if b is None else b.to(dtype))

    def _padded_basis(self, layer: KFACLayer, damping: float) -> eigenbasis.PaddedBasis:
        """Ā's eigenbasis split at the bias and padded, with 1 ⊘ (Λ + δ); cached until the
        basis, the scales or the damping change."""
        cached = self._bases.get(layer.name)
        if cached is not None and cached[0] == damping:
            return cached[1]
        st = self.state[layer.name]
        eigenvalues = st["S"] if self.config.ekfac else torch.outer(st["s_G"], st["s_A"])
        if layer.diagonal_inputs:  # Ā's basis is I: only C = 1 ⊘ (Λ + δ), unpadded
            basis = eigenbasis.PaddedBasis(None, None, 1 / (eigenvalues + damping))
        else:
            basis = eigenbasis.PaddedBasis.build(st["Q_A"], eigenvalues, damping,
                                                 layer.has_weight, layer.has_bias)
        self._bases[layer.name] = (damping, basis)
        return basis

    def _factored_inverses(
        self, layer: KFACLayer, damping: float
    ) -> tuple[Tensor, factored.InverseBlocks]:
        """(G + √δ/π I)⁻¹ and the blocks of (Ā + π√δ I)⁻¹ of the frozen factors, cached until
        the factors are frozen again or the damping changes."""
        cached = self._inverses.get(layer.name)
        if cached is not None and cached[0] == damping:
            return cached[1], cached[2]
        st = self.state[layer.name]
        pi, root = float(st["pi"]), math.sqrt(damping)
        G_inv = self._damped_inverse(layer, "G", root / pi).P
        A_inv = self._damped_inverse(layer, "A", pi * root)
        assert G_inv is not None
        self._inverses[layer.name] = (damping, G_inv, A_inv)
        return G_inv, A_inv

    def _damped_inverse(self, layer: KFACLayer, factor: str, shift: float
                        ) -> factored.InverseBlocks:
        """(M + shift·I)⁻¹ of a frozen factor M, in blocks at the bias, by Cholesky; if that
        fails (not positive definite in floating point) by eigendecomposition, clamping
        eigenvalues at 0; if that fails too, the last inverse of this process is kept (or the
        diagonal's inverse used) with a warning."""
        st = self.state[layer.name]
        M = st[f"{factor}_frozen"]
        if M.dim() == 1:  # a diagonal Ā: P holds the diagonal 1 ⊘ (f + shift) of the inverse
            return factored.InverseBlocks(1 / (M.clamp(min=0) + shift), None, None)
        has_weight, has_bias = (layer.has_weight, layer.has_bias) if factor == "A" else (
            True, False)
        blocks = factored.damped_inverse_blocks(M, shift, has_weight, has_bias)
        if blocks is None:
            name = f"the damped {factor} factor of {layer.name!r}"
            try:
                s, Q = sym_eig(M, name)
            except EigenDecompositionError as err:
                self.eigen_failures += 1
                previous = self._last_inverse.get((layer.name, factor))
                warnings.warn(f"{err}; " + ("keeping the previous inverse" if previous is not None
                                            else "inverting the diagonal instead"),
                              RuntimeWarning, stacklevel=5)
                if previous is not None:
                    return previous
                diagonal = torch.nan_to_num(M.diagonal(), nan=0.0, posinf=0.0).clamp(min=0)
                return factored.InverseBlocks.from_inverse(torch.diag(1 / (diagonal + shift)),
                                                           has_weight, has_bias)
            blocks = factored.InverseBlocks.from_inverse((Q / (s.clamp(min=0) + shift)) @ Q.T,
                                                         has_weight, has_bias)
        self._last_inverse[layer.name, factor] = blocks
        return blocks

    def curvature_mv(self, layer: KFACLayer, V: Tensor) -> Tensor:
        """F̂_l V (undamped) for the curvature in use: G V Ā of the frozen factors (factored
        damping), else Q_G [(Q_Gᵀ V Q_A) ⊙ Λ] Q_Aᵀ."""
        st = self.state[layer.name]
        if self._factored:
            G, A = st["G_frozen"], st["A_frozen"]
            if layer.diagonal_inputs:
                return diagonal_inputs.kron_mv(G, A, V.to(G.dtype)).to(V.dtype)
            return (G @ V.to(G.dtype) @ A).to(V.dtype)
        Q_G, Q_A = st["Q_G"], st.get("Q_A")
        eigenvalues = st["S"] if self.config.ekfac else torch.outer(st["s_G"], st["s_A"])
        if layer.diagonal_inputs:
            return diagonal_inputs.eigen_apply(Q_G, eigenvalues, V.to(Q_G.dtype)).to(V.dtype)
        return (Q_G @ ((Q_G.T @ V.to(Q_G.dtype) @ Q_A) * eigenvalues) @ Q_A.T).to(V.dtype)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "eigen_failures": self.eigen_failures,
            "layers": {name: dict(st) for name, st in self.state.items()},
        }

    def check_state_dict(self, state: object, excluded: frozenset[str] = frozenset()) -> None:
        """``ValueError`` naming the first way ``state`` does not fit these layers (less
        ``excluded``: layers the state had moved to the fallback), before anything is loaded:
        the layer names; per layer each tensor's name, floating dtype and
        shape (o outputs, i = in' inputs: Ā, Q_A, Ā_frozen (i, i); s_A (i,); G, Q_G, G_frozen
        (o, o); s_G (o,); S (o, i); π ()) — for a layer with one-hot inputs Ā, Ā_frozen and
        s_A are (i,) and there is no Q_A —; the entries that come together; and, through S,
        the kind (K-FAC or EK-FAC) that saved it."""
        if not isinstance(state, dict) or not {"steps", "layers"} <= set(state):
            raise ValueError("the state's curvature needs 'steps' and 'layers': it was not "
                             "saved by a K-FAC optimizer or preconditioner")
        for key in ("steps", "eigen_failures"):
            count = state.get(key, 0)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"the state's {key} must be an integer >= 0, got {count!r}")
        layers = [layer for layer in self.layers if layer.name not in excluded]
        names = {layer.name for layer in layers}
        if not isinstance(state["layers"], dict) or set(state["layers"]) != names:
            saved = sorted(state["layers"]) if isinstance(state["layers"], dict) else None
            raise ValueError(
                f"checkpoint layers {saved} do not match the model's {sorted(names)}"
            )
        kind = "EKFAC" if self.config.ekfac else "KFAC"
        for layer in layers:
            st = state["layers"][layer.name]
            o, i = layer.out_dim, layer.in_dim
            shapes = {"A": (i, i), "Q_A": (i, i), "A_frozen": (i, i), "s_A": (i,),
                      "G": (o, o), "Q_G": (o, o), "G_frozen": (o, o), "s_G": (o,),
                      "S": (o, i), "pi": ()}
            basis = {"s_A", "Q_A", "s_G", "Q_G"}
            if layer.diagonal_inputs:  # Ā = diag(f) stored as f; its eigenbasis is I
                shapes.update(A=(i,), A_frozen=(i,))
                del shapes["Q_A"]
                basis.discard("Q_A")
            where = f"layer {layer.name!r} of the state"
            for key, value in st.items():
                if key not in shapes:
                    raise ValueError(f"{where} has an unknown entry {key!r}")
                if not (isinstance(value, Tensor) and value.is_floating_point()):
                    got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{key} of {where} must be a floating tensor, got {got}")
                if tuple(value.shape) != shapes[key]:
                    raise ValueError(
                        f"{key} of {where} has shape {tuple(value.shape)}, the model's layer "
                        f"({o} outputs, {i} inputs with the bias) needs {shapes[key]}: the "
                        "state belongs to a model with other layer sizes"
                    )
            keys = set(st)
            for together in ({"A", "G"}, basis, {"A_frozen", "G_frozen", "pi"}):
                if keys & together and not together <= keys:
                    raise ValueError(f"{where} has {sorted(keys & together)} without "
                                     f"{sorted(together - keys)}")
            if keys and "A" not in keys:
                raise ValueError(f"{where} has a curvature without its factors A and G")
            if self.config.ekfac and "Q_G" in keys and "S" not in keys:
                raise ValueError(f"{where} has a K-FAC eigenbasis without EK-FAC scales S: it "
                                 f"was saved by KFAC, this is {kind}")
            if not self.config.ekfac and "S" in keys:
                raise ValueError(f"{where} has EK-FAC scales S: it was saved by EKFAC, this "
                                 f"is {kind}")

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` saved, all or nothing (checked by
        :meth:`check_state_dict`), onto this model's devices and curvature dtypes."""
        self.check_state_dict(state)
        self._inverses.clear()
        self._bases.clear()
        self._last_inverse.clear()
        for layer in self.layers:
            device, dtype = layer.weight.device, self._dtype(layer)
            self.state[layer.name] = {
                k: v.to(device=device, dtype=torch.float64 if k == "pi" else dtype)
                for k, v in state["layers"][layer.name].items()
            }
        self.steps = int(state["steps"])
        self.eigen_failures = int(state.get("eigen_failures", 0))
        self._pending = _Pending()


def join_parts(W: Tensor | None, b: Tensor | None) -> Tensor:
    """The layer matrix [W | b] (out, in') from a weight part W (out, in) and a bias part b
    (out,), either of which may be absent."""
    parts = [t if t.dim() == 2 else t[:, None] for t in (W, b) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _pi(A: Tensor, G: Tensor) -> float:
    """π = √((tr Ā / dim Ā) / (tr G / dim G)) (Martens & Grosse 2015, §6.3); 1 if degenerate."""
    a = float(diagonal_inputs.factor_trace(A)) / A.shape[0]
    g = float(G.trace()) / G.shape[0]
    if a <= 0 or g <= 0 or not math.isfinite(a / g):
        return 1.0
    return math.sqrt(a / g)
