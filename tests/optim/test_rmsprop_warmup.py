"""RMSpropWarmup: parity with torch.optim.SGD / RMSprop at the two ends of the
warm-up, a hand-written reference in between, and the optimizer contract."""

import copy

import pytest
import torch
from torch import nn

from megabatch.optim import RMSpropWarmup
from problems import (FOREACH, DTYPES, make_mlp, make_data, train_step,
                      varying_lr, varying_alpha, assert_params_equal)

# (rtol, atol) per dtype: float64 keeps the parity checks tight. Parameters are
# O(0.1..1); RMSprop's g / sqrt(m) amplifies float32 rounding where g is near 0:
# after 200 float32 steps at rmsprop_lr 1e-3, one weight near 0.02 differed by 1.4e-5
# on an AVX-512 CPU (the two optimizers associate their products differently), so
# float32 allows 5% of one step; float64 shows the formulas are the same.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 5e-5)}


def assert_params_close(model_a, model_b, rtol, atol):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_sgd_one_is_momentum_sgd(foreach, weight_decay, dtype):
    model = make_mlp(dtype)
    ref = copy.deepcopy(model)
    data = make_data(dtype)
    opt = RMSpropWarmup(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay, alpha_sgd=1.0,
        foreach=foreach,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    for t in range(50):
        train_step(model, opt, data, lr=varying_lr(t))
        train_step(ref, ref_opt, data, lr=varying_lr(t))
    assert_params_close(model, ref, *TOL[dtype])
    assert not torch.equal(model[0].weight, make_mlp(dtype)[0].weight)  # it did train


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_sgd_zero_constant_lr_is_rmsprop(foreach, momentum, weight_decay, dtype):
    # lr != rmsprop_lr: with a constant lr the step size is rmsprop_lr, whatever lr is.
    model = make_mlp(dtype)
    ref = copy.deepcopy(model)
    data = make_data(dtype)
    hyper = dict(momentum=momentum, eps=1e-8, weight_decay=weight_decay)
    opt = RMSpropWarmup(
        model.parameters(), lr=2.0, rms_decay=0.99, rmsprop_lr=1e-3, alpha_sgd=0.0,
        foreach=foreach, **hyper,
    )
    ref_opt = torch.optim.RMSprop(ref.parameters(), lr=1e-3, alpha=0.99, **hyper)
    for _ in range(200):
        train_step(model, opt, data)
        train_step(ref, ref_opt, data)
    assert_params_close(model, ref, *TOL[dtype])


def reference_update(theta, grad, m, delta, *, lr, momentum, rms_decay, eps, rmsprop_lr,
                     weight_decay, alpha_sgd):
    """The update rule of the paper, written out of place exactly as printed."""
    g = grad + weight_decay * theta
    m = rms_decay * m + (1 - rms_decay) * g**2
    alpha_rmsprop = (1 - alpha_sgd) * rmsprop_lr / lr
    delta = momentum * delta - (alpha_sgd + alpha_rmsprop / (torch.sqrt(m) + eps)) * g
    return theta + lr * delta, m, delta


def quadratic_params(dtypes=(torch.float64, torch.float64, torch.float64), seed=0):
    """Parameters of a separable problem with a closed-form gradient (see quadratic_grad)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    return [nn.Parameter(torch.randn(s, generator=g).to(d)) for s, d in zip(shapes, dtypes)]


def quadratic_loss(params):
    return sum((0.5 * 1.5 * p**2 - 0.3 * p + torch.sin(p)).sum() for p in params)


def quadratic_grad(p):
    return 1.5 * p - 0.3 + torch.cos(p)


@pytest.mark.parametrize("foreach", FOREACH)
def test_intermediate_alpha_matches_reference(foreach):
    hyper = dict(momentum=0.9, rms_decay=0.99, eps=1e-8, rmsprop_lr=3e-3, weight_decay=1e-2)
    params = quadratic_params()
    opt = RMSpropWarmup(params, lr=0.1, alpha_sgd=0.3, foreach=foreach, **hyper)
    ref = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for t in range(10):
        lr = varying_lr(t)
        alpha_sgd = 0.3 if t < 5 else 0.3 + 0.1 * (t - 5)  # constant, then moving
        opt.param_groups[0].update(lr=lr, alpha_sgd=alpha_sgd)
        opt.zero_grad()
        quadratic_loss(params).backward()
        opt.step()
        ref = [
            reference_update(theta, quadratic_grad(theta), m, delta, lr=lr, alpha_sgd=alpha_sgd,
                             **hyper)
            for theta, m, delta in ref
        ]
    for p, (theta, m, delta) in zip(params, ref):
        state = opt.state[p]
        torch.testing.assert_close(p.detach(), theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["square_avg"], m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["delta"], delta, rtol=1e-10, atol=1e-12)
        assert state["step"] == 10


@pytest.mark.parametrize("foreach", FOREACH)
def test_scalar_values_by_hand(foreach):
    # eps = 0 keeps every number exact enough to write down:
    # step 1: g = 0.5 + 0.1 * 2.0 = 0.7; m = 0.01 * 0.49 = 0.0049; sqrt(m) = 0.07
    #         alpha_rmsprop = 0.7 * 0.01 / 0.5 = 0.014; 0.3 + 0.014 / 0.07 = 0.5
    #         Delta = -0.5 * 0.7 = -0.35; theta = 2.0 + 0.5 * -0.35 = 1.825
    # step 2 (zero gradient, no decay): m = 0.99 * 0.0049; Delta = 0.9 * -0.35 = -0.315;
    #         theta = 1.825 + 0.5 * -0.315 = 1.6675
    p = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    opt = RMSpropWarmup([p], lr=0.5, momentum=0.9, rms_decay=0.99, eps=0.0, rmsprop_lr=0.01,
                        weight_decay=0.1, alpha_sgd=0.3, foreach=foreach)
    p.grad = torch.tensor(0.5, dtype=torch.float64)
    opt.step()
    state = opt.state[p]
    assert state["step"] == 1
    assert state["square_avg"].item() == pytest.approx(0.0049, rel=1e-12)
    assert state["delta"].item() == pytest.approx(-0.35, rel=1e-12)
    assert p.item() == pytest.approx(1.825, rel=1e-12)

    opt.param_groups[0]["weight_decay"] = 0.0
    p.grad = torch.tensor(0.0, dtype=torch.float64)
    opt.step()
    assert state["step"] == 2
    assert state["square_avg"].item() == pytest.approx(0.99 * 0.0049, rel=1e-12)
    assert state["delta"].item() == pytest.approx(-0.315, rel=1e-12)
    assert p.item() == pytest.approx(1.6675, rel=1e-12)


def test_foreach_matches_per_tensor():
    # Mixed dtypes (the foreach path buckets by device and dtype), a parameter
    # without gradient, and lr and alpha_sgd changing every step.
    dtypes = (torch.float64, torch.float32, torch.float64)
    runs = []
    for foreach in (False, True):
        params = quadratic_params(dtypes)
        frozen = nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = RMSpropWarmup(params + [frozen], lr=0.1, weight_decay=1e-3, rmsprop_lr=1e-3,
                            foreach=foreach)
        for t in range(40):
            opt.param_groups[0].update(lr=varying_lr(t), alpha_sgd=varying_alpha(t, 40))
            opt.zero_grad()
            quadratic_loss(params).backward()
            opt.step()
        assert frozen.grad is None and frozen not in opt.state
        assert torch.equal(frozen, torch.ones(3, dtype=torch.float64))
        runs.append((params, opt))
    (params_a, opt_a), (params_b, opt_b) = runs
    for a, b in zip(params_a, params_b):
        # Same operations in the same order: bitwise equal on the CPU.
        assert torch.equal(a, b), f"max diff {(a - b).abs().max().item():.3g}"
        for key in ("square_avg", "delta"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key])
    assert params_a[0].dtype == torch.float64 and params_a[1].dtype == torch.float32


@pytest.mark.parametrize("foreach", FOREACH)
def test_param_groups_are_independent(foreach):
    # One optimizer with three groups == three optimizers with one group each.
    group_values = [
        dict(lr=0.1, alpha_sgd=0.0, weight_decay=0.0),
        dict(lr=0.02, alpha_sgd=0.4, weight_decay=1e-2),
        dict(lr=0.3, alpha_sgd=1.0, weight_decay=1e-4),
    ]
    data = make_data()
    model = make_mlp()
    singles = make_mlp()
    layers = [model[0].weight, model[0].bias, model[2].weight]
    single_layers = [singles[0].weight, singles[0].bias, singles[2].weight]
    opt = RMSpropWarmup(
        [dict(params=[p], **v) for p, v in zip(layers, group_values)]
        + [dict(params=[model[2].bias])],
        lr=0.05, rmsprop_lr=1e-3, foreach=foreach,
    )
    single_opts = [
        RMSpropWarmup([p], rmsprop_lr=1e-3, foreach=foreach, **v)
        for p, v in zip(single_layers + [singles[2].bias], group_values + [dict(lr=0.05)])
    ]
    x, y = data
    for t in range(20):
        for i, group in enumerate(opt.param_groups[:3]):
            group["lr"] = group_values[i]["lr"] * (1 + 0.1 * t)
            single_opts[i].param_groups[0]["lr"] = group["lr"]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for o in single_opts:
            o.zero_grad()
        nn.functional.mse_loss(singles(x), y).backward()
        for o in single_opts:
            o.step()
    assert_params_equal(model, singles)
    assert [g["alpha_sgd"] for g in opt.param_groups] == [0.0, 0.4, 1.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(rms_decay=1.0), "rms_decay"),
        (dict(rms_decay=-0.5), "rms_decay"),
        (dict(eps=-1e-8), "eps"),
        (dict(rmsprop_lr=-3e-4), "rmsprop_lr"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(alpha_sgd=-0.1), "alpha_sgd"),
        (dict(alpha_sgd=1.5), "alpha_sgd"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = dict(dict(lr=0.1), **kwargs)
    with pytest.raises(ValueError, match=match):
        RMSpropWarmup(make_mlp().parameters(), **kwargs)


def test_invalid_group_value():
    model = make_mlp()
    with pytest.raises(ValueError, match="weight_decay"):
        RMSpropWarmup([dict(params=model.parameters(), weight_decay=-1.0)], lr=0.1)


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_step_rejects_nonpositive_lr_during_warmup(lr):
    model = make_mlp()
    opt = RMSpropWarmup(model.parameters(), lr=0.1, alpha_sgd=0.5)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="lr must be > 0 while alpha_sgd < 1"):
        train_step(model, opt, make_data(), lr=lr)
    assert_params_equal(model, before)


@pytest.mark.parametrize("foreach", FOREACH)
def test_step_allows_zero_lr_once_pure_sgd(foreach):
    # After some warm-up steps, lr = 0 with alpha_sgd = 1: the parameters keep every bit,
    # with weight decay on, while Delta and m go on by the rule (m at every step, as the
    # docstring says): Delta = mu1 Delta - g, m = mu2 m + (1 - mu2) g^2, at fixed weights
    # with the same g every step.
    model = make_mlp()
    mu1, mu2, wd = 0.9, 0.99, 1e-2
    opt = RMSpropWarmup(model.parameters(), lr=0.1, momentum=mu1, rms_decay=mu2, weight_decay=wd,
                        alpha_sgd=0.0, foreach=foreach)
    data = make_data()
    for t in range(3):
        train_step(model, opt, data, lr=varying_lr(t), alpha_sgd=t / 3)
    before = copy.deepcopy(model)
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in model.parameters()}
    delta = {p: s["delta"] for p, s in state.items()}
    square_avg = {p: s["square_avg"] for p, s in state.items()}
    for steps in (1, 2):
        train_step(model, opt, data, lr=0.0, alpha_sgd=1.0)
        for (name, p), q in zip(model.named_parameters(), before.parameters()):
            assert torch.equal(p.detach().view(torch.uint8), q.detach().view(torch.uint8)), \
                f"{name} moved at lr = 0 after {steps} steps"
            g = p.grad + wd * p.detach()
            delta[p] = mu1 * delta[p] - g
            square_avg[p] = mu2 * square_avg[p] + (1 - mu2) * g * g
            torch.testing.assert_close(opt.state[p]["delta"], delta[p], rtol=1e-12, atol=1e-15,
                                       msg=lambda m: f"{name} delta: {m}")
            torch.testing.assert_close(opt.state[p]["square_avg"], square_avg[p], rtol=1e-12, atol=1e-15,
                                       msg=lambda m: f"{name} square_avg: {m}")
            assert opt.state[p]["step"] == state[p]["step"] + steps
            assert not torch.equal(opt.state[p]["delta"], state[p]["delta"])


def test_step_rejects_alpha_sgd_out_of_range():
    model = make_mlp()
    opt = RMSpropWarmup(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="alpha_sgd"):
        train_step(model, opt, make_data(), alpha_sgd=1.2)
