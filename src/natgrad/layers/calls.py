"""Whether a recorded call of a layer computes what its kind says: a = W h + b.

Kronecker factors are built from the input h a layer's hook sees (its first argument) and the
gradient at its output a, on the assumption that a = W h + b with the layer's own weight and
bias (in its kind's layout; for a diagonal-input kind such as ``nn.Embedding``, a = W e_x with
x the indices in h). A module can match a kind and still break that:

- an ``nn.Linear`` subclass whose ``forward`` rescales its weight (equalised learning rate,
  F.linear(h, c W, b)): its gradient is c times the one the factors describe;
- an ``nn.Embedding`` subclass called with something other than its token indices, which
  computes the positions inside ``forward`` (Hugging Face OPT, BART, BioGPT and Whisper
  positional embeddings get the attention mask, float embeddings or the token ids): its
  statistics would count the wrong rows, or fail on a float input.

:func:`call_problem` recomputes W h + b from the recorded h (its first
:data:`_CHECKED_ROWS` slices along dim 0) in float32 (float64 for a float64
layer) and compares it with the recorded a, entry by entry, relative to the largest entry:
10⁻² for 32- and 64-bit outputs on the CPU (quantisation-aware training's fake-quantised
weights are off by ~5·10⁻³ and keep K-FAC: their gradient is the straight-through g hᵀ),
5·10⁻² for 16-bit ones (autocast, or a
half-precision model, whose products round differently) and on accelerators (TF32 matrix
products and convolutions round float32 inputs to 10 bits). Either is far below what the
defects above produce (a weight scaled by c is off by |1 − c|; other rows by O(1)).
natgrad checks the first training pass of an optimizer and
every ``fisher_matrix`` batch; a layer that fails takes the fallback (optimizers) or is
refused (``fisher_matrix``) with the reason. A forward that changes later (a gain held in a
buffer that starts at 1 and moves) is not seen by an optimizer's first-pass check.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from natgrad.layers.base import LayerKind

__all__ = ["call_problem"]

_TOLERANCE = 1e-2
"""Largest |a − (W h + b)| / max |W h + b| accepted for 32- and 64-bit outputs on the CPU."""

_TOLERANCE_ROUNDED = 5e-2
"""… for 16-bit outputs, and on accelerators (TF32)."""

_CHECKED_ROWS = 8
"""Leading slices (examples; positions for a sequence-first input) of a call that are checked:
the defects above show in every slice, and a check of the whole batch cost ``fisher_matrix``
a third of its time (one more product per layer and batch; 135 of 600 ms on the MLP
784-1000-500-250-30-10 with 2,048 examples in 16 batches)."""


def call_problem(kind: LayerKind, module: nn.Module, h: Tensor, a: Tensor) -> str | None:
    """Why the call with first argument ``h`` and output ``a`` does not compute a = W h + b
    with ``module``'s own weight and bias (``kind``'s layout), or None when it does."""
    weight = kind.weight(module)
    if weight is None:  # nothing of the weight trains here: no factor depends on h
        return None
    if kind.diagonal_inputs and (h.dtype.is_floating_point or h.dtype.is_complex):
        return (f"called with a {h.dtype} tensor, not its integer indices (an embedding that "
                "computes its positions inside forward); its statistics would count the wrong "
                "rows")
    if h.dim() >= 1 and a.dim() >= 1 and h.shape[0] == a.shape[0] > _CHECKED_ROWS:
        h, a = h[:_CHECKED_ROWS], a[:_CHECKED_ROWS]  # the layer acts on each slice of dim 0
    try:
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
            W = kind.to_matrix(module, weight.detach()).to(dtype)  # (out, in)
            rows = kind.input_rows(module, h.detach())
            got = kind.output_rows(module, a.detach().unsqueeze(0))[0].to(dtype)
            if kind.diagonal_inputs:
                index = rows[..., 0].long()
                known = index >= 0  # negative: ā = 0 (padding), a is not W ā there
                expected = W.T[index.clamp(min=0)]
                got, expected = got[known], expected[known]
            else:
                expected = rows.to(dtype) @ W.T
                bias = kind.bias(module)
                if bias is not None:
                    expected = expected + bias.detach().to(dtype).reshape(-1)
    except (RuntimeError, IndexError, ValueError) as err:
        return (f"its output could not be recomputed from its first argument and its weight "
                f"({str(err).splitlines()[0][:120]}); it does not compute a = W h + b")
    if got.shape != expected.shape:
        return (f"its output has {tuple(got.shape)} rows where W h + b from its first argument "
                f"has {tuple(expected.shape)}: it does not compute a = W h + b from that input "
                "(an embedding that computes its positions inside forward?)")
    if expected.numel() == 0 or not bool(torch.isfinite(got).all() & torch.isfinite(
            expected).all()):
        return None  # non-finite values are reported as such by the finiteness checks
    scale = float(expected.abs().max()) + torch.finfo(dtype).tiny
    error = float((got - expected).abs().max()) / scale
    tolerance = (_TOLERANCE if a.element_size() >= 4 and a.device.type == "cpu"
                 else _TOLERANCE_ROUNDED)
    if not error <= tolerance:
        return (f"its output differs from W h + b computed from its first argument and its "
                f"weight (relative error {error:.2g}): its forward changes the weight or the "
                "input (a rescaled weight, positions computed from a mask), which Kronecker "
                "factors of that input cannot describe")
    return None
