"""RMSprop warm-up: an optimizer that starts as RMSprop and becomes momentum SGD.

Akiba, Suzuki, Fukuda 2017, "Extremely Large Minibatch SGD: Training ResNet-50
on ImageNet in 15 Minutes", arXiv:1711.04325, section "RMSprop warm-up".
"""

from collections.abc import Callable

import torch
from torch import Tensor

from megabatch.optim.foreach import by_device_and_dtype, use_foreach


class RMSpropWarmup(torch.optim.Optimizer):
    r"""Momentum SGD blended with RMSprop by a per-group coefficient ``alpha_sgd``.

    Per element, with the weight decay added to the gradient first
    (``g = grad + weight_decay * theta``)::

        m_t     = rms_decay * m_{t-1} + (1 - rms_decay) * g^2
        Delta_t = momentum * Delta_{t-1}
                  - (alpha_sgd + alpha_rmsprop / (sqrt(m_t) + eps)) * g
        theta_t = theta_{t-1} + lr * Delta_t

        alpha_rmsprop = (1 - alpha_sgd) * rmsprop_lr / lr

    ``alpha_sgd = 1`` is exactly ``torch.optim.SGD(lr, momentum, weight_decay)``.
    ``alpha_sgd = 0`` with a constant ``lr`` is exactly
    ``torch.optim.RMSprop(lr=rmsprop_lr, alpha=rms_decay, eps=eps,
    momentum=momentum, weight_decay=weight_decay)``: ``Delta`` is the step
    divided by ``lr``, so the step size is ``rmsprop_lr`` whatever ``lr`` is.
    The trainer overwrites ``group["lr"]`` and ``group["alpha_sgd"]`` every
    iteration; ``m`` is updated at every step, also once ``alpha_sgd = 1``, as
    the rule says.

    Reference: Akiba, Suzuki, Fukuda 2017, arXiv:1711.04325.

    Args:
        params: parameters or parameter groups (dicts), as for any optimizer.
        lr: learning rate ``eta_t`` of the SGD part; also scales the step.
        momentum: ``mu1``, the momentum of ``Delta``.
        rms_decay: ``mu2``, the decay of the running average of ``g^2``.
        eps: added to ``sqrt(m_t)`` in the RMSprop denominator.
        rmsprop_lr: ``eta_RMSprop``, the step size of the RMSprop part.
        weight_decay: L2 coefficient added to the gradient.
        alpha_sgd: blend coefficient in [0, 1]; 0 is RMSprop, 1 is momentum SGD.
        foreach: use the multi-tensor (``torch._foreach_*``) path. ``None``
            picks it when every parameter is on CUDA, as PyTorch's optimizers do.

    State per parameter: ``square_avg`` (``m``), ``delta`` (``Delta``) and
    ``step`` (number of updates applied).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        rms_decay: float = 0.99,
        eps: float = 1e-8,
        rmsprop_lr: float = 3e-4,
        weight_decay: float = 0.0,
        alpha_sgd: float = 0.0,
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            rms_decay=rms_decay,
            eps=eps,
            rmsprop_lr=rmsprop_lr,
            weight_decay=weight_decay,
            alpha_sgd=alpha_sgd,
            foreach=foreach,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Also checks values that a group sets itself, e.g. its own weight_decay.
        super().add_param_group(param_group)
        _check_hyperparameters(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # The trainer sets lr and alpha_sgd every iteration: check every group
        # before touching any parameter.
        for group in self.param_groups:
            lr, alpha_sgd = group["lr"], group["alpha_sgd"]
            if not 0.0 <= alpha_sgd <= 1.0:
                raise ValueError(f"alpha_sgd must be in [0, 1], got {alpha_sgd}")
            if lr <= 0.0 and alpha_sgd < 1.0:
                raise ValueError(
                    f"lr must be > 0 while alpha_sgd < 1 (the RMSprop term is "
                    f"rmsprop_lr / lr), got lr={lr}, alpha_sgd={alpha_sgd}"
                )

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("RMSpropWarmup does not support sparse gradients")
            lr, alpha_sgd = group["lr"], group["alpha_sgd"]
            alpha_rmsprop = 0.0
            if alpha_sgd < 1.0:
                alpha_rmsprop = (1.0 - alpha_sgd) * group["rmsprop_lr"] / lr

            grads, square_avgs, deltas = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grads.append(p.grad)
                square_avgs.append(state["square_avg"])
                deltas.append(state["delta"])

            foreach = use_foreach(group["foreach"], params)
            update = _multi_tensor_update if foreach else _single_tensor_update
            update(
                params,
                grads,
                square_avgs,
                deltas,
                lr=lr,
                momentum=group["momentum"],
                rms_decay=group["rms_decay"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                alpha_sgd=alpha_sgd,
                alpha_rmsprop=alpha_rmsprop,
            )
        return loss


def _check_hyperparameters(group: dict) -> None:
    """Raise ValueError for any hyperparameter outside its valid range."""
    if not group["lr"] > 0.0:
        raise ValueError(f"lr must be > 0, got {group['lr']}")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if not 0.0 <= group["rms_decay"] < 1.0:
        raise ValueError(f"rms_decay must be in [0, 1), got {group['rms_decay']}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")
    if not group["rmsprop_lr"] >= 0.0:
        raise ValueError(f"rmsprop_lr must be >= 0, got {group['rmsprop_lr']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not 0.0 <= group["alpha_sgd"] <= 1.0:
        raise ValueError(f"alpha_sgd must be in [0, 1], got {group['alpha_sgd']}")




def _single_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    deltas: list[Tensor],
    *,
    lr: float,
    momentum: float,
    rms_decay: float,
    eps: float,
    weight_decay: float,
    alpha_sgd: float,
    alpha_rmsprop: float,
) -> None:
    for p, g, square_avg, delta in zip(params, grads, square_avgs, deltas):
        if weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        square_avg.mul_(rms_decay).addcmul_(g, g, value=1.0 - rms_decay)
        delta.mul_(momentum)
        if alpha_rmsprop != 0.0:
            delta.addcdiv_(g, square_avg.sqrt().add_(eps), value=-alpha_rmsprop)
        if alpha_sgd != 0.0:
            delta.add_(g, alpha=-alpha_sgd)
        p.add_(delta, alpha=lr)


def _multi_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    deltas: list[Tensor],
    *,
    lr: float,
    momentum: float,
    rms_decay: float,
    eps: float,
    weight_decay: float,
    alpha_sgd: float,
    alpha_rmsprop: float,
) -> None:
    # The same operations as _single_tensor_update, in the same order.
    for p, g, square_avg, delta in by_device_and_dtype(params, grads, square_avgs, deltas):
        if weight_decay != 0.0:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        torch._foreach_mul_(square_avg, rms_decay)
        torch._foreach_addcmul_(square_avg, g, g, value=1.0 - rms_decay)
        torch._foreach_mul_(delta, momentum)
        if alpha_rmsprop != 0.0:
            denom = torch._foreach_sqrt(square_avg)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(delta, g, denom, value=-alpha_rmsprop)
        if alpha_sgd != 0.0:
            torch._foreach_add_(delta, g, alpha=-alpha_sgd)
        torch._foreach_add_(p, delta, alpha=lr)
