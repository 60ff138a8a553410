"""Stopping cleanly on a cluster's time limit or preemption.

SIGTERM (SLURM's and Kubernetes' time limit, ``kill``) and SIGUSR1 (SLURM's
``--signal=USR1@120`` warning) only raise a flag: the trainer finishes its step,
checkpoints and exits 75 (:class:`~megabatch.errors.Preempted`); a study stops
starting runs and passes the signal on to the runs it started.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_on_signals(on_signal: Callable[[int], None] | None = None) -> Iterator[Callable[[], bool]]:
    """While inside, a stop signal raises a flag (read by the returned function) and
    calls ``on_signal(number)``, instead of ending the process. Main thread only."""
    raised: list[int] = []

    def handle(number: int, frame) -> None:
        raised.append(number)
        if on_signal is not None:
            on_signal(number)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield lambda: bool(raised)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
