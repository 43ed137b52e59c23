"""Whitened layers of Natural Neural Networks (Desjardins et al. 2015): a = V U (h − c) + d.

V and d are trainable parameters; U (whitening) and c (centre) are buffers, saved in the
``state_dict`` and never touched by backpropagation. A layer built with ``rank=k`` stores U as
U = r I + B diag(σ − r) Bᵀ (``U_basis`` B with k orthonormal (or zero) columns, ``U_scale`` σ,
``U_rest`` r), which whitens the k directions of B and scales the rest by r: applying it costs
2k multiply-adds per input feature instead of in. With U = I and c = 0 a whitened layer
computes exactly what the plain layer with W = V, b = d computes. In canonical coordinates the
layer is W = V U and b = d − W c (for Conv2d, per kernel tap: W_t = V_t U, b = d − Σ_t W_t c).
A layer without bias cannot absorb a shift, so PRONG whitens it without centring (c stays 0),
unless a batch norm follows it (PRONG+).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from natgrad.nn.whitening import low_rank_times

__all__ = ["WhitenedConv2d", "WhitenedLayer", "WhitenedLinear", "whitening_rows"]


class WhitenedLayer(nn.Module):
    """Shared parts of the whitened layers: parameters V, d and buffers U, c.

    ``V`` has the plain layer's weight shape, ``d`` its bias shape (or is ``None``), ``U`` is
    (in, in) over input features (Linear) or input channels (Conv2d) and ``c`` has length in.
    """

    V: nn.Parameter
    d: nn.Parameter | None
    U: Tensor
    c: Tensor
    rank: int | None
    rank_at_most: bool = False
    """PRONG whitens only the k' ≤ ``rank`` leading directions its randomized solver resolves
    (``whiten(model, rank="auto")``; :func:`natgrad.nn.whitening.top_eigenpairs`), the other
    columns of B zero."""

    def _init_whitening(
        self, in_dim: int, weight_shape: tuple[int, ...], bias: bool, rank: int | None,
        device: torch.device | None, dtype: torch.dtype | None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        self.V = nn.Parameter(torch.empty(weight_shape, **kw))
        self.d = nn.Parameter(torch.empty(weight_shape[0], **kw)) if bias else None
        self.rank = _check_rank(rank, in_dim)
        if self.rank is None:
            self.register_buffer("U", torch.eye(in_dim, **kw))
        else:  # U = r I + B diag(σ − r) Bᵀ, = I with B = 0, r = 1
            self.register_buffer("U_basis", torch.zeros(in_dim, self.rank, **kw))
            self.register_buffer("U_scale", torch.ones(self.rank, **kw))
            self.register_buffer("U_rest", torch.ones((), **kw))
        self.register_buffer("c", torch.zeros(in_dim, **kw))
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        if self.d is not None:
            fan_in = self.V[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.d, -bound, bound)

    def whitening_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """U as a dense (in, in) matrix (for the low-rank form: r I + B diag(σ − r) Bᵀ),
        formed in ``dtype`` (default: the buffers')."""
        if self.rank is None:
            return self.U if dtype is None else self.U.to(dtype)
        B = self.U_basis
        return self.times_whitening(torch.eye(B.shape[0], dtype=dtype or B.dtype,
                                              device=B.device))

    def _canonical_parts(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(V, U, d, c) in float64: W = V U and b = d − W c are formed there and rounded
        once (a low-rank U formed and multiplied in float32 lost 1e-4 of the function of an
        uncentred layer with a mean offset of 1e3, a red team)."""
        d = None if self.d is None else self.d.detach().double()
        return (self.V.detach().double(), self.whitening_matrix(torch.float64), d,
                self.c.double())

    def _rounded(self, W: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        dtype = self.V.dtype
        return W.to(dtype), None if b is None else b.to(dtype)

    def set_whitening(self, U: Tensor | None, basis: Tensor | None = None,
                      scale: Tensor | None = None, rest: Tensor | None = None) -> None:
        """Store a new whitening: the dense ``U`` (full layers) or, for a layer of rank k,
        ``basis`` (in, k) with orthonormal columns, ``scale`` (k,) and ``rest`` (scalar)."""
        with torch.no_grad():
            if self.rank is None:
                if U is None:
                    raise ValueError("a full whitened layer needs the dense U")
                self.U.copy_(U)
                return
            if basis is None or scale is None or rest is None:
                raise ValueError("a low-rank whitened layer needs basis, scale and rest")
            self.U_basis.copy_(basis)
            self.U_scale.copy_(scale)
            self.U_rest.copy_(rest)

    def _whiten_last(self, x: Tensor) -> Tensor:
        """U x for rows x along the last dimension (x Uᵀ)."""
        return F.linear(x, self.U) if self.rank is None else self.times_whitening(x)

    def times_whitening(self, X: Tensor) -> Tensor:
        """X U for X of shape (..., in), in X's dtype (the low-rank U is symmetric)."""
        if self.rank is None:
            return X @ self.U.to(X.dtype)
        return low_rank_times(X, self.U_basis, self.U_scale, self.U_rest)

    def whitening_samples(self, h: Tensor) -> Tensor:
        """The rows whose statistics U and c whiten: (samples, in)."""
        raise NotImplementedError

    def canonical(self) -> tuple[Tensor, Tensor | None]:
        """(W, b) of the plain layer computing the same function: W = V U, b = d − W c."""
        raise NotImplementedError


class WhitenedLinear(WhitenedLayer):
    """a = V U (h − c) + d for inputs h of shape (..., in_features).

    Example:
        >>> layer = WhitenedLinear(3, 2)
        >>> tuple(layer(torch.randn(4, 3)).shape)
        (4, 2)
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_whitening(in_features, (out_features, in_features), bias, rank, device,
                             dtype)

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self._whiten_last(h - self.c), self.V, self.d)

    def whitening_samples(self, h: Tensor) -> Tensor:
        return h.reshape(-1, self.in_features)

    def canonical(self) -> tuple[Tensor, Tensor | None]:
        V, U, d, c = self._canonical_parts()
        W = V @ U
        return self._rounded(W, _canonical_bias(d, W @ c, c))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.d is not None}" + _rank_repr(self.rank, self.rank_at_most))


def _check_rank(rank: int | None, in_dim: int) -> int | None:
    """``None`` (full U) or an integer 1 ≤ rank < in_dim; rank ≥ in_dim means full."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be None or an integer >= 1, got {rank!r}")
    return rank if rank < in_dim else None


def _rank_repr(rank: int | None, at_most: bool = False) -> str:
    return "" if rank is None else f", rank={rank}" + (" (at most)" if at_most else "")


def _canonical_bias(d: Tensor | None, Wc: Tensor, c: Tensor) -> Tensor | None:
    """b = d − W c (Conv2d: Σ_t W_t c); ``None`` when there is neither a bias nor a shift."""
    if d is None:
        return None if not bool(c.any()) else -Wc
    return d - Wc


def _reversed_padding(
    padding: str | int | tuple[int, int], kernel_size: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for a Conv2d ``padding`` (ints, "valid", "same")."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads: list[int] = []
        for k, dil in zip(reversed(kernel_size), reversed(dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


class WhitenedConv2d(WhitenedLayer):
    """a = V ⋆ (U (pad(h) − c)) + d: U mixes input channels (a 1×1 convolution) on the
    zero-padded input, then V is an ordinary convolution (no further padding). Padding before
    whitening keeps re-estimation function-preserving at the borders; spatial positions count
    as samples for U and c. groups=1, zero padding.

    Example:
        >>> layer = WhitenedConv2d(2, 3, 3, padding=1)
        >>> tuple(layer(torch.randn(1, 2, 5, 5)).shape)
        (1, 3, 5, 5)
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1, padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1, bias: bool = True,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding
        self._padding = _reversed_padding(padding, self.kernel_size, self.dilation)
        shape = (out_channels, in_channels, *self.kernel_size)
        self._init_whitening(in_channels, shape, bias, rank, device, dtype)

    def _padded(self, h: Tensor) -> Tensor:
        return F.pad(h, self._padding) if any(self._padding) else h

    def forward(self, h: Tensor) -> Tensor:
        x = self._padded(h) - self.c.view(1, -1, 1, 1)
        z = self._whiten_last(x.movedim(1, -1)).movedim(-1, 1)  # U across channels
        return F.conv2d(z, self.V, self.d, self.stride, 0, self.dilation)

    def whitening_samples(self, h: Tensor) -> Tensor:
        return self._padded(h).transpose(0, 1).reshape(self.in_channels, -1).T

    def canonical(self) -> tuple[Tensor, Tensor | None]:
        V, U, d, c = self._canonical_parts()
        W = torch.einsum("oikl,ij->ojkl", V, U)
        return self._rounded(W, _canonical_bias(d, torch.einsum("oikl,i->o", W, c), c))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.d is not None}" + _rank_repr(self.rank, self.rank_at_most))


def whitening_rows(module: nn.Module, h: Tensor) -> Tensor:
    """The rows (samples, in) whose statistics whiten ``module``'s input ``h``: features for
    Linear layers, channels of the zero-padded input at every position for Conv2d layers
    (plain or whitened)."""
    if isinstance(module, WhitenedLayer):
        return module.whitening_samples(h)
    if isinstance(module, nn.Conv2d):
        padded = F.pad(h, module._reversed_padding_repeated_twice)
        return padded.transpose(0, 1).reshape(module.in_channels, -1).T
    return h.reshape(-1, h.shape[-1])
