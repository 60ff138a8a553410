"""A training run: its parts, how it starts, and how it resumes from a checkpoint.

:func:`start_run` builds everything from a recipe (model with per-worker BN,
optimizer, data, batch plan, DDP wrapper) and writes the run's provenance;
:func:`resume_state` finds the newest complete checkpoint of a run directory.
The loop itself is in :mod:`megabatch.train`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megabatch import checkpoint, models, provenance
from megabatch.batching import CPU_MAX_MICRO_BATCH, DEFAULT_MAX_MICRO_BATCH, BatchPlan
from megabatch.data import load_datasets
from megabatch.data.images import ImageTensors
from megabatch.distributed import DistInfo, wrap_model
from megabatch.errors import UserError
from megabatch.nn import convert_to_ghost_bn, set_bn_mode
from megabatch.optim import LARS, RMSpropWarmup, param_groups
from megabatch.progress import Progress
from megabatch.recipe import Recipe, to_dict, to_toml
from megabatch.schedules import epoch_settings


@dataclass
class Run:
    """Everything one training run works with."""

    recipe: Recipe
    model: nn.Module  # the model itself: state dicts, evaluation
    net: nn.Module  # what the training forward pass calls: the model, or DDP around it
    optimizer: torch.optim.Optimizer
    train_data: ImageTensors
    test_data: ImageTensors
    plan: BatchPlan
    device: torch.device
    out_dir: Path
    progress: Progress
    dist: DistInfo = field(default_factory=DistInfo)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial_epoch: dict[str, float] = field(default_factory=dict)  # sums of an unfinished epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch(len(self.train_data))

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def resolve_device(name: str, dist: DistInfo = DistInfo()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device = cuda but no CUDA device is visible: use --set train.device=cpu")
        return torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    return torch.device(name)


def memory_format(device: torch.device, setting: str = "auto") -> torch.memory_format:
    """``train.memory_format``; "auto" is channels-last where convolutions gain from it
    (CUDA) and contiguous on CPU, where it trains the small models faster (and keeps
    ghost BN's regrouping cheap)."""
    if setting == "auto":
        setting = "channels_last" if device.type == "cuda" else "contiguous"
    return torch.channels_last if setting == "channels_last" else torch.contiguous_format


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU
    with AVX512-BF16 or AMX (read from /proc/cpuinfo; elsewhere: no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_recipe(recipe: Recipe, device: torch.device) -> Recipe:
    """A copy of ``recipe`` with its device-dependent "auto" values decided (precision)."""
    if recipe.train.precision != "auto":
        return recipe
    resolved = copy.deepcopy(recipe)
    resolved.train.precision = "bf16" if native_bf16(device) else "fp32"
    return resolved


def build_model(recipe: Recipe, in_channels: int, num_classes: int, device: torch.device) -> nn.Module:
    """The recipe's model with per-worker (ghost) batch norm and its BN statistics mode."""
    torch.manual_seed(recipe.train.seed)
    model = models.create(recipe.model.arch, num_classes, in_channels, recipe.model.zero_init_residual)
    convert_to_ghost_bn(model, recipe.batch.per_worker_batch)
    set_bn_mode(model, recipe.model.bn)
    return model.to(device=device, memory_format=memory_format(device, recipe.train.memory_format))


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    # LARS's trust ratio is skipped where weight decay is (You et al.: BN and biases).
    groups = param_groups(model, o.weight_decay, o.no_decay_bn_bias,
                          {"lars_adaptation": False} if o.name == "lars" else None)
    # The trainer sets lr (and alpha_sgd) before every step; these are placeholders.
    if o.name == "lars":
        return LARS(groups, lr=recipe.base_lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient,
                    trust_norm=o.trust_norm)
    if o.name == "rmsprop_warmup":
        return RMSpropWarmup(groups, lr=recipe.base_lr, momentum=o.momentum, rms_decay=o.rms_decay,
                             eps=o.eps, rmsprop_lr=o.rmsprop_lr, alpha_sgd=0.0)
    return torch.optim.SGD(groups, lr=recipe.base_lr, momentum=o.momentum)


def resume_state(run_dir: Path, log=None) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_dir`` that loads; damaged ones are skipped (and said)."""
    for path in reversed(checkpoint.list_checkpoints(run_dir / "checkpoints")):
        try:
            state = checkpoint.load(path)
        except UserError as e:
            if log:
                log(f"skipping {path.name}: {e}")
            continue
        state["path"] = str(path)
        return state
    return None


def configure_backends(device: torch.device, recipe: Recipe) -> None:
    """The process-wide settings of the run's device: cuDNN autotuning on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = recipe.train.cudnn_benchmark


def start_run(recipe: Recipe, data_dir: str | None, out_dir: Path, progress: Progress | None = None,
              dist: DistInfo = DistInfo(), state: dict[str, Any] | None = None) -> Run:
    """Load the data, build model and optimizer (from ``state``, a checkpoint, when
    resuming), and write the run's provenance (rank 0)."""
    device = resolve_device(recipe.train.device, dist)
    recipe = resolve_recipe(recipe, device)
    configure_backends(device, recipe)
    plan = BatchPlan.create(recipe.batch.global_batch, recipe.batch.per_worker_batch,
                            recipe.batch.micro_batch, dist.world_size, dist.rank,
                            CPU_MAX_MICRO_BATCH if device.type == "cpu" else DEFAULT_MAX_MICRO_BATCH)
    train_data, test_data = load_datasets(recipe.data, data_dir, device.type, recipe.train.seed)
    model = build_model(recipe, train_data.channels, len(train_data.classes), device)
    optimizer = build_optimizer(recipe, model)
    steps = plan.steps_per_epoch(len(train_data))
    progress = progress or Progress(recipe.train.epochs, steps, enabled=dist.is_main)
    run = Run(recipe, model, model, optimizer, train_data, test_data, plan, device, out_dir, progress, dist)
    if state is not None:
        restore(run, state)
    if recipe.train.precision == "fp16":
        run.scaler = torch.amp.GradScaler(device.type)
        if state is not None and "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
    # DDP broadcasts rank 0's parameters when it wraps: all ranks start equal.
    run.net = wrap_model(model, dist, recipe.train.comm_dtype)
    if recipe.train.compile:
        run.net = torch.compile(run.net)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.toml").write_text(to_toml(recipe))
        info = {**provenance.collect(device), "workers": plan.workers, "processes": dist.world_size,
                "launcher": dist.launcher, "micro_batch": plan.micro_batch, "steps_per_epoch": steps,
                "base_lr": recipe.base_lr}
        if state is not None:
            info["resumed_from"] = state["path"]
        (out_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return run


def restore(run: Run, state: dict[str, Any]) -> None:
    """Continue where a checkpoint left off, mid-epoch included; keep its metrics only."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.iteration = state["iteration"]
    run.partial_epoch = dict(state.get("partial_epoch", {}))
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    metrics = run.out_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        run.history = [m for m in lines if m["epoch"] <= state["epoch"]]
        if run.dist.is_main:
            tmp = metrics.with_name(f".metrics.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(m) + "\n" for m in run.history))
            os.replace(tmp, metrics)
    run.progress.info(f"resuming from {state['path']} (iteration {run.iteration}, "
                      f"{state['epoch']} epochs done)")


def checkpoint_state(run: Run, epochs_done: int) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "iteration": run.iteration,
        "epoch": epochs_done,
        "recipe": to_dict(run.recipe),
        "rng": rng,
        "partial_epoch": dict(run.partial_epoch),
        **({"scaler": run.scaler.state_dict()} if run.scaler else {}),
        "metrics": run.history[-1] if run.history else {},
    }


def describe(run: Run) -> str:
    """The derived values of the recipe, printed at start."""
    r, p = run.recipe, run.plan
    steps = run.steps_per_epoch
    total = steps * r.train.epochs if not r.train.max_steps else min(r.train.max_steps, steps * r.train.epochs)
    e = epoch_settings(r, steps)
    if r.schedule.kind == "polynomial":
        shape = f"polynomial decay (power {r.schedule.power:g}) to epoch {r.train.epochs}"
    else:
        shape = f"factors {r.schedule.factors} at epochs {[round(b, 3) for b in e.boundaries]}"
    if e.scale != 1.0:
        shape += (f" (written in steps, {steps} per epoch)" if r.schedule.unit == "step" else
                  f" (written for {r.schedule.reference_epochs:g} epochs, stretched x{e.scale:.3g})")
    lines = [
        f"recipe {r.name}: {r.description}",
        f"  global batch {p.global_batch} = {p.workers} workers x {p.per_worker_batch} images; "
        f"{p.processes} process{'es' if p.processes > 1 else ''} x {p.workers // p.processes} emulated workers; "
        f"micro-batch {p.micro_batch} ({p.micro_batches} pass{'es' if p.micro_batches > 1 else ''} per step)",
        f"  lr = {r.optimizer.lr_per_256:g} per 256 x {p.global_batch}/256 = {r.base_lr:g}; {shape}"
        + (f"; warm-up {e.warmup_epochs:.3g} epochs from {r.optimizer.lr_per_256:g}" if e.warmup_epochs else ""),
    ]
    if r.optimizer.name == "rmsprop_warmup":
        lines.append(f"  RMSprop warm-up: rmsprop_lr {r.optimizer.rmsprop_lr:g}, alpha_sgd center "
                     f"{e.alpha_center:.3g} period {e.alpha_period:.3g} epochs")
    lines.append(f"  optimizer {r.optimizer.name}, momentum {r.optimizer.momentum:g}, weight decay "
                 f"{r.optimizer.weight_decay:g}{' (not on BN/bias)' if r.optimizer.no_decay_bn_bias else ''}; "
                 f"bn {r.model.bn}; model {r.model.arch}; {r.train.precision} compute"
                 f"{', compiled' if r.train.compile else ''}; gradients all-reduced in {r.train.comm_dtype}")
    lines.append(f"  {len(run.train_data)} training images, {steps} steps/epoch, {r.train.epochs} epochs "
                 f"= {total} steps; device {provenance.device_name(run.device)}")
    return "\n".join(lines)
