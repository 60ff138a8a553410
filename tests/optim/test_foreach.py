"""The multi-tensor helpers: device/dtype buckets and the default choice."""

import pytest
import torch
from torch import nn

from megabatch.optim import LARS, RMSpropWarmup
from megabatch.optim.foreach import by_device_and_dtype, use_foreach


def test_buckets_split_by_dtype_and_keep_order():
    a, b, c = torch.zeros(1), torch.zeros(2, dtype=torch.float64), torch.ones(3)
    sa, sb, sc = torch.full((1,), 7.0), torch.zeros(2, dtype=torch.float64), torch.full((3,), 9.0)
    buckets = by_device_and_dtype([a, b, c], [sa, sb, sc])
    assert [[t.shape for t in params] for params, _ in buckets] == [[(1,), (3,)], [(2,)]]
    assert buckets[0][1][1] is sc and buckets[1][1][0] is sb


def test_default_is_foreach_only_on_cuda():
    assert use_foreach(None, [nn.Parameter(torch.zeros(1))]) is False
    assert use_foreach(True, [torch.zeros(1)]) is True


@pytest.mark.parametrize("make", [lambda ps: RMSpropWarmup(ps, lr=0.1, alpha_sgd=0.3, foreach=True),
                                  lambda ps: LARS(ps, lr=0.1, foreach=True)])
def test_mixed_dtypes_through_the_foreach_path_match_per_tensor(make):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, dtype=torch.float64))]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    opt, ref_opt = make(ps), make(ref)
    for group in ref_opt.param_groups:
        group["foreach"] = False
    for _ in range(3):
        for p, q in zip(ps, ref):
            p.grad = torch.ones_like(p) * p.detach().sum()
            q.grad = torch.ones_like(q) * q.detach().sum()
        opt.step()
        ref_opt.step()
    for p, q in zip(ps, ref):
        assert p.dtype == q.dtype and torch.equal(p, q)
