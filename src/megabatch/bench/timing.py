"""How ``megabatch bench`` times a training step: untimed warm-up steps, then ``repeats``
timings of ``steps`` steps each, summarized as the median images/s and the min-max.

:func:`measure` times one configuration after another (the ResNet-50 bench).
:func:`interleaved` times several configurations round-robin, one repeat of each in
turn, every other round in reverse order (A B C, C B A, ...: a slow drift of the machine
cancels over two rounds, and no configuration always follows the same one), so that a
busy shared machine slows every side of a comparison alike;
:func:`compare` then gives their ratio, and the ratio of each repeat with its partner.
"""

from __future__ import annotations

import functools
import gc
import resource
import statistics
import sys
import time
from typing import Any, Callable


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def summary(rates: list[float]) -> dict[str, Any]:
    """Median images/s, min-max and every repeat's images/s."""
    return {"images_per_s": statistics.median(rates), "spread": [min(rates), max(rates)], "per_repeat": rates}


def measure(step: Callable[[], Any], s, images: int, warmup: int | None = None) -> dict[str, Any]:
    """Images/s of ``step`` (``images`` per call) with the settings ``s`` (device, warmup,
    steps, repeats): median and min-max of the repeats, peak memory on CUDA."""
    import torch

    cuda = s.device.startswith("cuda")
    sync = _sync(s.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(s.warmup if warmup is None else warmup):
        step()
    sync()
    rates = []
    for _ in range(s.repeats):
        start = time.perf_counter()
        for _ in range(s.steps):
            step()
        sync()
        rates.append(images * s.steps / (time.perf_counter() - start))
    result = summary(rates)
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def warm_up(steps: dict[str, Callable[[], Any]], device: str, calls: int) -> dict[str, float]:
    """Call every step function ``calls`` times, untimed but for the last call: its seconds
    (what the caller may size the timed repeats by), for each step that was called."""
    sync, seconds = _sync(device), {}
    for name, step in steps.items():
        for _ in range(calls):
            sync()
            start = time.perf_counter()
            step()
            sync()
            seconds[name] = time.perf_counter() - start
    return seconds


def interleaved(steps: dict[str, Callable[[], Any]], counts: dict[str, int], device: str, images: int,
                repeats: int, after_repeat: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Images/s of every step function of ``steps`` (``images`` per call), timed in turn:
    each round times ``counts[name]`` calls of each, in order in even rounds and in reverse
    in odd ones (the module's docstring says why). ``after_repeat(r)`` reports progress."""
    sync = _sync(device)
    sync()
    names = list(steps)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(counts[name]):
                steps[name]()
            sync()
            rates[name].append(images * counts[name] / (time.perf_counter() - start))
        if after_repeat:
            after_repeat(r)
    return {name: summary(rates[name]) for name in names}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` against ``b`` (two results of one :func:`interleaved` run): the ratio of their
    median images/s, and the ratio within each repeat (timed side by side), with its range."""
    paired = [x / y for x, y in zip(a["per_repeat"], b["per_repeat"])]
    return {"ratio": a["images_per_s"] / b["images_per_s"], "paired_ratios": paired,
            "paired_median": statistics.median(paired), "paired_spread": [min(paired), max(paired)]}


def released(measurement: Callable[..., Any]) -> Callable[..., Any]:
    """``measurement``, after which what it held (its model, compiled graphs, cached device
    blocks) is freed before the next one: its frame is gone once it returns, so gc frees it."""
    @functools.wraps(measurement)
    def measured(*args: Any, **kwargs: Any) -> Any:
        try:
            return measurement(*args, **kwargs)
        finally:
            import torch

            gc.collect()
            torch.compiler.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return measured


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
