"""Curvature in full precision whatever the caller's autocast region.

Forward hooks run inside the user's ``torch.autocast`` block, where matrix products of float32
tensors are silently computed in bfloat16/float16. Factors, their eigendecompositions and the
preconditioning are computed with autocast disabled, in the tensors' own dtypes (natgrad casts
statistics to at least float32 first).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

__all__ = ["full_precision"]


def full_precision(device: torch.device) -> AbstractContextManager:
    """A context in which autocast is off on ``device``'s type."""
    return torch.autocast(device_type=device.type, enabled=False)
