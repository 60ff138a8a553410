"""The flags both ``megabatch bench`` models share: where to measure, and counts
checked against their least value. torch is imported inside the functions."""

from __future__ import annotations

from megabatch.errors import UserError


def wants_gpu(device: str) -> bool:
    """``--device`` auto/cpu/cuda as "measure on the GPU?"; cuda without one is an error."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible: use --device cpu (or auto)")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def at_least(value: int, flag: str, least: int = 1) -> int:
    """``value`` of ``--flag``, or a one-line error if it is below ``least``."""
    if value < least:
        raise UserError(f"--{flag} must be at least {least}, not {value}")
    return value
