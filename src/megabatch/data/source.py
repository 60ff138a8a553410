"""The contract every data source keeps with the trainer.

The batch plan decides which images each micro-batch holds
(:meth:`megabatch.batching.BatchPlan.epoch`); a source only turns those indices
into tensors on the device: in-memory images (:class:`~megabatch.data.images.ImageTensors`)
or files streamed by a DataLoader (:class:`~megabatch.data.imagenet.ImageFolderSource`).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, Sequence

import torch

from megabatch.batching import StepIndices

Batch = tuple[torch.Tensor, torch.Tensor]  # normalized images on the device, labels


class Source(Protocol):
    classes: tuple[str, ...]

    @property
    def channels(self) -> int: ...

    def __len__(self) -> int: ...

    def training_batches(self, steps: Iterable[StepIndices], seed: int, augment: bool,
                         device: torch.device) -> Iterator[Iterator[Batch]]:
        """For every step of ``steps``, the micro-batches it lists, in order."""
        ...

    def evaluation_batches(self, first: int, last: int, batch_size: int,
                           device: torch.device) -> Iterator[Batch]:
        """Images ``first`` to ``last`` (exclusive) in order, unaugmented."""
        ...

    def take_unreadable(self) -> list[str]:
        """Files that could not be read (and were replaced) since the last call."""
        ...

    def subset(self, n: int) -> "Source":
        """The first ``n`` images (a spread over the classes for a folder); all for n <= 0."""
        ...

    def select(self, indices: Sequence[int]) -> "Source":
        """The images at ``indices``, in that order."""
        ...
