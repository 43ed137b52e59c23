"""``fisher_matrix``: the Fisher of a network on data, for every type × structure.

All fisher types share one mechanism: per example n, cotangent rows r_{nk} in output space
(:func:`natgrad.likelihoods.cotangent_rows`) such that F = (1/M) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ,
M the number of loss terms (M = N for (N, C) outputs; the non-ignored positions of sequence
outputs, see :mod:`natgrad.normalisation`).

- dense / block_diagonal / diagonal: per-example gradients Jₙᵀ r_{nk} of every parameter
  (torch.func), for any module that owns parameters;
- kfac / ekfac: one forward pass with the layers' inputs recorded, then one batched backward
  pass of all K rows to the layers' pre-activations, per stack of small batches
  (:mod:`natgrad.fisher.stacking`).

Every structure is the Fisher of the model's eval-mode function, evaluated with natgrad's
training hooks suspended and no buffer written (:mod:`natgrad.fisher.evaluation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from natgrad._diagonal_inputs import input_counts
from natgrad._diagonal_inputs import projected_second_moment as diagonal_second_moment
from natgrad._gram import GramSum
from natgrad._linalg import sym_eig
from natgrad._model_check import check_model
from natgrad.capture import KFACLayer, LayerCapture, find_kfac_layers
from natgrad.fisher.base import FisherMatrix, ParameterLayout
from natgrad.fisher.block_diagonal import BlockDiagonalFisher, module_blocks
from natgrad.fisher.data import Batch, as_batches
from natgrad.fisher.dense import DenseFisher
from natgrad.fisher.diagonal import DiagonalFisher
from natgrad.fisher.ekfac import EKFACFisher, projected_second_moment
from natgrad.fisher.evaluation import evaluation
from natgrad.fisher.kfac import KFACFisher
from natgrad.fisher.matrix_free import MatrixFreeFisher
from natgrad.fisher.per_example import gradient_rows
from natgrad.fisher.stacking import StackPlan
from natgrad.layers.sharing import KFACApprox, check_kfac_approx, factor_rows
from natgrad.likelihoods import (
    FisherType,
    Likelihood,
    LikelihoodName,
    check_fisher_type,
    cotangent_rows,
    get_likelihood,
    num_terms,
)
from natgrad.normalisation import kfac_divisors, per_example_divisor
from natgrad.outputs import OutputSelector, check_output_selector

__all__ = ["STRUCTURES", "Structure", "fisher_matrix", "layer_statistics"]

Structure = Literal["dense", "block_diagonal", "kfac", "ekfac", "diagonal", "matrix_free"]
STRUCTURES: tuple[str, ...] = (
    "dense", "block_diagonal", "kfac", "ekfac", "diagonal", "matrix_free"
)


def _accumulation_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(p for p in model.parameters() if p.requires_grad)
    return torch.promote_types(p.dtype, torch.float32), p.device


def layer_statistics(
    model: nn.Module,
    layers: list[KFACLayer],
    batch: Batch,
    likelihood: Likelihood,
    fisher_type: FisherType,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    per_example: bool = False,
    output: OutputSelector = None,
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Per layer (ā of shape (N, S, in'), g of shape (K, N, S, out)) for one batch, and its
    number of loss terms M (:func:`natgrad.likelihoods.num_terms`).

    One forward pass records the layers' inputs and pre-activations (each layer hands the rest
    of the network a copy, so in-place operations downstream cannot overwrite them); one
    batched backward pass sends the K cotangent rows r_{nk} to every pre-activation:
    g_{nk} = J_aᵀ r_{nk}. N indexes the examples of the model's output (its dim 0).
    """
    inputs, targets = batch
    with torch.enable_grad(), LayerCapture(layers) as capture:
        f = inputs.call(model, output)
    capture.check(f)
    likelihood.check_outputs(f)
    rows = cotangent_rows(likelihood, f, fisher_type, targets, mc_samples, generator)
    return capture.statistics(f, rows, per_example), num_terms(likelihood, f, targets)


