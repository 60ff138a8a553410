"""Batch normalization as the paper's workers do it, emulated or real.

Training: every worker normalizes its own ``per_worker_batch`` images with their
own statistics. :class:`GhostBatchNorm2d` is :class:`torch.nn.BatchNorm2d` that
splits a forward batch holding several emulated workers into groups of
``group_size`` images and normalizes each group separately, so one forward pass
over ``k * group_size`` images computes exactly what ``k`` workers would.

Evaluation statistics: PyTorch's BN stores ``momentum * batch + (1 - momentum) *
running``; ``momentum=1.0`` therefore keeps exactly the last batch's mean and
unbiased variance, which is the paper's "BN without moving averages"
(:func:`use_last_batch_stats`). Across workers, those stored statistics are
averaged element-wise (ChainerMN's AllreducePersistent):

* emulated workers inside one process: :func:`step_statistics` wraps one
  optimizer step (all its micro-batches) so the stored statistics become the
  average over every worker of that step, then applies the layer's momentum once;
* processes: :func:`average_bn_stats` all-reduces the stored statistics.

EMA is linear, so the same two mechanisms are also exact for
``bn = "moving_average"``: the average of every worker's moving average is the
moving average of the per-step worker averages.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from megabatch import kernels
from megabatch.distributed import DistInfo, all_reduce_mean

BN_MOMENTUM = {"last_batch": 1.0, "moving_average": 0.1}  # a recipe's model.bn: PyTorch's momentum


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from groups of ``group_size`` images.

    Each group of consecutive images in the batch is one (emulated) worker:
    it is normalized with its own mean and biased variance, exactly as
    ``nn.BatchNorm2d`` would normalize that group alone. The running statistics
    receive the average over groups of each group's mean and unbiased variance.
    ``group_size=None`` (or a batch of one group) is plain ``nn.BatchNorm2d``.
    The state dict is that of ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, group_size: int | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be >= 2 (BN needs two images), got {group_size}")
        self.group_size = group_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.training:
            return super().forward(x)
        if self.group_size is not None and n % self.group_size:
            raise ValueError(
                f"batch of {n} images does not split into groups of {self.group_size}"
            )
        k = 1 if self.group_size is None else n // self.group_size
        # One group is PyTorch's own layer, except for a cumulative average (momentum None,
        # as inside step_statistics): PyTorch's reads its counter on the host for it, which
        # waits for a GPU; the grouped path below keeps the count on the device.
        if k == 1 and self.momentum is not None:
            return super().forward(x)
        if torch.compiler.is_compiling():
            # Inductor fuses the regrouping into its own kernels.
            y, stats = _regrouped_batch_norm(x, self.weight, self.bias, k, self.eps)
        else:
            y, stats = _GroupedBatchNorm.apply(x, self.weight, self.bias, k, self.eps)
        if self.track_running_stats:
            self._update_running_stats(stats.mean(1))  # both averages over the groups in one kernel
        return y

    @torch.no_grad()
    def _update_running_stats(self, stats: torch.Tensor) -> None:
        """The same rule as nn.BatchNorm2d (momentum=None: a cumulative average), given the
        (2, C) mean and unbiased variance of this batch."""
        self.num_batches_tracked.add_(1)
        # A tensor weight keeps torch.compile from breaking the graph on the counter's value.
        factor = (self.num_batches_tracked.to(self.running_mean.dtype).reciprocal_() if self.momentum is None
                  else self.momentum)
        self.running_mean.lerp_(stats[0].to(self.running_mean.dtype), factor)
        self.running_var.lerp_(stats[1].to(self.running_var.dtype), factor)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class _GroupedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of each of ``k`` equal slices of the batch, by
    PyTorch's own BN kernels run on each slice where it lies: the output is
    written slice by slice into one tensor, and nothing is regrouped. The loop runs
    in C++ (:mod:`megabatch.kernels`): on a CPU the slices side by side on the
    intra-op threads, on a GPU one after another on the stream; where that kernel is
    not built (or on another device), in Python, with the same results.

    Returns ``(y, stats)``, ``stats`` of shape (2, k, C): each group's mean and
    unbiased variance (PyTorch's running-statistics rule with momentum 1, which stores
    exactly the batch's figures, from a zero start), not differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k, eps):
        kernel = _kernel(x.device.type)
        if kernel is not None:  # the same loop in C++ (on a CPU, the groups side by side on its threads)
            y, stats, saved_mean, saved_invstd = kernel.forward(x, weight, bias, k, eps)
        else:
            # One buffer (one launch) for the four (k, C) statistics. With momentum 1 the
            # zeros that the running statistics start from count 0 times: 1 * batch + 0 * 0.
            buffer = torch.zeros(4, k, x.shape[1], device=x.device, dtype=_stat_dtype(x))
            stats, (mean, var, saved_mean, saved_invstd) = buffer[:2], buffer.unbind(0)
            y = torch.empty_like(x)  # keeps x's memory format; slices along N stay dense
            for xi, yi, m, v, sm, si in zip(x.chunk(k), y.chunk(k), mean.unbind(0), var.unbind(0),
                                            saved_mean.unbind(0), saved_invstd.unbind(0)):
                torch.native_batch_norm(xi, weight, bias, m, v, True, 1.0, eps, out=(yi, sm, si))
        ctx.save_for_backward(x, weight, saved_mean, saved_invstd)
        ctx.k, ctx.eps = k, eps
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' gradients, which are unused
        return y, stats

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        if grad_y is None:  # not materialized: a zero gradient, which gives zeros (None) everywhere
            return None, None, None, None, None
        x, weight, saved_mean, saved_invstd = ctx.saved_tensors
        affine = weight is not None
        mask = [ctx.needs_input_grad[0], affine and ctx.needs_input_grad[1],
                affine and ctx.needs_input_grad[2]]
        # The kernel's backward records no graph: a double backward (create_graph) takes the loop.
        kernel = None if torch.is_grad_enabled() else _kernel(x.device.type)
        if kernel is not None:
            grad_x, grad_weight, grad_bias = kernel.backward(grad_y, x, weight, saved_mean, saved_invstd,
                                                             ctx.k, ctx.eps, mask)
            return grad_x, grad_weight, grad_bias, None, None
        # PyTorch's BN backward has no kernel that writes into a given tensor, so each group's
        # input gradient is its own tensor, joined in x's memory format. On a CPU each is
        # copied into its slice right after it is computed, while it is still in the cache;
        # on a GPU one cat joins them all (one kernel instead of one per group).
        in_cache = x.device.type in JOIN_IN_CACHE_ON
        grad_x = torch.empty_like(x) if mask[0] and in_cache else None
        pieces, grad_weights, grad_biases = [], [], []
        for i, (xi, gi, sm, si) in enumerate(zip(x.chunk(ctx.k), grad_y.chunk(ctx.k),
                                                 saved_mean.unbind(0), saved_invstd.unbind(0))):
            gx, gw, gb = _BN_BACKWARD(gi, xi, weight, None, None, sm, si, True, ctx.eps, mask)
            if grad_x is not None:
                grad_x[i * xi.shape[0]:(i + 1) * xi.shape[0]].copy_(gx)
            else:
                pieces.append(gx)
            grad_weights.append(gw)
            grad_biases.append(gb)
        if mask[0] and grad_x is None:
            grad_x = torch.cat(pieces)
        # The groups' parameter gradients summed in one stack and one sum, as the kernel does.
        wanted = [grads for grads, needed in ((grad_weights, mask[1]), (grad_biases, mask[2])) if needed]
        sums = torch.stack([g for grads in wanted for g in grads]).unflatten(0, (len(wanted), ctx.k)).sum(1) \
            if wanted else None
        return grad_x, sums[0] if mask[1] else None, sums[-1] if mask[2] else None, None, None


_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def ghost_bn_implementation(device: torch.device) -> str:
    """How eager ghost BN runs on ``device``, in words (for benchmark results)."""
    kernel = _kernel(device.type)
    if device.type == "cpu":
        if kernel is None:
            return "Python loop, PyTorch's BN kernel per group (the C++ kernel is not built)"
        written = "written into place" if kernel.writes_in_place() else "copied into place"
        return f"C++ kernel: PyTorch's BN kernel per group, groups side by side on the threads, gradients {written}"
    loop = "C++ loop" if kernel is not None else "Python loop"
    return f"{loop}, PyTorch's BN kernel per group one after another, input gradients joined by one cat"


# Where megabatch's C++ grouped BN runs: a CPU (groups side by side) and a CUDA GPU (its
# loop in C++, the kernels queued as from Python).
KERNEL_DEVICES = ("cpu", "cuda")


def _kernel(device_type: str):
    """megabatch's C++ grouped BN (:mod:`megabatch.kernels`) for a device of this type
    where it is built, else None. On a CPU: called one by one from
    Python, a 32-image group's BN kernel is too small for ATen to split over threads, and
    the backward's input gradients need a copy (on 2 threads, ghost BN ran at 0.91x plain
    BN in bf16); the kernel runs the groups side by side, one thread each, and writes the
    gradients into place. On a GPU, whose eager step waits on its host, it saves the
    Python loop's overhead per group (251 against 118 us per layer of 8 groups, measured
    on this project's 2-core CPU)."""
    return kernels.load("grouped_batch_norm") if device_type in KERNEL_DEVICES else None


