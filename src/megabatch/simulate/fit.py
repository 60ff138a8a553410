"""The model's two empirical parameters, fitted by least squares on published records.

Everything else in the model is a public figure. Two things are not: how much one
worker's step time varies (``step_cv``, which prices the wait for the slowest of N
workers) and the software cost of a step's all-reduce beyond its wire time
(``collective_overhead_us``). No public figure prices either for the records' clusters,
so :func:`fit` learns them from the records in :mod:`~megabatch.simulate.records`, and
:func:`leave_one_out` predicts every record from a fit that excludes it: a record
never checks a fit it took part in.

The residual of a time is predicted / published - 1; of an efficiency, predicted -
published (both fractions, so 0.05 is 5% or 5 points). A published time informs the
fit only where the record's software was measured on one node (its device figure
inferred from that, :class:`~megabatch.simulate.records.NodeFigure`): elsewhere the
device figure is borrowed from other software, and the fit would price its error as
stragglers. Efficiencies always inform it: the device figure mostly cancels out of them
(compute and stragglers scale with it, the wire time does not: MN-1 at 120, 171 and 250
images/s per GPU gives 77, 74 and 69% against one GPU). Every
record is predicted either way. The minimum is found by a grid, then Nelder-Mead inside
the bounds, deterministically.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from megabatch.simulate.records import RECORDS, Record

STEP_CV_BOUNDS = (0.0, 0.5)
OVERHEAD_US_BOUNDS = (0.0, 20_000.0)


@dataclass(frozen=True)
class Parameters:
    """The two empirical parameters."""

    step_cv: float
    """Coefficient of variation of one worker's compute time per step."""
    collective_overhead_us: float
    """Software cost of a step's gradient all-reduce beyond its wire time, microseconds."""


# fit(RECORDS), rounded: the defaults of `megabatch simulate`; tests re-run the fit.
FITTED = Parameters(step_cv=0.0528, collective_overhead_us=3320.0)


def predictions(record: Record, params: Parameters) -> dict[str, float]:
    """What the model predicts for each quantity ``record`` published."""
    pred = record.inputs(params.step_cv, params.collective_overhead_us).predict()
    values = {"total_time_s": pred.total_time_s, "efficiency_vs_1gpu": pred.efficiency_vs_1gpu,
              "efficiency_vs_1node": pred.efficiency_vs_1node}
    return {name: values[name] for name in record.published()}


def errors(published: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    """Relative error of a time, error in points (as a fraction) of an efficiency."""
    return {name: predicted[name] / value - 1 if name == "total_time_s" else predicted[name] - value
            for name, value in published.items()}


def residuals(record: Record, params: Parameters) -> dict[str, float]:
    """:func:`errors` of the model's predictions for ``record`` with ``params``."""
    return errors(record.published(), predictions(record, params))


def informs_fit(record: Record, quantity: str) -> bool:
    """Whether this published quantity of ``record`` takes part in fits (module docstring)."""
    return quantity != "total_time_s" or record.node is not None


def cost(records: tuple[Record, ...], params: Parameters) -> float:
    """Sum of squared residuals over the published quantities that inform the fit."""
    return sum(r * r for record in records for name, r in residuals(record, params).items()
               if informs_fit(record, name))


def fit(records: tuple[Record, ...]) -> Parameters:
    """Least-squares values of the two parameters on ``records``."""
    def clipped(point: tuple[float, float]) -> Parameters:
        # The search runs on (cv, overhead in ms), so both coordinates move on similar scales.
        return Parameters(min(max(point[0], STEP_CV_BOUNDS[0]), STEP_CV_BOUNDS[1]),
                          min(max(point[1] * 1e3, OVERHEAD_US_BOUNDS[0]), OVERHEAD_US_BOUNDS[1]))

    def f(point: tuple[float, float]) -> float:
        return cost(records, clipped(point))

    grid = [(cv / 40, ms) for cv in range(0, 21) for ms in (0, 0.1, 0.3, 1, 3, 10)]
    return clipped(_nelder_mead(f, min(grid, key=f)))


def _nelder_mead(f, start: tuple[float, float], step: float = 0.02, iterations: int = 300):
    """Minimise ``f`` over the plane from ``start`` (the textbook reflection, expansion,
    contraction and shrink with coefficients 1, 2, 1/2, 1/2)."""
    simplex = [start, (start[0] + step, start[1]), (start[0], start[1] + 10 * step)]
    values = [f(p) for p in simplex]
    for _ in range(iterations):
        order = sorted(range(3), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if abs(values[2] - values[0]) < 1e-10:
            break
        centre = tuple((simplex[0][k] + simplex[1][k]) / 2 for k in range(2))
        worst = simplex[2]

        def towards(t: float) -> tuple[float, float]:
            return tuple(centre[k] + t * (worst[k] - centre[k]) for k in range(2))

        reflected = towards(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = towards(-2.0)
            fe = f(expanded)
            simplex[2], values[2] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[1]:
            simplex[2], values[2] = reflected, fr
        else:
            contracted = towards(0.5)
            fc = f(contracted)
            if fc < values[2]:
                simplex[2], values[2] = contracted, fc
            else:
                simplex = [simplex[0]] + [tuple((simplex[0][k] + p[k]) / 2 for k in range(2))
                                          for p in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    return simplex[min(range(3), key=values.__getitem__)]


@dataclass(frozen=True)
class Check:
    """One record predicted from a fit on all the others."""

    record: Record
    params: Parameters
    predicted: dict[str, float]

    @property
    def errors(self) -> dict[str, float]:
        return errors(self.record.published(), self.predicted)


def leave_one_out(records: tuple[Record, ...] = RECORDS) -> list[Check]:
    """Predict each record from the parameters fitted on every other record."""
    checks = []
    for held_out in records:
        params = fit(tuple(r for r in records if r is not held_out))
        checks.append(Check(held_out, params, predictions(held_out, params)))
    return checks


def summary(checks: list[Check]) -> dict[str, float]:
    """Median and worst absolute error of the total times over ``checks``."""
    times = [abs(c.errors["total_time_s"]) for c in checks if "total_time_s" in c.errors]
    return {"records": len(checks), "time_records": len(times),
            "median_abs_time_error": statistics.median(times), "max_abs_time_error": max(times)}

