"""``megabatch eval``: a checkpoint's test top-1 and top-5, with its stored BN statistics
and, with ``--recompute-bn``, with statistics recomputed from training images in the
recipe's worker groups (which tells the weights from the statistics last-batch BN kept).

The checkpoint's own recipe rebuilds the model, on the recipe's device or ``--device``:
a checkpoint written on a GPU evaluates on a CPU. torch is imported inside :func:`run`,
so that the command line starts without it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from megabatch.errors import UserError

if TYPE_CHECKING:
    import torch

    from megabatch.batching import BatchPlan
    from megabatch.data.source import Source
    from megabatch.recipe import Recipe


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint file (final.pt or step-*.pt)")
    add("--data", help="folder with the data set (default: the recipe's)")
    add("--device", choices=["cpu", "cuda"], help="default: the recipe's")
    add("--recompute-bn", type=int, nargs="?", const=0, metavar="IMAGES",
        help="also evaluate with BN statistics recomputed from IMAGES training images (default: the "
             "recipe's global batch) in the recipe's worker groups, as last-batch BN stores them: "
             "tells the weights from the stored statistics")


def run(args: argparse.Namespace) -> int:
    from megabatch import checkpoint
    from megabatch.build import (AUTOCAST_DTYPES, build_model, configure_backends, memory_format, resolve_device,
                                 resolve_recipe)
    from megabatch.data import hold_out, load_datasets
    from megabatch.recipe import from_dict
    from megabatch.train import evaluate, recompute_bn_statistics

    state = checkpoint.load(args.checkpoint, require_finite=True, run_state=True)
    saved = from_dict(state["recipe"])
    device = resolve_device(args.device or saved.train.device)
    recipe = resolve_recipe(saved, device)
    configure_backends(device, recipe)  # the run's arithmetic (train.tf32) and autotuning
    train, test = load_datasets(recipe.data, args.data, device.type)
    model = build_model(recipe, test.channels, len(test.classes), device)
    checkpoint.load_weights(model, state, args.checkpoint, f"its recipe builds model.arch = {recipe.model.arch}: "
                            "the file was edited or written by another program")
    layout, dtype = memory_format(recipe.train.memory_format), AUTOCAST_DTYPES[recipe.train.precision]

    def report(statistics: str) -> None:
        result = evaluate(model, test, device, batch_size=max(recipe.batch.micro_batch, 256), layout=layout,
                          autocast_dtype=dtype)
        print(f"  {statistics}: top-1 {result['test_top1']:.2f}%  top-5 {result['test_top5']:.2f}%  "
              f"loss {result['test_loss']:.4f}")

    print(f"{args.checkpoint}: {recipe.name} after {state['iteration']} steps, {len(test)} test images")
    report("stored BN statistics")
    if args.recompute_bn is not None:
        train, _ = hold_out(train, recipe.data.validation_images)  # the images the run trained on
        plan = bn_plan(args.recompute_bn, recipe, train, device)
        recompute_bn_statistics(model, train, plan, recipe.train.seed, recipe.data.augment, device, layout, dtype)
        report(f"BN statistics of {plan.global_batch} training images ({plan.workers} workers x "
               f"{plan.per_worker_batch})")
    return 0


def bn_plan(images: int, recipe: Recipe, train: Source, device: torch.device) -> BatchPlan:
    """The batch that ``eval --recompute-bn`` takes its statistics from: ``images`` (0: the
    recipe's global batch) in the recipe's worker groups; the micro-batches (which do not change
    the statistics) are the device's automatic ones."""
    from megabatch.batching import BatchPlan, max_micro_batch

    images = images or recipe.batch.global_batch
    if images < 0:
        raise UserError(f"--recompute-bn {images}: give a number of training images, e.g. {recipe.batch.global_batch}")
    if images > len(train):
        raise UserError(f"--recompute-bn {images}: the recipe has {len(train)} training images; ask for fewer")
    if images % recipe.batch.per_worker_batch:
        raise UserError(f"--recompute-bn {images} is not a whole number of workers of "
                        f"{recipe.batch.per_worker_batch} images (batch.per_worker_batch): give a multiple of it")
    return BatchPlan.create(images, recipe.batch.per_worker_batch, max_micro_batch=max_micro_batch(device.type))
