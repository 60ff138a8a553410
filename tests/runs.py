"""Small training runs of the demo recipe on Fashion-MNIST that the tests build and compare."""

from __future__ import annotations

from megabatch import recipe as recipes
from megabatch.build import build_run
from megabatch.progress import Progress

# The demo computes in bf16 where the CPU has it: these compare in fp32, and on the CPU also
# where a GPU is visible (they are exact comparisons with CPU references).
SMALL = ["data.train_subset=1024", "data.test_subset=500", "train.epochs=1", "train.comm_dtype=fp32",
         "train.precision=fp32", "train.device=cpu"]


def quiet_run(tmp_path, overrides, data_dir=None):
    recipe = recipes.load("fashion-mnist-demo", SMALL + overrides)
    return build_run(recipe, data_dir, tmp_path, Progress(1, 1, enabled=False))


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
