"""megabatch's own C++ kernels, compiled for this machine on first use.

PyTorch's JIT extension builder (:func:`torch.utils.cpp_extension.load`) compiles
``csrc/*.cpp`` against the installed torch with the system's C++ compiler and
ninja, once per source, flags, torch install and Python, into a cache folder
(``$MEGABATCH_KERNEL_CACHE``, else ``~/.cache/megabatch/kernels``); ``make install``
builds it ahead, so a first training run does not wait. Where it cannot be built
(no compiler), or with ``MEGABATCH_NO_KERNELS=1``, callers fall back to their
Python form, the same computation more slowly (equal to the last bit where both run
each kernel on one thread): one warning says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = Path(__file__).parent / "csrc"


def cache_root() -> Path:
    """Where compiled kernels are kept: ``$MEGABATCH_KERNEL_CACHE`` or ``~/.cache/megabatch/kernels``."""
    configured = os.environ.get("MEGABATCH_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "megabatch" / "kernels"


def build_folder(name: str) -> Path:
    """One folder per source text, flags, torch (version and install) and Python: a change to
    any rebuilds, and two environments never relink one library under each other."""
    parts = [(SOURCES / f"{name}.cpp").read_text(), *compile_flags(), torch.__version__, torch.__file__, sys.version]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"{name}-{key}"


def compile_flags() -> list[str]:
    """OpenMP on Linux, as PyTorch's ATen is built (without it ``at::parallel_for`` runs
    inline; the extension then shares the libgomp that torch loads); on x86-64 the macros
    under which ATen's headers declare its dispatch tables' AVX2 and AVX512 entries, as
    PyTorch's own x86 builds do."""
    flags = ["-O2"]
    if platform.system() == "Linux":
        flags.append("-fopenmp")
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-DHAVE_AVX2_CPU_DEFINITION", "-DHAVE_AVX512_CPU_DEFINITION"]
    return flags


def disabled() -> bool:
    return os.environ.get("MEGABATCH_NO_KERNELS", "") not in ("", "0")


@functools.cache
def load(name: str) -> ModuleType | None:
    """The compiled module ``csrc/<name>.cpp``, building it if needed; None (with one
    warning) where it cannot be built, or None silently with ``MEGABATCH_NO_KERNELS=1``."""
    if disabled():
        return None
    # Its import logs "No CUDA runtime is found" on a machine without CUDA: these kernels are plain C++,
    # built without CUDA's compiler (on a GPU they only call PyTorch's operators).
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as jit_load
    finally:
        logger.setLevel(level)

    folder, flags = build_folder(name), compile_flags()
    fresh = not any(folder.glob("*.so"))
    if fresh:
        print(f"megabatch: compiling the {name.replace('_', ' ')} kernel for this machine "
              f"(once, about 30 s; cached in {folder})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        module = jit_load(name=f"megabatch_{name}", sources=[str(SOURCES / f"{name}.cpp")],
                          build_directory=str(folder), extra_cflags=flags,
                          extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the Python form
        reason = " ".join(str(error).split())[:300]
        warnings.warn(f"megabatch: the {name} kernel could not be built ({type(error).__name__}: {reason}); "
                      f"using its Python form, slower on several threads. A C++ compiler with OpenMP and ninja "
                      f"(pip install ninja) build it; MEGABATCH_NO_KERNELS=1 silences this.", stacklevel=2)
        return None
    if fresh:
        print(f"megabatch: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def main() -> int:
    """``python -m megabatch.kernels``: build every kernel now (``make install`` does)."""
    names = sorted(p.stem for p in SOURCES.glob("*.cpp"))
    missing = [name for name in names if load(name) is None]
    for name in names:
        print(f"{name}: {'not built (see the warning above)' if name in missing else build_folder(name)}")
    return 1 if missing and not disabled() else 0


if __name__ == "__main__":
    raise SystemExit(main())
