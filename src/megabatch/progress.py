"""What a run prints: a live tqdm bar on a terminal, one plain line per epoch elsewhere.

Only the process that owns the console (rank 0) prints; others pass
``enabled=False``. The caller passes everything in: no global state, no patched
``print``.

Whether to draw the bar: ``MEGABATCH_PLAIN_PROGRESS=1`` forces plain lines,
``MEGABATCH_PLAIN_PROGRESS=0`` draws the bar whenever the output is a terminal;
unset, the bar is drawn on a terminal except under Open MPI's ``mpirun``, which
hands every rank a pseudo-terminal even when its own output goes to a file (so
``isatty()`` says nothing there, and a log would fill with ``\\r`` and escape codes).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Mapping, TextIO

from tqdm import tqdm

from megabatch.errors import UserError

PLAIN_VARIABLE = "MEGABATCH_PLAIN_PROGRESS"
BAR_FORMAT = "{desc} |{bar:20}| {percentage:3.0f}%{postfix}, ETA {remaining}"  # ETA: of the run


def draws_bar(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Whether the bar is drawn on ``stream``, by :data:`PLAIN_VARIABLE` and the launcher."""
    plain = env.get(PLAIN_VARIABLE, "").strip()
    if plain not in ("", "0", "1"):
        raise UserError(f"{PLAIN_VARIABLE}={plain!r} must be 1 (plain lines) or 0 (a live bar on a terminal)")
    is_terminal = hasattr(stream, "isatty") and stream.isatty()
    if plain:
        return plain == "0" and is_terminal
    return is_terminal and "OMPI_COMM_WORLD_SIZE" not in env


def discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, once its reader has left: what is still
    buffered, and the interpreter's last flush at exit, then go nowhere instead of raising
    a second broken pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool = True,
                 stream: TextIO | None = None, interactive: bool | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        """``interactive``: draw the bar (default: :func:`draws_bar` of ``stream``)."""
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.interactive = draws_bar(self.stream, os.environ if env is None else env) \
            if interactive is None else interactive
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self._bar: tqdm | None = None

    def info(self, message: str) -> None:
        """One plain line (the bar, if drawn, is cleared first and comes back at the next step)."""
        if self.enabled:
            with self._output_may_go():
                if self._bar is not None:
                    self._bar.clear()
                print(message, file=self.stream, flush=True)

    def step(self, epoch: int, step: int, loss: float, images_per_s: float) -> None:
        """Advance the bar after ``step`` (1-based) of ``epoch`` (0-based); a no-op off a terminal."""
        if not (self.enabled and self.interactive):
            return
        with self._output_may_go():
            self._advance(epoch, step, loss, images_per_s)

    @contextlib.contextmanager
    def _output_may_go(self) -> Iterator[None]:
        """A run outlives its output: when the stream's reader is gone (a closed pipe, a
        `tee` that died, a hung-up terminal), the run stops printing and goes on, its
        metrics in its run directory, rather than die without its last checkpoint."""
        try:
            yield
        except OSError as e:
            self.enabled, self._bar = False, None
            if self.stream is sys.stdout:
                discard_stdout()
            with contextlib.suppress(OSError, ValueError):
                print(f"megabatch: warning: the output is gone ({e.strerror or e}): the run goes on without "
                      f"printing; its run directory has its metrics and checkpoints", file=sys.stderr, flush=True)

    def _advance(self, epoch: int, step: int, loss: float, images_per_s: float) -> None:
        done = epoch * self.steps_per_epoch + step
        desc = f"epoch {epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch}"
        postfix = f"loss {loss:.4f}, {images_per_s:,.0f} img/s"
        if self._bar is None:  # started (or resumed) here: the rate and ETA count from this step
            self._bar = tqdm(total=self.epochs * self.steps_per_epoch, initial=done, desc=desc, postfix=postfix,
                             file=self.stream, bar_format=BAR_FORMAT, mininterval=0.2, leave=False,
                             disable=False)
        else:
            self._bar.set_description_str(desc, refresh=False)
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(done - self._bar.n)
        if step == self.steps_per_epoch:  # the last step of an epoch is always drawn
            self._bar.refresh()
        if done >= self._bar.total:
            self._bar.close()
            self._bar = None
