"""Errors caused by what a user passed in (a path, a name, a value).

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class RMTError(Exception):
    """Bad input from the user: a missing file, an unknown name, an invalid value."""


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
