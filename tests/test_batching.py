"""Batch splitting: processes, workers and micro-batches."""

import pytest
import torch

from megabatch.batching import BatchPlan, epoch_order, step_generator
from megabatch.errors import UserError


def test_paper_configuration_on_one_process():
    plan = BatchPlan.create(32768, 32, 512)
    assert (plan.workers, plan.local_batch, plan.micro_batches) == (1024, 32768, 64)
    assert plan.steps_per_epoch(1_281_167) == 39


@pytest.mark.parametrize("global_batch, processes, expected", [
    (128, 1, 128), (2048, 1, 1024), (32768, 1, 1024), (96, 1, 96), (3 * 32 * 11, 1, 352),
])
def test_automatic_micro_batch_holds_whole_workers_and_divides_the_share(global_batch, processes, expected):
    plan = BatchPlan.create(global_batch, 32, 0, processes)
    assert plan.micro_batch == expected
    assert plan.micro_batch % 32 == 0 and plan.local_batch % plan.micro_batch == 0


def test_process_shares_are_disjoint_and_cover_the_global_batch():
    batch = torch.arange(256)
    shares = [batch[part] for rank in range(4) for part in BatchPlan.create(256, 32, 32, 4, rank).micro_slices()]
    assert torch.equal(torch.cat(shares), batch)
    plan = BatchPlan.create(256, 32, 32, 4, 3)
    assert [(s.start, s.stop) for s in plan.micro_slices()] == [(192, 224), (224, 256)]


def test_an_epoch_is_cut_into_steps_of_micro_batches_once():
    """BatchPlan.epoch: every step's micro-batches hold the next global batch of the order,
    the last partial batch is dropped, and a resumed epoch starts at its step."""
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    steps = list(BatchPlan.create(256, 32, 64, 2, 1).epoch(order, epoch=3))
    assert [s.iteration for s in steps] == [9, 10, 11] and all(s.epoch == 3 for s in steps)
    for k, step in enumerate(steps):
        assert step.position == 256 * k and step.global_batch == 256
        assert [part for part, _ in step.micro_batches] == [slice(128, 192), slice(192, 256)]
        assert torch.equal(torch.cat([i for _, i in step.micro_batches]), order[256 * k + 128:256 * (k + 1)])
    resumed = list(BatchPlan.create(256, 32, 64, 2, 1).epoch(order, epoch=3, first_step=2))
    assert len(resumed) == 1 and torch.equal(resumed[0].micro_batches[0][1], steps[2].micro_batches[0][1])


@pytest.mark.parametrize("args, message", [
    ((100, 32, 0, 1), "not divisible by per_worker_batch 32: set batch.global_batch to a multiple of it "
                      r"\(96 or 128\)"),
    ((20, 32, 0, 1), r"a multiple of it \(32\)"),
    ((96, 32, 0, 2), "cannot be shared by 2 processes"),
    ((128, 32, 48, 1), "must be a multiple of per_worker_batch"),
    ((128, 32, 96, 1), "that divides the 128 images"),
])
def test_impossible_splits_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        BatchPlan.create(*args)


def test_global_batch_larger_than_dataset():
    with pytest.raises(UserError, match="larger than the 100 training images"):
        BatchPlan.create(128, 32).steps_per_epoch(100)


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(8, generator=generator, dtype=torch.float64)


def test_order_and_augmentation_depend_only_on_seed_and_position():
    """epoch_order is a function of (seed, epoch) and step_generator of (seed, iteration):
    the same across calls whatever the global RNG has drawn in between, different when
    any one of the two changes."""
    torch.manual_seed(1)
    order = epoch_order(1, 3, 1000)
    draw = draws(step_generator(1, 7))
    torch.manual_seed(2)
    torch.rand(100)  # the global generator moves on: neither may notice
    assert torch.equal(epoch_order(1, 3, 1000), order)
    assert torch.equal(draws(step_generator(1, 7)), draw)
    assert sorted(order.tolist()) == list(range(1000))
    for other in ((2, 3), (0, 3), (1, 4), (1, 2)):  # another seed, or another epoch
        assert not torch.equal(epoch_order(*other, 1000), order), other
    for other in ((2, 7), (0, 7), (1, 8), (1, 6)):  # another seed, or another iteration
        assert not torch.equal(draws(step_generator(*other)), draw), other
    # The iterations of one run draw apart from each other and from another seed's.
    grid = torch.stack([draws(step_generator(s, i)) for s in range(3) for i in range(20)])
    assert len({tuple(row.tolist()) for row in grid}) == len(grid)


@pytest.mark.parametrize("processes, micro", [(1, 32), (1, 128), (2, 64), (4, 32), (8, 32)])
def test_every_split_of_the_epoch_sees_the_same_global_batches(processes, micro):
    """The order does not depend on the plan, and the ranks' micro-batches of every step
    put back together are the step's slice of it, whatever the processes or micro-batch."""
    order = epoch_order(5, 2, 1000)
    plans = [BatchPlan.create(256, 32, micro, processes, rank) for rank in range(processes)]
    per_rank = [list(plan.epoch(order, epoch=2)) for plan in plans]
    assert all(len(steps) == 3 for steps in per_rank)
    for k in range(3):
        assert {steps[k].iteration for steps in per_rank} == {2 * 3 + k}
        joined = torch.cat([i for steps in per_rank for _, i in steps[k].micro_batches])
        assert torch.equal(joined, order[256 * k:256 * (k + 1)])
        assert all(len(i) == micro for steps in per_rank for _, i in steps[k].micro_batches)


def test_micro_batch_larger_than_the_share_is_the_share():
    assert BatchPlan.create(256, 32, 1024, processes=2).micro_batch == 128


def test_a_seed_beyond_a_generators_range_still_seeds():
    huge = 10**14  # (seed * 1,000,003 + epoch) passes 2**63
    assert torch.equal(epoch_order(huge, 0, 50), epoch_order(huge, 0, 50))
    assert not torch.equal(epoch_order(huge, 0, 50), epoch_order(huge, 1, 50))
    assert torch.rand(1, generator=step_generator(huge, 3)).item() == torch.rand(1, generator=step_generator(huge, 3)).item()
    assert torch.equal(epoch_order(7, 2, 50), torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1_000_003 + 2)))
