"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``, top to bottom.

One process runs any ``workers x per_worker_batch`` configuration with the math
of the real cluster: each forward pass holds whole workers (ghost batch norm
gives each worker its own statistics), gradients of all micro-batches of a step
are accumulated into the mean over the global batch, the optimizer steps once
per global batch, and batch-norm evaluation statistics are the average over all
workers of the last step. Memory is bounded by ``micro_batch``, not by the
global batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megabatch import checkpoint, models, provenance, schedules
from megabatch.batching import BatchPlan, epoch_order, step_generator
from megabatch.data import load_datasets
from megabatch.data.images import Augmentation, ImageTensors
from megabatch.errors import Diverged, UserError
from megabatch.nn import average_bn_stats, convert_to_ghost_bn, set_bn_mode, step_statistics
from megabatch.optim import RMSpropWarmup, param_groups
from megabatch.progress import Progress
from megabatch.recipe import Recipe, to_dict, to_toml

AUGMENT_PAD = 2


@dataclass
class Run:
    """Everything one training run works with."""

    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_data: ImageTensors
    test_data: ImageTensors
    plan: BatchPlan
    device: torch.device
    out_dir: Path
    progress: Progress
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch(len(self.train_data))

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda but no CUDA device is visible: use --set train.device=cpu")
    return torch.device(name)


