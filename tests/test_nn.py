"""Batch norm without moving averages: ghost batches equal separate workers, the
stored statistics are the workers' average, and processes agree after averaging."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from megabatch import kernels
from megabatch.distributed import DistInfo
from megabatch.nn import (GhostBatchNorm2d, average_bn_stats, convert_to_ghost_bn, set_bn_mode,
                          step_statistics, use_last_batch_stats)

C, B = 3, 8  # channels, images per worker


def workers_input(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Each worker's images get their own offset and scale, so mixing them up would show.
    x = torch.randn(k, B, C, 5, 4, generator=g, dtype=torch.float64)
    x = x * torch.arange(1, k + 1, dtype=torch.float64)[:, None, None, None, None] + torch.arange(k)[:, None, None, None, None]
    return x.reshape(k * B, C, 5, 4)


def ghost(momentum: float | None = 1.0) -> GhostBatchNorm2d:
    layer = GhostBatchNorm2d(C, group_size=B, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def plain_from(layer: GhostBatchNorm2d) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(C, momentum=layer.momentum).double()
    plain.load_state_dict(layer.state_dict())
    return plain


@pytest.mark.parametrize("k", [1, 2, 5])
def test_ghost_batches_equal_separate_workers_forward_and_backward(k):
    x = workers_input(k).requires_grad_()
    layer = ghost()
    y = layer(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()

    grads_w, grads_b = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for w in range(k):
        xw = x.detach()[w * B:(w + 1) * B].clone().requires_grad_()
        worker = plain_from(ghost())
        yw = worker(xw)
        (yw * upstream[w * B:(w + 1) * B]).sum().backward()
        torch.testing.assert_close(y[w * B:(w + 1) * B], yw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad[w * B:(w + 1) * B], xw.grad, rtol=1e-10, atol=1e-12)
        grads_w += worker.weight.grad
        grads_b += worker.bias.grad
    torch.testing.assert_close(layer.weight.grad, grads_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, grads_b, rtol=1e-10, atol=1e-12)


def test_channels_last_input_gives_the_same_result():
    x = workers_input(3)
    plain, last = ghost(), ghost()
    y = plain(x)
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert not x_last.is_contiguous()
    y_last = last(x_last)
    torch.testing.assert_close(y_last, y, rtol=1e-12, atol=1e-12)
    assert y_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last.running_var, plain.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eager", ["C++ kernel", "in cache", "cat"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("affine", [True, False])
def test_compiled_formulation_equals_the_eager_one(layout, affine, eager, monkeypatch):
    """Under torch.compile the layer regroups and calls F.batch_norm once; eagerly it runs
    PyTorch's kernel on each group in place: from C++ with the groups side by side (CPU), or
    from Python, joining the groups' input gradients in place (CPU without the kernel) or
    with one cat (GPU). Outputs, statistics and gradients agree."""
    from megabatch import nn as megabatch_nn
    from megabatch.nn import _GroupedBatchNorm, _regrouped_batch_norm

    if eager == "C++ kernel":
        if kernels.disabled():
            pytest.skip("MEGABATCH_NO_KERNELS is set")
        assert megabatch_nn._kernel("cpu") is not None, "the grouped BN kernel did not build"
    else:
        monkeypatch.setattr(megabatch_nn, "_kernel", lambda device_type: None)
        monkeypatch.setattr(megabatch_nn, "JOIN_IN_CACHE_ON", ("cpu",) if eager == "in cache" else ())

    k = 4
    upstream = torch.randn(k * B, C, 5, 4, dtype=torch.float64)
    results = []
    for formulation in (_GroupedBatchNorm.apply, _regrouped_batch_norm):
        x = workers_input(k).contiguous(memory_format=layout).requires_grad_()
        weight = torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64, requires_grad=True) if affine else None
        bias = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True) if affine else None
        y, stats = formulation(x, weight, bias, k, 1e-5)
        (y * upstream).sum().backward()
        assert y.is_contiguous(memory_format=layout) and x.grad.is_contiguous(memory_format=layout)
        assert stats.shape == (2, k, C)
        results.append([y, stats, x.grad] + ([weight.grad, bias.grad] if affine else []))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(eager, compiled, rtol=1e-10, atol=1e-12)
    mean, var = results[0][1]
    torch.testing.assert_close(mean.mean(0), worker_stats(workers_input(k), k)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var.mean(0), worker_stats(workers_input(k), k)[1], rtol=1e-12, atol=1e-12)


def test_bf16_ghost_batches_equal_separate_bf16_workers():
    """bf16 activations with fp32 parameters (autocast's case): each group is what
    nn.BatchNorm2d computes on that group, and the parameter gradients stay fp32."""
    k = 3
    x = workers_input(k).to(torch.bfloat16).requires_grad_()
    layer = GhostBatchNorm2d(C, group_size=B, momentum=1.0)
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    grad_w = torch.zeros(C)
    for w in range(k):
        xw = x.detach()[w * B:(w + 1) * B].clone().requires_grad_()
        worker = nn.BatchNorm2d(C, momentum=1.0)
        yw = worker(xw)
        yw.float().square().sum().backward()
        torch.testing.assert_close(y[w * B:(w + 1) * B], yw, rtol=0, atol=0)
        torch.testing.assert_close(x.grad[w * B:(w + 1) * B], xw.grad, rtol=0, atol=0)
        grad_w += worker.weight.grad
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-5, atol=1e-5)


def worker_stats(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each worker's mean and unbiased variance per channel, averaged over workers."""
    groups = x.reshape(k, B, C, -1).transpose(1, 2).reshape(k, C, -1)
    return groups.mean(-1).mean(0), groups.var(-1, unbiased=True).mean(0)


def test_last_batch_stats_are_the_workers_average_of_unbiased_statistics():
    x = workers_input(4)
    layer = ghost()
    with step_statistics(layer):
        layer(x)
    mean, var = worker_stats(x, 4)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [1.0, 0.1])
