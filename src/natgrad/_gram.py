"""Sums of Gram matrices over many blocks of rows, at the cost of one Gram of all rows.

Σ_b M_bᵀ M_b = Mᵀ M for M the rows of all blocks stacked. Each call of
:func:`natgrad._linalg.gram` pays, besides its R·P² multiply-adds, a fixed O(P²) cost (the
result written, made exactly symmetric, added to the sum) and, for few rows, slow small
products; with a DataLoader of small batches (R = 128 rows against P ≈ 1000 columns) that
fixed cost dominated (profile in benchmarks/RESULTS.md). :class:`GramSum` therefore buffers
blocks until they hold enough rows, stacks them, and computes one Gram per buffer; a block
larger than the buffer is taken in slices of rows, so that no more than about
``max_elements`` stacked rows are held besides the block itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy
import torch
from torch import Tensor

from natgrad._linalg import _SYRK_MIN_WIDTH, gram, symmetric_from_upper

__all__ = ["GramSum"]

_NUMPY = {torch.float32: numpy.float32, torch.float64: numpy.float64}


def _syrk(width: int, dtype: torch.dtype, device: torch.device) -> Callable | None:
    """SciPy's BLAS ``syrk`` for this dtype where :func:`natgrad._linalg.gram` uses it
    (CPU, float32/float64, width ≥ 2048), else None."""
    if torch.device(device).type != "cpu" or dtype not in _NUMPY or width < _SYRK_MIN_WIDTH:
        return None
    try:
        from scipy.linalg.blas import dsyrk, ssyrk
    except ImportError:  # pragma: no cover - scipy is a dependency
        return None
    return ssyrk if dtype == torch.float32 else dsyrk

_MIN_ROWS = 2048  # rows per Gram below which the fixed O(P²) cost shows
_MAX_ELEMENTS = 1 << 22  # elements of the stacked buffer (16 MiB in float32)


class GramSum:
    """Accumulates Σ_b M_bᵀ M_b over blocks M_b of shape (R_b, P), in ``dtype``.

    Blocks are converted to ``dtype`` and buffered; a Gram is computed whenever the buffer
    holds ``chunk`` rows: max(``min_rows``, P), capped so that the buffer stays below
    max(``max_elements``, P²/2) elements (at least one row). A block of at least ``chunk``
    rows arriving at an empty buffer in ``dtype`` goes to one Gram directly (no copy); other
    blocks are sliced into the buffer (each slice converted to ``dtype`` on its own, so a
    float32 block is never copied whole into float64; a slice is copied, so that the
    buffer keeps no larger tensor alive than the rows it holds). The sum equals that of
    :func:`~natgrad._linalg.gram` per block up to rounding (the products are summed in
    another order), and is exactly symmetric.

    Example:
        >>> s = GramSum(3, torch.float64, torch.device("cpu"))
        >>> blocks = [torch.randn(5, 3, dtype=torch.float64) for _ in range(4)]
        >>> for M in blocks:
        ...     s.add(M)
        >>> M = torch.cat(blocks)
        >>> torch.allclose(s.result(), M.T @ M), s.rows
        (True, 20)
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device,
                 min_rows: int = _MIN_ROWS, max_elements: int = _MAX_ELEMENTS) -> None:
        self.width = width
        self.dtype = dtype
        self.device = device
        budget = max(max_elements, width * width // 2)  # never above half the result's size
        self.chunk = max(1, min(max(min_rows, width), budget // max(1, width)))
        self.rows = 0  # rows added so far
        self._buffer: list[Tensor] = []
        self._buffered = 0
        self._total: Tensor | None = None
        # wide matrices on the CPU: BLAS syrk accumulating into one upper triangle, so that
        # each Gram costs no O(P²) pass of its own (see natgrad._linalg.gram)
        self._syrk = _syrk(width, dtype, device)
        if self._syrk is not None:
            self._upper = numpy.zeros((width, width), dtype=_NUMPY[dtype], order="F")

    def add(self, M: Tensor) -> None:
        """Add the rows of M (R, P)."""
        if M.dim() != 2 or M.shape[1] != self.width:
            raise ValueError(f"GramSum of width {self.width} got a block of shape "
                             f"{tuple(M.shape)}")
        self.rows += M.shape[0]
        if not self._buffer and M.shape[0] >= self.chunk and M.dtype == self.dtype:
            self._add_gram(M)  # enough rows, no conversion: no copy needed
            return
        start = 0
        while start < M.shape[0]:
            take = min(self.chunk - self._buffered, M.shape[0] - start)
            part = M[start:start + take]  # a part of M is copied: the buffer holds no view
            self._buffer.append(part.to(self.dtype, copy=take < M.shape[0]))
            self._buffered += take
            start += take
            if self._buffered >= self.chunk:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        rows = self._buffer[0] if len(self._buffer) == 1 else torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        self._add_gram(rows)

    def _add_gram(self, rows: Tensor) -> None:
        if self._syrk is not None:  # C ← C + rowsᵀ rows in C's upper triangle, in place
            self._upper = self._syrk(1.0, rows.detach().contiguous().numpy().T, beta=1.0,
                                     c=self._upper, trans=0, lower=0, overwrite_c=1)
            return
        product = gram(rows)
        self._total = product if self._total is None else self._total.add_(product)

    def result(self) -> Tensor:
        """Σ_b M_bᵀ M_b over the blocks added (zeros if none)."""
        self._flush()
        if self._syrk is not None:  # made symmetric once, from the upper triangle
            return symmetric_from_upper(torch.from_numpy(self._upper))
        if self._total is None:
            return torch.zeros(self.width, self.width, dtype=self.dtype, device=self.device)
        return self._total
