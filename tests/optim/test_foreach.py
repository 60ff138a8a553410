"""The multi-tensor helpers shared by the optimizers: device/dtype buckets and the
choice of update path. (Each optimizer's own tests compare the two paths, mixed
dtypes included.)"""

import pytest
import torch
from torch import nn

import megabatch.optim.lars as lars
import megabatch.optim.rmsprop_warmup as rmsprop_warmup
from megabatch.optim import LARS, RMSpropWarmup
from megabatch.optim.foreach import by_device_and_dtype, use_foreach
from problems import make_data, make_mlp, train_step


def test_buckets_split_by_dtype_and_keep_order():
    a, b, c = torch.zeros(1), torch.zeros(2, dtype=torch.float64), torch.ones(3)
    sa, sb, sc = torch.full((1,), 7.0), torch.zeros(2, dtype=torch.float64), torch.full((3,), 9.0)
    buckets = by_device_and_dtype([a, b, c], [sa, sb, sc])
    assert [[t.shape for t in params] for params, _ in buckets] == [[(1,), (3,)], [(2,)]]
    assert buckets[0][1][1] is sc and buckets[1][1][0] is sb


def test_default_is_foreach_only_on_cuda():
    assert use_foreach(None, [nn.Parameter(torch.zeros(1))]) is False
    assert use_foreach(True, [torch.zeros(1)]) is True


@pytest.mark.parametrize("module, optimizer", [(lars, LARS), (rmsprop_warmup, RMSpropWarmup)],
                         ids=["lars", "rmsprop_warmup"])
def test_foreach_selects_the_update_path(monkeypatch, module, optimizer):
    calls = []

    def spy(name):
        original = getattr(module, name)

        def record(*args, **kwargs):
            calls.append(name)
            original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)

    spy("_single_tensor_update")
    spy("_multi_tensor_update")
    for foreach, expected in [(None, "_single_tensor_update"),  # all parameters on the CPU
                              (False, "_single_tensor_update"),
                              (True, "_multi_tensor_update")]:
        calls.clear()
        model = make_mlp()
        train_step(model, optimizer(model.parameters(), lr=0.1, foreach=foreach), make_data())
        assert calls == [expected]
