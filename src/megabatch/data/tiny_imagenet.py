"""A small ImageNet-layout folder of real JPEG files, made from Fashion-MNIST.

For tests and demos of the ImageNet input pipeline on a CPU: the same folder
layout, file names and JPEG decoding as ImageNet, at a size that takes seconds.
Class ``c`` is Fashion-MNIST label ``c``, upscaled, coloured with a per-class
tint (so the classes stay learnable) and a per-image jitter, and given a random
aspect ratio (so the random-resized crop has something to do)::

    out/README.txt
    out/train/n00000000/n00000000_0.JPEG ...
    out/val/n00000000/ILSVRC2012_val_00000001.JPEG ...
"""

from __future__ import annotations

import colorsys
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from megabatch.data import fashion_mnist

MARK = "tiny-imagenet: written by megabatch.data.tiny_imagenet.write"
QUALITY = 90
ASPECT = (0.8, 1.25)  # range of width / size and of height / size


def wnid(c: int) -> str:
    """A fake WordNet id; sorting the ids sorts the classes."""
    return f"n{c:08d}"


def colourise(gray: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) uint8 -> (h, w, 3) uint8: the garment in its class's hue, jittered, on a
    dark background of a random hue."""
    hue = c / len(fashion_mnist.CLASSES) + rng.uniform(-0.03, 0.03)
    fg = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 0.9), rng.uniform(0.7, 1.0))
    bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.3))
    g = gray.astype(np.float32)[..., None] / 255
    rgb = g * np.array(fg, np.float32) + (1 - g) * np.array(bg, np.float32)
    return np.round(rgb * 255).astype(np.uint8)


def write_image(path: Path, gray: np.ndarray, c: int, size: int, rng: np.random.Generator) -> None:
    w, h = (round(size * s) for s in rng.uniform(*ASPECT, size=2))
    big = np.asarray(Image.fromarray(gray).resize((w, h), Image.BILINEAR))
    Image.fromarray(colourise(big, c, rng), "RGB").save(path, "JPEG", quality=QUALITY)


def clear(out: Path) -> None:
    """Make ``out`` an empty folder, or a previous output with its images removed."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.txt"
        if not (readme.is_file() and readme.read_text().startswith(MARK)):
            raise ValueError(f"{out} is not empty and not a previous tiny-imagenet output "
                             "(no README.txt of ours): choose an empty or new folder")
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def readme(classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> str:
    names = "\n".join(f"  {wnid(c)}  {fashion_mnist.CLASSES[c]}" for c in range(classes))
    return (f"{MARK}\n\n"
            f"A small ImageNet-layout folder of JPEG files (quality {QUALITY}) for tests and demos.\n"
            f"{classes} classes, {train_per_class} training images per class (from Fashion-MNIST "
            f"train), {val_per_class} validation images per class (from Fashion-MNIST test).\n"
            f"Each image is upscaled to about {size}x{size} (width and height each times "
            f"{ASPECT[0]}..{ASPECT[1]}), tinted per class and jittered per image; seed {seed}.\n"
            "Layout: train/<wnid>/<wnid>_<i>.JPEG, val/<wnid>/ILSVRC2012_val_<n>.JPEG\n"
            "Rewriting this folder with the same arguments gives the same bytes.\n\n"
            f"Classes (fake WordNet id, Fashion-MNIST class):\n{names}\n")


def write(out: Path, classes: int = 10, train_per_class: int = 32, val_per_class: int = 8,
          size: int = 64, seed: int = 0, fashion_dir: Path | None = None) -> Path:
    """Write the folder ``out`` (see the module docstring) and return it.

    Refuses (ValueError) a non-empty ``out`` that is not a previous output of this
    function; a previous output is overwritten. Deterministic for a given ``seed``.
    """
    out = Path(out)
    if not 1 <= classes <= len(fashion_mnist.CLASSES):
        raise ValueError(f"classes must be 1..{len(fashion_mnist.CLASSES)} "
                         f"(the Fashion-MNIST classes), got {classes}")
    if train_per_class < 1 or val_per_class < 1 or size < 8:
        raise ValueError(f"need train_per_class >= 1, val_per_class >= 1 and size >= 8, got "
                         f"{train_per_class}, {val_per_class} and {size}")
    train, test = fashion_mnist.load(fashion_dir)
    picks = []  # (split, class, its images), all checked before anything is written
    for split, source, per_class in (("train", train, train_per_class), ("val", test, val_per_class)):
        for c in range(classes):
            index = np.flatnonzero(source.labels.numpy() == c)[:per_class]
            if len(index) < per_class:
                raise ValueError(f"Fashion-MNIST {'test' if split == 'val' else 'train'} has only "
                                 f"{len(index)} images of class {c}, {per_class} asked for")
            picks.append((split, c, source.images[index, 0].numpy()))
    clear(out)
    # The README goes first: an interrupted write is still recognised as ours and overwritten.
    (out / "README.txt").write_text(readme(classes, train_per_class, val_per_class, size, seed))
    rng = np.random.default_rng(seed)
    n_val = 0
    for split, c, images in picks:
        folder = out / split / wnid(c)
        folder.mkdir(parents=True)
        for i, gray in enumerate(images):
            n_val += split == "val"
            name = f"ILSVRC2012_val_{n_val:08d}.JPEG" if split == "val" else f"{wnid(c)}_{i}.JPEG"
            write_image(folder / name, gray, c, size, rng)
    return out


# The files a real ImageNet copy holds besides plain RGB JPEGs (ImageNet's train set has 22
# CMYK JPEGs, one PNG named .JPEG and greyscale ones), and two that a copy can get damaged
# into. Readable: the loaders must decode them; unreadable: counted and replaced.
ODD_READABLE = ("cmyk", "grey", "png", "tiny", "large")
ODD_UNREADABLE = ("truncated", "empty")


def add_odd_files(out: Path, seed: int = 0) -> dict[str, Path]:
    """Add to the first training class of the folder ``out`` (written by :func:`write`) one
    file of each kind of :data:`ODD_READABLE` and :data:`ODD_UNREADABLE`, all named
    ``*.JPEG``: a CMYK JPEG, a greyscale JPEG, a PNG, a 3x2 JPEG, a 3000x2000 JPEG, a JPEG
    cut in half and an empty file. Returns {kind: path}."""
    folder = Path(out) / "train" / wnid(0)
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing: write the folder first")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels, "RGB")
    paths = {kind: folder / f"{wnid(0)}_odd_{kind}.JPEG" for kind in ODD_READABLE + ODD_UNREADABLE}
    rgb.convert("CMYK").save(paths["cmyk"], "JPEG", quality=QUALITY)
    rgb.convert("L").save(paths["grey"], "JPEG", quality=QUALITY)
    rgb.save(paths["png"], "PNG")
    rgb.resize((3, 2)).save(paths["tiny"], "JPEG", quality=QUALITY)
    rgb.resize((3000, 2000), Image.BILINEAR).save(paths["large"], "JPEG", quality=QUALITY)
    whole = paths["tiny"].with_suffix(".tmp")
    rgb.save(whole, "JPEG", quality=QUALITY)
    data = whole.read_bytes()
    whole.unlink()
    paths["truncated"].write_bytes(data[:len(data) // 2])
    paths["empty"].write_bytes(b"")
    return paths