def _kfac_factors(
    model: nn.Module, layers: list[KFACLayer], plan: StackPlan, statistics: Callable,
    approx: KFACApprox = "expand",
) -> tuple[list[Tensor], list[Tensor]]:
    """Ā = Σ ā āᵀ / (N·S) and G = Σ g gᵀ / M over all batches, examples, rows and positions
    ("expand", :func:`natgrad.normalisation.kfac_divisors`); "reduce" averages ā and sums g
    over each example's positions first, so Ā's count is N (:mod:`natgrad.layers.sharing`).
    Ā is the vector of its diagonal for layers with one-hot inputs. Small batches are
    stacked by ``plan`` (:mod:`natgrad.fisher.stacking`)."""
    dtype, device = _accumulation_dtype(model)
    like = torch.zeros((), dtype=dtype, device=device)
    # dense rows: GramSum, which stacks the rows of small batches into one Gram (a DataLoader
    # of 16 × 128 examples pays what one batch of 2,048 does; benchmarks/RESULTS.md, issue 16);
    # one-hot inputs: Ā's diagonal, the counts of each index (natgrad._diagonal_inputs)
    A: list[GramSum | Tensor] = [
        like.new_zeros(lay.in_dim) if lay.diagonal_inputs else GramSum(lay.in_dim, dtype, device)
        for lay in layers]
    G = [GramSum(lay.out_dim, dtype, device) for lay in layers]
    positions = [0] * len(layers)
    terms = 0
    for stats, count in plan.run(lambda b: statistics(b, per_example=approx == "reduce")):
        for i, (a, g) in enumerate(stats):
            layer, acc = layers[i], A[i]
            if isinstance(acc, Tensor):  # one-hot inputs: always expand
                acc += input_counts(a, layer.in_dim, dtype)
                a_count = a.shape[0] * a.shape[1]
                G[i].add(g.reshape(-1, g.shape[-1]))
            else:
                a_rows, g_rows = factor_rows(
                    a, g, approx if layer.kind.supports_reduce else "expand")
                acc.add(a_rows)
                G[i].add(g_rows)
                a_count = a_rows.shape[0]
            positions[i] += a_count
        del stats
        terms += count
    _check_terms(terms)
    divisors = [kfac_divisors(n, terms) for n in positions]
    return ([g.result() / d[1] for g, d in zip(G, divisors, strict=True)],
            [(a if isinstance(a, Tensor) else a.result()) / d[0]
             for a, d in zip(A, divisors, strict=True)])


def _check_terms(terms: int) -> None:
    if terms == 0:
        raise ValueError("every target of the data equals the likelihood's ignore_index: there "
                         "is no loss term, and the Fisher (an average over them) is undefined")


def _per_example_fisher(
    model: nn.Module, layout: ParameterLayout, batches: list[Batch], structure: str, rows_of,
    output: OutputSelector = None,
) -> FisherMatrix:
    dtype, device = _accumulation_dtype(model)
    P = layout.num_params
    blocks = module_blocks(model, layout) if structure == "block_diagonal" else []
    # Grams of small batches are stacked into Grams of >= 2,048 rows (natgrad._gram)
    grams = ([GramSum(P, dtype, device)] if structure == "dense" else
             [GramSum(sl.stop - sl.start, dtype, device) for _, sl in blocks])
    diagonal = torch.zeros(P, dtype=dtype, device=device)
    terms = 0
    for inputs, targets in batches:
        with torch.no_grad():
            f = inputs.call(model, output)
        rows, count = rows_of(f, targets)
        for M in gradient_rows(model, layout, inputs, rows, output=output):
            if structure == "dense":
                grams[0].add(M)
            elif structure == "block_diagonal":
                for (_, sl), block in zip(blocks, grams, strict=True):
                    block.add(M[:, sl])
            else:
                diagonal += M.to(dtype).square().sum(0)
        terms += count
    _check_terms(terms)
    acc = [s.result() for s in grams] if grams else [diagonal]
    acc = [a / per_example_divisor(terms) for a in acc]
    if structure == "dense":
        return DenseFisher(acc[0], layout)
    if structure == "block_diagonal":
        return BlockDiagonalFisher(
            [(name, sl, a) for (name, sl), a in zip(blocks, acc, strict=True)], layout
        )
    return DiagonalFisher(acc[0], layout)


