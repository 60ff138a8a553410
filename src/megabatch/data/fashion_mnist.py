"""Fashion-MNIST from its four idx files (gzipped or not).

Debian's package ``dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``; ``--data DIR`` points at any folder that
holds them. The idx format is a 4-byte magic (two zero bytes, a type code, the
number of dimensions), one big-endian int32 per dimension, then the values.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from megabatch.data.images import ImageTensors
from megabatch.errors import UserError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixels scaled to [0, 1]
_UBYTE = 0x08
HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist` (as root; `make demo` "
              "does this), or pass --data DIR with the four idx files "
              f"({', '.join(FILES.values())}, each optionally .gz)")


def read_idx(path: Path) -> torch.Tensor:
    """Read one idx file of unsigned bytes into a uint8 tensor; any damage is a UserError."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: {e}; replace the file ({HOW_TO_GET})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or not 1 <= raw[3] <= 4:
        raise UserError(f"{path} is not an idx file of unsigned bytes (bad magic number); "
                        f"replace it ({HOW_TO_GET})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated inside its header; replace it ({HOW_TO_GET})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])  # unsigned: no negative sizes
    expected = header + math.prod(shape)  # a Python int: no overflow
    if len(raw) != expected:
        raise UserError(f"{path} holds {len(raw)} bytes but its header {list(shape)} needs "
                        f"{expected}: the file is truncated or corrupt; replace it ({HOW_TO_GET})")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def find_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file {stem}[.gz] is missing from {root}: {HOW_TO_GET}")


def load(root: str | os.PathLike | None = None) -> tuple[ImageTensors, ImageTensors]:
    """The 60,000 training and 10,000 test images as (N, 1, 28, 28) uint8 tensors with labels."""
    root = Path(root) if root else DEFAULT_DIR
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST not found: {root} is not a folder; {HOW_TO_GET}")
    arrays = {key: read_idx(find_file(root, stem)) for key, stem in FILES.items()}
    splits = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {split} files in {root} do not match: "
                            f"images {list(images.shape)}, labels {list(labels.shape)}; {HOW_TO_GET}")
        if len(labels) == 0:
            raise UserError(f"Fashion-MNIST {split} files in {root} hold no images; {HOW_TO_GET}")
        if int(labels.max()) >= len(CLASSES):
            raise UserError(f"Fashion-MNIST {split} labels in {root} go up to {int(labels.max())}, "
                            f"expected < {len(CLASSES)}; {HOW_TO_GET}")
        splits.append(ImageTensors(images.unsqueeze(1), labels.long(), MEAN, STD, CLASSES))
    train, test = splits
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"Fashion-MNIST images in {root} differ in size: training {list(train.images.shape[2:])}, "
                        f"test {list(test.images.shape[2:])}; {HOW_TO_GET}")
    return train, test
