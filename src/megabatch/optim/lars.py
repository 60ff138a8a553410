"""LARS: momentum SGD with a layer-wise trust ratio.

You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks",
arXiv:1708.03888, Algorithm 1, in the form used to train ResNet-50 on ImageNet
with large batches.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from megabatch.optim.foreach import by_device_and_dtype, use_foreach

TRUST_NORMS = ("decayed_gradient", "gradient_plus_decay")


class LARS(torch.optim.Optimizer):
    r"""Momentum SGD whose step for each tensor is scaled by its trust ratio.

    Per parameter tensor ``w`` with gradient ``grad``::

        g        = grad + weight_decay * w
        local_lr = trust_coefficient * ||w|| / (norm + eps)    if ||w|| > 0 and norm > 0
                   1                                            otherwise
        norm     = ||g||                                 trust_norm="decayed_gradient"
                 = ||grad|| + weight_decay * ||w||       trust_norm="gradient_plus_decay"
        buf      = momentum * buf + local_lr * g
        w        = w - lr * buf
        nesterov: w = w - lr * (local_lr * g + momentum * buf)

    At the first step ``buf = local_lr * g``, as ``torch.optim.SGD`` (dampening 0).

    ``||.||`` is the L2 norm over the whole tensor (one layer's weight, or its
    bias). Two published forms of the denominator:

    * ``"decayed_gradient"`` (the default): the norm of the decayed gradient, the
      vector that is actually scaled and applied, as in the MAE / MoCo v3
      implementations: then ``||local_lr * g|| = trust_coefficient * ||w||`` (up to
      ``eps``), so before momentum every layer moves by the same fraction of its
      weight norm.
    * ``"gradient_plus_decay"``: ``||grad|| + weight_decay * ||w||``, the form of
      You et al.'s Algorithm 1, the MLPerf reference and ``timm.optim.Lars``
      (the triangle-inequality bound of the same norm).

    The two agree when ``weight_decay = 0``.

    A group with ``lars_adaptation=False`` uses ``local_lr = 1``: there LARS is
    exactly ``torch.optim.SGD(lr, momentum, weight_decay=..., nesterov=...)``.
    ``megabatch.optim.param_groups`` puts batch-norm parameters and biases in
    their own group, which is the usual place for that option. ``lr`` is the
    global learning rate, which the trainer overwrites every iteration.

    Reference: You, Gitman, Ginsburg 2017, arXiv:1708.03888.

    Args:
        params: parameters or parameter groups (dicts), as for any optimizer.
        lr: global learning rate ``lr`` (>= 0; 0 is allowed, e.g. at the
            start of a warm-up).
        momentum: momentum of ``buf``, in [0, 1).
        weight_decay: L2 coefficient added to the gradient, before the trust
            ratio is computed.
        trust_coefficient: ``eta`` of the paper, > 0.
        eps: added to the trust ratio's denominator.
        trust_norm: ``"decayed_gradient"`` or ``"gradient_plus_decay"`` (above).
        nesterov: Nesterov momentum, as in ``torch.optim.SGD``.
        exclude_from_adaptation: the default of the group option
            ``lars_adaptation`` is ``not exclude_from_adaptation``; a group
            can set ``lars_adaptation`` itself.
        foreach: use the multi-tensor (``torch._foreach_*``) path. ``None``
            picks it when every parameter is on CUDA, as PyTorch's optimizers do.

    State per parameter: ``momentum_buffer`` (``buf``).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-9,
        nesterov: bool = False,
        exclude_from_adaptation: bool = False,
        trust_norm: str = "decayed_gradient",
        foreach: bool | None = None,
    ):
        if not isinstance(exclude_from_adaptation, bool):
            raise ValueError(
                f"exclude_from_adaptation must be a bool, got {exclude_from_adaptation!r}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            lars_adaptation=not exclude_from_adaptation,
            trust_norm=trust_norm,
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

        # The trainer sets lr every iteration: check every group before
        # touching any parameter.
        for group in self.param_groups:
            if not group["lr"] >= 0.0:
                raise ValueError(f"lr must be >= 0, got {group['lr']}")

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")

            grads, bufs = [], []
            for p in params:
                state = self.state[p]
                if not state:
                    # Zeros: the first step then gives buf = local_lr * g exactly.
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])

            foreach = use_foreach(group["foreach"], params)
            update = _multi_tensor_update if foreach else _single_tensor_update
            update(
                params,
                grads,
                bufs,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                nesterov=group["nesterov"],
                lars_adaptation=group["lars_adaptation"],
                trust_norm=group.get("trust_norm", "decayed_gradient"),
            )
        return loss


