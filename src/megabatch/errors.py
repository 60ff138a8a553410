"""Errors that reach the user as one line, never as a traceback.

Raise :class:`UserError` for bad input (a missing file, a wrong recipe key, an
impossible batch split): the command line prints ``megabatch: error: <message>``
and exits with status 2. :class:`Diverged` is a training run that produced a NaN
or infinite loss: exit status 1. The message always says what to do next.
"""


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""

    exit_code = 2


class Diverged(UserError):
    """Training produced a non-finite loss: printed as one line, exit status 1."""

    exit_code = 1
