"""``fisher_matrix``: the Fisher of a network on data, for every type × structure.

All fisher types share one mechanism: per example n, cotangent rows r_{nk} in output space
(:func:`natgrad.likelihoods.cotangent_rows`) such that F = (1/N) Σₙ Σₖ Jₙᵀ r_{nk} r_{nk}ᵀ Jₙ.

- dense / block_diagonal / diagonal: per-example gradients Jₙᵀ r_{nk} of every parameter
  (torch.func), for any module that owns parameters;
- kfac / ekfac: one forward pass with the layers' inputs recorded, then one batched backward
  pass of all K rows to the layers' pre-activations.

Every structure is the Fisher of the model's eval-mode function, evaluated with natgrad's
training hooks suspended and no buffer written (:mod:`natgrad.fisher.evaluation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from natgrad._gram import GramSum
from natgrad._linalg import sym_eig
from natgrad.capture import (
    KFACLayer,
    LayerCapture,
    expand_grads,
    expand_inputs,
    find_kfac_layers,
    output_gradients,
)
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
from natgrad.layers.examples import ExampleAxis
from natgrad.likelihoods import (
    FisherType,
    Likelihood,
    LikelihoodName,
    check_fisher_type,
    cotangent_rows,
    get_likelihood,
)

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
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Per layer (ā of shape (N, S, in'), g of shape (K, N, S, out)) for one batch, and N.

    One forward pass records the layers' inputs and pre-activations (each layer hands the rest
    of the network a copy, so in-place operations downstream cannot overwrite them); one
    batched backward pass sends the K cotangent rows r_{nk} to every pre-activation:
    g_{nk} = J_aᵀ r_{nk}. N indexes the examples of the model's output (its dim 0).
    """
    inputs, targets = batch
    with torch.enable_grad(), LayerCapture(layers) as capture:
        f = inputs.call(model)
    capture.check(f)
    likelihood.check_outputs(f)
    rows = cotangent_rows(likelihood, f, fisher_type, targets, mc_samples, generator)
    return capture.statistics(f, rows, per_example), f.shape[0]


_ROW_GROUP_ELEMENTS = 1 << 22  # bound on the elements of g held at once (all layers)


