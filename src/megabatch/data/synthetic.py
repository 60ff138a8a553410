"""Random images with random labels: for smoke tests and throughput measurements,
where only shapes matter. Deterministic for a given seed."""

from __future__ import annotations

import torch

from megabatch.data.images import ImageTensors


def make(train_size: int, test_size: int, image_size: int, channels: int, num_classes: int,
         seed: int = 0) -> tuple[ImageTensors, ImageTensors]:
    generator = torch.Generator().manual_seed(seed)
    classes = tuple(f"class {i}" for i in range(num_classes))

    def split(n: int) -> ImageTensors:
        images = torch.randint(0, 256, (n, channels, image_size, image_size),
                               dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        return ImageTensors(images, labels, 0.5, 0.29, classes)

    return split(train_size), split(test_size)