# Devices where ghost BN's Python backward (no C++ kernel: not a CPU, or not built) copies
# each group's input gradient into place while it is in the cache (small CNN on 2 CPU
# threads: ghost/plain BN 1.009x in fp32 in the 2026-12-04 bench, 0.85-0.94x with one cat
# before); elsewhere one cat joins them.
JOIN_IN_CACHE_ON = ("cpu",)


def _regrouped_batch_norm(x: torch.Tensor, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, k: int, eps: float):
    """:class:`_GroupedBatchNorm` as one ``F.batch_norm`` call over the groups put
    side by side as channels, (b, k*c, H, W): two regrouping copies, which a
    compiler fuses away. Same outputs."""
    c = x.shape[1]
    stats = torch.zeros(2, k * c, device=x.device, dtype=_stat_dtype(x))
    y = F.batch_norm(_groups_as_channels(x, k), stats[0], stats[1],
                     weight.repeat(k) if weight is not None else None,
                     bias.repeat(k) if bias is not None else None, True, 1.0, eps)
    return _channels_as_groups(y, k), stats.view(2, k, c)


def _groups_as_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """(k*b, c, H, W) -> (b, k*c, H, W), channel index group*c + channel; one copy,
    in the memory format of ``x`` (channels-last stays channels-last)."""
    n, c, h, w = x.shape
    b = n // k
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1).reshape(k, b, h, w, c).permute(1, 2, 3, 0, 4)
        return nhwc.reshape(b, h, w, k * c).permute(0, 3, 1, 2)
    return x.reshape(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w)


