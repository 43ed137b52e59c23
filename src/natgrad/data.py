"""Benchmark data sets: the 8×8 digits shipped in scikit-learn (the embedded default) and
MNIST-format IDX folders (Fashion-MNIST from Debian's ``dataset-fashion-mnist``, or MNIST).

Nothing is downloaded: a missing or corrupt file is a :class:`DataError` that says how to get it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FASHION_DIR",
    "DataError",
    "Dataset",
    "load_digits",
    "load_idx_folder",
    "read_idx",
]

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, which fills "
    f"{DEFAULT_FASHION_DIR}) or point --data-dir at a folder with the four MNIST-format IDX "
    "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, optionally .gz)"
)


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class Dataset:
    """Inputs in [0, 1] (float32, images flattened to (N, D) or kept as (N, 1, H, W)) and
    integer labels, split into train and test."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    image_shape: tuple[int, int]
    num_classes: int = 10

    def images(self) -> Dataset:
        """The same data with inputs shaped (N, 1, H, W) for convolutional models."""
        h, w = self.image_shape
        return Dataset(self.name, self.x_train.view(-1, 1, h, w), self.y_train,
                       self.x_test.view(-1, 1, h, w), self.y_test, self.image_shape,
                       self.num_classes)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8×8 digits, scaled to [0, 1], split at random with ``seed``.

    Args:
        test_fraction: share of the examples held out as the test split (rounded).
        seed: seed of the random split (the same seed gives the same split).

    Returns:
        A :class:`Dataset` with flattened (N, 64) float32 inputs and int64 labels 0..9;
        ``.images()`` gives (N, 1, 8, 8) inputs.

    Raises:
        DataError: scikit-learn is not installed (it ships the data; nothing is downloaded).
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:  # pragma: no cover - dependency of natgrad[cli]
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") \
            from err
    bunch = sk_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], (8, 8))


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped), validating its header against its size.

    Raises:
        DataError: missing file, unreadable or corrupt (gzip) data, bad magic number, unknown
            type code, or a size that does not match the header's dimensions.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; {_HOW_TO_GET}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        # zlib.error: deflate data damaged inside an intact gzip header
        raise DataError(f"cannot read {path}: {err}; {_HOW_TO_GET}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); {_HOW_TO_GET}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES or ndim == 0:
        raise DataError(f"{path} has an unknown IDX type code 0x{code:02x} or no dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header {dims} needs {expected}"
                        " (truncated or corrupt)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"),
                 f"{stem.replace('-idx', '.idx')}.gz"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder} has no {stem}[.gz]; {_HOW_TO_GET}")


def _split(folder: Path, prefix: str) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The inputs, labels and image shape of one split (``prefix`` "train" or "t10k")."""
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    images = read_idx(images_path)
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{folder}: {prefix} images must be 3-D and labels 1-D, got shapes "
                        f"{images.shape} and {labels.shape}")
    _check_not_empty(images_path, prefix, images.shape)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {prefix} images but {labels.shape[0]} "
                        "labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{folder}: {prefix} labels must lie in 0..9, got "
                        f"{labels.min()}..{labels.max()}")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y, (images.shape[1], images.shape[2])


def _check_not_empty(path: Path, prefix: str, shape: tuple[int, ...]) -> None:
    """:class:`DataError` if the images in ``path`` are no examples, or images of no pixels."""
    split = "test" if prefix == "t10k" else prefix
    if shape[0] == 0:
        raise DataError(f"{path} holds 0 {split} examples (a valid IDX file, but empty): the "
                        f"{split} split needs at least one; {_HOW_TO_GET}")
    if 0 in shape[1:]:
        raise DataError(f"{path} holds {split} images of {shape[1]}x{shape[2]} pixels: an "
                        "image needs at least one pixel")


def load_idx_folder(folder: str | Path = DEFAULT_FASHION_DIR, name: str = "fashion") -> Dataset:
    """The train and test splits of an MNIST-format folder, pixels scaled to [0, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; {_HOW_TO_GET}")
    x_train, y_train, shape = _split(folder, "train")
    x_test, y_test, test_shape = _split(folder, "t10k")
    if shape != test_shape:
        raise DataError(f"{folder}: train images are {shape} but test images {test_shape}")
    return Dataset(name, x_train, y_train, x_test, y_test, shape)
