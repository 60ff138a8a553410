"""``megabatch noise-scale``: the critical batch of a recipe's model, at initialization
or at a checkpoint, and what it implies for a bigger or smaller batch.

B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) is measured on batches of the
recipe's global batch, each split into its micro-batches (the small batches of the
estimate), with the model in training mode and its per-worker BN, exactly as a
training step sees it; the weights are left as they were. The paper's model of
steps and data then says what a batch B costs: S = S_min (1 + B_noise / B) optimizer
steps and E = E_min (1 + B / B_noise) images. torch is imported inside :func:`run`, so
that the command line starts without it.
"""

from __future__ import annotations

import argparse
import itertools

from megabatch import flags
from megabatch.errors import UserError

BATCHES = (128, 512, 2048, 8192, 32768)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    flags.add_recipe(parser)
    add("--checkpoint", help="measure at these weights (a file megabatch train wrote); default: initialization")
    add("--steps", type=int, default=20, help="batches to average over (default 20)")
    add("--data", help="folder with the data set (default: the recipe's)")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from megabatch import checkpoint, noise
    from megabatch import recipe as recipes
    from megabatch.batching import BatchPlan, epoch_order, max_micro_batch
    from megabatch.build import build_model, configure_backends, resolve_device
    from megabatch.data import load_datasets

    if args.steps < 2:
        raise UserError(f"--steps must be at least 2 (the interval needs repeated estimates), not {args.steps}")
    recipe = recipes.load(args.recipe, args.set)
    device = resolve_device(recipe.train.device)
    configure_backends(device, recipe)  # the run's arithmetic (train.tf32) and autotuning
    train, _ = load_datasets(recipe.data, args.data, device.type)
    plan = BatchPlan.create(recipe.batch.global_batch, recipe.batch.per_worker_batch, recipe.batch.micro_batch,
                            max_micro_batch=max_micro_batch(device.type))
    if plan.micro_batches < 2:
        raise UserError(f"the global batch {plan.global_batch} holds a single micro-batch of {plan.micro_batch}: "
                        f"set batch.micro_batch to a part of it (a multiple of {plan.per_worker_batch})")
    model = build_model(recipe, train.channels, len(train.classes), device)
    where = "initialization"
    if args.checkpoint:
        state = checkpoint.load(args.checkpoint, require_finite=True, run_state=True)
        checkpoint.load_weights(model, state, args.checkpoint, f"--recipe {args.recipe} builds model.arch = "
                                f"{recipe.model.arch}: give the recipe the checkpoint was trained with")
        where = f"{args.checkpoint} (iteration {state.get('iteration', '?')})"

    def batches():  # whole global batches in the recipe's data order, unaugmented
        for epoch in itertools.count():
            steps = plan.epoch(epoch_order(recipe.train.seed, epoch, len(train)), epoch)
            for micro_batches in train.training_batches(steps, recipe.train.seed, False, device):
                xs, ys = zip(*micro_batches)
                yield torch.cat(xs), torch.cat(ys)

    m = noise.measure(model, lambda logits, y: F.cross_entropy(logits, y), batches(), plan.micro_batches,
                      args.steps)
    if not m.grad_sq_norm > 0 or not m.ci_low > 0:
        print(f"{recipe.name} at {where}: B_simple is not resolved: |G|^2 estimates to {m.grad_sq_norm:.3g} "
              f"(tr(Sigma) {m.trace_sigma:.4g}) over {m.batches} batches of {m.b_big}, so the true gradient is "
              f"lost in its noise (near a minimum the critical batch grows without bound); measure with "
              f"more --steps, or earlier in training")
        return 0
    print(f"{recipe.name} at {where}: gradient noise scale B_simple = {m.noise_scale:,.0f} images "
          f"(95% interval {m.ci_low:,.0f} to {m.ci_high:,.0f}; {m.batches} batches of {m.b_big} split into "
          f"{m.b_big // m.b_small} of {m.b_small}); |G|^2 = {m.grad_sq_norm:.4g}, tr(Sigma) = {m.trace_sigma:.4g}")
    print("what a batch B costs against the ideal (McCandlish et al. 2018, eq. 2.11):")
    print(f"{'batch':>8} {'steps / S_min':>14} {'images / E_min':>15}")
    for batch, steps, images in noise.tradeoff(m.noise_scale, sorted({*BATCHES, recipe.batch.global_batch})):
        print(f"{batch:>8,} {steps:>14.2f} {images:>15.2f}")
    return 0

