"""The parameter vector θ and the interface every Fisher structure implements.

θ = [p.flatten() for p in model.parameters() if p.requires_grad], concatenated in that order
(DESIGN.md §1). Every dense matrix and flat vector in natgrad uses this order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natgrad._linalg import check_damping

__all__ = ["FisherMatrix", "ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the trainable parameters in θ's order.

    Example:
        >>> layout = ParameterLayout.of(nn.Linear(3, 2))
        >>> layout.names, layout.num_params, layout.slice("bias")
        (('weight', 'bias'), 8, slice(6, 8, None))
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    num_params: int

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        """The layout of ``model``'s trainable parameters; ``ValueError`` if there are none."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        offsets, total = [], 0
        for _, p in named:
            offsets.append(total)
            total += p.numel()
        return cls(
            names=tuple(n for n, _ in named),
            shapes=tuple(p.shape for _, p in named),
            offsets=tuple(offsets),
            num_params=total,
        )

    def index(self, name: str) -> int:
        """Position of parameter ``name`` in the layout."""
        return self.names.index(name)

    def slice(self, name: str) -> slice:
        """The slice of θ holding parameter ``name``."""
        i = self.index(name)
        start = self.offsets[i]
        return slice(start, start + self.shapes[i].numel())


class FisherMatrix(ABC):
    """A (P, P) Fisher matrix F (or an approximation of it) over θ.

    Operations: ``to_dense()`` (F as a tensor), ``mv(v)`` (F v), ``solve(v, damping)``
    ((F + damping·I)⁻¹ v, exactly, for the structure's F), ``trace()`` and ``num_params``.
    """

    def __init__(self, layout: ParameterLayout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.dtype = dtype
        self.device = device

    @property
    def num_params(self) -> int:
        """P, the number of trainable parameters."""
        return self.layout.num_params

    @abstractmethod
    def to_dense(self) -> Tensor:
        """F as a dense (P, P) tensor in θ's order."""

    @abstractmethod
    def _mv(self, v: Tensor) -> Tensor: ...

    @abstractmethod
    def _solve(self, v: Tensor, damping: float) -> Tensor: ...

    @abstractmethod
    def trace(self) -> Tensor:
        """tr F, a 0-d tensor."""

    def mv(self, v: Tensor) -> Tensor:
        """F v for a flat vector v of shape (P,)."""
        return self._mv(self._check_vector(v))

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """(F + damping·I)⁻¹ v for a flat vector v of shape (P,); damping ≥ 0."""
        return self._solve(self._check_vector(v), check_damping(damping))

    def _check_vector(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"expected a tensor of shape ({self.num_params},), got {type(v)}")
        if v.shape != (self.num_params,):
            raise ValueError(
                f"expected a flat vector of shape ({self.num_params},) in θ's order, "
                f"got {tuple(v.shape)}"
            )
        return v.to(dtype=self.dtype, device=self.device)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_params={self.num_params}, dtype={self.dtype})"
