"""How a global batch is split: into processes, emulated workers and micro-batches.

The order of the images depends only on the seed and the epoch, and every
global batch is cut the same way whatever the number of processes: process
``r`` of ``P`` takes the ``r``-th contiguous share, and splits it into
micro-batches that each hold whole workers. So one process emulating ``W``
workers and ``P`` processes emulating ``W/P`` each see the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from megabatch.errors import UserError

DEFAULT_MAX_MICRO_BATCH = 1024  # on a GPU
CPU_MAX_MICRO_BATCH = 256  # small passes stay in a CPU's caches


def max_micro_batch(device_type: str) -> int:
    """The largest automatic micro-batch on a device of this type ("cpu", "cuda")."""
    return CPU_MAX_MICRO_BATCH if device_type == "cpu" else DEFAULT_MAX_MICRO_BATCH


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_worker_batch: int
    micro_batch: int
    processes: int = 1
    rank: int = 0

    @classmethod
    def create(cls, global_batch: int, per_worker_batch: int, micro_batch: int = 0,
               processes: int = 1, rank: int = 0,
               max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH) -> "BatchPlan":
        """Check the split and fill in an automatic micro-batch (``micro_batch=0``): the
        most whole workers, up to ``max_micro_batch`` images, that divide the share."""
        if global_batch % per_worker_batch:
            below, above = global_batch // per_worker_batch * per_worker_batch, \
                (global_batch // per_worker_batch + 1) * per_worker_batch
            nearest = f"{below} or {above}" if below else f"{above}"
            raise UserError(f"global batch {global_batch} is not divisible by per_worker_batch "
                            f"{per_worker_batch}: set batch.global_batch to a multiple of it ({nearest}), "
                            f"or change batch.per_worker_batch")
        workers = global_batch // per_worker_batch
        if workers % processes:
            raise UserError(f"{workers} workers (global batch {global_batch} / {per_worker_batch} "
                            f"per worker) cannot be shared by {processes} processes: use a number "
                            f"of processes that divides {workers}, or change batch.global_batch")
        local = global_batch // processes
        # A micro-batch is an upper bound on the images of one pass: never more than the share.
        micro_batch = min(micro_batch, local)
        if micro_batch == 0:
            per_pass = max(1, min(local, max_micro_batch) // per_worker_batch)
            while (local // per_worker_batch) % per_pass:
                per_pass -= 1
            micro_batch = per_pass * per_worker_batch
        if micro_batch % per_worker_batch or local % micro_batch:
            raise UserError(f"micro_batch {micro_batch} must be a multiple of per_worker_batch "
                            f"{per_worker_batch} that divides the {local} images of each process "
                            f"(global batch {global_batch} / {processes} processes)")
        return cls(global_batch, per_worker_batch, micro_batch, processes, rank)

    @property
    def workers(self) -> int:
        return self.global_batch // self.per_worker_batch

    @property
    def local_batch(self) -> int:
        """Images per optimizer step in this process."""
        return self.global_batch // self.processes

    @property
    def micro_batches(self) -> int:
        """Forward/backward passes per optimizer step in this process."""
        return self.local_batch // self.micro_batch

    def steps_per_epoch(self, dataset_size: int) -> int:
        """Full global batches per epoch; the last partial batch is dropped."""
        steps = dataset_size // self.global_batch
        if steps == 0:
            raise UserError(f"the global batch {self.global_batch} is larger than the "
                            f"{dataset_size} training images: lower batch.global_batch")
        return steps

    def micro_slices(self) -> list[slice]:
        """This process's micro-batches, as places in the global batch."""
        start = self.rank * self.local_batch
        return [slice(start + i, start + i + self.micro_batch) for i in range(0, self.local_batch, self.micro_batch)]

    def epoch(self, order: torch.Tensor, epoch: int, first_step: int = 0) -> Iterator["StepIndices"]:
        """The steps of an epoch from ``first_step``, each cut into this process's
        micro-batches of image indices: the one place where batches are sliced."""
        steps = self.steps_per_epoch(len(order))
        for step in range(first_step, steps):
            start = step * self.global_batch
            yield StepIndices(epoch, epoch * steps + step, start, self.global_batch,
                              tuple((part, order[start + part.start:start + part.stop])
                                    for part in self.micro_slices()))


@dataclass(frozen=True)
class StepIndices:
    """One optimizer step of this process: which images each of its micro-batches holds."""

    epoch: int
    iteration: int  # optimizer steps since the start of training
    position: int  # place of the global batch's first image in the epoch's order
    global_batch: int
    micro_batches: tuple[tuple[slice, torch.Tensor], ...]  # (place in the global batch, image indices)


def epoch_order(seed: int, epoch: int, dataset_size: int) -> torch.Tensor:
    """The shuffled order of the training images in ``epoch``: a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(dataset_size, generator=generator)


def step_generator(seed: int, iteration: int) -> torch.Generator:
    """The generator of a step's random augmentation: a function of (seed, iteration)."""
    return torch.Generator().manual_seed(((seed + 1) * 2_000_003 + iteration) % 2**63)
