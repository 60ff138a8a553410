"""The gradient noise scale: how large a batch still buys fewer steps.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training" (arXiv:1812.06162). With G the true gradient and Sigma the covariance
of one example's gradient, the simple noise scale is

    B_simple = tr(Sigma) / |G|^2,

the batch above which more images per step stop buying proportionally fewer
steps. A gradient averaged over B images has E|G_B|^2 = |G|^2 + tr(Sigma)/B, so
two such norms, over B_small and B_big images, give unbiased estimates of both
(Appendix A.1):

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

The appendix smooths the two separately and divides only at the end: a ratio
of noisy estimates is biased, the ratio of their averages is not (much).

Where a step has k pieces (micro-batches of emulated workers, or DDP
processes) of b images with gradients g_i: |G_small|^2 = mean_i |g_i|^2 with
B_small = b, and |G_big|^2 = |mean_i g_i|^2 with B_big = k b.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

Number = float | torch.Tensor


def sq_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """|g|^2 over a list of tensors viewed as one vector, as a float32 0-dim tensor.

    One fused call (`torch.nn.utils.get_total_norm`, torch >= 2.6); no host sync.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    if hasattr(nn.utils, "get_total_norm"):
        norm = nn.utils.get_total_norm(tensors)
    else:  # torch < 2.6: the same norm, one kernel per tensor
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
    return norm.float().square()


def estimate(small_sq_norm: Number, big_sq_norm: Number, b_small: float, b_big: float) -> tuple[Number, Number]:
    """Unbiased (|G|^2, tr(Sigma)) from the squared norms of gradients over b_small and b_big images."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq_norm = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq_norm, trace_sigma


class NoiseScale:
    """Exponential moving averages of |G|^2 and tr(Sigma), divided only when read.

    Each average is bias-corrected as Adam's moments are: after t updates it is
    divided by 1 - beta^t, so the first reading is the first estimate, not
    (1 - beta) times it. Tensor inputs stay tensors (no host sync per step);
    the properties return floats. beta = 0.99 averages over about 100 steps.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self._grad_sq_norm: Number = 0.0
        self._trace_sigma: Number = 0.0
        self.updates = 0

    def update(self, small_sq_norm: Number, big_sq_norm: Number, b_small: float, b_big: float) -> None:
        g, s = estimate(small_sq_norm, big_sq_norm, b_small, b_big)
        if isinstance(g, torch.Tensor):
            g, s = g.detach(), s.detach()
        self._grad_sq_norm = self.beta * self._grad_sq_norm + (1.0 - self.beta) * g
        self._trace_sigma = self.beta * self._trace_sigma + (1.0 - self.beta) * s
        self.updates += 1

    def _corrected(self, value: Number) -> float:
        if self.updates == 0:
            return math.nan
        return float(value) / (1.0 - self.beta ** self.updates)

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed |G|^2 (nan before the first update)."""
        return self._corrected(self._grad_sq_norm)

    @property
    def trace_sigma(self) -> float:
        """Smoothed tr(Sigma) (nan before the first update)."""
        return self._corrected(self._trace_sigma)

    @property
    def noise_scale(self) -> float:
        """B_simple = tr(Sigma) / |G|^2; inf where the smoothed |G|^2 is not positive (noise dominates)."""
        grad_sq_norm, trace_sigma = self.grad_sq_norm, self.trace_sigma
        if math.isnan(grad_sq_norm):
            return math.nan
        return trace_sigma / grad_sq_norm if grad_sq_norm > 0 else math.inf

    def state_dict(self) -> dict:
        return {"beta": self.beta, "updates": self.updates,
                "grad_sq_norm": float(self._grad_sq_norm), "trace_sigma": float(self._trace_sigma)}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.updates = float(state["beta"]), int(state["updates"])
        self._grad_sq_norm, self._trace_sigma = float(state["grad_sq_norm"]), float(state["trace_sigma"])


def steps_factor(batch: float, b_noise: float) -> float:
    """S / S_min = 1 + B_noise / B: how many more optimizer steps than the fewest possible."""
    return 1.0 + b_noise / batch


def epochs_factor(batch: float, b_noise: float) -> float:
    """E / E_min = 1 + B / B_noise: how many more epochs (examples) than the fewest possible."""
    return 1.0 + batch / b_noise


def tradeoff(b_noise: float, batches: Sequence[float]) -> list[tuple[float, float, float]]:
    """Rows (batch, S/S_min, E/E_min) of the paper's model (its eq. 2.11) for printing."""
    return [(b, steps_factor(b, b_noise), epochs_factor(b, b_noise)) for b in batches]


@dataclass(frozen=True)
class Measurement:
    """B_simple at fixed weights, with a 95% confidence interval."""

    noise_scale: float
    ci_low: float
    ci_high: float
    grad_sq_norm: float
    trace_sigma: float
    batches: int
    b_small: int
    b_big: int


def measure(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            batches: Iterable[tuple[torch.Tensor, torch.Tensor]], pieces: int,
            steps: int | None = None) -> Measurement:
    """Measure B_simple of `model` at its current weights, leaving it as it was.

    Each (x, y) batch of B_big images is split into `pieces` pieces of
    b = B_big / pieces images; `loss_fn(model(x_i), y_i)` must be the mean loss
    over the piece, so its gradient g_i is the piece's gradient. The model runs
    in train mode (the gradients training sees: each piece normalizes with its
    own batch statistics, as an emulated worker does); parameters' `.grad`,
    buffers (BN running statistics) and the train/eval mode are restored.
    Dropout, if any, draws from the global RNG.

    The estimate averages |G|^2 and tr(Sigma) over the `steps` batches (all, if
    None) and divides the averages: R = mean(S_j) / mean(G_j), as `NoiseScale`
    does without the decay. The interval is the ratio estimator's delta-method
    one, R +- 1.96 * std_j(S_j - R G_j) / (sqrt(n) * mean(G_j)).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    grads_est, traces_est = [], []
    b_small = b_big = 0
    model.train()
    try:
        for x, y in itertools.islice(batches, steps):
            b_big = x.shape[0]
            if pieces < 2 or b_big % pieces:
                raise ValueError(f"a batch of {b_big} does not split into {pieces} >= 2 equal pieces")
            b_small = b_big // pieces
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            total = [torch.zeros_like(p) for p in params]
            small = torch.zeros((), device=device)
            for xi, yi in zip(x.split(b_small), y.split(b_small)):
                grads = torch.autograd.grad(loss_fn(model(xi), yi), params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                small += sq_norm(grads).to(device)
                for t, g in zip(total, grads):
                    t.add_(g)
            big = sq_norm([t / pieces for t in total]).to(device)
            g, s = estimate(small / pieces, big, b_small, b_big)
            grads_est.append(g)
            traces_est.append(s)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved_buffers[name])
        model.train(was_training)
    n = len(grads_est)
    if n < 2:
        raise ValueError(f"need at least 2 batches for an interval, got {n}")
    g_all, s_all = torch.stack(grads_est).double().cpu(), torch.stack(traces_est).double().cpu()
    g_mean, s_mean = g_all.mean().item(), s_all.mean().item()
    ratio = s_mean / g_mean
    half = 1.96 * (s_all - ratio * g_all).std().item() / (math.sqrt(n) * abs(g_mean))
    return Measurement(ratio, ratio - half, ratio + half, g_mean, s_mean, n, b_small, b_big)
