"""Kronecker-structured Fisher blocks (K-FAC and EK-FAC), one per Linear/Conv2d layer.

A layer's trainable parameters form the matrix V = [W | b] of shape (out, in') (Conv2d weights
flattened to (out, C·kh·kw)); its block acts on vec(V) taken row-major. In θ's order the weight
entries come first and the bias after them, so blocks are scattered through an index map.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from natgrad.capture import KFACLayer
from natgrad.fisher.base import FisherMatrix, ParameterLayout

__all__ = ["KroneckerStructuredFisher", "layer_indices"]


def layer_indices(layer: KFACLayer, layout: ParameterLayout) -> Tensor:
    """θ positions of vec([W | b]) (row-major), shape (out·in',): entry (i, j) → index."""
    weight_name, bias_name = layer.param_names
    out = layer.out_dim
    columns = []
    if weight_name is not None:
        sl = layout.slice(weight_name)
        columns.append(layer.weight_matrix(torch.arange(sl.start, sl.stop).view(
            layer.weight.shape)))
    if bias_name is not None:
        sl = layout.slice(bias_name)
        columns.append(torch.arange(sl.start, sl.stop).view(out, 1))
    return torch.cat(columns, dim=1).flatten()


class KroneckerStructuredFisher(FisherMatrix):
    """Block-diagonal over layers; each block acts on the layer's matrix V = [W | b]."""

    def __init__(
        self, layers: list[KFACLayer], layout: ParameterLayout, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layout, dtype, device)
        self.layers = layers
        self._indices = [layer_indices(layer, layout).to(device) for layer in layers]

    @abstractmethod
    def _block_dense(self, i: int) -> Tensor:
        """Layer i's block as an (out·in', out·in') matrix in vec([W | b]) order."""

    @abstractmethod
    def _block_mv(self, i: int, V: Tensor) -> Tensor:
        """Layer i's block applied to V (out, in')."""

    @abstractmethod
    def _block_solve(self, i: int, V: Tensor, damping: float) -> Tensor:
        """(block + δI)⁻¹ applied to V (out, in')."""

    @abstractmethod
    def _block_trace(self, i: int) -> Tensor: ...

    def _apply(self, v: Tensor, fn: Callable[[int, Tensor], Tensor]) -> Tensor:
        out = torch.zeros_like(v)  # entries outside every layer (none via fisher_matrix) stay 0
        for i, (layer, idx) in enumerate(zip(self.layers, self._indices, strict=True)):
            V = v[idx].view(layer.out_dim, layer.in_dim)
            out[idx] = fn(i, V).flatten()
        return out

    def to_dense(self) -> Tensor:
        P = self.num_params
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        for i, idx in enumerate(self._indices):
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = self._block_dense(i)
        return out

    def _mv(self, v: Tensor) -> Tensor:
        return self._apply(v, self._block_mv)

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        return self._apply(v, lambda i, V: self._block_solve(i, V, damping))

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for i in range(len(self.layers)):
            total = total + self._block_trace(i)
        return total