def _channels_as_groups(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`_groups_as_channels`."""
    b, kc, h, w = y.shape
    c = kc // k
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        nhwc = y.permute(0, 2, 3, 1).reshape(b, h, w, k, c).permute(3, 0, 1, 2, 4)
        return nhwc.reshape(k * b, h, w, c).permute(0, 3, 1, 2)
    return y.reshape(b, k, c, h, w).transpose(0, 1).reshape(k * b, c, h, w)


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """All batch-norm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def convert_to_ghost_bn(model: nn.Module, group_size: int | None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` by a :class:`GhostBatchNorm2d`
    with the same parameters, buffers and settings, in place; returns ``model``."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            ghost = GhostBatchNorm2d(
                child.num_features, group_size, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            ).to(device=child.weight.device if child.affine else None)
            ghost.load_state_dict(child.state_dict())
            ghost.train(child.training)
            setattr(model, name, ghost)
        else:
            convert_to_ghost_bn(child, group_size)
    return model


def use_last_batch_stats(model: nn.Module) -> nn.Module:
    """Make every BN layer store the last training batch's statistics (mean and
    unbiased variance) instead of a moving average: ``momentum = 1.0``."""
    for layer in batch_norm_layers(model):
        layer.momentum = 1.0
    return model


def set_bn_mode(model: nn.Module, mode: str) -> nn.Module:
    """Apply a recipe's ``bn`` setting: "last_batch" (momentum 1, :func:`use_last_batch_stats`)
    or "moving_average" (PyTorch's default momentum 0.1)."""
    for layer in batch_norm_layers(model):
        layer.momentum = BN_MOMENTUM[mode]
    return model


@contextlib.contextmanager
def step_statistics(model: nn.Module) -> Iterator[None]:
    """Treat all forward passes inside the block as the workers of one optimizer step.

    Inside, every BN layer averages the statistics of all its forward passes
    (micro-batches); on exit the layer's own momentum is applied once to that
    average, as if each worker had seen its batch in a single forward pass. With
    equal micro-batches, the result is the element-wise average over workers.

    Nothing here waits for the device: a layer that saw no training pass in the block
    still holds its old statistics (the cumulative average never moved them), so the
    momentum step leaves them as they were, and its counter advances only where it
    counted a pass, decided on the device. (Reading the counters on the host would
    stop a GPU's queue once per layer and step.)
    """
    layers = batch_norm_layers(model)
    if not layers:
        yield
        return
    means, variances, counts = ([getattr(m, name) for m in layers]
                                for name in ("running_mean", "running_var", "num_batches_tracked"))
    momenta = [m.momentum for m in layers]
    if None in momenta:
        raise ValueError("step_statistics needs BN layers with a numeric momentum; momentum=None (a cumulative "
                         "average over all batches) would be taken as the last step's statistics alone")
    # Multi-tensor copies and updates: a few kernels for all layers, not a few per layer
    # (a ResNet-50's 53 layers would cost ~600 launches per step). x * 1 is an exact copy.
    saved_means, saved_variances, saved_counts = (torch._foreach_mul(t, 1) for t in (means, variances, counts))
    for m in layers:
        m.momentum = None  # PyTorch's cumulative average over this step's passes
    torch._foreach_zero_(counts)
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum
            factors = momenta
            for factor in set(factors):  # one multi-tensor update per momentum (usually one)
                group = [i for i, f in enumerate(factors) if f == factor]
                for saved, current in ((saved_means, means), (saved_variances, variances)):
                    torch._foreach_lerp_([saved[i] for i in group], [current[i] for i in group], factor)
            torch._foreach_copy_(means, saved_means)
            torch._foreach_copy_(variances, saved_variances)
            # +1 where the layer counted a training pass in the block (0 or 1 after the clamp).
            torch._foreach_add_(saved_counts, torch._foreach_clamp_max(counts, 1))
            torch._foreach_copy_(counts, saved_counts)


@torch.no_grad()
def average_bn_stats(model: nn.Module, info: DistInfo) -> None:
    """Average every BN layer's stored mean and variance over all processes
    (one fp32 all-reduce), so evaluation and checkpoints agree on every rank.
    A no-op with one process."""
    layers = batch_norm_layers(model)
    if not info.distributed or not layers:
        return
    stats = [t for m in layers for t in (m.running_mean, m.running_var)]
    flat = all_reduce_mean(torch.cat([t.float().flatten() for t in stats]), info)
    offset = 0
    for t in stats:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
