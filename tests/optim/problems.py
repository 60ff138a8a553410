"""The random problems and comparisons that the optimizer tests share."""

import math

import pytest
import torch
from torch import nn

FOREACH = [pytest.param(False, id="per_tensor"), pytest.param(True, id="foreach")]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def make_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_data(dtype=torch.float64, seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def train_step(model, optimizer, data, **group_values):
    """Set the given values on every group, then one forward/backward/step."""
    for group in optimizer.param_groups:
        group.update(group_values)
    x, y = data
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def varying_lr(t):
    return 0.05 * (1.0 + 0.5 * math.sin(0.7 * t))


def varying_alpha(t, steps):
    """RMSprop warm-up's alpha_sgd going 0 -> 1, then staying 1 for the last 10 steps."""
    return min(1.0, t / (steps - 10))


def max_diff(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def assert_params_equal(model_a, model_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{name}: max diff {max_diff(a, b):.3g}"
