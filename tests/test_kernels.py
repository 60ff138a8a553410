"""megabatch's C++ grouped batch-norm kernel (csrc/grouped_batch_norm.cpp, built by
megabatch.kernels): the numbers of PyTorch's own BN kernels on each group, the groups
really side by side on the threads, safe under autograd's second derivatives, inference
mode and Python dispatch modes, a Python fallback where it cannot be built, and on a GPU
the Python loop's numbers with the loop in C++."""

from __future__ import annotations

import contextlib

import pytest
import torch

from megabatch import kernels
from megabatch.nn import GhostBatchNorm2d


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_kernel():
    from megabatch import nn as megabatch_nn

    if kernels.disabled():
        pytest.skip("MEGABATCH_NO_KERNELS is set")
    kernel = megabatch_nn._kernel("cpu")
    assert kernel is not None, "the grouped BN kernel did not build"
    return kernel


def forward_backward(x0, upstream, weight0, bias0, k: int, needs: str, layout: torch.memory_format) -> list:
    """One pass of _GroupedBatchNorm and its backward on copies of the inputs, ``needs``
    saying which gradients are asked for: [y, stats, x.grad] (+ [weight.grad, bias.grad])."""
    from megabatch.nn import _GroupedBatchNorm

    x = x0.clone().requires_grad_(needs != "parameters only")
    weight, bias = ((None, None) if needs == "no affine" else
                    (t.clone().requires_grad_(needs != "input only") for t in (weight0, bias0)))
    y, stats = _GroupedBatchNorm.apply(x, weight, bias, k, 1e-5)
    y.backward(upstream)
    assert y.is_contiguous(memory_format=layout) and y.dtype == x0.dtype
    return [y, stats, x.grad] + ([] if weight is None else [weight.grad, bias.grad])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("needs", ["all", "input only", "parameters only", "no affine"])
