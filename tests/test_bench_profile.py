"""bench.profiling: the per-step summary of profiler rows, by hand, and a real profile of a
small step on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megabatch.bench import profiling


def rows(*spec):
    return [SimpleNamespace(key=k, count=n, self_cpu_time_total=cpu, self_device_time_total=dev, device_type=d)
            for k, n, cpu, dev, d in spec]


GPU_ROWS = rows(
    # name, calls, self CPU us, self device us, device type: over 2 steps
    ("aten::convolution", 4, 300.0, 0.0, "DeviceType.CPU"),
    ("cudaLaunchKernel", 40, 200.0, 0.0, "DeviceType.CPU"),
    ("cudaStreamSynchronize", 6, 500.0, 0.0, "DeviceType.CPU"),
    ("aten::_local_scalar_dense", 2, 10.0, 0.0, "DeviceType.CPU"),
    ("sm90_xmma_conv_kernel", 30, 0.0, 6000.0, "DeviceType.CUDA"),
    ("batch_norm_collect_statistics", 10, 0.0, 2000.0, "DeviceType.CUDA"),
)


def test_gpu_rows_by_hand():
    s = profiling.summarize(GPU_ROWS, calls=2, wall_s=0.010, on_device=True)
    assert s["steps_profiled"] == 2 and s["wall_ms_per_step"] == pytest.approx(5.0)
    assert s["device_ms_per_step"] == pytest.approx(4.0)  # (6000 + 2000) us / 2 steps
    assert s["device_busy"] == pytest.approx(0.8)  # 8 ms of kernels in 10 ms
    assert s["kernels_per_step"] == 20 and s["host_waits_per_step"] == 3 and s["scalar_reads_per_step"] == 1
    assert s["host_ms_per_step"] == pytest.approx(0.505)  # (300 + 200 + 500 + 10) us / 2
    top = s["top_kernels"]
    assert [k["name"] for k in top] == ["sm90_xmma_conv_kernel", "batch_norm_collect_statistics"]
    assert top[0]["ms_per_step"] == pytest.approx(3.0) and top[0]["share"] == pytest.approx(0.75)
    assert top[1]["calls_per_step"] == 5
    printed = profiling.lines("megabatch bf16", s)
    assert printed[0] == ("  megabatch bf16: 5.0 ms/step, GPU busy 4.0 ms (80%), 20 kernels, host 0.5 ms, "
                          "3 waits for the device, 1 scalar reads")
    assert "75.0%" in printed[1] and "sm90_xmma_conv_kernel" in printed[1]


def test_host_operators_are_ranked_on_a_gpu_too():
    s = profiling.summarize(GPU_ROWS, calls=2, wall_s=0.010, on_device=True)
    assert [op["name"] for op in s["top"]] == ["cudaStreamSynchronize", "aten::convolution", "cudaLaunchKernel",
                                               "aten::_local_scalar_dense"]
    assert s["top"][0]["ms_per_step"] == pytest.approx(0.25) and s["top"][2]["calls_per_step"] == 20


def test_the_most_called_operators_say_where_launches_come_from():
    s = profiling.summarize(GPU_ROWS, calls=2, wall_s=0.010, on_device=True)
    assert s["most_called"] == [{"name": "aten::convolution", "calls_per_step": 2},
                                {"name": "aten::_local_scalar_dense", "calls_per_step": 1}]
    assert profiling.lines("m", s)[-1] == "    most called: convolution x2, _local_scalar_dense x1"


def test_each_wait_for_the_device_is_traced_to_the_operators_around_it():
    def event(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)

    tolist = event("aten::copy_", event("aten::tolist"))
    events = [tolist, event("cudaStreamSynchronize", tolist), event("cudaLaunchKernel", tolist),
              event("cudaStreamSynchronize", tolist), event("cudaDeviceSynchronize")]
    assert profiling.wait_origins(events, calls=2) == [
        {"chain": "aten::tolist > aten::copy_ > cudaStreamSynchronize", "per_step": 1.0},
        {"chain": "cudaDeviceSynchronize", "per_step": 0.5}]
    printed = profiling.lines("m", {**profiling.summarize(GPU_ROWS, 2, 0.01, True),
                                    "waits_from": profiling.wait_origins(events, calls=2)})
    assert printed[-2:] == ["    wait x1 from aten::tolist > aten::copy_ > cudaStreamSynchronize",
                            "    wait x0.5 from cudaDeviceSynchronize"]


def test_cpu_rows_rank_host_operators():
    s = profiling.summarize(GPU_ROWS[:4], calls=1, wall_s=0.002, on_device=False)
    assert "device_ms_per_step" not in s and "top_kernels" not in s
    assert [op["name"] for op in s["top"]][:2] == ["cudaStreamSynchronize", "aten::convolution"]
    assert sum(op["share"] for op in s["top"]) == pytest.approx(1.0)


def test_a_real_profile_of_a_small_step():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    x = torch.randn(4, 3, 8, 8)
    model(x)

    def step():
        model(x).sum().backward()
        return float(model[0].weight.grad.sum())  # one scalar read per step

    s = profiling.profile_steps(step, "cpu", calls=3)
    assert s["steps_profiled"] == 3 and s["wall_ms_per_step"] > 0 and s["host_ms_per_step"] > 0
    assert s["scalar_reads_per_step"] >= 1
    names = [op["name"] for op in s["top"]]
    assert any(name.startswith("aten::") for name in names)
