"""The training loop: ``train_step``, ``train_one_epoch``, ``evaluate`` and ``fit``.

Each process runs its share of every global batch with the math of the real
cluster: each forward pass holds whole workers (ghost batch norm gives each
worker its own statistics), gradients of all micro-batches of a step are
accumulated into the mean over the process's share, DDP averages them over
processes once per step, the optimizer steps once per global batch, and the
batch-norm evaluation statistics are the average over all workers of the last
step. Memory is bounded by ``micro_batch``, not by the global batch.

The loop works on a :class:`~megabatch.run.Run` that :mod:`megabatch.build`
assembled; it knows nothing of the command line or of how the run was built.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megabatch import checkpoint
from megabatch.batching import BatchPlan, epoch_order
from megabatch.data.source import Batch, Source
from megabatch.distributed import DistInfo, accumulation, all_reduce_mean, all_reduce_sum, round_gradients
from megabatch.errors import CheckpointWriteError, Diverged, Preempted
from megabatch.nn import average_bn_stats, batch_norm_layers, step_statistics, use_last_batch_stats
from megabatch.noise import sq_norm
from megabatch.plots import plot_curves
from megabatch.run import Run


class StepResult(NamedTuple):
    loss: float  # mean training loss over the global batch (the same on every process)
    stop: bool  # some process was asked to stop (SIGTERM/SIGUSR1): all stop after this step


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, alpha_sgd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "alpha_sgd" in group:
            group["alpha_sgd"] = alpha_sgd


def train_step(run: Run, micro_batches: Iterable[Batch]) -> StepResult:
    """One optimizer step on this process's share of a global batch, given as micro-batches.

    Each micro-batch's summed loss is divided by the share's size, so the accumulated
    gradient is the mean over the share; DDP then averages the shares. With
    ``train.noise_scale`` the micro-batches' own gradients are the small batches of the
    noise-scale estimate and the step's gradient the big one (they change nothing else).
    """
    plan = run.plan
    total = torch.zeros((), device=run.device)
    pieces = NoisePieces(run)
    with step_statistics(run.model):
        for i, (x, y) in enumerate(micro_batches):
            with accumulation(run.net, last=i == plan.micro_batches - 1):
                with torch.autocast(run.device.type, dtype=run.autocast_dtype,
                                    enabled=run.autocast_dtype is not None):  # (the loss runs in fp32)
                    logits = run.net(x.contiguous(memory_format=run.layout))
                    loss = F.cross_entropy(logits, y, reduction="sum",
                                           label_smoothing=run.recipe.train.label_smoothing) / plan.local_batch
                (run.scaler.scale(loss) if run.scaler else loss).backward()
            pieces.after_backward(i)
            total += loss.detach()
    # One all-reduce per step agrees on the loss (all processes stop together on a NaN),
    # on a stop request, and on the noise-scale norms.
    # torch.full, not torch.tensor(..., device=): a fill kernel, not a copy that waits for a GPU.
    stop = torch.full((), float(run.stop_requested()), device=run.device)
    agreement = torch.stack([total, stop, *pieces.norms()])
    # Queued before the host waits for the loss (.tolist()), so that a GPU is still busy
    # with them meanwhile; a non-finite loss stops the run, whatever the rounding did.
    round_gradients(run.model, run.dist, run.recipe.train.comm_dtype)
    agreed = all_reduce_mean(agreement, run.dist).tolist()
    value = agreed[0]
    if not math.isfinite(value):
        return StepResult(value, agreed[1] > 0)  # the caller stops before the optimizer sees the gradient
    pieces.update(agreed[2:])
    if run.scaler:  # skips the step if the fp16 gradients overflowed, and adapts the scale
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=not run.keep_grads)
    return StepResult(value, agreed[1] > 0)


class NoisePieces:
    """The squared norms that the noise-scale estimate needs from one step: of each
    micro-batch's own mean gradient (|G_small|^2, B_small = micro_batch images) and of the
    step's gradient over the global batch (|G_big|^2). Under DDP the last micro-batch's
    gradient arrives already averaged over processes, so the first k-1 are the pieces."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.on = run.noise is not None and run.plan.micro_batches > 1
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.previous: list[torch.Tensor] | None = None
        self.small: list[torch.Tensor] = []

    def after_backward(self, i: int) -> None:
        plan = self.run.plan
        if not self.on or (self.run.dist.distributed and i == plan.micro_batches - 1):
            return
        grads = [p.grad for p in self.params]
        piece = grads if self.previous is None else torch._foreach_sub(grads, self.previous)
        # The micro-batch contributed (micro / share) x its own mean gradient (x the fp16
        # scale, divided out in norms()).
        self.small.append(sq_norm(piece) * (plan.local_batch / plan.micro_batch) ** 2)
        if self.previous is None:
            self.previous = [g.clone() for g in grads]
        else:  # one multi-tensor copy into the step's buffers, not an allocation per tensor
            torch._foreach_copy_(self.previous, grads)

    def norms(self) -> list[torch.Tensor]:
        if not self.on:
            return []
        # The fp16 loss scale as a tensor on the device (GradScaler.scale of a one):
        # get_scale() would read it on the host, which waits for a GPU.
        scale = self.run.scaler.scale(torch.ones((), device=self.run.device)) if self.run.scaler else 1.0
        big = sq_norm([p.grad for p in self.params])
        return [torch.stack(self.small).mean() / scale ** 2, big / scale ** 2]

    def update(self, norms: list[float]) -> None:
        if self.on and all(math.isfinite(v) for v in norms):  # an fp16 overflow step says nothing
            self.run.noise.update(norms[0], norms[1], self.run.plan.micro_batch, self.run.plan.global_batch)


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train until the end of ``epoch`` (from wherever ``run.iteration`` stands in it).
    On a stop request mid-epoch, checkpoint and raise :class:`Preempted`."""
    run.net.train()
    r, steps = run.recipe, run.steps_per_epoch
    sums = run.partial_epoch  # kept in mid-epoch checkpoints, so a resumed epoch reports the same
    sums.setdefault("loss", 0.0)
    sums.setdefault("steps", 0)
    start, images, stop = time.perf_counter(), 0, False
    first = run.iteration - epoch * steps
    order = epoch_order(r.train.seed, epoch, len(run.train_data))
    batches = run.train_data.training_batches(run.plan.epoch(order, epoch, first), r.train.seed,
                                              r.data.augment, run.device)
    for step, micro_batches in enumerate(batches, start=first):
        lr, alpha = run.schedule(run.iteration / steps)
        set_hyperparameters(run.optimizer, lr, alpha)
        loss, stop = train_step(run, micro_batches)
        if not math.isfinite(loss):
            raise Diverged(f"training diverged: loss is {loss} at epoch {epoch + 1}, iteration "
                           f"{run.iteration} (step {step + 1} of the epoch); {last_good(run)}; lower "
                           f"optimizer.lr_per_256 or lengthen the warm-up and train again")
        run.iteration += 1
        images += run.plan.global_batch
        sums["loss"] += loss
        sums["steps"] += 1
        rate = images / max(time.perf_counter() - start, 1e-9)
        run.progress.step(epoch, step + 1, loss, rate)
        if run.log:
            run.log({"train_loss": loss, "lr": lr, "alpha_sgd": alpha, "images_per_s": rate}, run.iteration)
        done = run.iteration >= run.total_steps
        if step + 1 < steps and not done and (stop or r.train.checkpoint_every
                                              and run.iteration % r.train.checkpoint_every == 0):
            save_checkpoint(run, epochs_done=epoch)
            if stop:
                raise Preempted(f"stopped by a signal at epoch {epoch + 1}, iteration {run.iteration}; "
                                f"{last_good(run)}; continue with: megabatch train --resume {run.out_dir}")
        if done:
            break
    elapsed = time.perf_counter() - start
    run.partial_epoch = {}
    return {"train_loss": sums["loss"] / max(sums["steps"], 1), "lr": lr, "alpha_sgd": alpha,
            "images_per_s": images / max(elapsed, 1e-9), "train_time_s": elapsed, "stop": stop}


@torch.no_grad()
def evaluate(model: nn.Module, data: Source, device: torch.device, dist: DistInfo = DistInfo(),
             batch_size: int = 1000, layout: torch.memory_format = torch.contiguous_format,
             autocast_dtype: torch.dtype | None = None, name: str = "test") -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in percent) on ``data`` with the stored BN statistics,
    as ``{name}_loss``, ``{name}_top1``, ``{name}_top5``.

    Each process takes a contiguous shard of the test set (no padding, no duplicate)
    and the sums are added over processes, so the result is exact.
    """
    model.eval()
    n = len(data)
    first, last = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    for x, y in data.evaluation_batches(first, last, batch_size, device):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x.contiguous(memory_format=layout))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits.double(), y, reduction="sum"),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
    loss, top1, top5 = all_reduce_sum(sums, dist).tolist()
    return {f"{name}_loss": loss / n, f"{name}_top1": 100.0 * top1 / n, f"{name}_top5": 100.0 * top5 / n}


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, data: Source, plan: BatchPlan, seed: int, augment: bool,
                            device: torch.device, layout: torch.memory_format = torch.contiguous_format,
                            autocast_dtype: torch.dtype | None = None) -> None:
    """Replace every BN layer's stored statistics by those of one global batch of training
    images, ``plan``'s (the first step of epoch 0 of ``seed``, augmented as in training),
    each worker's group normalized on its own and the groups averaged: what last-batch BN
    stores after a step with these weights. The weights are untouched; each layer keeps its
    momentum. Separates what the weights learned from what the stored statistics say."""
    layers = batch_norm_layers(model)
    momenta = [m.momentum for m in layers]
    step = next(plan.epoch(epoch_order(seed, 0, len(data)), 0))
    model.train()
    try:
        use_last_batch_stats(model)  # momentum 1: step_statistics then stores this step's average alone
        with step_statistics(model):
            for x, _ in next(data.training_batches([step], seed, augment, device)):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    model(x.contiguous(memory_format=layout))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()


