"""Where a result comes from: versions, device, git commit and command line."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

import megabatch


def git_commit() -> str:
    """The commit of the megabatch checkout, with "-dirty" for local changes, or "unknown"
    for an installed copy outside git. ``$MEGABATCH_GIT_COMMIT``, when set, is what whoever
    copied the source tree elsewhere (a cluster node, a lent GPU machine) says it is: it
    wins, since such a copy may carry another commit's .git."""
    if os.environ.get("MEGABATCH_GIT_COMMIT"):
        return os.environ["MEGABATCH_GIT_COMMIT"]
    here = Path(megabatch.__file__).resolve().parent

    def git(*args: str) -> str:
        # --no-optional-locks: status must not take the index lock (a commit beside a running
        # study would fail on it), as it does to refresh the index's stat data.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    """The lines of /proc/cpuinfo, read once (none where there is no such file)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; elsewhere: none known)."""
    line = next((l for l in _cpuinfo() if l.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), not by emulation."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor", "AMD EPYC 7B13"): the results
    of one study may come from several machines, whose speed and bf16 support differ."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """The CPU, the kernels PyTorch picked on it, and whether bf16 is native:
    "Intel(R) Xeon(R) Processor; AVX512; bf16 native"."""
    return (f"{cpu_model()}; {torch.backends.cpu.get_cpu_capability()}; "
            f"bf16 {'native' if cpu_native_bf16() else 'emulated'}")


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
        # Which kernels PyTorch picked here (AVX512, AVX2, ...) and whether bf16 is native.
        "cpu": cpu_summary(),
        "host": platform.node(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