@pytest.mark.parametrize("upstream_layout", ["same", "other"])
def test_the_cpu_kernel_is_bit_identical_to_the_python_loop(dtype, layout, k, needs, upstream_layout, monkeypatch):
    """The C++ kernel runs the groups side by side, one thread each, and its backward writes
    each group's gradients into place (ATen's own kernel where the upstream gradient has
    x's layout; else the operator and a copy). The numbers are PyTorch's own BN kernels' on
    each group: to the bit those of the Python loop on one thread, at any thread count
    (channels-last kernels split a group over threads and round by how many they get); one
    group keeps every thread, as in the loop."""
    import platform

    from megabatch import nn as megabatch_nn

    assert cpu_kernel().writes_in_place() == (platform.machine() == "x86_64")
    g = torch.Generator().manual_seed(k)
    x0 = (torch.randn(k * 16, 8, 6, 5, generator=g) * 3 + 1).to(dtype).contiguous(memory_format=layout)
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    upstream = torch.randn(x0.shape, generator=g).to(dtype).contiguous(
        memory_format=layout if upstream_layout == "same" else other)
    weight0, bias0 = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    if dtype == torch.float64:
        weight0, bias0 = weight0.double(), bias0.double()

    def run() -> list:
        return forward_backward(x0, upstream, weight0, bias0, k, needs, layout)

    with threads(3):
        kernel_many = run()
    with threads(1):
        kernel_one = run()
    monkeypatch.setattr(megabatch_nn, "_kernel", lambda device_type: None)
    with threads(1 if k > 1 else 3):
        loop = run()
    for many, one, reference in zip(kernel_many, kernel_one, loop):
        assert (many is None) == (one is None) == (reference is None)
        if reference is not None:
            assert many.dtype == reference.dtype and torch.equal(many, reference)
            assert torch.equal(one, reference) or k == 1  # one group's kernel rounds by its thread count


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True], [False, False, True]])
def test_off_the_cpu_the_kernel_queues_the_groups_and_joins_their_gradients(mask):
    """The path a GPU takes (any device but the CPU), on meta tensors, which carry shapes,
    dtypes and layouts but no numbers: outputs in x's layout, one gradient per mask entry.
    Its numbers are checked against the Python loop on a GPU (next test)."""
    kernel = cpu_kernel()
    x = torch.empty(16, 3, 4, 4, device="meta", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    y, stats, saved_mean, saved_invstd = kernel.forward(x, weight, bias, 4, 1e-5)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert stats.shape == (2, 4, 3) and saved_mean.shape == saved_invstd.shape == (4, 3)
    grads = kernel.backward(torch.empty_like(y), x, weight, saved_mean, saved_invstd, 4, 1e-5, mask)
    assert [g is not None for g in grads] == mask
    if mask[0]:
        assert grads[0].shape == x.shape and grads[0].is_contiguous(memory_format=torch.channels_last)
    assert all(g.shape == (3,) and g.dtype == torch.float32 for g in grads[1:] if g is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k, needs", [(1, "all"), (8, "all"), (8, "parameters only"), (8, "no affine")])
def test_on_a_gpu_the_kernel_queues_what_the_python_loop_queues(dtype, layout, k, needs, monkeypatch):
    """On a GPU the C++ loop calls the same BN kernels in the same order as the Python loop,
    and joins the gradients the same way (one cat, one stack and sum): equal to the bit."""
    from megabatch import nn as megabatch_nn

    if kernels.disabled():
        pytest.skip("MEGABATCH_NO_KERNELS is set")
    assert megabatch_nn._kernel("cuda") is not None, "the grouped BN kernel did not build"
    g = torch.Generator().manual_seed(k)
    x0 = (torch.randn(k * 32, 16, 7, 7, generator=g) * 3 + 1).to("cuda", dtype).contiguous(memory_format=layout)
    upstream = torch.randn(x0.shape, generator=g).to("cuda", dtype).contiguous(memory_format=layout)
    weight0, bias0 = (torch.rand(16, generator=g) + 0.5).cuda(), torch.randn(16, generator=g).cuda()

    def run() -> list:
        return forward_backward(x0, upstream, weight0, bias0, k, needs, layout)

    kernel = run()
    monkeypatch.setattr(megabatch_nn, "_kernel", lambda device_type: None)
    loop = run()
    for ours, reference in zip(kernel, loop):
        assert (ours is None) == (reference is None)
        if reference is not None:
            assert ours.dtype == reference.dtype and ours.stride() == reference.stride()
            assert torch.equal(ours, reference)


def test_the_groups_run_side_by_side_on_the_threads():
    kernel = cpu_kernel()
    with threads(2):
        assert sorted(set(kernel.group_threads(8))) == [0, 1]
        assert kernel.group_threads(1) == [0]  # one group: inline, its kernel keeps every thread
    with threads(1):
        assert set(kernel.group_threads(8)) == {0}


def test_a_double_backward_takes_the_python_loop_and_is_right():
    """The kernel's backward records no graph, so create_graph=True goes through the Python
    loop, whose second derivatives PyTorch's gradgradcheck confirms numerically."""
    from megabatch.nn import _GroupedBatchNorm

    cpu_kernel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(2, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    first = lambda x, w, b: _GroupedBatchNorm.apply(x, w, b, 3, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(first, (x, weight, bias))
    assert torch.autograd.gradgradcheck(first, (x, weight, bias))


def test_under_a_python_dispatch_mode_the_groups_run_through_the_dispatcher():
    """A Python dispatch mode (a profiler's counter, FakeTensorMode) must see every op, and
    worker threads could not run its Python code while the caller holds the GIL: there the
    kernel runs the groups one by one through the dispatcher (it used to hang)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    cpu_kernel()
    layer = GhostBatchNorm2d(3, 4)
    x = torch.randn(16, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    with threads(2), Seen() as seen:
        layer(x).sum().backward()
    assert seen.ops.count("native_batch_norm.out") == 4 and seen.ops.count("native_batch_norm_backward.default") == 4
    plain = GhostBatchNorm2d(3, 4)
    expected = x.detach().clone().requires_grad_()
    plain(expected).sum().backward()
    assert torch.equal(x.grad, expected.grad) or torch.allclose(x.grad, expected.grad, rtol=1e-5, atol=1e-6)


def test_ghost_bn_trains_under_inference_mode_too():
    """Worker threads take the caller's thread-local state: a training-mode pass under
    torch.inference_mode (whose tensors must not be written outside it) runs, and equals
    the same pass under no_grad."""
    cpu_kernel()
    x = torch.randn(16, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    with threads(2):
        with torch.inference_mode():
            y_inference = GhostBatchNorm2d(3, 4)(x)
        with torch.no_grad():
            y_no_grad = GhostBatchNorm2d(3, 4)(x)
    assert torch.equal(y_inference, y_no_grad)


def test_the_kernel_falls_back_to_python_with_one_warning_where_it_cannot_be_built(tmp_path):
    """No working compiler: one warning that says what builds it, and ghost BN still runs."""
    import os
    import subprocess
    import sys

    script = ("import warnings, torch\n"
              "from megabatch import kernels\n"
              "from megabatch.nn import GhostBatchNorm2d\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    y = GhostBatchNorm2d(3, 4)(torch.randn(8, 3, 2, 2))\n"
              "    GhostBatchNorm2d(3, 4)(torch.randn(8, 3, 2, 2))\n"
              "print(kernels.load('grouped_batch_norm'), len(caught), tuple(y.shape))\n"
              "print(caught[0].message)\n")
    env = {**os.environ, "MEGABATCH_KERNEL_CACHE": str(tmp_path), "CXX": "/bin/false"}
    env.pop("MEGABATCH_NO_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "None 1 (8, 3, 2, 2)"
    assert "could not be built" in message and "Python form" in message
