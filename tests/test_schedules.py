"""Schedules: exact values of the paper's and Goyal et al.'s formulas."""

import math

import pytest

from megabatch import recipe as recipes
from megabatch.schedules import alpha_sgd, goyal_lr, piecewise_lr, recipe_values, slow_start_lr


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 6.4), (39.99, 6.4), (40.0, 0.96), (69.9, 0.96), (70.0, 0.128), (84.0, 0.128),
    (85.0, 0.0128), (89.99, 0.0128),
])
def test_slow_start_at_32k_matches_paper_table(epoch, expected):
    assert slow_start_lr(epoch, base_lr=0.1 * 32768 / 256) == pytest.approx(expected, rel=1e-12)


def test_slow_start_boundaries_and_factors_are_overridable():
    lr = [slow_start_lr(e, 2.0, boundaries=(1.0, 2.0), factors=(1.0, 0.5, 0.25)) for e in (0.5, 1.5, 2.5)]
    assert lr == [2.0, 1.0, 0.5]


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.5 * math.exp(-4.0)),
    (5.0, 0.5 * math.exp(-2.0)),
    (9.0, 0.5 * math.exp(-0.4)),
    (10.0, 0.5),
    (10.5, 0.7),
    (11.0, 0.9),
    (11.25, 1.0),
    (11.5, 1.0),   # the printed formula overshoots: clamped
    (90.0, 1.0),
])
def test_alpha_sgd_printed_formula_clamped(epoch, expected):
    assert alpha_sgd(epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_alpha_sgd_is_continuous_and_non_decreasing():
    values = [alpha_sgd(i / 100) for i in range(0, 2000)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert alpha_sgd(10.0 - 1e-9) == pytest.approx(alpha_sgd(10.0), abs=1e-8)


def test_alpha_sgd_center_and_period():
    assert alpha_sgd(3.0, center=3.0, period=2.0) == 0.5
    assert alpha_sgd(3.5, center=3.0, period=2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        alpha_sgd(1.0, period=0.0)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.1), (2.5, (0.1 + 3.2) / 2), (5.0, 3.2), (29.9, 3.2), (30.0, 0.32), (60.0, 0.032), (80.0, 0.0032),
])
def test_goyal_warmup_then_steps(epoch, expected):
    assert goyal_lr(epoch, base_lr=3.2, small_batch_lr=0.1) == pytest.approx(expected, rel=1e-12)


def test_piecewise_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="one factor more"):
        piecewise_lr(0.0, 1.0, [1.0], [1.0])
    with pytest.raises(ValueError, match="increasing"):
        piecewise_lr(0.0, 1.0, [2.0, 1.0], [1.0, 1.0, 1.0])


def test_recipe_values_of_the_paper_recipe():
    paper = recipes.load("paper-resnet50-imagenet-32k")
    assert paper.base_lr == pytest.approx(12.8)
    assert recipe_values(paper, 0.0) == pytest.approx((6.4, 0.5 * math.exp(-4.0)))
    assert recipe_values(paper, 10.5) == pytest.approx((6.4, 0.7))
    assert recipe_values(paper, 45.0) == pytest.approx((0.96, 1.0))


def test_recipe_values_of_goyal_recipe_have_no_rmsprop_phase():
    goyal = recipes.load("goyal-resnet50-imagenet-8k")
    assert recipe_values(goyal, 0.0) == pytest.approx((0.1, 1.0))
    assert recipe_values(goyal, 5.0) == pytest.approx((3.2, 1.0))
