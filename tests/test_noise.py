"""The gradient noise scale: hand-computed estimates, the EMA, a closed-form truth, measure()."""

import math

import pytest
import torch
from torch import nn

from megabatch import noise


def test_estimate_hand_computed_case():
    # B_small = 2, B_big = 8, |G_small|^2 = 5, |G_big|^2 = 2:
    #   |G|^2     = (8*2 - 2*5) / (8 - 2)   = 6/6   = 1
    #   tr(Sigma) = (5 - 2) / (1/2 - 1/8)   = 3/(3/8) = 8
    # Check: E|G_B|^2 = |G|^2 + tr(Sigma)/B gives 1 + 8/2 = 5 and 1 + 8/8 = 2.
    assert noise.estimate(5.0, 2.0, 2, 8) == pytest.approx((1.0, 8.0), rel=1e-12)
    g, s = noise.estimate(torch.tensor([5.0, 5.0]), torch.tensor([2.0, 3.0]), 2, 8)
    # Second column: |G|^2 = (24 - 10)/6 = 7/3, tr(Sigma) = 2/(3/8) = 16/3.
    torch.testing.assert_close(g, torch.tensor([1.0, 7 / 3]))
    torch.testing.assert_close(s, torch.tensor([8.0, 16 / 3]))


@pytest.mark.parametrize("b_small, b_big", [(8, 8), (8, 4), (0, 4)])
def test_estimate_rejects_non_increasing_batches(b_small, b_big):
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise.estimate(1.0, 1.0, b_small, b_big)


def test_sq_norm_is_the_squared_norm_of_the_concatenation():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    flat = torch.cat([t.flatten() for t in tensors])
    torch.testing.assert_close(noise.sq_norm(tensors), flat.square().sum())
    assert noise.sq_norm([torch.full((4,), 2.0, dtype=torch.float16)]).dtype == torch.float32
    assert noise.sq_norm([]).item() == 0.0


def test_ema_smooths_each_estimate_then_divides_with_bias_correction():
    beta = 0.5
    ns = noise.NoiseScale(beta=beta)
    assert math.isnan(ns.noise_scale)
    # Step 1 from the hand case: |G|^2 = 1, tr(Sigma) = 8. Bias correction makes
    # the first reading the estimate itself (uncorrected it would be 0.5 and 4).
    ns.update(5.0, 2.0, 2, 8)
    assert (ns.grad_sq_norm, ns.trace_sigma, ns.noise_scale) == pytest.approx((1.0, 8.0, 8.0))
    # Step 2: |G_small|^2 = 5, |G_big|^2 = 4 -> |G|^2 = (32 - 10)/6 = 11/3, tr(Sigma) = 1/(3/8) = 8/3.
    ns.update(5.0, 4.0, 2, 8)
    # Raw EMAs: 0.5*0.5*1 + 0.5*11/3 = 25/12 and 0.5*0.5*8 + 0.5*8/3 = 10/3; corrected by 1 - 0.25.
    grad, trace = (25 / 12) / 0.75, (10 / 3) / 0.75
    assert (ns.grad_sq_norm, ns.trace_sigma) == pytest.approx((grad, trace))
    assert ns.noise_scale == pytest.approx(trace / grad)  # = 1.6
    ratio_average = ((0.5 * 0.5 * 8.0 + 0.5 * (8 / 3) / (11 / 3))) / 0.75  # EMA of per-step ratios: ~3.15
    assert ns.noise_scale != pytest.approx(ratio_average, rel=0.1)


def test_ema_keeps_tensors_and_state_dict_resumes():
    steps = [(torch.tensor(5.0), torch.tensor(2.0)), (torch.tensor(6.0), torch.tensor(3.0)),
             (torch.tensor(4.0), torch.tensor(1.5)), (torch.tensor(5.5), torch.tensor(2.5))]
    whole = noise.NoiseScale(beta=0.9)
    for small, big in steps:
        whole.update(small, big, 4, 32)
    first = noise.NoiseScale(beta=0.9)
    for small, big in steps[:2]:
        first.update(small, big, 4, 32)
    resumed = noise.NoiseScale()
    resumed.load_state_dict(first.state_dict())
    for small, big in steps[2:]:
        resumed.update(small, big, 4, 32)
    assert resumed.updates == 4
    assert (resumed.grad_sq_norm, resumed.trace_sigma) == pytest.approx((whole.grad_sq_norm, whole.trace_sigma))
    resumed.reset()
    assert resumed.updates == 0 and math.isnan(resumed.grad_sq_norm)


def test_noise_scale_is_infinite_when_the_gradient_estimate_is_not_positive():
    ns = noise.NoiseScale()
    ns.update(5.0, 1.0, 2, 8)  # |G|^2 = (8 - 10)/6 < 0
    assert ns.grad_sq_norm < 0 and ns.noise_scale == math.inf
    with pytest.raises(ValueError):
        noise.NoiseScale(beta=1.0)


