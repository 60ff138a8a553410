"""Learning-rate and RMSprop-warm-up schedules as pure functions of the epoch.

Every function here takes the *fractional* epoch ``iteration / iterations_per_epoch``
and returns a number; the trainer calls them every iteration with the count
passed in explicitly, so a resumed run only needs the iteration (no scheduler
object with hidden state, as in torchtitan's ``lr_scheduler.py``).

Formulas are those of Akiba et al. 2017 and Goyal et al. 2017, written out in
``shared/reference/paper.md``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

def piecewise_lr(
    epoch: float,
    base_lr: float,
    boundaries: Sequence[float],
    factors: Sequence[float],
    warmup_epochs: float = 0.0,
    warmup_start_lr: float = 0.0,
) -> float:
    """``base_lr * factors[i]`` in the i-th interval between ``boundaries``.

    With ``warmup_epochs > 0`` the learning rate first rises linearly from
    ``warmup_start_lr`` at epoch 0 to the first phase's value at
    ``warmup_epochs`` (Goyal et al.'s gradual warm-up).
    """
    if len(factors) != len(boundaries) + 1:
        raise ValueError(
            f"need one factor more than boundaries, got {len(factors)} factors "
            f"for {len(boundaries)} boundaries"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"boundaries must be increasing, got {list(boundaries)}")
    lr = base_lr * factors[bisect.bisect_right(boundaries, epoch)]
    if epoch < warmup_epochs:
        lr = warmup_start_lr + (lr - warmup_start_lr) * epoch / warmup_epochs
    return lr


def alpha_sgd(epoch: float, center: float = 10.0, period: float = 5.0) -> float:
    """Weight of the SGD term in RMSprop warm-up (an ELU-like curve, clamped at 1).

    alpha(e) = 0.5 * exp(2 (e - center) / period)      for e <  center
             = min(1, 0.5 + 2 (e - center) / period)   for e >= center

    This is the formula as printed in the paper; with the defaults it reaches
    1 (pure momentum SGD) at epoch 11.25.
    """
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    z = (epoch - center) / period
    if epoch < center:
        return 0.5 * math.exp(2.0 * z)
    return min(1.0, 0.5 + 2.0 * z)


def polynomial_lr(epoch: float, base_lr: float, total_epochs: float, power: float = 2.0,
                  warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0) -> float:
    """An optional linear warm-up from ``warmup_start_lr`` to ``base_lr`` over ``warmup_epochs``,
    then ``base_lr * (1 - (epoch - warmup_epochs) / (total_epochs - warmup_epochs)) ** power``:
    the decay runs over the epochs left after the warm-up, from ``base_lr`` at its end to 0 at
    the last epoch (You et al. 2017's schedule for LARS, as the MLPerf ResNet-50 references
    write it: ``polynomial_learning_rate_fn``, ``lars_util.PolynomialDecayWithWarmup``)."""
    if epoch < warmup_epochs:
        return warmup_start_lr + (base_lr - warmup_start_lr) * epoch / warmup_epochs
    left = total_epochs - warmup_epochs
    return base_lr * max(0.0, 1.0 - (epoch - warmup_epochs) / left) ** power if left > 0 else 0.0


@dataclass(frozen=True)
class EpochSettings:
    """A recipe's schedule settings converted to this run's epochs."""

    boundaries: tuple[float, ...]
    warmup_epochs: float
    alpha_center: float
    alpha_period: float
    scale: float  # epochs of this run per unit the recipe wrote them in


def epoch_settings(recipe, steps_per_epoch: int | None = None) -> EpochSettings:
    """Boundaries, warm-up and alpha curve in this run's epochs: stretched to the epoch
    budget (``schedule.reference_epochs``), or converted from optimizer steps
    (``schedule.unit = "step"``, which needs ``steps_per_epoch``)."""
    s, o = recipe.schedule, recipe.optimizer
    if s.unit == "step":
        if not steps_per_epoch:
            raise ValueError("a schedule in optimizer steps needs the number of steps per epoch")
        scale = 1.0 / steps_per_epoch
    else:
        scale = recipe.train.epochs / s.reference_epochs if s.reference_epochs else 1.0
    return EpochSettings(tuple(b * scale for b in s.boundaries), s.warmup_epochs * scale,
                         o.alpha_center * scale, o.alpha_period * scale, scale)


def recipe_values(recipe, epoch: float, steps_per_epoch: int | None = None) -> tuple[float, float]:
    """(learning rate, alpha_sgd) of a :class:`megabatch.recipe.Recipe` at ``epoch``.

    The learning rate is ``schedule.factors`` times the batch-scaled base rate (or its
    polynomial decay), after the optional linear warm-up from the batch-256 rate;
    alpha_sgd follows the RMSprop warm-up curve for ``rmsprop_warmup`` and is 1 (plain
    SGD) otherwise. See :func:`epoch_settings` for the units.
    """
    s, o = recipe.schedule, recipe.optimizer
    e = epoch_settings(recipe, steps_per_epoch)
    if s.kind == "polynomial":
        lr = polynomial_lr(epoch, recipe.base_lr, recipe.train.epochs, s.power, e.warmup_epochs, o.lr_per_256)
    else:
        lr = piecewise_lr(epoch, recipe.base_lr, e.boundaries, s.factors, e.warmup_epochs, o.lr_per_256)
    alpha = alpha_sgd(epoch, e.alpha_center, e.alpha_period) if o.name == "rmsprop_warmup" else 1.0
    return lr, alpha
