"""A training run's state: what the loop works with, and what a checkpoint holds.

:class:`Run` owns the model, optimizer, gradient scaler, RNG, iteration, partial-epoch
sums and noise-scale averages, and turns them into one checkpoint dict
(:meth:`Run.state_dict`) and back (:meth:`Run.load_state_dict`), as torchtitan's
``Stateful`` trainer does. Everything that depends on the recipe and the device is
decided once, when :mod:`megabatch.build` assembles the run: the memory layout, the
autocast dtype and the schedule bound to the recipe. The loop (:mod:`megabatch.train`)
only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megabatch.batching import BatchPlan
from megabatch.data.source import Source
from megabatch.distributed import DistInfo
from megabatch.noise import NoiseScale
from megabatch.progress import Progress
from megabatch.recipe import Recipe, to_dict


@dataclass
class Run:
    """Everything one training run works with."""

    recipe: Recipe  # with its "auto" values decided for this device
    model: nn.Module  # the model itself: state dicts, evaluation
    net: nn.Module  # what the training forward pass calls: the model, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    train_data: Source
    test_data: Source
    plan: BatchPlan
    device: torch.device
    out_dir: Path
    progress: Progress
    schedule: Callable[[float], tuple[float, float]]  # fractional epoch -> (lr, alpha_sgd)
    dist: DistInfo = field(default_factory=DistInfo)
    layout: torch.memory_format = torch.contiguous_format
    autocast_dtype: torch.dtype | None = None  # None: fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    noise: NoiseScale | None = None  # train.noise_scale
    validation_data: Source | None = None  # data.validation_images held out of the training set
    log: Callable[[dict[str, Any], int], None] | None = None  # extra metric sink (TensorBoard)
    stop_requested: Callable[[], bool] = lambda: False  # a signal asked to stop at the next step
    keep_grads: bool = False  # gradients stay allocated and are zeroed, not freed (CUDA graphs)
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial_epoch: dict[str, float] = field(default_factory=dict)  # sums of an unfinished epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch(len(self.train_data))

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: the epochs, or fewer with train.max_steps."""
        return total_steps(self.recipe, self.steps_per_epoch)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def state_dict(self, epochs_done: int) -> dict[str, Any]:
        """The checkpoint: one entry per component, plus where the run stands."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "epoch": epochs_done,
            "recipe": to_dict(self.recipe),
            "rng": rng,
            "partial_epoch": dict(self.partial_epoch),
            **({"scaler": self.scaler.state_dict()} if self.scaler else {}),
            **({"noise_scale": self.noise.state_dict()} if self.noise else {}),
            "metrics": self.history[-1] if self.history else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (a checkpoint) left off, mid-epoch included."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.noise and "noise_scale" in state:
            self.noise.load_state_dict(state["noise_scale"])
        self.iteration = state["iteration"]
        self.partial_epoch = dict(state.get("partial_epoch", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


def total_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """The run's optimizer steps: ``epochs x steps_per_epoch``, capped by train.max_steps."""
    steps = steps_per_epoch * recipe.train.epochs
    return min(recipe.train.max_steps, steps) if recipe.train.max_steps else steps
