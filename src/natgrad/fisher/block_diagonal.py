"""The block-diagonal Fisher: one dense block per module that owns parameters.

F ≈ diag(F₁, …, F_L) with F_l = (1/N) Σₙ J_{n,l}ᵀ D(fₙ) J_{n,l}, J_{n,l} = ∂fₙ/∂θ_l:
cross-module terms are dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from natgrad._linalg import check_invertible, sym_eig, sym_eig_solve
from natgrad.fisher.base import FisherMatrix, ParameterLayout

__all__ = ["BlockDiagonalFisher", "module_blocks"]


def module_blocks(model: nn.Module, layout: ParameterLayout) -> list[tuple[str, slice]]:
    """(owner module name, slice of θ) for each module owning trainable parameters, in θ order.

    A parameter shared by several modules belongs to the first one that registers it.
    """
    owner: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owner.setdefault(full, module_name or "<root>")
    blocks: list[tuple[str, slice]] = []
    for name in layout.names:
        sl = layout.slice(name)
        module_name = owner[name]
        if blocks and blocks[-1][0] == module_name and blocks[-1][1].stop == sl.start:
            blocks[-1] = (module_name, slice(blocks[-1][1].start, sl.stop))
        else:
            blocks.append((module_name, sl))
    return blocks


class BlockDiagonalFisher(FisherMatrix):
    """One dense block per module; ``solve`` uses each block's cached eigendecomposition."""

    def __init__(self, blocks: list[tuple[str, slice, Tensor]], layout: ParameterLayout) -> None:
        first = blocks[0][2]
        super().__init__(layout, first.dtype, first.device)
        self.blocks = blocks
        self._eigs: list[tuple[Tensor, Tensor]] | None = None

    def to_dense(self) -> Tensor:
        P = self.num_params
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        for _, sl, block in self.blocks:
            out[sl, sl] = block
        return out

    def _mv(self, v: Tensor) -> Tensor:
        out = torch.empty_like(v)
        for _, sl, block in self.blocks:
            out[sl] = block @ v[sl]
        return out

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        if self._eigs is None:
            self._eigs = [sym_eig(block, f"the Fisher block of {name!r}")
                          for name, _, block in self.blocks]
        out = torch.empty_like(v)
        for (name, sl, _), (s, Q) in zip(self.blocks, self._eigs, strict=True):
            check_invertible(s[0], s[-1], damping, f"the Fisher block of {name!r}")
            out[sl] = sym_eig_solve(s, Q, v[sl], damping)
        return out

    def trace(self) -> Tensor:
        return sum((block.diagonal().sum() for _, _, block in self.blocks),
                   torch.zeros((), dtype=self.dtype, device=self.device))