def _check_hyperparameters(group: dict) -> None:
    """Raise ValueError for any hyperparameter outside its valid range."""
    if not group["lr"] >= 0.0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not group["trust_coefficient"] > 0.0:
        raise ValueError(f"trust_coefficient must be > 0, got {group['trust_coefficient']}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
    if group["nesterov"] and group["momentum"] == 0.0:
        raise ValueError("nesterov momentum requires momentum > 0")
    if not isinstance(group["lars_adaptation"], bool):
        raise ValueError(f"lars_adaptation must be a bool, got {group['lars_adaptation']!r}")
    if group.get("trust_norm", "decayed_gradient") not in TRUST_NORMS:
        raise ValueError(f"trust_norm must be one of {TRUST_NORMS}, got {group['trust_norm']!r}")
    if group["foreach"] not in (None, False, True):
        raise ValueError(f"foreach must be None or a bool, got {group['foreach']!r}")


def _trust_ratio(w_norm: Tensor, g_norm: Tensor, trust_coefficient: float, eps: float,
                 grad_norm: Tensor | None = None) -> Tensor:
    """``trust_coefficient * ||w|| / (g_norm + eps)``, or 1 where ``||w||`` or the
    gradient's norm (``grad_norm`` if given, else ``g_norm``) is 0, as timm has it.

    Elementwise, so the per-tensor path (0-dim norms) and the multi-tensor
    path (stacked norms) compute the same bits. Stays on the device: no sync.
    """
    ratio = trust_coefficient * w_norm / (g_norm + eps)
    return torch.where((w_norm > 0.0) & ((g_norm if grad_norm is None else grad_norm) > 0.0), ratio, 1.0)


def _single_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    lars_adaptation: bool,
    trust_norm: str,
) -> None:
    # Same operations, in the same order, as torch.optim.SGD when local_lr = 1.
    for p, g, buf in zip(params, grads, bufs):
        grad_norm = torch.linalg.vector_norm(g) if lars_adaptation and trust_norm != "decayed_gradient" else None
        if weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        if lars_adaptation:
            w_norm = torch.linalg.vector_norm(p)
            norm = torch.linalg.vector_norm(g) if grad_norm is None else grad_norm + weight_decay * w_norm
            g = g.mul(_trust_ratio(w_norm, norm, trust_coefficient, eps, grad_norm))
        buf.mul_(momentum).add_(g)
        if nesterov:
            p.add_(g.add(buf, alpha=momentum), alpha=-lr)
        else:
            p.add_(buf, alpha=-lr)


def _multi_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    lars_adaptation: bool,
    trust_norm: str,
) -> None:
    # The same operations as _single_tensor_update, in the same order.
    for p, g, buf in by_device_and_dtype(params, grads, bufs):
        grad_norms = (torch.stack(torch._foreach_norm(g))
                      if lars_adaptation and trust_norm != "decayed_gradient" else None)
        if weight_decay != 0.0:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        if lars_adaptation:
            # One small elementwise kernel for all the ratios of the bucket.
            w_norms = torch.stack(torch._foreach_norm(p))
            norms = (torch.stack(torch._foreach_norm(g)) if grad_norms is None
                     else grad_norms + weight_decay * w_norms)
            ratios = _trust_ratio(w_norms, norms, trust_coefficient, eps, grad_norms)
            g = torch._foreach_mul(g, list(ratios.unbind(0)))
        torch._foreach_mul_(buf, momentum)
        torch._foreach_add_(buf, g)
        if nesterov:
            p_update = torch._foreach_add(g, buf, alpha=momentum)
            torch._foreach_add_(p, p_update, alpha=-lr)
        else:
            torch._foreach_add_(p, buf, alpha=-lr)
