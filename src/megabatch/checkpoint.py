"""Checkpoints: one dict of per-component ``state_dict()``s, written atomically.

A checkpoint holds ``model`` (a plain state_dict that the matching model loads
with strict loading), ``optimizer``, ``iteration``, ``epoch`` (completed
epochs), ``recipe`` (the resolved recipe as a dict) and ``rng`` (torch's RNG
states). It is written to a temporary file in the same folder, flushed to disk
and renamed, so a crash leaves either the old file or the new one, never half
of one. Loading uses ``torch.load(weights_only=True)``, which never runs code
stored in a file.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from megabatch.errors import UserError

_NAME = re.compile(r"^step-(\d+)\.pt$")


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing code from it; damage is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing checkpoint {path}: it holds objects other than tensors and "
                        f"plain values ({first}); only load files you trust, with torch.load") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0]}); "
                        f"use an earlier checkpoint") from None


def step_path(folder: str | os.PathLike, iteration: int) -> Path:
    return Path(folder) / f"step-{iteration:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``step-*.pt`` files of ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)),
                  key=lambda p: int(_NAME.match(p.name).group(1)))


def prune(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
