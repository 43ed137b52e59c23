"""``nn.Embedding``: a lookup, a = weight[x], i.e. a linear layer fed the one-hot row e_x.

With W = weightᵀ (out = embedding_dim, in = num_embeddings), a = W e_x, so ā = e_x and
Ā = E[ā āᵀ] = diag(f), f_j the fraction of positions holding token j; the K-FAC block is
G ⊗ diag(f) on vec(W) row-major (in the weight's own row-major order, where rows are tokens,
it is diag(f) ⊗ G). The kind says so with ``diagonal_inputs``: its rows are the indices x,
shape (*lead, 1), never one-hot rows (see :mod:`natgrad._diagonal_inputs`). A position
holding ``padding_idx`` gets no gradient in PyTorch (its row is never updated); here its ā
is zero (index −1): it adds nothing to f, so the padding row's f is 0 and, with damping,
its preconditioned gradient stays 0.

Not handled (the module takes the fallback, with the reason): ``sparse=True`` (sparse
gradients), ``max_norm`` (renormalises rows of the weight in place during the forward pass)
and ``scale_grad_by_freq`` (rescales the gradient by batch frequencies, which K-FAC's
statistics would not match).
"""

from __future__ import annotations

from torch import Tensor, nn

from natgrad.layers.base import LayerKind

__all__ = ["EmbeddingKind"]


class EmbeddingKind(LayerKind):
    """``nn.Embedding`` (and subclasses): weight (num_embeddings, dim), W = weightᵀ, no bias."""

    name = "Embedding"
    diagonal_inputs = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.sparse:
            return "Embedding with sparse=True (sparse gradients); use sparse=False"
        if module.max_norm is not None:
            return ("Embedding with max_norm (renormalises its weight in place in the forward "
                    "pass)")
        if module.scale_grad_by_freq:
            return "Embedding with scale_grad_by_freq=True"
        return None

    def bias(self, module: nn.Module) -> nn.Parameter | None:
        return None

    def out_features(self, module: nn.Module) -> int:
        return module.weight.shape[1]

    def in_features(self, module: nn.Module) -> int:
        return module.weight.shape[0]

    def input_rows(self, module: nn.Module, h: Tensor) -> Tensor:
        """The token indices as (*lead, 1); positions holding ``padding_idx`` become −1."""
        if module.padding_idx is not None:
            h = h.masked_fill(h == module.padding_idx, -1)
        return h.unsqueeze(-1)

    def to_matrix(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.T

    def from_matrix(self, module: nn.Module, M: Tensor) -> Tensor:
        return M.T
