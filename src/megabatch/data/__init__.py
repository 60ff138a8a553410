"""Data sources, one module each; :func:`load_datasets` picks the recipe's."""

from __future__ import annotations

import os

import torch

from megabatch.data import fashion_mnist, imagenet, synthetic
from megabatch.errors import UserError


def load_datasets(config, data_dir: str | None = None, device_type: str = "cpu"):
    """Training and test sources of a recipe's ``[data]`` table (``data_dir``, i.e. --data, wins
    over ``config.path``): in-memory :class:`ImageTensors`, or an ImageNet folder streamed by
    :class:`~megabatch.data.imagenet.ImageFolderSource`; both give the trainer micro-batches."""
    if config.dataset == "imagenet":
        root = data_dir or config.path
        if not root:
            raise UserError("an ImageNet recipe needs --data DIR: the folder with train/<class>/*.JPEG "
                            "and val/<class>/*.JPEG")
        decoder = config.decoder if config.decoder != "auto" else ("device" if device_type == "cuda" else "pil")
        workers = min(config.workers, os.cpu_count() or 1)  # more than the cores only slows down
        train, test = imagenet.load(root, config.image_size, config.resize_size, decoder, workers)
        return train.subset(config.train_subset), test.subset(config.test_subset)
    if config.dataset == "synthetic":
        train, test = synthetic.make(*config.synthetic_size)
    else:
        train, test = fashion_mnist.load(data_dir or config.path or None)
    return train.subset(config.train_subset), test.subset(config.test_subset)


VALIDATION_SEED = 0  # one draw of the held-out images for every run, seed and method


def hold_out(train, n: int):
    """(the training images left, a validation set of ``n`` of them): a fixed random draw,
    both in the source's own order; ``(train, None)`` for n = 0."""
    if n == 0:
        return train, None
    if n >= len(train):
        raise UserError(f"data.validation_images = {n} leaves no training images out of {len(train)}: "
                        f"hold out fewer (a tenth, {len(train) // 10}, is usual)")
    drawn = torch.randperm(len(train), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    rest, held = drawn[n:].sort().values, drawn[:n].sort().values
    return train.select(rest.tolist()), train.select(held.tolist())


IMAGENET_TRAIN_SIZE = 1_281_167


def train_size(config) -> int:
    """Training images of a recipe's ``[data]`` table, without loading them."""
    full = {"fashion-mnist": 60_000, "imagenet": IMAGENET_TRAIN_SIZE}.get(config.dataset)
    if full is None:
        full = config.synthetic_size[0]
    return (min(full, config.train_subset) if config.train_subset > 0 else full) - config.validation_images