def save_checkpoint(run: Run, epochs_done: int) -> None:
    """Average the workers' BN statistics, then (rank 0) write and rotate a checkpoint.
    Weights that are no longer finite are a divergence, never written; every process
    sees them (they are equal everywhere) and every process stops. A failed write
    (a full disk) stops every process too, not rank 0 alone."""
    average_bn_stats(run.model, run.dist)
    bad = checkpoint.non_finite(run.model.state_dict())
    if bad:
        raise Diverged(f"training diverged: the weights are no longer finite at iteration {run.iteration} "
                       f"(epoch {epochs_done + 1}: {', '.join(bad[:3])}); {last_good(run)}; lower "
                       f"optimizer.lr_per_256 or lengthen the warm-up and train again")
    failure = None
    if run.dist.is_main:
        try:
            checkpoint.save(run.state_dict(epochs_done), checkpoint.step_path(run.checkpoint_dir, run.iteration))
        except CheckpointWriteError as e:
            failure = e
        else:
            kept = checkpoint.prune(run.checkpoint_dir, run.recipe.train.keep_checkpoints)
            if kept:
                run.progress.info(f"megabatch: warning: could not delete the older checkpoint(s) "
                                  f"{', '.join(kept)}; the new one is written; training goes on")
    if run.dist.distributed:
        failed = all_reduce_sum(torch.full((), float(failure is not None), device=run.device), run.dist).item()
        if failed and failure is None:
            raise CheckpointWriteError(f"rank 0 could not write the checkpoint of iteration {run.iteration} "
                                       f"(its own message says why); stopping with it")
    if failure is not None:
        raise failure


