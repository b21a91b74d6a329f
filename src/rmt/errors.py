"""Errors that end a command, each with the exit status the ``rmt`` command returns for it.

================================= ======= =====================================================
error                             status  meaning
================================= ======= =====================================================
:class:`RMTError`                 2       bad input from the user: a path, a name, a value
:class:`NonFiniteLossError`       3       training stopped: the loss (or the weights) went NaN/inf
:class:`RunInterrupted`           128+N   SIGTERM/SIGINT (signal N) stopped a run after it saved
================================= ======= =====================================================

The CLI prints these as one line (``--debug`` shows the traceback); anything else is a bug.
"""
from __future__ import annotations

import difflib
import signal

__all__ = ["RMTError", "NonFiniteLossError", "RunInterrupted", "did_you_mean"]


class RMTError(Exception):
    """Bad input from the user: a missing file, an unknown name, an invalid value."""

    exit_status = 2


class NonFiniteLossError(RMTError):
    """Training produced a NaN or infinite loss (or weights); the last good checkpoint is kept."""

    exit_status = 3


class RunInterrupted(Exception):
    """A signal stopped a training run; a resumable checkpoint was saved first."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
