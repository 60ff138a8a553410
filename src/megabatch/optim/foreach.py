"""What the optimizers' multi-tensor (``torch._foreach_*``) paths share."""

from __future__ import annotations

from torch import Tensor, nn


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach`` itself, or PyTorch's default for ``None``: the multi-tensor kernels
    pay off only on an accelerator, and only for plain tensors (not subclasses)."""
    if foreach is not None:
        return foreach
    return all(type(p) in (Tensor, nn.Parameter) and p.is_cuda for p in params)


def by_device_and_dtype(*lists: list[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists (params, grads, states...) into buckets of one device and
    dtype, as the fused kernels need; the order inside a bucket is kept."""
    buckets: dict[tuple, tuple[list[Tensor], ...]] = {}
    for tensors in zip(*lists):
        bucket = buckets.setdefault((tensors[0].device, tensors[0].dtype), tuple([] for _ in lists))
        for lst, t in zip(bucket, tensors):
            lst.append(t)
    return list(buckets.values())
