"""How ``megabatch bench`` shows what it measured: the table's rows, where the time goes,
and the result file's name. Pure functions of the measurements."""

from __future__ import annotations

import re
import time
from pathlib import Path

COLUMNS = f"{'measurement':<58} {'images/s':>10} {'spread (min-max)':>19} {'vs plain':>11} {'MFU':>6}"
SMALL_WIDTH = 68  # the small CNN's measurement names
SMALL_COLUMNS = f"{'measurement':<{SMALL_WIDTH + 2}} {'images/s':>10} {'spread (min-max)':>19} {'vs plain':>11}"


def row(name: str, m: dict, plain: float | None = None, mfu: float | None = None, width: int = 56) -> str:
    """One line of the table: median images/s, min-max, ratio to the plain loop, MFU."""
    lo, hi = m["spread"]
    ratio = f"{m['images_per_s'] / plain:.2f}x" if plain else ""
    return (f"  {name:<{width}} {m['images_per_s']:>10,.1f} {f'{lo:,.1f}-{hi:,.1f}':>19} {ratio:>11} "
            f"{f'{100 * mfu:.1f}%' if mfu is not None else '':>6}").rstrip()


def ratio_line(label: str, r: dict) -> str:
    """One ratio of two configurations timed side by side (:func:`megabatch.bench.timing.compare`),
    with its target where it has one."""
    lo, hi = r["paired_spread"]
    line = f"  {label:<{SMALL_WIDTH}} {r['ratio']:>9.3f}x  per repeat {lo:.3f}-{hi:.3f}"
    if "overhead" in r:
        line += f"; overhead {100 * r['overhead']:+.1f}% of the step"
    if "target" in r:
        goal = f">= {r['target']:.2f}x" if "overhead" not in r else f"<= {100 * r['target']:.0f}%"
        line += f" (target {goal}: {'met' if r['meets_target'] else 'NOT met'})"
    return line


def where_the_time_goes(train_step: float, plain: float, input_pipeline: float, end_to_end: float) -> dict:
    """Compare the fastest train step (and the plain PyTorch loop at its settings), the
    fastest input pipeline and the end-to-end run (each in images/s): does the input keep
    up, and what does training from files cost?"""
    return {
        "train_step_images_per_s": train_step,
        "ratio_to_plain": train_step / plain,
        "input_pipeline_images_per_s": input_pipeline,
        "input_over_train_step": input_pipeline / train_step,
        "input_keeps_up": input_pipeline >= train_step,
        "end_to_end_images_per_s": end_to_end,
        "end_to_end_over_train_step": end_to_end / train_step,
        "ms_per_1000_images": {"train_step": 1e6 / train_step, "input_pipeline": 1e6 / input_pipeline,
                               "end_to_end": 1e6 / end_to_end},
    }


def time_lines(summary: dict, train_name: str, input_name: str) -> list[str]:
    """The printed form of :func:`where_the_time_goes`."""
    ms = summary["ms_per_1000_images"]
    share = summary["input_over_train_step"]
    verdict = (f"keeps up ({share:.2f}x the train step)" if summary["input_keeps_up"]
               else f"is the limit: it feeds {100 * share:.0f}% of what the train step takes")
    return ["where the time goes (ms per 1,000 images)",
            f"  train step alone    {ms['train_step']:>9,.1f}  {train_name}, "
            f"{summary['ratio_to_plain']:.2f}x the plain loop at its settings",
            f"  input alone         {ms['input_pipeline']:>9,.1f}  {input_name}: {verdict}",
            f"  end to end          {ms['end_to_end']:>9,.1f}  "
            f"{100 * summary['end_to_end_over_train_step']:.0f}% of the train step's images/s"]


def output_path(out: Path, device: str, model: str = "resnet50") -> Path:
    """``out/<device slug>-<date>.json`` (ResNet-50) or ``out/<model>-<device slug>-<date>.json``;
    a second result of the same day gets -2, -3, ..."""
    stem = f"{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{time.strftime('%Y-%m-%d')}"
    stem = stem if model == "resnet50" else f"{model}-{stem}"
    path, n = out / f"{stem}.json", 2
    while path.exists():
        path, n = out / f"{stem}-{n}.json", n + 1
    return path