def build_model(recipe: Recipe, in_channels: int, num_classes: int, device: torch.device) -> nn.Module:
    """The recipe's model with per-worker (ghost) batch norm and its BN statistics mode."""
    torch.manual_seed(recipe.train.seed)
    model = models.create(recipe.model.arch, num_classes, in_channels, recipe.model.zero_init_residual)
    convert_to_ghost_bn(model, recipe.batch.per_worker_batch)
    set_bn_mode(model, recipe.model.bn)
    return model.to(device=device, memory_format=memory_format(device))


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last where convolutions gain from it (CUDA); on CPU the contiguous
    layout trains the small models faster (and keeps ghost BN's regrouping cheap)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    groups = param_groups(model, o.weight_decay, o.no_decay_bn_bias)
    lr, alpha = schedules.recipe_values(recipe, 0.0)
    if o.name == "rmsprop_warmup":
        return RMSpropWarmup(groups, lr=lr, momentum=o.momentum, rms_decay=o.rms_decay, eps=o.eps,
                             rmsprop_lr=o.rmsprop_lr, alpha_sgd=alpha)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, alpha_sgd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "alpha_sgd" in group:
            group["alpha_sgd"] = alpha_sgd


def train_step(run: Run, index: torch.Tensor, augmentation: Augmentation | None) -> float:
    """One optimizer step on this process's share ``index`` of a global batch.

    Returns the mean training loss over the share. Each micro-batch's summed loss
    is divided by the share's size, so the accumulated gradient is the mean over
    the share (and, averaged over processes, over the global batch).
    """
    total = torch.zeros((), device=run.device)
    with step_statistics(run.model):
        for part in run.plan.micro_slices():
            x, y = run.train_data.batch(index[part], run.device,
                                        augmentation[part] if augmentation else None)
            x = x.contiguous(memory_format=memory_format(run.device))
            logits = run.model(x)
            loss = F.cross_entropy(logits, y, reduction="sum",
                                   label_smoothing=run.recipe.train.label_smoothing) / len(index)
            loss.backward()
            total += loss.detach()
    value = total.item()
    if not math.isfinite(value):
        return value  # the caller stops the run before the optimizer sees the gradient
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return value


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train until the end of ``epoch`` (from wherever ``run.iteration`` stands in it)."""
    run.model.train()
    steps = run.steps_per_epoch
    order = epoch_order(run.recipe.train.seed, epoch, len(run.train_data))
    first = run.iteration - epoch * steps
    losses, start, images = [], time.perf_counter(), 0
    for step in range(first, steps):
        fractional_epoch = run.iteration / steps
        lr, alpha = schedules.recipe_values(run.recipe, fractional_epoch)
        set_hyperparameters(run.optimizer, lr, alpha)
        batch = order[step * run.plan.global_batch:(step + 1) * run.plan.global_batch]
        augmentation = None
        if run.recipe.data.augment:
            augmentation = Augmentation.draw(len(batch), AUGMENT_PAD,
                                             step_generator(run.recipe.train.seed, run.iteration))
            augmentation = augmentation[run.plan.local_slice()]
        loss = train_step(run, batch[run.plan.local_slice()], augmentation)
        if not math.isfinite(loss):
            newest = checkpoint.list_checkpoints(run.checkpoint_dir)
            kept = f"the last good checkpoint is {newest[-1]}" if newest else "no checkpoint was written yet"
            raise Diverged(f"training diverged: loss is {loss} at epoch {epoch + 1}, iteration "
                           f"{run.iteration} (step {step + 1} of the epoch); {kept}; lower "
                           f"optimizer.lr_per_256 or lengthen the warm-up and train again")
        run.iteration += 1
        images += run.plan.global_batch
        losses.append(loss)
        elapsed = time.perf_counter() - start
        run.progress.step(epoch, step + 1, loss, images / max(elapsed, 1e-9))
        if run.recipe.train.max_steps and run.iteration >= run.recipe.train.max_steps:
            break
    elapsed = time.perf_counter() - start
    return {"train_loss": sum(losses) / max(len(losses), 1), "lr": lr, "alpha_sgd": alpha,
            "images_per_s": images / max(elapsed, 1e-9), "train_time_s": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, device: torch.device,
             batch_size: int = 1000) -> dict[str, float]:
    """Test loss, top-1 and top-5 accuracy (in percent) with the stored BN statistics."""
    model.eval()
    loss = correct1 = correct5 = 0.0
    for start in range(0, len(data), batch_size):
        x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
        logits = model(x.contiguous(memory_format=memory_format(device)))
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
    n = len(data)
    return {"test_loss": loss / n, "test_top1": 100.0 * correct1 / n, "test_top5": 100.0 * correct5 / n}


def checkpoint_state(run: Run, epochs_done: int) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "iteration": run.iteration,
        "epoch": epochs_done,
        "recipe": to_dict(run.recipe),
        "rng": {"torch": torch.get_rng_state()},
        "metrics": run.history[-1] if run.history else {},
    }


def describe(run: Run) -> str:
    """The derived values of the recipe, printed at start."""
    r, p = run.recipe, run.plan
    steps = run.steps_per_epoch
    total = steps * r.train.epochs if not r.train.max_steps else min(r.train.max_steps, steps * r.train.epochs)
    lines = [
        f"recipe {r.name}: {r.description}",
        f"  global batch {p.global_batch} = {p.workers} workers x {p.per_worker_batch} images; "
        f"{p.processes} process(es) x {p.workers // p.processes} emulated workers; "
        f"micro-batch {p.micro_batch} ({p.micro_batches} passes per step)",
        f"  lr = {r.optimizer.lr_per_256:g} per 256 x {p.global_batch}/256 = {r.base_lr:g}; "
        f"factors {r.schedule.factors} at epochs {r.schedule.boundaries}"
        + (f"; warm-up {r.schedule.warmup_epochs:g} epochs from {r.optimizer.lr_per_256:g}"
           if r.schedule.warmup_epochs else ""),
    ]
    if r.optimizer.name == "rmsprop_warmup":
        lines.append(f"  RMSprop warm-up: rmsprop_lr {r.optimizer.rmsprop_lr:g}, alpha_sgd center "
                     f"{r.optimizer.alpha_center:g} period {r.optimizer.alpha_period:g} epochs")
    lines.append(f"  optimizer {r.optimizer.name}, momentum {r.optimizer.momentum:g}, weight decay "
                 f"{r.optimizer.weight_decay:g}{' (not on BN/bias)' if r.optimizer.no_decay_bn_bias else ''}; "
                 f"bn {r.model.bn}; model {r.model.arch}")
    lines.append(f"  {len(run.train_data)} training images, {steps} steps/epoch, {r.train.epochs} epochs "
                 f"= {total} steps; device {provenance.device_name(run.device)}")
    return "\n".join(lines)


def start_run(recipe: Recipe, data_dir: str | None, out_dir: Path, progress: Progress | None = None,
              processes: int = 1, rank: int = 0) -> Run:
    """Load the data, build model and optimizer, and write the run's provenance."""
    device = resolve_device(recipe.train.device)
    plan = BatchPlan.create(recipe.batch.global_batch, recipe.batch.per_worker_batch,
                            recipe.batch.micro_batch, processes, rank)
    train_data, test_data = load_datasets(recipe.data, data_dir)
    model = build_model(recipe, train_data.channels, len(train_data.classes), device)
    optimizer = build_optimizer(recipe, model)
    steps = plan.steps_per_epoch(len(train_data))
    progress = progress or Progress(recipe.train.epochs, steps)
    run = Run(recipe, model, optimizer, train_data, test_data, plan, device, out_dir, progress)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.toml").write_text(to_toml(recipe))
        info = {**provenance.collect(device), "workers": plan.workers, "processes": processes,
                "micro_batch": plan.micro_batch, "steps_per_epoch": steps, "base_lr": recipe.base_lr}
        (out_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return run


def fit(run: Run) -> dict[str, Any]:
    """Train for the recipe's epochs, evaluating and checkpointing after each; returns
    the last epoch's metrics."""
    r = run.recipe
    run.progress.info(describe(run))
    wall_start = time.perf_counter()
    steps = run.steps_per_epoch
    for epoch in range(run.iteration // steps, r.train.epochs):
        metrics = {"epoch": epoch + 1, **train_one_epoch(run, epoch)}
        stopping = bool(r.train.max_steps) and run.iteration >= r.train.max_steps
        last = epoch + 1 == r.train.epochs or stopping
        # Evaluation and checkpoints use the last step's BN statistics of all workers.
        average_bn_stats(run.model)
        if last or (epoch + 1) % r.train.eval_every == 0:
            metrics.update(evaluate(run.model, run.test_data, run.device))
        metrics.update(iteration=run.iteration, wall_time_s=time.perf_counter() - wall_start)
        run.history.append(metrics)
        log_epoch(run, metrics)
        checkpoint.save(checkpoint_state(run, epoch + 1), checkpoint.step_path(run.checkpoint_dir, run.iteration))
        checkpoint.prune(run.checkpoint_dir, r.train.keep_checkpoints)
        if stopping:
            break
    final = checkpoint.save(checkpoint_state(run, epoch + 1), run.out_dir / "final.pt")
    run.progress.info(f"final: test top-1 {run.history[-1].get('test_top1', float('nan')):.2f}% "
                      f"top-5 {run.history[-1].get('test_top5', float('nan')):.2f}% after "
                      f"{run.iteration} steps in {run.history[-1]['wall_time_s']:.0f} s; "
                      f"checkpoint {final}")
    from megabatch.plots import plot_curves  # matplotlib is optional and slow to import

    plot_curves(run.history, run.out_dir / "curves.png", title=r.name)
    return run.history[-1]


def log_epoch(run: Run, metrics: dict[str, Any]) -> None:
    with open(run.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    test = (f" test top-1 {metrics['test_top1']:.2f}% top-5 {metrics['test_top5']:.2f}%"
            if "test_top1" in metrics else "")
    run.progress.info(
        f"epoch {metrics['epoch']}/{run.recipe.train.epochs} iter {metrics['iteration']} "
        f"loss {metrics['train_loss']:.4f}{test} lr {metrics['lr']:.4g} alpha_sgd "
        f"{metrics['alpha_sgd']:.3f} {metrics['images_per_s']:,.0f} img/s "
        f"{metrics['wall_time_s']:.0f} s")
