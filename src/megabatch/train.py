"""The training loop: ``train_step``, ``train_one_epoch``, ``evaluate`` and ``fit``.

Each process runs its share of every global batch with the math of the real
cluster: each forward pass holds whole workers (ghost batch norm gives each
worker its own statistics), gradients of all micro-batches of a step are
accumulated into the mean over the process's share, DDP averages them over
processes once per step, the optimizer steps once per global batch, and the
batch-norm evaluation statistics are the average over all workers of the last
step. Memory is bounded by ``micro_batch``, not by the global batch.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from megabatch import checkpoint, schedules
from megabatch.data.images import ImageTensors
from megabatch.distributed import (DistInfo, accumulation, all_reduce_mean, all_reduce_sum,
                                   round_gradients)
from megabatch.errors import Diverged
from megabatch.nn import average_bn_stats, step_statistics
from megabatch.run import Run, checkpoint_state, describe, memory_format


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, alpha_sgd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "alpha_sgd" in group:
            group["alpha_sgd"] = alpha_sgd


def train_step(run: Run, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One optimizer step on this process's share of a global batch, given as micro-batches.

    Returns the mean training loss over the global batch. Each micro-batch's summed
    loss is divided by the share's size, so the accumulated gradient is the mean over
    the share; DDP then averages the shares.
    """
    total = torch.zeros((), device=run.device)
    passes, layout = run.plan.micro_batches, memory_format(run.device, run.recipe.train.memory_format)
    with step_statistics(run.model):
        for i, (x, y) in enumerate(micro_batches):
            with accumulation(run.net, last=i == passes - 1):
                with autocast(run.device, run.recipe.train.precision):  # (autocast runs the loss in fp32)
                    logits = run.net(x.contiguous(memory_format=layout))
                    loss = F.cross_entropy(logits, y, reduction="sum",
                                           label_smoothing=run.recipe.train.label_smoothing) / run.plan.local_batch
                (run.scaler.scale(loss) if run.scaler else loss).backward()
            total += loss.detach()
    # Every process sees the same loss, so all of them stop together on a NaN.
    value = all_reduce_mean(total, run.dist).item()
    if not math.isfinite(value):
        return value  # the caller stops the run before the optimizer sees the gradient
    if not run.dist.distributed:
        round_gradients(run.model, run.recipe.train.comm_dtype)
    if run.scaler:  # skips the step if the fp16 gradients overflowed, and adapts the scale
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return value


