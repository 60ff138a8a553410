"""A run's metrics.jsonl: one JSON object per finished epoch, appended by rank 0.

A crash while appending can leave the last line cut short; every reader drops such a
line (the epoch's checkpoint holds its metrics too, and a resume puts it back) and
refuses any other line that is not JSON, naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from megabatch.checkpoint import sync_folder
from megabatch.errors import UserError


def read(path: Path, log: Callable[[str], Any] = lambda message: None) -> list[dict[str, Any]]:
    """The epochs of the metrics.jsonl at ``path`` ([] if there is none); ``log`` hears of
    a last line that was dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    epochs = []
    for number, line in enumerate(lines, 1):
        try:
            epochs.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"{path}:{number} is not a JSON line: remove or repair that line, "
                                "then resume again") from None
            log(f"dropping the last line of {path}: it was cut short")
    return epochs


def write(path: Path, epochs: list[dict[str, Any]]) -> None:
    """Replace the metrics.jsonl at ``path`` with ``epochs``, atomically (a temporary file,
    flushed, renamed, and the rename flushed)."""
    tmp = path.with_name(f".metrics.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(m) + "\n" for m in epochs))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)
