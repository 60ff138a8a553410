"""Schedules: exact values of the paper's and Goyal et al.'s formulas."""

import math

import pytest

from megabatch import recipe as recipes
from megabatch.schedules import alpha_sgd, epoch_settings, piecewise_lr, polynomial_lr, recipe_values


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 6.4), (39.99, 6.4), (40.0, 0.96), (69.9, 0.96), (70.0, 0.128), (84.0, 0.128),
    (85.0, 0.0128), (89.99, 0.0128),
])
def test_slow_start_at_32k_matches_paper_table(epoch, expected):
    """What the trainer computes for the paper's recipe: eta_base = 0.1 * 32768 / 256."""
    assert recipe_values(recipes.load("paper-resnet50-imagenet-32k"), epoch)[0] == pytest.approx(expected, rel=1e-12)


def test_piecewise_boundaries_and_factors():
    lr = [piecewise_lr(e, 2.0, boundaries=(1.0, 2.0), factors=(1.0, 0.5, 0.25)) for e in (0.5, 1.5, 2.5)]
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
    """Goyal et al. at 8k: linear warm-up from 0.1 to 3.2 over 5 epochs, then /10 at 30, 60, 80."""
    assert recipe_values(recipes.load("goyal-resnet50-imagenet-8k"), epoch)[0] == pytest.approx(expected, rel=1e-12)


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


def test_a_90_epoch_schedule_stretched_to_a_shorter_budget():
    short = recipes.load("paper-resnet50-imagenet-32k", ["schedule.reference_epochs=90", "train.epochs=9"])
    e = epoch_settings(short)
    assert e.scale == pytest.approx(0.1)
    assert e.boundaries == pytest.approx((4.0, 7.0, 8.5))
    assert (e.alpha_center, e.alpha_period) == pytest.approx((1.0, 0.5))
    assert recipe_values(short, 1.05) == pytest.approx((6.4, 0.7))  # paper's epoch 10.5
    assert recipe_values(short, 4.0) == pytest.approx((0.96, 1.0))  # paper's epoch 40


def test_schedule_in_optimizer_steps():
    r = recipes.load("fashion-mnist-paper", ["schedule.unit=step", "schedule.boundaries=[100, 150, 180]",
                                             "optimizer.alpha_center=40", "optimizer.alpha_period=20"])
    # 20 steps per epoch: the boundaries fall at epochs 5, 7.5 and 9, the hand-over centre at epoch 2
    assert epoch_settings(r, 20).boundaries == pytest.approx((5.0, 7.5, 9.0))
    assert recipe_values(r, 2.0, 20)[1] == 0.5
    assert recipe_values(r, 4.99, 20)[0] == pytest.approx(0.5 * r.base_lr)
    assert recipe_values(r, 5.0, 20)[0] == pytest.approx(0.075 * r.base_lr)
    with pytest.raises(ValueError, match="steps per epoch"):
        recipe_values(r, 1.0)


def test_polynomial_decay_with_warmup():
    assert polynomial_lr(0.0, 8.0, 10.0, 2.0, 2.0, 0.1) == pytest.approx(0.1)
    assert polynomial_lr(1.0, 8.0, 10.0, 2.0, 2.0, 0.1) == pytest.approx(4.05)
    # the decay runs over the 8 epochs after the warm-up: continuous at its end, 0 at the last
    assert polynomial_lr(2.0 - 1e-9, 8.0, 10.0, 2.0, 2.0, 0.1) == pytest.approx(8.0)
    assert polynomial_lr(2.0, 8.0, 10.0, 2.0, 2.0, 0.1) == pytest.approx(8.0)
    assert polynomial_lr(5.0, 8.0, 10.0, 2.0, 2.0, 0.1) == pytest.approx(8.0 * (1 - 3 / 8) ** 2)
    assert polynomial_lr(10.0, 8.0, 10.0, 2.0, 2.0, 0.1) == 0.0
    assert polynomial_lr(10.0, 8.0, 10.0) == 0.0 and polynomial_lr(5.0, 8.0, 10.0) == pytest.approx(2.0)
    # fashion-mnist-lars over 90 epochs at 8,192 (6 steps per epoch): no drop after the warm-up
    r = recipes.load("fashion-mnist-lars", ["batch.global_batch=8192", "train.epochs=90"])
    end = epoch_settings(r, 6).warmup_epochs
    assert end == pytest.approx(90 * 18 / 64)
    before, after = recipe_values(r, end - 1 / 6, 6)[0], recipe_values(r, end + 1 / 6, 6)[0]
    assert after == pytest.approx(r.base_lr * (1 - (1 / 6) / (90 - end)) ** 2) and after / before > 0.98
    r = recipes.load("fashion-mnist-demo", ["schedule.kind=polynomial", "schedule.power=1.0"])
    assert recipe_values(r, 6.0)[0] == pytest.approx(r.base_lr * 0.5)
