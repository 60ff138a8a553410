"""Which learning-rate factor a tuned study's cell chose: the one whose mean validation
top-1 over the cell's tuning seeds is best. The runner reads it to start a cell's
confirmation seeds (``confirm_seeds``), the report to say what each cell reached."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Sequence

from megabatch.study.spec import StudySpec


def factor_of(row: dict[str, Any]) -> float:
    return row.get("lr_factor", 1.0)  # results written before tuning existed ran at 1.0


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``; NaN for none or a NaN among them."""
    if not values or any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def tuned(spec: StudySpec, results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[tuple[str, int], float]]:
    """(the rows that stand for each cell, the learning-rate factor chosen per cell). Without
    tuning, every row. With it, per (method, batch), the factor whose mean validation top-1
    over the cell's tuning seeds is best (a diverged factor loses; a tie goes to the recipe's
    own rate), chosen once every tuning run the cell plans has finished, so that a choice is
    never revised; the cell's rows are then that factor's, its confirmation seeds' included."""
    if not spec.tuning:
        return list(results), {}
    planned: dict[tuple[str, int, float], set[int]] = defaultdict(set)
    for run in spec.whole().runs():
        planned[run.method.name, run.batch, run.lr_factor].add(run.seed)
    tuning: dict[tuple[str, int], dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    every: dict[tuple[str, int, float], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        every[r["method"], r["batch"], factor_of(r)].append(r)
        if r["seed"] in planned.get((r["method"], r["batch"], factor_of(r)), ()):
            tuning[r["method"], r["batch"]][factor_of(r)].append(r)
    rows, chosen = [], {}
    for method in spec.methods:
        for (name, batch), runs in tuning.items():
            if name != method.name or any({r["seed"] for r in runs.get(f, [])} != planned[name, batch, f]
                                          for f in spec.factors(method)):
                continue

            def score(factor: float) -> tuple[float, bool]:  # a tie goes to the recipe's own rate
                mean, _ = mean_spread([r["final_val_top1"] for r in runs[factor]])
                return -math.inf if math.isnan(mean) else mean, factor == 1.0

            chosen[name, batch] = max(runs, key=score)
            rows += every[name, batch, chosen[name, batch]]
    return rows, chosen