def fisher_matrix(
    model: nn.Module,
    data: Iterable | Tensor,
    likelihood: LikelihoodName | Likelihood = "categorical",
    fisher_type: FisherType = "true",
    structure: Structure = "dense",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac_approx: KFACApprox = "expand",
    output: OutputSelector = None,
) -> FisherMatrix:
    """The Fisher information matrix of ``model`` on ``data``, averaged over loss terms.

    F = (1/M) Σₙ Jₙᵀ D(fₙ) Jₙ for ``fisher_type="true"`` (Jₙ = ∂fₙ/∂θ, D the output-space
    Fisher of ``likelihood``); the expectation over ŷ replaced by ``mc_samples`` draws for
    ``"mc"``; F = (1/M) Σₙ ∇θ log p(yₙ|fₙ) ∇θ log p(yₙ|fₙ)ᵀ with the data's targets for
    ``"empirical"``. M = N for (N, C) outputs. For sequence outputs (logits (N, T, C), or
    (N, C, d…) with ``Categorical(class_dim=1)``) an example n is a sequence and M counts its
    positions whose target is not ``ignore_index`` (all positions when the batch has no
    targets): D(fₙ) is block diagonal over positions, "mc" draws one ŷ per position and
    "empirical" uses per-sequence gradients (see :mod:`natgrad.normalisation`).

    ``structure`` picks the representation: ``"dense"``, ``"block_diagonal"``
    (one block per module owning parameters), ``"kfac"`` (G ⊗ Ā per Linear/Conv2d layer),
    ``"ekfac"`` (K-FAC's eigenbasis with re-fitted eigenvalues), ``"diagonal"``, or
    ``"matrix_free"`` (the exact F applied by Jacobian-vector products; ``solve`` by conjugate
    gradient).

    fₙ is the model's **eval-mode** function (Dropout off, BatchNorm on its running
    statistics), whatever mode the model is in: in train mode such layers are random or couple
    the examples, and have no per-example Fisher. The model is left unchanged (modes,
    buffers, ``.grad``, hooks), also when this raises, and natgrad optimizers attached to it
    record nothing from these evaluations (nor from a ``"matrix_free"`` result's later ones).

    Args:
        model: the network; its trainable parameters define θ (DESIGN.md §1). Not modified.
        data: iterable of (inputs, targets) batches (e.g. a DataLoader), or one such pair;
            inputs are a tensor, or a :class:`~natgrad.fisher.data.ModelInputs` (positional
            and keyword arguments) for models called with several or keyword arguments.
            For "kfac"/"ekfac", consecutive small batches of alike shapes are stacked (up to
            2,048 rows per layer and 64 MiB of statistics, or one batch's own) where a check
            shows that stacking keeps the function (:mod:`natgrad.fisher.stacking`).
        likelihood: "categorical" (logits), "gaussian" (unit-variance mean), "bernoulli",
            or an instance such as ``Categorical(ignore_index=-1, class_dim=1)``.
        fisher_type: "true", "mc" or "empirical".
        structure: see above.
        mc_samples: samples ŷ per example for "mc".
        generator: torch.Generator used for "mc" sampling (default: seeded from torch's RNG).
        kfac_approx: for "kfac"/"ekfac", how a layer applied at several positions of one
            example (sequence positions, pixels) enters its factors: "expand" (positions as
            extra examples, the default) or "reduce" (inputs averaged and output gradients
            summed over the positions first); see :mod:`natgrad.layers.sharing`.
        output: which output of the model is f when it returns a dict / ``ModelOutput``,
            tuple or other object: a key, an index or a callable (see
            :func:`natgrad.outputs.output_tensor`); default: the tensor itself, or "logits".

    Returns:
        A :class:`~natgrad.fisher.base.FisherMatrix` with ``to_dense``, ``mv``, ``solve``,
        ``trace`` and ``num_params``, in the model's dtype (at least float32) and device.

    Raises:
        ValueError: unknown likelihood, type or structure; empty data; targets missing for
            "empirical" or not fitting the likelihood (every target ignored included); a
            model output that ``output`` does not select; non-finite outputs; layers that
            "kfac"/"ekfac" do not support (listed), or a layer called twice in one forward;
            a BatchNorm without running statistics; a model random in eval mode.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
        ...                             torch.nn.Linear(3, 2)).double()
        >>> x = torch.randn(8, 4, dtype=torch.float64)
        >>> F = fisher_matrix(model, [(x, None)], "categorical", "true", "kfac")
        >>> F.num_params, tuple(F.to_dense().shape)
        (23, (23, 23))
    """
    check_model(model, "fisher_matrix")
    lik = get_likelihood(likelihood)
    check_fisher_type(fisher_type, mc_samples)
    check_kfac_approx(kfac_approx)
    check_output_selector(output)
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
    layout = ParameterLayout.of(model)
    layers = find_kfac_layers(model) if structure in ("kfac", "ekfac") else []
    batches = as_batches(data)
    if fisher_type == "mc" and generator is None:
        _, device = _accumulation_dtype(model)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(0, 2**62, ()).item()))
    sample_state = generator.get_state() if generator is not None else None

    def rows_of(f: Tensor, targets: Tensor | None) -> tuple[Tensor, int]:
        lik.check_outputs(f)
        rows = cotangent_rows(lik, f, fisher_type, targets, mc_samples, generator)
        return rows, num_terms(lik, f, targets)

    def statistics(batch: Batch, per_example: bool = False
                   ) -> tuple[list[tuple[Tensor, Tensor]], int]:
        return layer_statistics(model, layers, batch, lik, fisher_type, mc_samples, generator,
                                per_example, output)

    with evaluation(model):
        return _structured(model, layout, layers, batches, structure, rows_of, statistics,
                           generator, sample_state, kfac_approx, output)


