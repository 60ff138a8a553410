"""What megabatch's optimizers do as ``torch.optim``'s own do, each on both update
paths: a state_dict that resumes a run bitwise, a closure, and a refusal of sparse
gradients."""

import io

import pytest
import torch
from torch import nn

from megabatch.optim import LARS, RMSpropWarmup
from problems import FOREACH, assert_params_equal, make_data, make_mlp, train_step, varying_alpha, varying_lr


class Case:
    """An optimizer with the hyper-parameters and per-step schedule its tests use."""

    def __init__(self, optimizer, hyper, schedule, state_keys):
        self.optimizer, self.hyper, self.schedule, self.state_keys = optimizer, hyper, schedule, state_keys

    def __call__(self, params, foreach):
        return self.optimizer(params, foreach=foreach, **self.hyper)


CASES = [
    pytest.param(Case(LARS, dict(lr=0.1, weight_decay=1e-3, trust_coefficient=0.01),
                      lambda t: dict(lr=20 * varying_lr(t)), ("momentum_buffer",)), id="lars"),
    pytest.param(Case(RMSpropWarmup, dict(lr=0.1, weight_decay=1e-3, rmsprop_lr=1e-3, alpha_sgd=0.5),
                      lambda t: dict(lr=varying_lr(t), alpha_sgd=varying_alpha(t, 15)),
                      ("step", "square_avg", "delta")), id="rmsprop_warmup"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_state_dict_round_trip(case, foreach):
    data = make_data()
    model = make_mlp()
    opt = case(model.parameters(), foreach)
    for t in range(15):
        train_step(model, opt, data, **case.schedule(t))

    first = make_mlp()
    first_opt = case(first.parameters(), foreach)
    for t in range(7):
        train_step(first, first_opt, data, **case.schedule(t))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed = make_mlp(seed=123)  # different initial weights: everything comes from the checkpoint
    resumed_opt = case(resumed.parameters(), foreach)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    for t in range(7, 15):
        train_step(resumed, resumed_opt, data, **case.schedule(t))

    assert_params_equal(resumed, model)
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert set(resumed_opt.state[p]) == set(case.state_keys)
        for key in case.state_keys:
            assert torch.equal(torch.as_tensor(resumed_opt.state[p][key]), torch.as_tensor(opt.state[q][key]))
        if "step" in case.state_keys:  # the step count came back from the checkpoint too
            assert resumed_opt.state[p]["step"] == opt.state[q]["step"] == 15


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_closure(case, foreach):
    data = make_data()
    model, ref = make_mlp(), make_mlp()
    opt, ref_opt = case(model.parameters(), foreach), case(ref.parameters(), foreach)
    x, y = data
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert torch.equal(loss, train_step(ref, ref_opt, data))
    assert calls == [True, True, True]
    assert_params_equal(model, ref)
    assert opt.step() is None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_sparse_gradients_are_rejected(case, foreach):
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = case(embedding.parameters(), foreach)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
