"""Reading a ``megabatch bench`` result for ``megabatch simulate --from-bench``.

From the chosen train-step entry it takes the images/s, the batch, and the spread of
one step's time. The bench times ``repeats`` runs of ``settings.steps`` steps each and
records each run's images/s under ``per_repeat`` (the small CNN's bench: each entry's
``steps_per_repeat`` steps); if one step's time has coefficient
of variation c and the steps are independent, a run's mean has c / sqrt(steps), so

    step CV = stdev(1/rate) / mean(1/rate) * sqrt(steps)     over the repeats.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from megabatch.errors import UserError


@dataclass(frozen=True)
class BenchReading:
    """What ``simulate`` takes from one train-step entry of a bench result."""

    images_per_s: float
    source: str
    batch: int | None
    step_cv: float | None
    """None when the entry has fewer than two repeats or no step count."""
    model: str | None
    """The model the bench timed (``"model"``), if the file says."""


def step_cv(rates: list[float], steps: int) -> float:
    """Coefficient of variation of one step's time from per-repeat images/s (module doc)."""
    times = [1 / rate for rate in rates]
    return statistics.stdev(times) / statistics.mean(times) * math.sqrt(steps)


def read_bench(path: str, entry: str | None) -> BenchReading:
    """Read a ``megabatch bench`` JSON result:
    ``{"device": str, "train_step": [{"name": str, "images_per_s": float, ...}]}``;
    the fastest entry unless ``entry`` names one; ``batch_size``, ``per_repeat`` and
    the entry's ``steps_per_repeat`` (or the file's ``settings.steps``) and ``model`` are
    optional."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read --from-bench {path}: {err.strerror}; "
                        "give the JSON file `megabatch bench` wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--from-bench {path} is not JSON; "
                        "give the file `megabatch bench` wrote") from None
    steps = data.get("train_step") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("device"), str) \
            or not isinstance(steps, list) or not steps:
        raise UserError(f"--from-bench {path} is not a megabatch bench result: expected an "
                        "object with \"device\" and a non-empty \"train_step\" list")
    for step in steps:
        speed = step.get("images_per_s") if isinstance(step, dict) else None
        if not isinstance(step, dict) or not isinstance(step.get("name"), str) \
                or not _positive(speed):
            raise UserError(f"--from-bench {path}: every train_step entry needs a \"name\" "
                            "and a positive \"images_per_s\"")
    if entry is None:
        chosen = max(steps, key=lambda step: step["images_per_s"])
    else:
        chosen = next((step for step in steps if step["name"] == entry), None)
        if chosen is None:
            names = ", ".join(step["name"] for step in steps)
            raise UserError(f"--bench-entry {entry!r} is not in {path}: choose one of {names}")
    batch = chosen.get("batch_size")
    batch = batch if _whole(batch) else None
    rates = chosen.get("per_repeat")
    settings = data.get("settings")
    per_run = chosen.get("steps_per_repeat")
    if per_run is None and isinstance(settings, dict):
        per_run = settings.get("steps")
    cv = None
    if isinstance(rates, list) and len(rates) >= 2 and all(_positive(r) for r in rates) \
            and _whole(per_run):
        cv = step_cv(rates, per_run)
    model = data.get("model")
    return BenchReading(float(chosen["images_per_s"]),
                        f"{path}: {chosen['name']} on {data['device']}", batch, cv,
                        model if isinstance(model, str) else None)


def _positive(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
