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

__all__ = ["RMTError", "NonFiniteLossError", "RunInterrupted", "did_you_mean", "shorten"]


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


def shorten(value, limit: int = 60) -> str:
    """``value`` (its ``repr`` unless it is a string) on one line of at most ``limit`` characters, for
    messages that quote user data (a value from a config or an annotation file may be megabytes long)."""
    text = value if isinstance(value, str) else _bounded_repr(value, limit)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."



def _bounded_repr(value, limit: int, depth: int = 0) -> str:
    """``repr(value)``, but a large, deep or shared container (a YAML alias bomb) is not expanded."""
    brackets = {list: "[]", tuple: "()", dict: "{}"}.get(type(value))
    if brackets is None:
        text = repr(value)
        return text if len(text) <= 2 * limit else text[:2 * limit]
    if depth >= 8:
        return brackets[0] + "..." + brackets[1]
    items = value.items() if isinstance(value, dict) else value
    parts, size = [], 0
    for item in items:
        if size > limit:
            parts.append("...")
            break
        parts.append(": ".join(_bounded_repr(v, limit, depth + 1) for v in item) if isinstance(value, dict)
                     else _bounded_repr(item, limit, depth + 1))
        size += len(parts[-1]) + 2
    return brackets[0] + ", ".join(parts) + brackets[1]
