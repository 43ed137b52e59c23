"""``nn.Conv2d`` (groups = 1) in KFC's "expand" form (Grosse & Martens 2016).

The rows h are the input's zero-padded patches, unfolded like ``weight.flatten(1)``: input
(N, C, H, W) → (N, H'·W', C·kh·kw); the output gradients (K, N, out, H', W') become
(K, N, H'·W', out). W is the weight flattened to (out, C·kh·kw).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import LayerKind

__all__ = ["Conv2dKind"]


class Conv2dKind(LayerKind):
    """``nn.Conv2d`` with ``groups=1``, any stride, dilation, padding and padding mode."""

    name = "Conv2d"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}; only groups=1"
        return None

    def input_rows(self, module: nn.Module, h: Tensor) -> Tensor:
        if h.dim() == 3:  # an unbatched (C, H, W) input is one example
            h = h.unsqueeze(0)
        pad = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        h = F.pad(h, pad, mode=mode) if any(pad) else h
        patches = F.unfold(h, module.kernel_size, module.dilation, 0, module.stride)
        return patches.transpose(1, 2)  # (N, S, C·kh·kw)

    def output_rows(self, module: nn.Module, g: Tensor) -> Tensor:
        if g.dim() == 4:  # (K, C, H', W') of an unbatched input
            g = g.unsqueeze(1)
        return g.flatten(3).transpose(2, 3)  # (K, N, S, out)