def test_micro_batches_inside_a_step_equal_one_pass(momentum):
    x = workers_input(6)
    one, split = ghost(momentum), ghost(momentum)
    for step in range(3):  # several steps: the moving average carries over
        xs = x + step
        with step_statistics(one):
            one(xs)
        with step_statistics(split):
            for part in xs.split(2 * B):
                split(part)
    torch.testing.assert_close(one.running_mean, split.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.running_var, split.running_var, rtol=1e-12, atol=1e-12)
    assert int(one.num_batches_tracked) == int(split.num_batches_tracked) == 3
    assert one.momentum == split.momentum == momentum


@pytest.mark.parametrize("momentum", [1.0, 0.1])
def test_a_layer_without_a_training_pass_in_the_step_is_left_as_it_was(momentum):
    # Decided on the device (no host read of the counters): statistics and counter unchanged,
    # also for a layer that only saw an evaluation pass; a trained layer beside it moves on.
    idle, trained = ghost(momentum), ghost(momentum)
    with step_statistics(trained):
        trained(workers_input(2))
    idle.running_mean.fill_(0.25)
    idle.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in idle.state_dict().items()}
    model = torch.nn.Sequential(idle, trained)
    with step_statistics(model):
        idle.eval()
        idle(workers_input(2))
        trained(workers_input(2) * 2)
    for key, value in idle.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert idle.momentum == trained.momentum == momentum
    assert int(trained.num_batches_tracked) == 2


def test_step_statistics_costs_the_same_few_calls_for_any_number_of_layers():
    # Multi-tensor copies and updates: on a GPU each call is a kernel launch, and a
    # ResNet-50's 53 layers must not cost 53 times the launches of one.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    counts = {}
    for layers in (2, 53):
        model = torch.nn.Sequential(*[ghost(0.1) for _ in range(layers)])
        with Count() as counted:
            with step_statistics(model):
                pass
        counts[layers] = counted.calls
        assert torch.ops.aten._local_scalar_dense.default not in counted.calls  # no host reads
    assert len(counts[2]) == len(counts[53]) <= 12, counts[53]


