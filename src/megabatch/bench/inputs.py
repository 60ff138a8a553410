"""The input side of ``megabatch bench``: a folder of real JPEGs and endless streams of
micro-batches read from it, for the input-pipeline and end-to-end measurements.

:func:`repeated` lists the folder's images over and over, so that one epoch lasts the
whole measurement: the loader's workers start once (in the warm-up), as in a long
ImageNet epoch, instead of at every pass over a small folder.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from megabatch.batching import BatchPlan, epoch_order
from megabatch.data import imagenet, tiny_imagenet
from megabatch.errors import UserError


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def jpeg_folder(data: str | None, quick: bool, tmp: Path) -> Path:
    """``--data`` checked, or a generated ImageNet-layout folder of real JPEGs in ``tmp``
    (10 classes x 64 training images of about 320x320; 2 x 8 of 48x48 for --quick)."""
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise UserError(f"--data {data} is not a folder: give an ImageNet-layout folder "
                            f"(train/<class>/*.JPEG and val/<class>/*.JPEG), or leave --data out "
                            f"to generate one")
        return root
    if quick:
        return tiny_imagenet.write(tmp / "jpegs", classes=2, train_per_class=8, val_per_class=1, size=48)
    return tiny_imagenet.write(tmp / "jpegs", classes=10, train_per_class=64, val_per_class=2, size=320)


def resize_size(image_size: int) -> int:
    """The evaluation resize that goes with a crop, as 256 goes with 224."""
    return round(image_size * 256 / 224)


def open_folder(root: Path, image_size: int, decoder: str = "pil", workers: int = 1) -> imagenet.ImageFolderSource:
    """The training split of ``root`` (the layout is checked: one-line errors)."""
    train, _ = imagenet.load(root, image_size, resize_size(image_size), decoder, workers)
    return train


def repeated(source: imagenet.ImageFolderSource, images: int) -> imagenet.ImageFolderSource:
    """``source`` with its images listed again and again, at least ``images`` in all."""
    copies = -(-images // len(source))
    return imagenet.ImageFolderSource(source.samples * copies, list(source.classes), source.image_size,
                                      source.resize_size, source.decoder, source.workers)


def steps(source, plan: BatchPlan, device: torch.device, augment: bool = True,
          seed: int = 0) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The micro-batches of every training step of ``source`` (ImageTensors or an
    ImageFolderSource), epoch after epoch; ``close()`` it to stop a loader's workers."""
    for epoch in itertools.count():
        yield from source.training_batches(plan.epoch(epoch_order(seed, epoch, len(source)), epoch),
                                           seed, augment, device)


@dataclass(frozen=True)
class Pipeline:
    """One way of reading the folder: a decoder and a number of loader workers."""

    decoder: str
    workers: int

    def name(self, device: torch.device) -> str:
        if self.decoder == "pil":
            return f"pil decode on CPU, {self.workers} worker{'s' if self.workers > 1 else ''}"
        where = "GPU (nvJPEG)" if device.type == "cuda" else "CPU: CPU decoding"
        return f"device decode (decode_jpeg) on {where}, {self.workers} readers"


def pipelines(device: torch.device) -> list[Pipeline]:
    """CPU decoding with one worker (what one core delivers) and with a worker per core,
    and batched decoding on the training device."""
    n = cores()
    return [Pipeline("pil", 1), *([Pipeline("pil", n)] if n > 1 else []), Pipeline("device", n)]


def reader(root: Path, pipeline: Pipeline, image_size: int, batch: int, images: int,
           device: torch.device) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Steps of one micro-batch of ``batch`` images read from the folder onto ``device``
    (decoded, randomly cropped, flipped, normalized); the folder is repeated to give at
    least ``images`` without starting the loader again."""
    source = repeated(open_folder(root, image_size, pipeline.decoder, pipeline.workers), images + batch)
    return steps(source, BatchPlan.create(batch, batch, batch), device)
