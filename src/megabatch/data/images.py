"""An in-memory image dataset and the batch-wise augmentation it applies.

Augmentation parameters are drawn for a whole global batch from a generator
seeded by (seed, iteration), then sliced: every image gets the same flip and
shift whatever the number of processes or the micro-batch size, which is what
makes emulated and real workers compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from megabatch.batching import StepIndices, step_generator

AUGMENT_PAD = 2  # pixels of random translation


@dataclass(frozen=True)
class Augmentation:
    """Per-image random horizontal flip and translation by up to ``pad`` pixels."""

    flip: torch.Tensor  # (n,) bool
    shift: torch.Tensor  # (n, 2) int64, rows then columns, in [-pad, pad]
    pad: int

    @classmethod
    def draw(cls, n: int, pad: int, generator: torch.Generator) -> "Augmentation":
        flip = torch.rand(n, generator=generator) < 0.5
        shift = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
        return cls(flip, shift, pad)

    def __getitem__(self, index: slice) -> "Augmentation":
        return Augmentation(self.flip[index], self.shift[index], self.pad)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Flip and translate a batch (n, c, h, w); uncovered pixels become 0."""
        n, _, h, w = x.shape
        flip = self.flip.to(x.device, non_blocking=True)  # a blocking copy would wait for the GPU
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.pad == 0:
            return x
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        shift = self.shift.to(x.device, non_blocking=True)
        rows = torch.arange(h, device=x.device) + (p - shift[:, :1])  # (n, h)
        cols = torch.arange(w, device=x.device) + (p - shift[:, 1:])  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        # Advanced indices around a slice: the result is (n, h, w, c).
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ImageTensors:
    """Images as one uint8 tensor (N, C, H, W) with int64 labels, normalized per batch."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: float
    std: float
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu",
              augmentation: Augmentation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``index`` as normalized tensors of the default float dtype on ``device``,
        with their labels."""
        # Indices go where the images and labels are without waiting for the GPU (kept on it).
        on_images = index.to(self.images.device, non_blocking=True)
        x = self.images[on_images].to(device, non_blocking=True).to(torch.get_default_dtype()).div_(255.0)
        if augmentation is not None:
            x = augmentation.apply(x)
        x = x.sub_(self.mean).div_(self.std)
        on_labels = index.to(self.labels.device, non_blocking=True)
        return x, self.labels[on_labels].to(device, non_blocking=True)

    def training_batches(self, steps: Iterable[StepIndices], seed: int, augment: bool,
                         device: torch.device) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """For every step: this process's micro-batches, made one at a time (memory stays
        bounded by the micro-batch). Augmentation is drawn for the whole global batch from
        the step's generator, then sliced, so it does not depend on the processes."""
        for step in steps:
            augmentation = None
            if augment:
                augmentation = Augmentation.draw(step.global_batch, AUGMENT_PAD, step_generator(seed, step.iteration))
            yield (self.batch(index, device, augmentation[part] if augmentation else None)
                   for part, index in step.micro_batches)

    def evaluation_batches(self, first: int, last: int, batch_size: int,
                           device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images ``first`` to ``last`` (exclusive) in order, unaugmented."""
        for start in range(first, last, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, last)), device)

    def take_unreadable(self) -> list[str]:
        """Files that could not be read since the last call: none, everything is in memory."""
        return []

    def subset(self, n: int) -> "ImageTensors":
        """The first ``n`` images (all of them for n <= 0 or n >= len)."""
        if n <= 0 or n >= len(self):
            return self
        return ImageTensors(self.images[:n], self.labels[:n], self.mean, self.std, self.classes)

    def select(self, indices: Sequence[int]) -> "ImageTensors":
        """The images at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensors(self.images[index], self.labels[index], self.mean, self.std, self.classes)
