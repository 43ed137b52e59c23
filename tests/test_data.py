"""IDX parsing and validation (natgrad.data) on small files the tests write themselves."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from natgrad.data import DataError, load_digits, load_idx_folder, read_idx


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: magic 0 0 code ndim, big-endian uint32 dims, then the data."""
    dtype = {0x08: np.uint8, 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False, code: int = 0x08) -> Path:
    data = idx_bytes(array, code)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_folder(folder: Path, n_train: int = 6, n_test: int = 3, size: tuple[int, int] = (4, 5),
                gz: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An MNIST-format folder with random images and labels; returns the train split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays["train"]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_valid_folder_loads(tmp_path: Path, gz: bool) -> None:
    images, labels = make_folder(tmp_path, gz=gz)
    data = load_idx_folder(tmp_path, name="tiny")
    assert data.name == "tiny" and data.image_shape == (4, 5)
    assert data.x_train.shape == (6, 20) and data.x_test.shape == (3, 20)
    assert data.x_train.dtype == torch.float32
    np.testing.assert_allclose(data.x_train.numpy(), images.reshape(6, -1) / 255.0, rtol=1e-6)
    assert data.y_train.tolist() == labels.tolist()
    assert data.images().x_train.shape == (6, 1, 4, 5)


def test_raw_and_gz_read_the_same(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = read_idx(write_idx(tmp_path / "a-idx3-ubyte", array))
    packed = read_idx(write_idx(tmp_path / "a-idx3-ubyte.gz", array, gz=True))
    assert raw.shape == (2, 3, 4) and np.array_equal(raw, packed) and np.array_equal(raw, array)


def test_big_endian_types(tmp_path: Path) -> None:
    array = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "ints", array, code=0x0C))
    assert out.tolist() == array.tolist()
    floats = np.array([0.5, -1.25], dtype=np.float32)
    assert read_idx(write_idx(tmp_path / "floats", floats, code=0x0D)).tolist() == [0.5, -1.25]


def test_dotted_file_names_are_found(tmp_path: Path) -> None:
    make_folder(tmp_path)
    for path in tmp_path.iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert load_idx_folder(tmp_path).x_train.shape == (6, 20)


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(path)


def test_unknown_type_code(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(DataError, match="type code"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 7], ids=["in-data", "in-header"])
def test_truncated(tmp_path: Path, cut: int) -> None:
    data = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    path = tmp_path / "short"
    path.write_bytes(data[:-cut] if cut == 1 else data[:cut])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_trailing_bytes_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(4, dtype=np.uint8)))[:-6])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_damaged_deflate_data_inside_gzip(tmp_path: Path) -> None:
    """Bit flips inside the compressed stream (an intact gzip header) raise zlib.error in
    gzip.decompress: the same clear DataError as other unreadable files, no traceback."""
    images = np.random.default_rng(0).integers(0, 4, size=(50, 8, 8), dtype=np.uint8)
    data = bytearray(gzip.compress(idx_bytes(images)))
    for i in range(40, 100):
        data[i] ^= 0x5A
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte\.gz"):
        read_idx(path)


@pytest.mark.parametrize(("prefix", "split"), [("train", "train"), ("t10k", "test")])
def test_a_split_with_no_examples_is_named(tmp_path: Path, prefix: str, split: str) -> None:
    """A valid IDX pair holding 0 examples is refused naming the file and the split (it used
    to fail in a reshape)."""
    make_folder(tmp_path)
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((0, 4, 5), np.uint8))
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.zeros(0, np.uint8))
    with pytest.raises(DataError) as info:
        load_idx_folder(tmp_path)
    message = str(info.value)
    assert f"{prefix}-images-idx3-ubyte holds 0 {split} examples" in message
    assert str(tmp_path) in message


def test_label_out_of_range(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 10], np.uint8))
    with pytest.raises(DataError, match=r"0\.\.9"):
        load_idx_folder(tmp_path)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    with pytest.raises(DataError, match="3 t10k images but 2 labels"):
        load_idx_folder(tmp_path)


def test_images_must_be_3d(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 20), np.uint8))
    with pytest.raises(DataError, match="3-D"):
        load_idx_folder(tmp_path)


def test_train_test_shapes_must_match(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 5, 4), np.uint8))
    with pytest.raises(DataError, match="train images are"):
        load_idx_folder(tmp_path)


@pytest.mark.parametrize("what", ["folder", "file"])
def test_missing_data_says_how_to_get_it(tmp_path: Path, what: str) -> None:
    if what == "file":
        make_folder(tmp_path)
        (tmp_path / "t10k-images-idx3-ubyte").unlink()
        folder = tmp_path
    else:
        folder = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_idx_folder(folder)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message
    assert str(folder) in message


def test_missing_single_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "absent-idx1-ubyte")


def test_digits_split_is_seeded() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