def last_good(run: Run) -> str:
    newest = checkpoint.list_checkpoints(run.checkpoint_dir)
    return f"the last good checkpoint is {newest[-1]}" if newest else "no checkpoint was written yet"


def fit(run: Run) -> dict[str, Any]:
    """Train for the recipe's epochs, evaluating and checkpointing after each; returns
    the last epoch's metrics."""
    r = run.recipe
    wall_start = time.perf_counter() - (run.history[-1]["wall_time_s"] if run.history else 0.0)
    steps = run.steps_per_epoch
    while run.iteration < run.total_steps:
        epoch = run.iteration // steps
        metrics = {"epoch": epoch + 1, **train_one_epoch(run, epoch)}
        stop = metrics.pop("stop")
        done = run.iteration >= run.total_steps
        # Evaluation and checkpoints use the last step's BN statistics of all workers.
        average_bn_stats(run.model, run.dist)
        if done or (epoch + 1) % r.train.eval_every == 0:
            metrics.update(evaluate(run.model, run.test_data, run.device, run.dist, run.plan.micro_batch,
                                    run.layout, run.autocast_dtype))
            if run.validation_data is not None:
                metrics.update(evaluate(run.model, run.validation_data, run.device, run.dist,
                                        run.plan.micro_batch, run.layout, run.autocast_dtype, name="val"))
        if run.noise and run.noise.updates:
            metrics.update(noise_scale=run.noise.noise_scale, grad_sq_norm=run.noise.grad_sq_norm,
                           grad_trace_sigma=run.noise.trace_sigma)
        report_unreadable(run, epoch, metrics)
        metrics.update(iteration=run.iteration, wall_time_s=time.perf_counter() - wall_start)
        run.history.append(metrics)
        # A failed append (a full disk) must not cost the epoch's checkpoint, which holds
        # this epoch's metrics too: it is raised once the checkpoint was tried.
        failure = log_epoch(run, metrics)
        save_checkpoint(run, epochs_done=epoch + 1)
        # Agreed by all: a failed log (rank 0's), and a stop asked for during the evaluation
        # or the checkpoint (not one more step).
        late = all_reduce_sum(torch.tensor([float(failure is not None), float(run.stop_requested())],
                                           device=run.device), run.dist)
        if late[0] > 0:
            raise CheckpointWriteError(f"{failure or 'rank 0 could not append to metrics.jsonl'}; {last_good(run)} "
                                       f"and holds this epoch's metrics; fix the disk, then continue with "
                                       f"--resume {run.out_dir}")
        stop = stop or bool(late[1] > 0)
        if stop and not done:
            raise Preempted(f"stopped by a signal after epoch {epoch + 1}, iteration {run.iteration}; "
                            f"{last_good(run)}; continue with: megabatch train --resume {run.out_dir}")
    if not run.history:
        return {}
    if run.dist.is_main:
        final = checkpoint.save(run.state_dict(run.history[-1]["epoch"]), run.out_dir / "final.pt")
        last = run.history[-1]
        val = f" (validation top-1 {last['val_top1']:.2f}%)" if "val_top1" in last else ""
        run.progress.info(f"final: test top-1 {last.get('test_top1', float('nan')):.2f}% "
                          f"top-5 {last.get('test_top5', float('nan')):.2f}%{val} after {run.iteration} "
                          f"steps in {last['wall_time_s']:.0f} s; checkpoint {final}")
        plot_curves(run.history, run.out_dir / "curves.png", title=r.name)
    return run.history[-1]