def autocast(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 for ``precision``; a no-op for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train until the end of ``epoch`` (from wherever ``run.iteration`` stands in it)."""
    run.net.train()
    r, steps = run.recipe, run.steps_per_epoch
    sums = run.partial_epoch  # kept in mid-epoch checkpoints, so a resumed epoch reports the same
    sums.setdefault("loss", 0.0)
    sums.setdefault("steps", 0)
    start, images = time.perf_counter(), 0
    first = run.iteration - epoch * steps
    batches = run.train_data.training_steps(epoch, first, run.plan, r.train.seed, r.data.augment, run.device)
    for step, micro_batches in enumerate(batches, start=first):
        lr, alpha = schedules.recipe_values(r, run.iteration / steps, steps)
        set_hyperparameters(run.optimizer, lr, alpha)
        loss = train_step(run, micro_batches)
        if not math.isfinite(loss):
            newest = checkpoint.list_checkpoints(run.checkpoint_dir)
            kept = f"the last good checkpoint is {newest[-1]}" if newest else "no checkpoint was written yet"
            raise Diverged(f"training diverged: loss is {loss} at epoch {epoch + 1}, iteration "
                           f"{run.iteration} (step {step + 1} of the epoch); {kept}; lower "
                           f"optimizer.lr_per_256 or lengthen the warm-up and train again")
        run.iteration += 1
        images += run.plan.global_batch
        sums["loss"] += loss
        sums["steps"] += 1
        run.progress.step(epoch, step + 1, loss, images / max(time.perf_counter() - start, 1e-9))
        stop = r.train.max_steps and run.iteration >= r.train.max_steps
        if r.train.checkpoint_every and run.iteration % r.train.checkpoint_every == 0 \
                and step + 1 < steps and not stop:
            save_checkpoint(run, epochs_done=epoch)
        if stop:
            break
    elapsed = time.perf_counter() - start
    run.partial_epoch = {}
    return {"train_loss": sums["loss"] / max(sums["steps"], 1), "lr": lr, "alpha_sgd": alpha,
            "images_per_s": images / max(elapsed, 1e-9), "train_time_s": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, device: torch.device, dist: DistInfo = DistInfo(),
             batch_size: int = 1000, layout: torch.memory_format = torch.contiguous_format,
             precision: str = "fp32") -> dict[str, float]:
    """Test loss, top-1 and top-5 accuracy (in percent) with the stored BN statistics.

    Each process takes a contiguous shard of the test set (no padding, no duplicate)
    and the sums are added over processes, so the result is exact.
    """
    model.eval()
    n = len(data)
    first, last = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    for x, y in data.evaluation_batches(first, last, batch_size, device):
        with autocast(device, precision):
            logits = model(x.contiguous(memory_format=layout))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits.double(), y, reduction="sum"),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
    loss, top1, top5 = all_reduce_sum(sums, dist).tolist()
    return {"test_loss": loss / n, "test_top1": 100.0 * top1 / n, "test_top5": 100.0 * top5 / n}


def save_checkpoint(run: Run, epochs_done: int) -> None:
    """Average the workers' BN statistics, then (rank 0) write and rotate a checkpoint."""
    average_bn_stats(run.model)
    if run.dist.is_main:
        checkpoint.save(checkpoint_state(run, epochs_done), checkpoint.step_path(run.checkpoint_dir, run.iteration))
        checkpoint.prune(run.checkpoint_dir, run.recipe.train.keep_checkpoints)


def fit(run: Run) -> dict[str, Any]:
    """Train for the recipe's epochs, evaluating and checkpointing after each; returns
    the last epoch's metrics."""
    r = run.recipe
    run.progress.info(describe(run))
    wall_start = time.perf_counter() - (run.history[-1]["wall_time_s"] if run.history else 0.0)
    steps = run.steps_per_epoch
    total = steps * r.train.epochs if not r.train.max_steps else min(r.train.max_steps, steps * r.train.epochs)
    while run.iteration < total:
        epoch = run.iteration // steps
        metrics = {"epoch": epoch + 1, **train_one_epoch(run, epoch)}
        done = run.iteration >= total
        # Evaluation and checkpoints use the last step's BN statistics of all workers.
        average_bn_stats(run.model)
        if done or (epoch + 1) % r.train.eval_every == 0:
            metrics.update(evaluate(run.model, run.test_data, run.device, run.dist, run.plan.micro_batch,
                                    memory_format(run.device, r.train.memory_format), r.train.precision))
        report_unreadable(run, epoch, metrics)
        metrics.update(iteration=run.iteration, wall_time_s=time.perf_counter() - wall_start)
        run.history.append(metrics)
        log_epoch(run, metrics)
        save_checkpoint(run, epochs_done=epoch + 1)
    if not run.history:
        return {}
    if run.dist.is_main:
        final = checkpoint.save(checkpoint_state(run, run.history[-1]["epoch"]), run.out_dir / "final.pt")
        last = run.history[-1]
        run.progress.info(f"final: test top-1 {last.get('test_top1', float('nan')):.2f}% "
                          f"top-5 {last.get('test_top5', float('nan')):.2f}% after {run.iteration} "
                          f"steps in {last['wall_time_s']:.0f} s; checkpoint {final}")
        from megabatch.plots import plot_curves  # matplotlib is optional and slow to import

        plot_curves(run.history, run.out_dir / "curves.png", title=r.name)
    return run.history[-1]


def report_unreadable(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Count (over all processes) and name the images the data sources could not read."""
    unreadable = run.train_data.take_unreadable() + run.test_data.take_unreadable()
    count = int(all_reduce_sum(torch.tensor(float(len(unreadable)), device=run.device), run.dist))
    if count:
        metrics["unreadable_images"] = count
        example = f" (e.g. {unreadable[0]})" if unreadable else ""
        run.progress.info(f"epoch {epoch + 1}: {count} unreadable image(s) replaced by readable ones{example}")


def log_epoch(run: Run, metrics: dict[str, Any]) -> None:
    if not run.dist.is_main:
        return
    with open(run.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    test = (f" test top-1 {metrics['test_top1']:.2f}% top-5 {metrics['test_top5']:.2f}%"
            if "test_top1" in metrics else "")
    run.progress.info(
        f"epoch {metrics['epoch']}/{run.recipe.train.epochs} iter {metrics['iteration']} "
        f"loss {metrics['train_loss']:.4f}{test} lr {metrics['lr']:.4g} alpha_sgd "
        f"{metrics['alpha_sgd']:.3f} {metrics['images_per_s']:,.0f} img/s "
        f"{metrics['wall_time_s']:.0f} s")