def _add_factor_statistics(
    model: nn.Module, layers: list[KFACLayer], batch: Batch, likelihood: Likelihood,
    fisher_type: FisherType, mc_samples: int, generator: torch.Generator | None,
    A: list[GramSum], G: list[GramSum],
) -> int:
    """Add one batch's Σ ā āᵀ to A and Σ g gᵀ to G (per layer); return its N.

    As :func:`layer_statistics` (one forward pass, g_{nk} = J_aᵀ r_{nk} by backward passes to
    the pre-activations), but the K cotangent rows go backward in groups of k rows, k the most
    whose g (k·N·Σ_l out_l·S_l elements) stays within ``_ROW_GROUP_ELEMENTS`` (at least one):
    each group's g is added to the Grams and freed before the next, so that the K·N rows of
    the true Fisher (K = C − 1) are never held at once. The factors only need the rows, not
    which example each belongs to.
    """
    inputs, targets = batch
    with torch.enable_grad(), LayerCapture(layers) as capture:
        f = inputs.call(model)
    capture.check(f)
    likelihood.check_outputs(f)
    rows = cotangent_rows(likelihood, f, fisher_type, targets, mc_samples, generator)
    outputs = [capture.output(layer) for layer in layers]
    rowwise = ExampleAxis((), known=False)  # every row its own group: only rows matter here
    for acc, layer in zip(A, layers, strict=True):
        a = expand_inputs(layer, capture.input(layer), rowwise)
        acc.add(a.reshape(-1, a.shape[-1]))
        del a
    group = max(1, _ROW_GROUP_ELEMENTS // max(1, sum(a.numel() for a in outputs)))
    for start in range(0, rows.shape[0], group):
        stop = min(start + group, rows.shape[0])
        grads = output_gradients(f, outputs, rows[start:stop],
                                 retain_graph=stop < rows.shape[0])
        for acc, layer, g in zip(G, layers, grads, strict=True):
            g = expand_grads(layer, g, rowwise)
            acc.add(g.reshape(-1, g.shape[-1]))
        del grads, g
    return f.shape[0]


def _kfac_factors(
    model: nn.Module, layers: list[KFACLayer], batches: list[Batch], add: Callable,
) -> tuple[list[Tensor], list[Tensor]]:
    """Ā = Σ ā āᵀ / (N·S) and G = Σ g gᵀ / N over all batches, examples, rows and positions
    (``add(batch, A, G)``: :func:`_add_factor_statistics`, returning the batch's N)."""
    dtype, device = _accumulation_dtype(model)
    A = [GramSum(lay.in_dim, dtype, device) for lay in layers]
    G = [GramSum(lay.out_dim, dtype, device) for lay in layers]
    examples = sum(add(batch, A, G) for batch in batches)
    return ([g.result() / examples for g in G],
            [a.result() / a.rows for a in A])


def _per_example_fisher(
    model: nn.Module, layout: ParameterLayout, batches: list[Batch], structure: str, rows_of,
) -> FisherMatrix:
    dtype, device = _accumulation_dtype(model)
    P = layout.num_params
    blocks = module_blocks(model, layout) if structure == "block_diagonal" else []
    grams = ([GramSum(P, dtype, device)] if structure == "dense" else
             [GramSum(sl.stop - sl.start, dtype, device) for _, sl in blocks])
    diagonal = torch.zeros(P, dtype=dtype, device=device)
    examples = 0
    for inputs, targets in batches:
        with torch.no_grad():
            f = inputs.call(model)
        rows = rows_of(f, targets)
        for M in gradient_rows(model, layout, inputs, rows):
            if structure == "dense":
                grams[0].add(M)
            elif structure == "block_diagonal":
                for (_, sl), block in zip(blocks, grams, strict=True):
                    block.add(M[:, sl])
            else:
                diagonal += M.to(dtype).square().sum(0)
        examples += inputs.num_examples
    acc = [s.result() / examples for s in grams] if grams else [diagonal / examples]
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
) -> FisherMatrix:
    """The Fisher information matrix of ``model`` on ``data``, averaged over examples.

    F = (1/N) Σₙ Jₙᵀ D(fₙ) Jₙ for ``fisher_type="true"`` (Jₙ = ∂fₙ/∂θ, D the output-space
    Fisher of ``likelihood``); the expectation over ŷ replaced by ``mc_samples`` draws for
    ``"mc"``; F = (1/N) Σₙ ∇θ log p(yₙ|fₙ) ∇θ log p(yₙ|fₙ)ᵀ with the data's targets for
    ``"empirical"``. ``structure`` picks the representation: ``"dense"``, ``"block_diagonal"``
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
        likelihood: "categorical" (logits), "gaussian" (unit-variance mean), "bernoulli".
        fisher_type: "true", "mc" or "empirical".
        structure: see above.
        mc_samples: samples ŷ per example for "mc".
        generator: torch.Generator used for "mc" sampling (default: seeded from torch's RNG).

    Returns:
        A :class:`~natgrad.fisher.base.FisherMatrix` with ``to_dense``, ``mv``, ``solve``,
        ``trace`` and ``num_params``, in the model's dtype (at least float32) and device.

    Raises:
        ValueError: unknown likelihood, type or structure; empty data; targets missing for
            "empirical" or not fitting the likelihood; non-finite outputs; layers that
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
    lik = get_likelihood(likelihood)
    check_fisher_type(fisher_type, mc_samples)
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

    def rows_of(f: Tensor, targets: Tensor | None) -> Tensor:
        lik.check_outputs(f)
        return cotangent_rows(lik, f, fisher_type, targets, mc_samples, generator)

    def statistics(batch: Batch, per_example: bool = False
                   ) -> tuple[list[tuple[Tensor, Tensor]], int]:
        return layer_statistics(model, layers, batch, lik, fisher_type, mc_samples, generator,
                                per_example)

    def add_factors(batch: Batch, A: list[GramSum], G: list[GramSum]) -> int:
        return _add_factor_statistics(model, layers, batch, lik, fisher_type, mc_samples,
                                      generator, A, G)

    with evaluation(model):
        return _structured(model, layout, layers, batches, structure, rows_of, statistics,
                           generator, sample_state, add_factors)


def _structured(
    model: nn.Module,
    layout: ParameterLayout,
    layers: list[KFACLayer],
    batches: list[Batch],
    structure: str,
    rows_of: Callable[[Tensor, Tensor | None], Tensor],
    statistics: Callable[..., tuple[list[tuple[Tensor, Tensor]], int]],
    generator: torch.Generator | None,
    sample_state: Tensor | None,
    add_factors: Callable[[Batch, list[GramSum], list[GramSum]], int],
) -> FisherMatrix:
    """``fisher_matrix``'s computation once its arguments are checked (run in eval mode)."""
    if structure == "matrix_free":
        with torch.no_grad():
            prepared = [(inputs, rows_of(inputs.call(model), targets))
                        for inputs, targets in batches]
        return MatrixFreeFisher(model, layout, prepared)
    if not layers:
        return _per_example_fisher(model, layout, batches, structure, rows_of)

    G, A = _kfac_factors(model, layers, batches, add_factors)
    if structure == "kfac":
        return KFACFisher(layers, G, A, layout)
    # EK-FAC: the same samples again (same generator state), projected into K-FAC's eigenbasis.
    if generator is not None and sample_state is not None:
        generator.set_state(sample_state)
    bases = [(sym_eig(g, f"the G factor of {lay.name!r}")[1],
              sym_eig(a, f"the A factor of {lay.name!r}")[1])
             for lay, g, a in zip(layers, G, A, strict=True)]
    scales = [torch.zeros(lay.out_dim, lay.in_dim, dtype=g.dtype, device=g.device)
              for lay, g in zip(layers, G, strict=True)]
    examples = 0
    for batch in batches:
        stats, count = statistics(batch, per_example=True)
        for i, (a, g) in enumerate(stats):
            Q_G, Q_A = bases[i]
            scales[i] += projected_second_moment(a.to(Q_A.dtype), g.to(Q_G.dtype), Q_A, Q_G)
        examples += count
    return EKFACFisher(layers, [b[0] for b in bases], [b[1] for b in bases],
                       [s / examples for s in scales], layout)
