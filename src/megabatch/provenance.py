"""Where a result comes from: versions, device, git commit and command line."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

import megabatch


def git_commit() -> str:
    """The commit of the megabatch checkout, with "-dirty" for local changes; "unknown"
    for an installed copy outside git."""
    here = Path(megabatch.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def collect(device: torch.device) -> dict[str, Any]:
    return {
        "megabatch": megabatch.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "host": platform.node(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
