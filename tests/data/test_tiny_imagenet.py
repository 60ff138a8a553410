"""The tiny ImageNet-layout folder: layout, ImageFolder view, real colour JPEGs, determinism,
refusals, and the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_idx

from megabatch.data import fashion_mnist, tiny_imagenet

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
REPO = Path(__file__).resolve().parents[2]
SMALL = dict(classes=3, train_per_class=4, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory, fashion_dir) -> Path:
    """The first real Fashion-MNIST images, uncompressed, so each write loads in milliseconds."""
    root = tmp_path_factory.mktemp("fashion")
    train, test = fashion_mnist.load(fashion_dir)
    for split, data, n in (("train", train, 200), ("test", test, 100)):
        write_idx(root / fashion_mnist.FILES[f"{split}_images"], data.images[:n, 0].numpy())
        write_idx(root / fashion_mnist.FILES[f"{split}_labels"], data.labels[:n].numpy())
    return root


@pytest.fixture(scope="module")
def out(tmp_path_factory, small_fashion) -> Path:
    return tiny_imagenet.write(tmp_path_factory.mktemp("w") / "tiny", **SMALL, fashion_dir=small_fashion)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(out):
    wnids = ["n00000000", "n00000001", "n00000002"]
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "train", "val"]
    assert (out / "README.txt").read_text().startswith(tiny_imagenet.MARK)
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == wnids
    assert sorted(p.name for p in (out / "train/n00000001").iterdir()) == \
        [f"n00000001_{i}.JPEG" for i in range(4)]
    val = sorted(p.relative_to(out / "val").as_posix() for p in (out / "val").rglob("*.JPEG"))
    assert val == [f"{wnids[n // 2]}/ILSVRC2012_val_{n + 1:08d}.JPEG" for n in range(6)]


def test_image_folder_sees_classes_in_order(out):
    for split, per_class in (("train", 4), ("val", 2)):
        folder = torchvision.datasets.ImageFolder(out / split)
        assert folder.classes == ["n00000000", "n00000001", "n00000002"]
        assert folder.targets == [c for c in range(3) for _ in range(per_class)]
        image, label = folder[per_class]
        assert image.mode == "RGB" and label == 1


def test_files_are_colour_jpegs_of_varying_size(out):
    sizes = set()
    for path in out.rglob("*.JPEG"):
        assert path.read_bytes()[:2] == b"\xff\xd8"
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)))
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert 0.8 * 32 - 1 <= image.shape[1] <= 1.25 * 32 + 1
        assert 0.8 * 32 - 1 <= image.shape[2] <= 1.25 * 32 + 1
        channels = image.float().mean(dim=(1, 2))
        assert channels.max() - channels.min() > 5  # tinted, not grey
        sizes.add(tuple(image.shape[1:]))
    assert len(sizes) > 5


def test_deterministic_for_a_seed(out, small_fashion, tmp_path):
    again = tiny_imagenet.write(tmp_path / "again", **SMALL, fashion_dir=small_fashion)
    assert files(again) == files(out)
    other = tiny_imagenet.write(tmp_path / "other", **SMALL, seed=1, fashion_dir=small_fashion)
    assert files(other).keys() == files(out).keys()
    assert files(other)["train/n00000000/n00000000_0.JPEG"] != files(out)["train/n00000000/n00000000_0.JPEG"]


def test_refuses_foreign_folders_and_overwrites_its_own(small_fashion, tmp_path):
    (tmp_path / "mine.txt").write_text("not a tiny-imagenet")
    with pytest.raises(ValueError, match="not empty"):
        tiny_imagenet.write(tmp_path, **SMALL, fashion_dir=small_fashion)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    with pytest.raises(ValueError, match="file"):
        tiny_imagenet.write(tmp_path / "mine.txt", **SMALL, fashion_dir=small_fashion)
    with pytest.raises(ValueError, match="classes"):
        tiny_imagenet.write(tmp_path / "new", classes=11, fashion_dir=small_fashion)
    with pytest.raises(ValueError, match="only"):  # the small folder has < 100 images a class
        tiny_imagenet.write(tmp_path / "new", classes=1, train_per_class=100, fashion_dir=small_fashion)
    assert not (tmp_path / "new").exists()
    ours = tiny_imagenet.write(tmp_path / "ours", **SMALL, fashion_dir=small_fashion)
    tiny_imagenet.write(ours, classes=2, train_per_class=1, val_per_class=1, size=16,
                        fashion_dir=small_fashion)
    assert sorted(files(ours)) == ["README.txt", "train/n00000000/n00000000_0.JPEG",
                                   "train/n00000001/n00000001_0.JPEG",
                                   "val/n00000000/ILSVRC2012_val_00000001.JPEG",
                                   "val/n00000001/ILSVRC2012_val_00000002.JPEG"]


def test_script(small_fashion, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_imagenet.py"), str(tmp_path / "t"),
                           "--classes", "2", "--train-per-class", "3", "--val-per-class", "1",
                           "--size", "24", "--seed", "5", "--fashion-dir", str(small_fashion)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "2 classes, 6 train + 2 val JPEGs" in done.stdout
    assert len(list((tmp_path / "t").rglob("*.JPEG"))) == 8
