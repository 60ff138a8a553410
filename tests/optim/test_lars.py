"""LARS: parity with torch.optim.SGD without the trust ratio, a hand-written
reference and hand-computed values with it, its scale invariance, and the
optimizer contract."""

import copy

import pytest
import torch
from torch import nn

from megabatch.optim import LARS, param_groups
from problems import (FOREACH, DTYPES, make_mlp, make_data, train_step,
                      varying_lr, max_diff, assert_params_equal)


# -- without the trust ratio, LARS is torch.optim.SGD -----------------------------------------

SGD_CASES = [
    pytest.param(0.9, False, id="momentum"),
    pytest.param(0.9, True, id="nesterov"),
    pytest.param(0.0, False, id="no_momentum"),
]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("momentum, nesterov", SGD_CASES)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("switch_off", ["exclude_from_adaptation", "group_option"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_without_adaptation_is_momentum_sgd(foreach, momentum, nesterov, weight_decay,
                                            switch_off, dtype):
    model = make_mlp(dtype)
    ref = copy.deepcopy(model)
    data = make_data(dtype)
    hyper = dict(lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if switch_off == "exclude_from_adaptation":
        opt = LARS(model.parameters(), exclude_from_adaptation=True, foreach=foreach, **hyper)
    else:
        opt = LARS([dict(params=model.parameters(), lars_adaptation=False)], foreach=foreach,
                   **hyper)
    ref_opt = torch.optim.SGD(ref.parameters(), **hyper)
    for t in range(50):
        train_step(model, opt, data, lr=varying_lr(t))
        train_step(ref, ref_opt, data, lr=varying_lr(t))
    # Same operations in the same order as SGD: bitwise equal, in float32 too.
    assert_params_equal(model, ref)
    assert not torch.equal(model[0].weight, make_mlp(dtype)[0].weight)  # it did train


# -- with the trust ratio ---------------------------------------------------------------------

def reference_update(w, grad, buf, *, lr, momentum, weight_decay, trust_coefficient, eps,
                     nesterov):
    """The update rule of the docstring, written out of place; buf is None at the first step."""
    g = grad + weight_decay * w
    w_norm, g_norm = torch.sqrt((w**2).sum()), torch.sqrt((g**2).sum())
    local_lr = trust_coefficient * w_norm / (g_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
    buf = local_lr * g if buf is None else momentum * buf + local_lr * g
    step = local_lr * g + momentum * buf if nesterov else buf
    return w - lr * step, buf


def separable_params(dtypes=(torch.float64,) * 4, seed=0):
    """Parameters of a separable problem with a closed-form gradient (see separable_grad);
    the last one starts at zero (trust ratio 1 at the first step)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 2), (5,)]
    values = [torch.randn(s, generator=g) * scale for s, scale in zip(shapes, (1.0, 0.1, 3.0, 0.0))]
    return [nn.Parameter(v.to(d)) for v, d in zip(values, dtypes)]


def separable_loss(params):
    return sum((0.5 * 1.5 * p**2 - 0.3 * p + torch.sin(p)).sum() for p in params)


def separable_grad(p):
    return 1.5 * p - 0.3 + torch.cos(p)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["f64", "f32"])
def test_adaptation_matches_reference(foreach, nesterov, weight_decay, dtype, tol):
    hyper = dict(momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.02, eps=1e-9,
                 nesterov=nesterov)
    params = separable_params((dtype,) * 4)
    initial = [p.detach().clone() for p in params]
    opt = LARS(params, lr=1.0, foreach=foreach, **hyper)
    ref = [(p.detach().clone(), None) for p in params]
    for t in range(30):
        lr = 20 * varying_lr(t)
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        separable_loss(params).backward()
        opt.step()
        ref = [reference_update(w, separable_grad(w), buf, lr=lr, **hyper) for w, buf in ref]
    for p, (w, buf), w0 in zip(params, ref, initial):
        torch.testing.assert_close(p.detach(), w, rtol=tol, atol=tol)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=tol, atol=tol)
        assert max_diff(p, w0) > 1e-2  # it moved, by much more than the tolerance


@pytest.mark.parametrize("foreach", FOREACH)
def test_one_step_by_hand(foreach):
    # ||w|| = 5, ||g|| = 1: local_lr = 0.001 * 5 / (1 + 1e-9); buf = local_lr * g.
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([w], lr=2.0, foreach=foreach)  # defaults: trust_coefficient 1e-3, eps 1e-9
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    local_lr = 0.001 * 5.0 / (1.0 + 1e-9)
    buf = opt.state[w]["momentum_buffer"]
    assert buf.tolist() == pytest.approx([local_lr * 0.6, local_lr * 0.8], rel=1e-15)
    assert w.tolist() == pytest.approx([3.0 - 2.0 * local_lr * 0.6, 4.0 - 2.0 * local_lr * 0.8],
                                       rel=1e-15)
    # Second step, same gradient: ||w|| is now 5 - 2 * local_lr (w moved along -g).
    opt.step()
    local_lr_2 = 0.001 * (5.0 - 2.0 * local_lr) / (1.0 + 1e-9)
    assert buf.tolist() == pytest.approx(
        [(0.9 * local_lr + local_lr_2) * 0.6, (0.9 * local_lr + local_lr_2) * 0.8], rel=1e-12
    )


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov", [False, True])
def test_trust_ratio_uses_the_decayed_gradient(foreach, nesterov):
    # g = [0.62, 0.36] + 0.06 * [3, 4] = [0.8, 0.6]: ||g|| = 1, whereas
    # ||grad|| + wd * ||w|| = 0.717 + 0.3 (grad is not parallel to w).
    # eps = 0: local_lr = 0.02 * 5 / 1 = 0.1; buf = [0.08, 0.06];
    # w = w - 0.5 * buf, or with nesterov w - 0.5 * 1.9 * buf.
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.06, trust_coefficient=0.02, eps=0.0,
               nesterov=nesterov, foreach=foreach)
    w.grad = torch.tensor([0.62, 0.36], dtype=torch.float64)
    opt.step()
    assert opt.state[w]["momentum_buffer"].tolist() == pytest.approx([0.08, 0.06], rel=1e-13)
    factor = 0.5 * (1.9 if nesterov else 1.0)
    assert w.tolist() == pytest.approx([3.0 - factor * 0.08, 4.0 - factor * 0.06], rel=1e-13)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_size_is_proportional_to_weight_norm(foreach, dtype):
    # Two layers, one the other's weights times 10, receiving gradients of the same
    # direction but unrelated sizes: every step of the second is 10 times the first's,
    # so it stays 10 times the first. The first step's size is lr * tc * ||w||.
    g = torch.Generator().manual_seed(0)
    small = nn.Parameter(torch.randn(4, 6, generator=g, dtype=dtype))
    large = nn.Parameter(10 * small.detach().clone())
    opt = LARS([small, large], lr=0.5, trust_coefficient=0.01, eps=0.0, foreach=foreach)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for t in range(5):
        direction = torch.randn(4, 6, generator=g, dtype=dtype)
        small.grad = 3.0 * direction
        large.grad = 1e-3 * (t + 1) * direction
        norms = [torch.linalg.vector_norm(small), torch.linalg.vector_norm(large)]
        opt.step()
        # The step is lr * momentum_buffer (compared there: no cancellation in w - w_old).
        buf_small = opt.state[small]["momentum_buffer"]
        buf_large = opt.state[large]["momentum_buffer"]
        torch.testing.assert_close(buf_large, 10 * buf_small, rtol=tol, atol=0.0)
        if t == 0:
            for w_norm, buf in zip(norms, (buf_small, buf_large)):
                step_norm = 0.5 * torch.linalg.vector_norm(buf)
                torch.testing.assert_close(step_norm, 0.5 * 0.01 * w_norm, rtol=tol, atol=0.0)
    torch.testing.assert_close(large, 10 * small, rtol=tol, atol=0.0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_zero_weights_or_zero_gradient_give_local_lr_one(foreach, eps):
    zero_w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    zero_g = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    both = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    # grad = -wd * w: the decayed gradient is exactly 0 although grad is not.
    cancelled = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = LARS([dict(params=[zero_w, zero_g, both]), dict(params=[cancelled], weight_decay=0.5)],
               lr=0.1, momentum=0.9, eps=eps, foreach=foreach)
    zero_w.grad = torch.tensor([0.3, -0.6, 0.9], dtype=torch.float64)
    zero_g.grad = torch.zeros(3, dtype=torch.float64)
    both.grad = torch.zeros(2, dtype=torch.float64)
    cancelled.grad = torch.tensor([-0.5, -1.0], dtype=torch.float64)
    opt.step()
    state = opt.state
    # local_lr = 1: a plain SGD step on zero_w, nothing anywhere else.
    assert torch.equal(state[zero_w]["momentum_buffer"], zero_w.grad)
    assert torch.allclose(zero_w, -0.1 * zero_w.grad, rtol=1e-15, atol=0.0)
    assert torch.equal(zero_g, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert torch.equal(both, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(cancelled, torch.tensor([1.0, 2.0], dtype=torch.float64))
    for p in (zero_g, both, cancelled):
        assert torch.equal(state[p]["momentum_buffer"], torch.zeros_like(p))
    assert all(torch.isfinite(p).all() for p in (zero_w, zero_g, both, cancelled))


# -- the two paths, and the optimizer contract ------------------------------------------------

def test_foreach_matches_per_tensor():
    # Mixed dtypes (the foreach path buckets by device and dtype), a zero tensor, a
    # parameter without gradient, an adapted and a not adapted group, nesterov, lr
    # changing every step.
    dtypes = (torch.float64, torch.float32, torch.float64, torch.float32)
    runs = []
    for foreach in (False, True):
        params = separable_params(dtypes)
        frozen = nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = LARS(
            [dict(params=params[:3] + [frozen], weight_decay=1e-2),
             dict(params=params[3:], lars_adaptation=False, nesterov=True)],
            lr=1.0, trust_coefficient=0.02, foreach=foreach,
        )
        for t in range(40):
            for group in opt.param_groups:
                group["lr"] = 20 * varying_lr(t)
            opt.zero_grad()
            separable_loss(params).backward()
            opt.step()
        assert frozen.grad is None and frozen not in opt.state
        assert torch.equal(frozen, torch.ones(3, dtype=torch.float64))
        runs.append((params, opt))
    (params_a, opt_a), (params_b, opt_b) = runs
    for a, b in zip(params_a, params_b):
        # Same operations in the same order: bitwise equal on the CPU.
        assert torch.equal(a, b), f"max diff {max_diff(a, b):.3g}"
        assert torch.equal(opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"])
    assert params_a[0].dtype == torch.float64 and params_a[1].dtype == torch.float32


def make_bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("foreach", FOREACH)
def test_param_groups_with_sgd_for_bn_and_bias(foreach):
    # The ImageNet set-up: conv/linear weights decayed and adapted, BN parameters and
    # biases neither. One LARS == LARS on the weights + torch.optim.SGD on the rest.
    model, ref = make_bn_model(), make_bn_model()
    groups = param_groups(model, 5e-4, no_decay_bn_bias=True)
    groups[1]["lars_adaptation"] = False
    opt = LARS(groups, lr=0.1, trust_coefficient=0.01, foreach=foreach)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    assert [(g["weight_decay"], g["lars_adaptation"]) for g in opt.param_groups] == [
        (5e-4, True), (0.0, False)]

    ref_groups = param_groups(ref, 5e-4, no_decay_bn_bias=True)
    ref_opts = [LARS([ref_groups[0]], lr=0.1, trust_coefficient=0.01, foreach=foreach),
                torch.optim.SGD([ref_groups[1]], lr=0.1, momentum=0.9)]
    x, y = make_data()
    for t in range(20):
        lr = 20 * varying_lr(t)
        for o in [opt] + ref_opts:
            for group in o.param_groups:
                group["lr"] = lr
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for o in ref_opts:
            o.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        for o in ref_opts:
            o.step()
    assert_params_equal(model, ref)
    assert not torch.equal(model[1].weight, make_bn_model()[1].weight)  # BN trained too


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(trust_coefficient=0.0), "trust_coefficient"),
        (dict(trust_coefficient=-1e-3), "trust_coefficient"),
        (dict(eps=-1e-9), "eps"),
        (dict(nesterov=1), "nesterov"),
        (dict(momentum=0.0, nesterov=True), "nesterov"),
        (dict(exclude_from_adaptation="yes"), "exclude_from_adaptation"),
        (dict(foreach="auto"), "foreach"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = dict(dict(lr=0.1), **kwargs)
    with pytest.raises(ValueError, match=match):
        LARS(make_mlp().parameters(), **kwargs)


@pytest.mark.parametrize(
    "group_value, match",
    [
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(lars_adaptation=None), "lars_adaptation"),
        (dict(trust_coefficient=0.0), "trust_coefficient"),
    ],
)
def test_invalid_group_value(group_value, match):
    model = make_mlp()
    with pytest.raises(ValueError, match=match):
        LARS([dict(params=model.parameters(), **group_value)], lr=0.1)


def test_group_options_override_constructor_defaults():
    model = make_mlp()
    opt = LARS([dict(params=model[0].parameters()),
                dict(params=model[2].parameters(), lars_adaptation=True)],
               lr=0.1, exclude_from_adaptation=True)
    assert [g["lars_adaptation"] for g in opt.param_groups] == [False, True]
    assert "exclude_from_adaptation" not in opt.defaults


def test_step_rejects_negative_lr():
    model = make_mlp()
    opt = LARS([dict(params=model[0].parameters()), dict(params=model[2].parameters())], lr=0.1)
    before = copy.deepcopy(model)
    x, y = make_data()
    nn.functional.mse_loss(model(x), y).backward()
    opt.param_groups[1]["lr"] = -0.1  # only the second group: the first is not touched either
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()
    assert_params_equal(model, before)


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov", [False, True])
def test_zero_lr_leaves_parameters_unchanged(foreach, nesterov):
    # Linear warm-up often starts at lr = 0: the parameters keep every bit, with weight
    # decay and the trust ratio on, while the momentum buffer accumulates as the rule says
    # (buf = momentum * buf + local_lr * g; at fixed weights g is the same every step).
    model = make_mlp()
    before = copy.deepcopy(model)
    momentum, wd, eta, eps = 0.9, 5e-4, 0.001, 1e-9
    opt = LARS(model.parameters(), lr=0.0, momentum=momentum, weight_decay=wd, trust_coefficient=eta,
               eps=eps, nesterov=nesterov, foreach=foreach)
    data = make_data()
    for steps in (1, 2, 3):
        train_step(model, opt, data)
        for (name, p), q in zip(model.named_parameters(), before.parameters()):
            assert same_bits(p, q), f"{name} moved at lr = 0 after {steps} steps"
            g = p.grad + wd * p.detach()
            scaled = eta * p.detach().norm() / (g.norm() + eps) * g
            expected = sum(momentum ** i for i in range(steps)) * scaled
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=1e-12, atol=0,
                                       msg=lambda m: f"{name}: {m}")


# -- the published trust ratio: parity with timm ------------------------------------------------

@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_plus_decay_matches_timm(foreach, weight_decay, dtype):
    """trust_norm="gradient_plus_decay" is You et al.'s ||grad|| + wd ||w||, as timm's
    Lars(always_adapt=True) computes it; the default differs from it once wd > 0."""
    timm_optim = pytest.importorskip("timm.optim")
    model, data = make_mlp(dtype), make_data(dtype)
    ref, moco = copy.deepcopy(model), copy.deepcopy(model)
    hyper = dict(momentum=0.9, weight_decay=weight_decay, eps=1e-8)
    opt = LARS(model.parameters(), lr=0.1, trust_coefficient=0.001, trust_norm="gradient_plus_decay",
               foreach=foreach, **hyper)
    ref_opt = timm_optim.Lars(ref.parameters(), lr=0.1, trust_coeff=0.001, always_adapt=True, **hyper)
    moco_opt = LARS(moco.parameters(), lr=0.1, trust_coefficient=0.001, foreach=foreach, **hyper)
    for t in range(20):
        for m, o in ((model, opt), (ref, ref_opt), (moco, moco_opt)):
            train_step(m, o, data, lr=10 * varying_lr(t))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for (name, a), b, c in zip(model.named_parameters(), ref.parameters(), moco.parameters()):
        assert max_diff(a, b) <= tolerance * max(1.0, b.abs().max().item()), name
        if weight_decay:
            assert max_diff(a, c) > 10 * tolerance, f"{name}: the two forms should differ with decay"
        else:
            assert max_diff(a, c) <= tolerance * max(1.0, c.abs().max().item()), name


def test_trust_norm_is_checked():
    with pytest.raises(ValueError, match="trust_norm"):
        LARS([torch.zeros(2, requires_grad=True)], lr=0.1, trust_norm="grad")