@pytest.mark.parametrize("batch, b_noise, steps, epochs", [
    (100, 100, 2.0, 2.0), (900, 300, 4 / 3, 4.0), (32, 1024, 33.0, 1 + 1 / 32),
])
def test_steps_and_epochs_factors(batch, b_noise, steps, epochs):
    assert noise.steps_factor(batch, b_noise) == pytest.approx(steps)
    assert noise.epochs_factor(batch, b_noise) == pytest.approx(epochs)


def test_tradeoff_rows():
    assert noise.tradeoff(256, [64, 256, 1024]) == [(64, 5.0, 1.25), (256, 2.0, 2.0), (1024, 1.25, 5.0)]  # exact in binary


def half_squared_error(out, y):
    return 0.5 * (out.squeeze(-1) - y).square().mean()


def test_measure_matches_closed_form_least_squares():
    """Least squares with Gaussian inputs, at a point w != w*.

    x ~ N(0, I_D), eps ~ N(0, s^2), y = w*.x + eps, loss 0.5 (w.x - y)^2. With
    d = w - w*, one example's gradient is g = (d.x - eps) x = x x^T d - eps x.
      G = E[g] = E[x x^T] d = d, so |G|^2 = |d|^2.
      E[g g^T] = E[(d.x)^2 x x^T] + s^2 E[x x^T]   (the cross term has E[eps] = 0)
               = |d|^2 I + 2 d d^T + s^2 I         (Isserlis: E[x_i x_j x_k x_l] d_k d_l)
      Sigma = E[g g^T] - G G^T = (|d|^2 + s^2) I + d d^T
      tr(Sigma) = (D + 1) |d|^2 + D s^2,  B_simple = D + 1 + D s^2 / |d|^2.
    D = 10, |d|^2 = 2, s = 2: tr(Sigma) = 22 + 40 = 62, |G|^2 = 2, B_simple = 31.
    """
    torch.manual_seed(0)
    dim, noise_std = 10, 2.0
    w_star = torch.randn(dim)
    d = torch.zeros(dim)
    d[:2] = 1.0
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star + d)
    true_grad, true_trace = 2.0, (dim + 1) * 2.0 + dim * noise_std ** 2

    def batches(n, size):
        gen = torch.Generator().manual_seed(1)
        for _ in range(n):
            x = torch.randn(size, dim, generator=gen)
            yield x, x @ w_star + noise_std * torch.randn(size, generator=gen)

    m = noise.measure(model, half_squared_error, batches(10_000, 256), pieces=16, steps=150)
    assert (m.batches, m.b_small, m.b_big) == (150, 16, 256)
    assert m.grad_sq_norm == pytest.approx(true_grad, rel=0.1)
    assert m.trace_sigma == pytest.approx(true_trace, rel=0.1)
    assert m.noise_scale == pytest.approx(true_trace / true_grad, rel=0.1)
    print(m)
    assert m.ci_low < true_trace / true_grad < m.ci_high
    assert m.ci_high - m.ci_low < 0.2 * m.noise_scale


def test_measure_leaves_parameters_grads_buffers_and_mode_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model(torch.randn(16, 6)).sum().backward()  # some .grad and running statistics to keep
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    data = [(torch.randn(32, 6), torch.randint(0, 3, (32,))) for _ in range(4)]
    m = noise.measure(model, nn.CrossEntropyLoss(), data, pieces=4)
    assert m.batches == 4 and math.isfinite(m.noise_scale)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_measure_rejects_batches_that_do_not_split():
    model = nn.Linear(3, 1)
    data = [(torch.randn(10, 3), torch.randn(10))] * 2
    with pytest.raises(ValueError, match="pieces"):
        noise.measure(model, half_squared_error, data, pieces=4)
    with pytest.raises(ValueError, match="at least 2"):
        noise.measure(model, half_squared_error, data[:1], pieces=2)


def test_noise_scale_command_on_the_demo_recipe(capsys, fashion_dir):
    from megabatch.cli import main

    assert main(["noise-scale", "--recipe", "fashion-mnist-demo", "--steps", "3", "--data", str(fashion_dir),
                 "--set", "data.train_subset=8192", "--set", "train.precision=fp32",
                 "--set", "train.device=cpu"]) == 0  # the CPU's automatic micro-batch (256)
    out = capsys.readouterr().out
    value = float(out.split("B_simple = ")[1].split(" images")[0].replace(",", ""))
    assert 10 < value < 500  # at initialization the demo's is about 55 (README)
    assert "3 batches of 2048 split into 8 of 256" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("2,048", "8,192"))]
    assert [float(r[1]) for r in rows] == pytest.approx([1 + value / 2048, 1 + value / 8192], abs=0.006)