def _structured(
    model: nn.Module,
    layout: ParameterLayout,
    layers: list[KFACLayer],
    batches: list[Batch],
    structure: str,
    rows_of: Callable[[Tensor, Tensor | None], tuple[Tensor, int]],
    statistics: Callable[..., tuple[list[tuple[Tensor, Tensor]], int]],
    generator: torch.Generator | None,
    sample_state: Tensor | None,
    kfac_approx: KFACApprox = "expand",
    output: OutputSelector = None,
) -> FisherMatrix:
    """``fisher_matrix``'s computation once its arguments are checked (run in eval mode)."""
    if structure == "matrix_free":
        with torch.no_grad():
            prepared = [(inputs, *rows_of(inputs.call(model, output), targets))
                        for inputs, targets in batches]
        terms = sum(count for _, _, count in prepared)
        _check_terms(terms)
        return MatrixFreeFisher(model, layout, [(i, r) for i, r, _ in prepared],
                                num_terms=per_example_divisor(terms), output=output)
    if not layers:
        return _per_example_fisher(model, layout, batches, structure, rows_of, output)

    plan = StackPlan(model, batches, output)
    G, A = _kfac_factors(model, layers, plan, statistics, kfac_approx)
    if structure == "kfac":
        return KFACFisher(layers, G, A, layout)
    # EK-FAC: the same samples again (same generator state), projected into K-FAC's eigenbasis.
    if generator is not None and sample_state is not None:
        generator.set_state(sample_state)
    bases = [(sym_eig(g, f"the G factor of {lay.name!r}")[1],
              None if lay.diagonal_inputs else sym_eig(a, f"the A factor of {lay.name!r}")[1])
             for lay, g, a in zip(layers, G, A, strict=True)]  # a diagonal Ā's basis is I
    scales = [torch.zeros(lay.out_dim, lay.in_dim, dtype=g.dtype, device=g.device)
              for lay, g in zip(layers, G, strict=True)]
    terms = 0
    for stats, count in plan.run(lambda b: statistics(b, per_example=True)):
        for i, (a, g) in enumerate(stats):
            Q_G, Q_A = bases[i]
            if Q_A is None:
                scales[i] += diagonal_second_moment(a, g.to(Q_G.dtype), Q_G, layers[i].in_dim)
            else:
                scales[i] += projected_second_moment(a.to(Q_A.dtype), g.to(Q_G.dtype), Q_A, Q_G)
        terms += count
    return EKFACFisher(layers, [b[0] for b in bases], [b[1] for b in bases],
                       [s / per_example_divisor(terms) for s in scales], layout)
