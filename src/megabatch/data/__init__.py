"""Data sources, one module each; :func:`load_datasets` picks the recipe's."""

from __future__ import annotations

from megabatch.data import fashion_mnist, synthetic
from megabatch.data.images import ImageTensors
from megabatch.errors import UserError


def load_datasets(config, data_dir: str | None = None) -> tuple[ImageTensors, ImageTensors]:
    """Training and test sets of a recipe's ``[data]`` table; ``data_dir`` (--data) wins over
    ``config.path``."""
    if config.dataset == "imagenet":
        raise UserError("the ImageNet input pipeline is not implemented yet; to run an ImageNet "
                        "recipe's model and optimization on random images now, add --set "
                        "data.dataset=synthetic --set data.synthetic_size=[TRAIN,TEST,SIZE,3,1000] "
                        "with TRAIN at least batch.global_batch")
    if config.dataset == "synthetic":
        train, test = synthetic.make(*config.synthetic_size)
    else:
        train, test = fashion_mnist.load(data_dir or config.path or None)
    return train.subset(config.train_subset), test.subset(config.test_subset)


IMAGENET_TRAIN_SIZE = 1_281_167


def train_size(config) -> int:
    """Training images of a recipe's ``[data]`` table, without loading them."""
    full = {"fashion-mnist": 60_000, "imagenet": IMAGENET_TRAIN_SIZE}.get(config.dataset)
    if full is None:
        full = config.synthetic_size[0]
    return min(full, config.train_subset) if config.train_subset > 0 else full
