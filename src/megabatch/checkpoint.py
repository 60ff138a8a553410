"""Checkpoints: one dict of per-component ``state_dict()``s, written atomically.

A checkpoint holds ``model`` (a plain state_dict that the matching model loads
with strict loading), ``optimizer``, ``iteration``, ``epoch`` (completed
epochs), ``recipe`` (the resolved recipe as a dict) and ``rng`` (torch's RNG
states). It is written to a temporary file in the same folder, flushed to disk
and renamed, and the rename is flushed too (the folder's fsync) before any older
checkpoint is deleted, so a crash leaves either the old file or the new one, never
half of one, and never neither; the file gets the permissions of any new file (the umask's). A model
with a NaN or infinite weight is never written, so every checkpoint on disk is
one to resume from. A failed write (a full disk) is a one-line
:class:`CheckpointWriteError` naming the last good checkpoint. Loading uses
``torch.load(weights_only=True)``, which never runs code stored in a file, after
the archive's checksums are read (torch.load does not check them: a flipped bit
would load as a wrong weight).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch

from megabatch.errors import CheckpointWriteError, NonFiniteCheckpoint, UserError

_NAME = re.compile(r"^step-(\d+)\.pt$")
KEYS = ("model", "recipe", "iteration", "epoch")  # what every megabatch checkpoint holds
# How torch.save's files begin: a zip archive, or (before torch 1.6) a pickle.
_MAGIC = (b"PK\x03\x04", b"\x80")


def non_finite(model_state: dict[str, Any]) -> list[str]:
    """The names of the tensors of a model state_dict that hold NaN or infinite values."""
    return [name for name, t in model_state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`NonFiniteCheckpoint` if the checkpoint ``state`` read from ``path``
    holds a non-finite model parameter or buffer (what ``megabatch eval`` refuses)."""
    bad = non_finite(state.get("model", {}))
    if bad:
        raise NonFiniteCheckpoint(f"checkpoint {path} holds NaN or infinite weights ({_some(bad)}): it comes "
                                  f"from a diverged run; use an earlier checkpoint of that run")


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename), unless its
    model holds a non-finite value (:class:`NonFiniteCheckpoint`: nothing is written)."""
    path = Path(path)
    bad = non_finite(state.get("model", {}))
    if bad:
        raise NonFiniteCheckpoint(f"not writing checkpoint {path}: the model holds NaN or infinite weights "
                                  f"({_some(bad)}), training has diverged; {_last_good(path)}: resume from "
                                  f"it with a smaller learning rate or a longer warm-up")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            sync_folder(path.parent.parent)
        # os.open applies the umask, as for any new file (mkstemp would make it 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException as e:
        if created:
            tmp.unlink(missing_ok=True)
        cause = _write_failure(e)
        if cause is None:
            raise
        raise CheckpointWriteError(_write_failure_message(path, cause)) from e
    return path


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename, a new file) to disk, where the file system can."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # folders that cannot be synced
            raise
    finally:
        os.close(fd)


def _write_failure(e: BaseException) -> BaseException | None:
    """The OSError behind a failed write (torch.save reports a full disk as a
    ``RuntimeError: ... unexpected pos`` raised while handling the OSError), or
    torch's own writer error; None for anything else (a bug: raised as it is)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, RuntimeError) and re.search(r"unexpected pos|PytorchStreamWriter|file write failed", str(e)):
        return e
    return None


def _write_failure_message(path: Path, cause: BaseException) -> str:
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk of {path.parent} is full ({cause.strerror})"
        todo = "free some space (or move the run to a larger disk), then continue with --resume"
    else:
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
        what = f"writing to {path.parent} failed ({reason})"
        todo = "fix the folder (space, permissions, the file system), then continue with --resume"
    return f"could not write checkpoint {path.name}: {what}; nothing partial was left; {_last_good(path)}; {todo}"


def _last_good(path: Path) -> str:
    """Which checkpoint survives beside ``path``: the newest step checkpoint of its folder
    (or of its ``checkpoints/`` subfolder, where ``megabatch train`` writes them), else
    the earlier version of ``path`` itself."""
    for folder in (path.parent, path.parent / "checkpoints"):
        found = [p for p in list_checkpoints(folder) if p != path]
        if found:
            return f"the last good checkpoint is {found[-1]}"
    if path.is_file():
        return f"the last good checkpoint is {path} (its earlier version)"
    return f"no earlier checkpoint is in {path.parent}"


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         require_finite: bool = False, run_state: bool = False) -> dict[str, Any]:
    """Read a checkpoint without executing code from it; damage is a one-line UserError.
    ``require_finite``: a non-finite model weight is a :class:`NonFiniteCheckpoint`;
    ``run_state``: a file without what ``megabatch train`` writes (:data:`KEYS`), a bare
    state_dict say, is a UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a checkpoint file in it, e.g. {path / 'final.pt'} "
                        f"or {path / 'checkpoints'}/step-*.pt")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head and not head.startswith(_MAGIC):
        raise UserError(f"{path} is not a checkpoint (not a file written by torch.save): give a .pt file "
                        f"that megabatch train wrote, e.g. RUN_DIR/final.pt or RUN_DIR/checkpoints/step-*.pt")
    damaged = _bad_member(path) if head.startswith(b"PK") else None
    if damaged:
        raise UserError(f"checkpoint {path} is corrupt ({damaged} fails its checksum); use an earlier checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing checkpoint {path}: it holds objects other than tensors and "
                        f"plain values ({first}); only load files you trust, with torch.load") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is truncated or corrupt ({message}); use an earlier checkpoint") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint (it holds a {type(state).__name__}, not a dict of "
                        f"states): give a .pt file that megabatch train wrote")
    missing = [key for key in KEYS if key not in state] if run_state else []
    if missing:
        what = "a model's state_dict" if all(isinstance(v, torch.Tensor) for v in state.values()) else "a dict"
        raise UserError(f"{path} is {what}, not a megabatch checkpoint (no {', '.join(map(repr, missing))}): "
                        f"give RUN_DIR/final.pt or RUN_DIR/checkpoints/step-*.pt that megabatch train wrote")
    if require_finite:
        check_finite(state, path)
    return state


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike, advice: str) -> None:
    """Load a checkpoint's ``model`` weights into ``model`` (strictly); weights that do not
    fit it (other layers, other shapes) are a one-line UserError ending with ``advice``."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise UserError(f"the weights in {path} do not fit the model ({detail}); {advice}") from None


def _bad_member(path: Path) -> str | None:
    """The first member of a torch.save zip archive whose CRC-32 does not match, if any."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):  # truncated: torch.load says so below
        return None


def step_path(folder: str | os.PathLike, iteration: int) -> Path:
    return Path(folder) / f"step-{iteration:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``step-*.pt`` files of ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name) and p.is_file()),
                  key=lambda p: int(_NAME.match(p.name).group(1)))


def prune(folder: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step checkpoints; what could not be deleted
    (each as "name (reason)") is returned, not raised: the newest ones are safe."""
    failed = []
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        try:
            old.unlink(missing_ok=True)
        except OSError as e:
            failed.append(f"{old.name} ({e.strerror or e})")
    return failed