def report_unreadable(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Count (over all processes) and name the images the data sources could not read."""
    sources = (run.train_data, run.test_data, run.validation_data)
    unreadable = [path for source in sources if source is not None for path in source.take_unreadable()]
    count = int(all_reduce_sum(torch.full((), float(len(unreadable)), device=run.device), run.dist))
    if count:
        metrics["unreadable_images"] = count
        example = f" (e.g. {unreadable[0]})" if unreadable else ""
        run.progress.info(f"epoch {epoch + 1}: {count} unreadable image(s) replaced by readable ones{example}")


def log_epoch(run: Run, metrics: dict[str, Any]) -> str | None:
    """Rank 0 appends the epoch to metrics.jsonl and prints it; why an append failed is returned."""
    if not run.dist.is_main:
        return None
    path = run.out_dir / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    except OSError as e:
        return f"could not append epoch {metrics['epoch']} to {path} ({e.strerror or e})"
    if run.log:
        run.log({k: v for k, v in metrics.items() if k.startswith(("test_", "val_", "noise", "grad_"))},
                run.iteration)
    test = (f" test top-1 {metrics['test_top1']:.2f}% top-5 {metrics['test_top5']:.2f}%"
            if "test_top1" in metrics else "")
    test += f" val top-1 {metrics['val_top1']:.2f}%" if "val_top1" in metrics else ""
    noise = f" B_simple {metrics['noise_scale']:,.0f}" if "noise_scale" in metrics else ""
    run.progress.info(
        f"epoch {metrics['epoch']}/{run.recipe.train.epochs} iter {metrics['iteration']} "
        f"loss {metrics['train_loss']:.4f}{test} lr {metrics['lr']:.4g} alpha_sgd "
        f"{metrics['alpha_sgd']:.3f}{noise} {metrics['images_per_s']:,.0f} img/s "
        f"{metrics['wall_time_s']:.0f} s")
