"""Errors that reach the user as one line, never as a traceback.

Raise :class:`UserError` for bad input (a missing file, a wrong recipe key, an
impossible batch split): the command line prints ``megabatch: error: <message>``
and exits with status 2. :class:`Diverged` is a training run that produced a NaN
or infinite loss, :class:`NonFiniteCheckpoint` a checkpoint of such weights and
:class:`CheckpointWriteError` a checkpoint the disk refused: exit status 1. The
message always says what to do next.
"""


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""

    exit_code = 2


class Diverged(UserError):
    """Training produced a non-finite loss: printed as one line, exit status 1."""

    exit_code = 1


class NonFiniteCheckpoint(Diverged):
    """A checkpoint whose model weights hold NaN or infinite values: refused when it
    would be written, and when it is loaded for evaluation. Exit status 1."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, no permission, I/O error); nothing
    partial is left behind. Exit status 1: the input was fine, the disk was not."""

    exit_code = 1


class Preempted(UserError):
    """SIGTERM or SIGUSR1 (a cluster's time limit, preemption) stopped the run after a
    finished step and a checkpoint: ``megabatch train --resume`` continues it exactly.
    Exit status 75 (EX_TEMPFAIL: try again), for job scripts that requeue themselves."""

    exit_code = 75
