"""The README's code runs as written: its "In your own training loop" block."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from megabatch.nn import GhostBatchNorm2d

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block below ``heading``."""
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_own_loop_example_trains_with_the_papers_parts():
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(readme_block("### In your own training loop"), "README.md", "exec"), scope)
    model, optimizer = scope["model"], scope["optimizer"]
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert layers and all(isinstance(m, GhostBatchNorm2d) and m.group_size == 32 and m.momentum == 1.0
                          for m in layers)
    assert all(m.num_batches_tracked.item() == 2 for m in layers)  # one count per step, not per pass
    state = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    assert state and all(s["step"] == 2 for s in state)
    assert optimizer.param_groups[0]["alpha_sgd"] == pytest.approx(0.5 * math.exp(2 * (0.5 - 10) / 5), rel=1e-15)
    assert all(torch.isfinite(p).all() for p in model.parameters())
