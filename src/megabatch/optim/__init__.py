"""Optimizers and parameter grouping, one optimizer per module."""

from megabatch.optim.lars import LARS
from megabatch.optim.param_groups import param_groups
from megabatch.optim.rmsprop_warmup import RMSpropWarmup

__all__ = ["LARS", "RMSpropWarmup", "param_groups"]
