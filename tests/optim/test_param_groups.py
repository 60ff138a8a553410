"""param_groups: which parameters are weight-decayed."""

import pytest
import torch
from torch import nn

from megabatch.optim import RMSpropWarmup, param_groups


class LastBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass, as megabatch's own BN variants are."""


class Net(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm
        self.fc = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


NORMS = {
    "bn": lambda: nn.BatchNorm2d(4),
    "bn_subclass": lambda: LastBatchNorm2d(4),
    "group_norm": lambda: nn.GroupNorm(2, 4),
    "layer_norm_2d_weight": lambda: nn.LayerNorm((5, 5)),  # 2-D weight: only isinstance exempts it
}


def ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_norm_and_bias_not_decayed(norm):
    model = Net(norm())
    groups = param_groups(model, weight_decay=1e-4, no_decay_bn_bias=True)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    decayed, not_decayed = (ids(g["params"]) for g in groups)
    assert decayed == ids([model.conv.weight, model.fc.weight])
    assert not_decayed == ids([model.conv.bias, model.norm.weight, model.norm.bias, model.fc.bias])


def test_one_group_without_no_decay():
    model = Net(nn.BatchNorm2d(4))
    groups = param_groups(model, weight_decay=5e-4, no_decay_bn_bias=False)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 5e-4
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_one_dimensional_parameter_not_decayed():
    model = nn.Module()
    model.scale = nn.Parameter(torch.ones(4))
    model.temperature = nn.Parameter(torch.tensor(1.0))
    model.table = nn.Parameter(torch.ones(4, 4))
    decayed, not_decayed = param_groups(model, weight_decay=0.1, no_decay_bn_bias=True)
    assert ids(decayed["params"]) == ids([model.table])
    assert ids(not_decayed["params"]) == ids([model.scale, model.temperature])


def test_shared_parameters_counted_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    model.add_module("again", model[0])  # the same module twice
    for no_decay in (True, False):
        groups = param_groups(model, weight_decay=0.1, no_decay_bn_bias=no_decay)
        all_params = [p for g in groups for p in g["params"]]
        assert len(all_params) == len(ids(all_params)) == 3  # one weight, two biases


def test_frozen_parameters_and_empty_groups_left_out():
    model = Net(nn.BatchNorm2d(4))
    model.conv.requires_grad_(False)
    model.fc.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1, no_decay_bn_bias=True)
    assert len(groups) == 1  # nothing left to decay
    assert groups[0]["weight_decay"] == 0.0
    assert ids(groups[0]["params"]) == ids([model.norm.weight, model.norm.bias, model.fc.bias])

    assert param_groups(nn.Linear(3, 3, bias=False), 0.1, True)[0]["weight_decay"] == 0.1
    assert param_groups(nn.ReLU(), 0.1, True) == []


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "rmsprop_warmup": lambda groups: RMSpropWarmup(groups, lr=0.1, alpha_sgd=0.5),
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_weight_decay_alone_moves_only_decayed_params(make_optimizer):
    torch.manual_seed(0)
    model = Net(nn.BatchNorm2d(4))
    with torch.no_grad():  # non-trivial BN scale and shift, so decay would move them
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    optimizer = make_optimizer(param_groups(model, weight_decay=0.1, no_decay_bn_bias=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()

    for name, p in model.named_parameters():
        if name in ("conv.weight", "fc.weight"):
            assert not torch.equal(p, before[name]), name
            assert ((p - before[name]) * before[name] <= 0).all(), name  # toward zero
        else:
            assert torch.equal(p, before[name]), name


def test_no_decay_options_go_to_the_no_decay_group_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    decay, no_decay = param_groups(model, 1e-4, True, {"lars_adaptation": False})
    assert "lars_adaptation" not in decay and no_decay["lars_adaptation"] is False
    assert no_decay["weight_decay"] == 0.0
