"""Shared fixtures: the real Fashion-MNIST files, small idx files, a two-process launcher."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from megabatch.data import fashion_mnist


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The real Fashion-MNIST files (`make test` installs dataset-fashion-mnist)."""
    if not fashion_mnist.DEFAULT_DIR.is_dir():
        pytest.fail(f"Fashion-MNIST is missing: {fashion_mnist.HOW_TO_GET}")
    return fashion_mnist.DEFAULT_DIR


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) \
        + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def tiny_idx_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped folder with 64 training and 32 test images (uncompressed)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        write_idx(tmp_path / fashion_mnist.FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / fashion_mnist.FILES[f"{split}_labels"], rng.integers(0, 10, n))
    return tmp_path
