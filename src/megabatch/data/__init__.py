"""Data sources, one module each; :func:`load_datasets` picks the recipe's."""

from __future__ import annotations

from megabatch.data import fashion_mnist, synthetic
from megabatch.data.images import ImageTensors
from megabatch.errors import UserError


def load_datasets(config, data_dir: str | None = None) -> tuple[ImageTensors, ImageTensors]:
    """Training and test sets of a recipe's ``[data]`` table; ``data_dir`` (--data) wins over
    ``config.path``."""
    if config.dataset == "imagenet":
        raise UserError("the ImageNet input pipeline is not implemented yet (it is planned, with GPU "
                        "JPEG decoding); to try an ImageNet recipe's optimization and batch settings "
                        "now, add --set data.dataset=synthetic --set data.synthetic_size=[2048,256,64,3,1000]")
    if config.dataset == "synthetic":
        train, test = synthetic.make(*config.synthetic_size)
    else:
        train, test = fashion_mnist.load(data_dir or config.path or None)
    return train.subset(config.train_subset), test.subset(config.test_subset)
