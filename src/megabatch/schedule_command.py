"""``megabatch schedule``: a recipe's learning rate and alpha_sgd at chosen epochs, as CSV
(and as a plot with ``--plot``), from the same pure functions a run calls every step
(:mod:`megabatch.schedules`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megabatch import flags
from megabatch.errors import UserError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    flags.add_recipe(parser)
    add("--epochs", help="comma-separated epochs, e.g. 0,5,10.5")
    add("--every", type=float, default=1.0, help="sample every K epochs (default 1)")
    add("--plot", metavar="FILE.png", help="also draw lr and alpha_sgd against epochs")


def run(args: argparse.Namespace) -> int:
    from megabatch import recipe as recipes
    from megabatch.data import train_size
    from megabatch.schedules import epoch_settings, recipe_values

    recipe = recipes.load(args.recipe, args.set)
    steps = max(1, train_size(recipe.data) // recipe.batch.global_batch)
    settings = epoch_settings(recipe, steps)
    if recipe.schedule.unit == "step":
        print(f"# schedule written in optimizer steps: {steps} steps per epoch at global batch "
              f"{recipe.batch.global_batch}", file=sys.stderr)
    elif settings.scale != 1.0:
        print(f"# schedule written for {recipe.schedule.reference_epochs:g} epochs, stretched "
              f"x{settings.scale:.4g} to {recipe.train.epochs} epochs: boundaries "
              f"{[round(b, 4) for b in settings.boundaries]}, alpha_sgd center "
              f"{settings.alpha_center:.4g} period {settings.alpha_period:.4g}", file=sys.stderr)
    if args.epochs is not None:
        epochs = flags.numbers(args.epochs, "--epochs", float, "0,5,10.5", least=0)
    else:
        if args.every <= 0:
            raise UserError(f"--every must be > 0, got {args.every}")
        count = int(recipe.train.epochs / args.every + 1e-9)
        epochs = [i * args.every for i in range(count + 1)]
    rows = [(e, *recipe_values(recipe, e, steps)) for e in epochs]
    print("epoch,lr,alpha_sgd")
    for epoch, lr, alpha in rows:
        print(f"{epoch:g},{lr:.6g},{alpha:.6g}")
    if args.plot:
        from megabatch.plots import plot_schedule

        fine = max(recipe.train.epochs * 20, 200)
        dense = [(e, *recipe_values(recipe, e, steps)) for e in
                 (i * recipe.train.epochs / fine for i in range(fine + 1))]
        if plot_schedule(dense, Path(args.plot), title=f"{recipe.name} (global batch "
                         f"{recipe.batch.global_batch})"):
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0