def test_a_ghost_layer_launches_its_groups_bn_kernels_and_a_fixed_few_more(monkeypatch):
    # The Python form (a GPU's): each op is a kernel launch there, and a step of ResNet-50
    # holds 53 such layers. Per group one BN forward and one backward; for the whole layer
    # one buffer for the statistics, their average over groups and the running-statistics
    # update (counter, weight, 2 lerps), one cat of the input gradients and one stack and
    # sum of the parameter gradients: 10 (there were 17).
    from torch.utils._python_dispatch import TorchDispatchMode

    from megabatch import nn as megabatch_nn

    class Launches(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("empty", "empty_like", "detach"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(megabatch_nn, "_kernel", lambda device_type: None)
    monkeypatch.setattr(megabatch_nn, "JOIN_IN_CACHE_ON", ())
    for k in (2, 8):
        layer = GhostBatchNorm2d(C, group_size=B, momentum=None).double()
        x = workers_input(k).requires_grad_()
        upstream = torch.ones_like(x)
        with Launches() as launches:
            layer(x).backward(upstream)
        per_group = [op for op in launches.ops if op.startswith("native_batch_norm")]
        assert len(per_group) == 2 * k
        assert len(launches.ops) - len(per_group) == 10, launches.ops


def test_moving_average_is_pytorchs_update_of_the_workers_average():
    x = workers_input(3)
    layer = ghost(0.1)
    with step_statistics(layer):
        for part in x.split(B):
            layer(part)
    mean, var = worker_stats(x, 3)
    torch.testing.assert_close(layer.running_mean, 0.9 * torch.zeros(C, dtype=torch.float64) + 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 * torch.ones(C, dtype=torch.float64) + 0.1 * var)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_group_is_batch_norm_with_the_batchs_own_statistics(momentum):
    """One group: with a momentum, PyTorch's own layer runs (equal by construction); with
    momentum None (a cumulative average, as inside step_statistics) the grouped path does.
    Both are checked against statistics computed here: the output is F.batch_norm with the
    batch's mean and biased variance, the input gradient that of the formula written out,
    and the running statistics PyTorch's update rule applied by hand over two batches."""
    layer, plain = ghost(momentum), plain_from(ghost(momentum))
    running_mean, running_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for t, seed in enumerate((0, 1), start=1):
        x = workers_input(1, seed).requires_grad_()
        y = layer(x)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        (y * upstream).sum().backward()
        torch.testing.assert_close(y, plain(x), rtol=0, atol=0)  # PyTorch's layer, to the bit

        xr = x.detach().clone().requires_grad_()
        per_channel = xr.transpose(0, 1).reshape(C, -1)
        mean, biased = per_channel.mean(1), per_channel.var(1, unbiased=False)
        unbiased = per_channel.var(1, unbiased=True)
        expected = F.batch_norm(x.detach(), mean.detach(), biased.detach(), layer.weight.detach(),
                                layer.bias.detach(), training=False, eps=layer.eps)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        formula = ((xr - mean[None, :, None, None]) / torch.sqrt(biased[None, :, None, None] + layer.eps)
                   * layer.weight.detach()[None, :, None, None] + layer.bias.detach()[None, :, None, None])
        (formula * upstream).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)

        factor = 1.0 / t if momentum is None else momentum
        running_mean = (1 - factor) * running_mean + factor * mean.detach()
        running_var = (1 - factor) * running_var + factor * unbiased.detach()
        torch.testing.assert_close(layer.running_mean, running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_var, running_var, rtol=1e-12, atol=1e-14)
        assert int(layer.num_batches_tracked) == t


def test_evaluation_uses_stored_statistics():
    x = workers_input(2)
    layer = ghost()
    with step_statistics(layer):
        layer(x)
    layer.eval()
    mean, var = worker_stats(x, 2)
    expected = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + layer.eps)
    expected = expected * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_batch_that_does_not_split_into_workers_is_an_error():
    with pytest.raises(ValueError, match="groups of 8"):
        ghost()(torch.randn(12, C, 2, 2, dtype=torch.float64))


def test_conversion_keeps_state_dict_and_torchvision_loads_it():
    model = torchvision.models.resnet18(num_classes=10)
    reference = copy.deepcopy(model.state_dict())
    convert_to_ghost_bn(model, 4)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, GhostBatchNorm2d) for m in model.modules()) == 20
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    torchvision.models.resnet18(num_classes=10).load_state_dict(state, strict=True)


def test_bn_modes():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2))
    assert all(m.momentum == 1.0 for m in use_last_batch_stats(model)[1:])
    assert all(m.momentum == 0.1 for m in set_bn_mode(model, "moving_average")[1:])


def test_average_bn_stats_outside_distributed_is_a_no_op():
    layer = ghost()
    before = copy.deepcopy(layer.state_dict())
    average_bn_stats(layer, DistInfo())
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def _average_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = nn.BatchNorm2d(C)
        layer.running_mean.fill_(float(rank + 1))
        layer.running_var.fill_(float(10 * (rank + 1)))
        average_bn_stats(nn.Sequential(layer), DistInfo(rank, world))
        results[rank] = (layer.running_mean.tolist(), layer.running_var.tolist())
        dist.barrier()  # avoids a teardown abort of gloo right after collectives
    finally:
        dist.destroy_process_group()


def test_average_bn_stats_over_two_gloo_processes(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_average_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank] == ([1.5] * C, [15.0] * C)


def test_step_statistics_refuses_a_cumulative_average():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=None))
    with pytest.raises(ValueError, match="momentum=None"):
        with step_statistics(model):
            model(torch.randn(4, 1, 5, 5))
