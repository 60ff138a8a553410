"""Where one training step's time goes, from ``torch.profiler``: the summary that
``megabatch bench --profile`` writes beside each measured step.

:func:`profile_steps` profiles a few calls of a step; :func:`summarize` turns the
profiler's per-operator averages into a few numbers per step: the wall time, on a GPU the
device's busy time and its kernels (how much of the step the GPU computes, and how many
launches the host pays for), the host's waits for the device (each a pipeline stall),
the operators that take the most device time (kernels) and the most host time, and the
operators called most often (where the launches come from). :func:`summarize` is a
pure function of the rows, so it is tested without a profiler.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

# Runtime calls that make the host wait for the GPU: a blocking copy ends in a stream
# synchronization; .item() and .tolist() read the device (aten::_local_scalar_dense).
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SCALAR_READS = ("aten::_local_scalar_dense",)
TOP = 12
MOST_CALLED = 20


def summarize(rows: Iterable[Any], calls: int, wall_s: float, on_device: bool) -> dict[str, Any]:
    """The per-step summary of profiler rows (``key_averages()``: objects with ``key``,
    ``count``, ``self_cpu_time_total`` and ``self_device_time_total`` in microseconds, and
    ``device_type``) over ``calls`` steps that took ``wall_s`` seconds."""
    rows = list(rows)
    per_step = 1.0 / calls

    def is_device(r) -> bool:
        return str(getattr(r, "device_type", "")).endswith(("CUDA", "PrivateUse1", "XPU"))

    kernels = [r for r in rows if is_device(r)]
    host = [r for r in rows if not is_device(r)]
    summary: dict[str, Any] = {"steps_profiled": calls, "wall_ms_per_step": 1e3 * wall_s * per_step}
    if on_device:
        busy_us = sum(r.self_device_time_total for r in kernels)
        summary.update(device_ms_per_step=busy_us / 1e3 * per_step,
                       device_busy=busy_us / 1e6 / wall_s if wall_s > 0 else 0.0,
                       kernels_per_step=sum(r.count for r in kernels) * per_step)
    summary["host_waits_per_step"] = sum(r.count for r in host if r.key in HOST_WAITS) * per_step
    summary["scalar_reads_per_step"] = sum(r.count for r in host if r.key in SCALAR_READS) * per_step
    summary["host_ms_per_step"] = sum(r.self_cpu_time_total for r in host) / 1e3 * per_step
    def ranked(timed: list, attr: str) -> list[dict[str, Any]]:
        total = sum(getattr(r, attr) for r in timed) or 1.0
        top = sorted(timed, key=lambda r: getattr(r, attr), reverse=True)[:TOP]
        return [{"name": r.key[:160], "ms_per_step": getattr(r, attr) / 1e3 * per_step,
                 "calls_per_step": r.count * per_step, "share": getattr(r, attr) / total} for r in top]

    if on_device:
        summary["top_kernels"] = ranked(kernels, "self_device_time_total")
    # The host's own time by operator: on a GPU, what a launch-bound step spends its time on.
    summary["top"] = ranked(host, "self_cpu_time_total")
    # The operators called most often, nested calls included: in an eager step, where a GPU's
    # launches come from (views and allocations launch nothing; compiled kernels and CUDA
    # graphs' replays are no aten:: operators). The harness's own wait for the device, at
    # the end of the profiled steps, is in waits_from as a bare cudaDeviceSynchronize.
    ops = sorted((r for r in host if r.key.startswith("aten::")), key=lambda r: r.count, reverse=True)[:MOST_CALLED]
    summary["most_called"] = [{"name": r.key, "calls_per_step": r.count * per_step} for r in ops]
    return summary


def wait_origins(events: Iterable[Any], calls: int) -> list[dict[str, Any]]:
    """Where each wait for the device was called from, per step: the chain of operators
    around it, outermost first (e.g. "aten::tolist > aten::copy_ > cudaStreamSynchronize"),
    from profiler events (objects with ``name`` and ``cpu_parent``)."""
    chains: dict[str, int] = {}
    for event in events:
        if event.name not in HOST_WAITS:
            continue
        names, parent = [event.name], event.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        chain = " > ".join(reversed(names))
        chains[chain] = chains.get(chain, 0) + 1
    return [{"chain": chain, "per_step": n / calls} for chain, n in sorted(chains.items(), key=lambda c: -c[1])]


def profile_steps(step: Callable[[], Any], device: str, calls: int = 2) -> dict[str, Any]:
    """Profile ``calls`` calls of ``step`` (already warmed up) on ``device`` ("cpu" or
    "cuda:N"); the summary, or ``{"error": ...}`` if the profiler itself failed (the
    measurement it sits beside is kept)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync()
    try:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            wall = time.perf_counter() - start
        return {**summarize(prof.key_averages(), calls, wall, cuda), "waits_from": wait_origins(prof.events(), calls)}
    except RuntimeError as err:  # e.g. CUPTI unavailable in a sandbox
        return {"error": f"torch.profiler failed: {err}"}


def lines(name: str, summary: dict[str, Any], top: int = 5) -> list[str]:
    """The printed form of one summary."""
    if "error" in summary:
        return [f"  {name}: {summary['error']}"]
    head = f"  {name}: {summary['wall_ms_per_step']:.1f} ms/step"
    if "device_ms_per_step" in summary:
        head += (f", GPU busy {summary['device_ms_per_step']:.1f} ms ({100 * summary['device_busy']:.0f}%), "
                 f"{summary['kernels_per_step']:.0f} kernels")
    head += (f", host {summary['host_ms_per_step']:.1f} ms, {summary['host_waits_per_step']:.0f} waits for the "
             f"device, {summary['scalar_reads_per_step']:.0f} scalar reads")
    ops = (summary["top_kernels"] if "top_kernels" in summary else summary["top"])[:top]
    called = ", ".join(f"{op['name'].removeprefix('aten::')} x{op['calls_per_step']:g}"
                       for op in summary.get("most_called", [])[:6])
    return [head] + [f"    {100 * op['share']:5.1f}%  {op['ms_per_step']:8.2f} ms  x{op['calls_per_step']:<5g} "
                     f"{op['name'][:90]}" for op in ops] + ([f"    most called: {called}"] if called else []) + [
        f"    wait x{w['per_step']:g} from {w['chain'][-110:]}" for w in summary.get("waits_from", [])[:4]]
