"""What every ``rmt`` subcommand shares: argument types that refuse impossible values, JSON output
that never holds a bare ``NaN``, and plain-text tables.

The packages' ``cli`` modules (classification, detection, segmentation, tools) use these to add
their subcommands; :mod:`rmt.cli` assembles them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable, Dict, Iterable, Sequence

__all__ = ["positive_int", "non_negative_int", "positive_float", "probability", "port_number", "to_jsonable",
           "print_json", "format_table", "print_results"]


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = _number(int, text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors and arrays as lists, paths as strings, non-finite floats as ``None``
    (JSON has no NaN; a reader of ``--json`` output must never meet a bare ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    return str(obj)


def print_json(obj: Any) -> None:
    """One line of strict JSON on stdout (flushed, so that a reader sees each result as it comes)."""
    print(json.dumps(to_jsonable(obj), allow_nan=False), flush=True)


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[tuple]) -> str:
    """Plain-text table. ``columns``: ``(key, header, format)`` with a ``str.format`` spec."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], f) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_results(results: Iterable[Dict[str, Any]], command: str, as_json: bool,
                  describe: Callable[[Dict[str, Any]], str]) -> int:
    """Print the per-input results of a ``predict`` command as each arrives, in the output contract all
    of them share: ``{"path", ...}``, or ``{"path", "error"}`` for an input that could not be read,
    which is reported on stderr and skipped. ``--json`` prints one object per input (failures too);
    otherwise ``describe(result)`` is printed. Returns the exit status: 1 if any input failed, else 0."""
    failed = total = 0
    for result in results:
        total += 1
        if "error" in result:
            failed += 1
            print(f"{command}: skipped {result['path']}: {result['error']}", file=sys.stderr, flush=True)
        if as_json:
            print_json(result)
        elif "error" not in result:
            print(describe(result), flush=True)
    if failed:
        print(f"{command}: {failed} of {total} image(s) could not be read", file=sys.stderr)
        return 1
    return 0
