"""Which learning-rate factor a tuned study's cell chose: the one whose mean validation
top-1 over the cell's tuning seeds is best. With ``widen_edges``, a best factor at the
edge of those tried is not a choice yet: the factor one step further out is tried
first, and below the smallest where every factor tried diverged (a best value at the edge of a search says the search was too narrow there;
Choi et al. 2019 show optimizer rankings turning on such search spaces). The runner
reads this to start what a cell needs next, the report to say what each cell reached."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Sequence

from megabatch.study.spec import StudySpec

Cell = tuple[str, int]  # (method, batch)


def factor_of(row: dict[str, Any]) -> float:
    return row.get("lr_factor", 1.0)  # results written before tuning existed ran at 1.0


def validation(row: dict[str, Any]) -> float:
    """A run's final validation top-1; NaN for one that diverged before it was evaluated."""
    value = row.get("final_val_top1")
    return float("nan") if value is None else value


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``; NaN for none or a NaN among them."""
    if not values or any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def beyond(tried: Sequence[float], best: float) -> float:
    """The factor one step past ``best``, an edge of ``tried``: the edge's ratio to its
    neighbour once more (x2 after x1 and x2: x4; x0.5 after x0.5 and x1: x0.25)."""
    ordered = sorted(tried)
    neighbour = ordered[-2] if best == ordered[-1] else ordered[1]
    return float(f"{best * best / neighbour:.6g}")


def tuning_rows(spec: StudySpec, results: Sequence[dict[str, Any]]) -> dict[Cell, dict[float, list[dict[str, Any]]]]:
    """Each cell's finished tuning runs (the seeds that choose, not the confirmations), by factor."""
    seeds = spec.whole().cell_seeds()
    rows: dict[Cell, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r["seed"] in seeds.get((r["method"], r["batch"]), ()):
            rows[r["method"], r["batch"]][factor_of(r)].append(r)
    return rows


def choices(spec: StudySpec, results: Sequence[dict[str, Any]]) -> tuple[dict[Cell, float], dict[Cell, float]]:
    """(the factor each cell chose, the factor each cell must try before it chooses). A cell
    decides once all its tuning seeds have finished at every factor it tried; the best is
    the factor of the best mean validation top-1 (a diverged factor loses; a tie goes to
    the recipe's own rate). That is its choice, for good, unless it is an edge of the
    factors tried and the spec lets the cell widen (``widen_edges``) once more. A cell whose
    every factor diverged widens below its smallest; out of widenings, it keeps the
    recipe's own rate, diverged."""
    if not spec.tuning:
        return {}, {}
    seeds, rows = spec.whole().cell_seeds(), tuning_rows(spec, results)
    chosen, widen = {}, {}
    for method, batch in spec.whole().cells():
        cell, given = (method.name, batch), spec.factors(method)
        runs = rows.get(cell, {})
        tried = sorted(set(given) | set(runs))
        if any({r["seed"] for r in runs.get(f, [])} != set(seeds[cell]) for f in tried):
            continue

        def score(factor: float) -> tuple[float, bool]:  # a tie goes to the recipe's own rate
            mean, _ = mean_spread([validation(r) for r in runs[factor]])
            return -math.inf if math.isnan(mean) else mean, factor == 1.0

        best = max(tried, key=score)
        # every factor diverged: the search went too high, so its edge is the smallest
        edge = best if score(best)[0] > -math.inf else tried[0]
        if len(tried) > 1 and edge in (tried[0], tried[-1]) and len(tried) - len(given) < spec.widen_edges:
            widen[cell] = beyond(tried, edge)
        else:
            chosen[cell] = best
    return chosen, widen


def tuned(spec: StudySpec, results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[Cell, float]]:
    """(the rows that stand for each cell, the learning-rate factor chosen per cell). Without
    tuning, every row. With it, each chosen cell's rows at its factor, its confirmation
    seeds' included (a cell that has not chosen yet has none)."""
    if not spec.tuning:
        return list(results), {}
    chosen, _ = choices(spec, results)
    rows = [r for cell, factor in chosen.items() for r in results
            if (r["method"], r["batch"]) == cell and factor_of(r) == factor]
    return rows, chosen


def planned_total(spec: StudySpec, results: Sequence[dict[str, Any]]) -> int:
    """How many runs the study plans as far as its results tell: the spec's own, the widened
    factors' runs that have finished and those the cells at an edge call for now."""
    given = {(m.name, batch): spec.factors(m) for m, batch in spec.cells()}
    seeds = {(m.name, batch): spec.seeds_of(m, batch) for m, batch in spec.cells()}
    widened = sum(len(seeds[cell]) for cell, by_factor in tuning_rows(spec, results).items() if cell in given
                  for factor in by_factor if factor not in given[cell])
    return spec.total() + widened + len(spec.widenings(choices(spec, results)[1]))
