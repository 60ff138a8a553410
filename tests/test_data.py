"""Fashion-MNIST loading (real files and damaged ones) and the batch augmentation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from conftest import write_idx
from megabatch.data import fashion_mnist, load_datasets
from megabatch.data.images import Augmentation
from megabatch.errors import UserError
from megabatch.recipe import DataConfig


def test_real_fashion_mnist(fashion_dir):
    train, test = fashion_mnist.load(fashion_dir)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    x, y = train.batch(torch.arange(60000))
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1.0) < 1e-3  # MEAN and STD are right
    assert y.dtype == torch.int64


def test_uncompressed_and_gzipped_files_read_the_same(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    plain = fashion_mnist.read_idx(write_idx(tmp_path / "a", array))
    zipped = fashion_mnist.read_idx(write_idx(tmp_path / "a.gz", array, compress=True))
    assert torch.equal(plain, zipped) and plain.tolist() == array.tolist()


def test_folder_of_idx_files_via_data_dir(tiny_idx_dir):
    train, test = load_datasets(DataConfig(), str(tiny_idx_dir))
    assert (len(train), len(test)) == (64, 32)


def test_missing_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(UserError, match=r"apt-get install dataset-fashion-mnist.*--data DIR"):
        fashion_mnist.load(tmp_path / "nowhere")


def test_missing_file_is_named(tiny_idx_dir):
    (tiny_idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte\\[.gz\\] is missing"):
        fashion_mnist.load(tiny_idx_dir)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-100], "truncated or corrupt"),
    (lambda raw: raw[:10], "truncated inside its header"),
    (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], "bad magic number"),
    (lambda raw: b"", "bad magic number"),
])
def test_damaged_idx_file_is_a_user_error(tiny_idx_dir, damage, message):
    path = tiny_idx_dir / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        fashion_mnist.load(tiny_idx_dir)


def header(dims: list[int], payload: int) -> bytes:
    """An idx file of unsigned bytes whose header says ``dims`` (as signed int32) over ``payload`` bytes."""
    import struct

    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}i", *dims) + bytes(payload)


@pytest.mark.parametrize("dims, payload, message", [
    ([-8, -28, 28], 8 * 28 * 28, "holds 6288 bytes but its header"),  # read unsigned: huge, not negative
    ([65536, 65536, 65536, 65536], 0, r"its header \[65536, 65536, 65536, 65536\] needs 18446744073709551636"),
    ([0, 28, 28], 0, "train files in .* hold no images"),
])
def test_an_idx_header_that_lies_is_a_user_error(tiny_idx_dir, dims, payload, message):
    (tiny_idx_dir / "train-images-idx3-ubyte").write_bytes(header(dims, payload))
    if dims[0] == 0:
        (tiny_idx_dir / "train-labels-idx1-ubyte").write_bytes(header([0], 0))
    with pytest.raises(UserError, match=message):
        fashion_mnist.load(tiny_idx_dir)


def test_training_and_test_images_of_other_sizes_are_a_user_error(tiny_idx_dir):
    write_idx(tiny_idx_dir / "t10k-images-idx3-ubyte", np.zeros((32, 32, 32)))
    with pytest.raises(UserError, match=r"differ in size: training \[28, 28\], test \[32, 32\]"):
        fashion_mnist.load(tiny_idx_dir)


def test_corrupt_gzip_is_a_user_error(tiny_idx_dir):
    path = tiny_idx_dir / "train-images-idx3-ubyte"
    data = gzip.compress(path.read_bytes())
    path.unlink()
    (tiny_idx_dir / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read .*train-images-idx3-ubyte.gz"):
        fashion_mnist.load(tiny_idx_dir)


def test_mismatched_images_and_labels(tiny_idx_dir):
    write_idx(tiny_idx_dir / "train-labels-idx1-ubyte", np.zeros(10))
    with pytest.raises(UserError, match="train files .* do not match"):
        fashion_mnist.load(tiny_idx_dir)


def test_augmentation_flips_and_shifts_each_image_as_drawn():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5) + 1
    aug = Augmentation(torch.tensor([True, False]), torch.tensor([[1, 0], [0, -2]]), pad=2)
    out = aug.apply(x)
    # image 0: flipped left-right, then moved down by one row (top row becomes 0)
    expected0 = torch.zeros(4, 5)
    expected0[1:] = x[0, 0].flip(-1)[:-1]
    # image 1: not flipped, moved left by two columns (two right columns become 0)
    expected1 = torch.zeros(4, 5)
    expected1[:, :3] = x[1, 0, :, 2:]
    assert torch.equal(out[0, 0], expected0) and torch.equal(out[1, 0], expected1)


def test_augmentation_slices_match_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 6, 6)
    aug = Augmentation.draw(8, 2, g)
    whole = aug.apply(x)
    parts = torch.cat([aug[0:4].apply(x[0:4]), aug[4:8].apply(x[4:8])])
    assert torch.equal(whole, parts)
    assert aug.shift.abs().max() <= 2


def test_hold_out_is_a_fixed_draw_that_partitions_the_training_images():
    """The validation images and the training images left are disjoint, together all of
    them, each in the source's order, the same draw on every call; none is held out for 0."""
    from megabatch.data import hold_out
    from megabatch.data.images import ImageTensors

    n = 100
    source = ImageTensors(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n) % 10,
                          0.5, 0.25, tuple("0123456789"))
    rest, held = hold_out(source, 10)
    ids = [t.images.flatten().tolist() for t in (rest, held)]
    assert (len(rest), len(held)) == (90, 10) and sorted(ids[0] + ids[1]) == list(range(n))
    assert ids[0] == sorted(ids[0]) and ids[1] == sorted(ids[1])
    assert ids[1] != list(range(90, 100)) and ids[1] != list(range(10))  # drawn, not the first or last
    assert torch.equal(held.labels, held.images.flatten().long() % 10)  # labels travel with their images
    again = hold_out(source, 10)[1]
    assert torch.equal(again.images, held.images)
    assert hold_out(source, 0) == (source, None)
    with pytest.raises(UserError, match="data.validation_images = 100 leaves no training images out of 100"):
        hold_out(source, 100)
