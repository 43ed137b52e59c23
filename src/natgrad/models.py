"""Benchmark models: the deep autoencoder of Hinton & Salakhutdinov as used by K-FAC, an MLP
classifier and a small CNN."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

__all__ = ["AUTOENCODER_SIZES", "DIGITS_AUTOENCODER_SIZES", "autoencoder", "mlp", "small_cnn"]

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30)
"""The MNIST deep autoencoder's encoder (Hinton & Salakhutdinov 2006; Martens & Grosse 2015)."""

DIGITS_AUTOENCODER_SIZES = (64, 32, 16, 8)
"""A scaled-down version of the same shape for the 8×8 digits."""


def autoencoder(sizes: Sequence[int] = AUTOENCODER_SIZES) -> nn.Sequential:
    """Encoder sizes[0]→…→sizes[-1] with tanh and a linear code layer, then the mirror decoder
    with tanh; the output is one logit per input pixel (Bernoulli likelihood, i.e. sigmoid
    cross-entropy on pixels).

    Example:
        >>> autoencoder((8, 4, 2))
        Sequential(
          (0): Linear(in_features=8, out_features=4, bias=True)
          (1): Tanh()
          (2): Linear(in_features=4, out_features=2, bias=True)
          (3): Linear(in_features=2, out_features=4, bias=True)
          (4): Tanh()
          (5): Linear(in_features=4, out_features=8, bias=True)
        )
    """
    if len(sizes) < 2:
        raise ValueError(f"an autoencoder needs at least 2 sizes, got {list(sizes)}")
    mirror = list(sizes) + list(reversed(sizes))[1:]
    layers: list[nn.Module] = []
    code = len(sizes) - 1
    for i, (a, b) in enumerate(itertools.pairwise(mirror)):
        layers.append(nn.Linear(a, b))
        if i + 1 != code and i + 1 != len(mirror) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """A tanh MLP sizes[0]→…→sizes[-1] whose output is logits.

    Example:
        >>> mlp((4, 3, 2))
        Sequential(
          (0): Linear(in_features=4, out_features=3, bias=True)
          (1): Tanh()
          (2): Linear(in_features=3, out_features=2, bias=True)
        )
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def small_cnn(image_size: int | tuple[int, int], num_classes: int = 10, channels: int = 16
              ) -> nn.Sequential:
    """Two 3×3 convolutions (the second with stride 2), ReLU, and a linear classifier, for
    (N, 1, H, W) inputs: ``image_size`` is (H, W), or one int for square images.

    Example:
        >>> import torch
        >>> tuple(small_cnn(8, channels=4)(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
        >>> tuple(small_cnn((28, 20), channels=4)(torch.zeros(2, 1, 28, 20)).shape)
        (2, 10)
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    half_h, half_w = (height + 1) // 2, (width + 1) // 2  # after the stride-2 convolution
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * half_h * half_w, num_classes),
    )
