"""What a run prints: a live progress bar on a terminal, one plain line per epoch elsewhere.

Only the process that owns the console (rank 0) prints; others pass
``enabled=False``. The caller passes everything in: no global state, no patched
``print``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool = True,
                 stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self._start = time.perf_counter()
        self._done_at_start: int | None = None
        self._last_draw = 0.0

    def info(self, message: str) -> None:
        if self.enabled:
            self._clear()
            print(message, file=self.stream, flush=True)

    def step(self, epoch: int, step: int, loss: float, images_per_s: float) -> None:
        """Redraw the bar after ``step`` (1-based) of ``epoch`` (0-based); a no-op off a terminal."""
        if not (self.enabled and self.interactive):
            return
        done = epoch * self.steps_per_epoch + step
        if self._done_at_start is None:
            self._done_at_start, self._start = done - 1, time.perf_counter()
        now = time.perf_counter()
        if now - self._last_draw < 0.2 and step != self.steps_per_epoch:
            return
        self._last_draw = now
        rate = (done - self._done_at_start) / max(now - self._start, 1e-9)
        eta = (self.epochs * self.steps_per_epoch - done) / max(rate, 1e-9)
        width = 20
        filled = int(width * step / self.steps_per_epoch)
        bar = "#" * filled + "." * (width - filled)
        line = (f"epoch {epoch + 1}/{self.epochs} [{bar}] step {step}/{self.steps_per_epoch} "
                f"loss {loss:.4f} {images_per_s:,.0f} img/s ETA {format_duration(eta)}")
        self.stream.write("\r" + line + "\033[K")
        self.stream.flush()

    def _clear(self) -> None:
        if self.interactive and self._last_draw:
            self.stream.write("\r\033[K")
            self._last_draw = 0.0
