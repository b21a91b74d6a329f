"""The ``rmt`` command: assembles the subcommands that each package adds (classification,
detection, segmentation, tools) and turns errors into one line and an exit status.

Exit statuses (rmt.errors): 0 success; 1 an internal error (a bug: ``--debug`` shows the traceback)
or, for ``predict``, some inputs could not be read; 2 bad input from the user (a path, a name, a
value, a file the file system refused); 3 training stopped on a non-finite loss; 128+N a run stopped
by signal N after saving. Without ``--debug`` no command prints a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .classification import cli as classification_cli
from .detection import cli as detection_cli
from .errors import RMTError, RunInterrupted, shorten
from .runtime.memory import keep_freed_memory
from .segmentation import cli as segmentation_cli
from .tools import cli as tools_cli

__all__ = ["main", "build_parser"]

# -------------------------------------------------------------------------------------- main
# the packages that add their own subcommands: each module has `add_commands(subparsers)`
_COMMAND_MODULES = (classification_cli, detection_cli, segmentation_cli, tools_cli)


class _Parser(argparse.ArgumentParser):
    """The parser of ``rmt`` and of every subcommand: each takes ``--debug`` (one flag, accepted
    wherever it is given), and a usage mistake is one line and exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show tracebacks instead of one-line errors")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rmt", description="RMT (Retentive Networks Meet Vision Transformers): models, training, "
                                             "evaluation and tools.")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # subcommand parsers are _Parser too
    sub.required = True
    for module in _COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def _one_line(e: BaseException, limit: int = 500) -> str:
    """The message of ``e`` on one line of at most ``limit`` characters (it may quote user data)."""
    return shorten(str(e), limit) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rmt``; returns the exit status (see rmt.errors for what each means)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage mistake (one line, status 2): a status to return, as for the rest
        return int(e.code or 0)
    keep_freed_memory()  # see rmt.runtime.memory: fewer page faults, 10-20% faster CPU training steps
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rmt").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, RunInterrupted):
            print(f"rmt: {e}", file=sys.stderr)
        elif isinstance(e, RMTError):
            print(f"rmt: error: {_one_line(e)}", file=sys.stderr)
        elif isinstance(e, OSError):  # the file system refused: a path, a permission, a full disk
            where = f": {e.filename}" if e.filename else ""
            print(f"rmt: error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
            return 2
        else:
            print(f"rmt: internal error: {type(e).__name__}: {_one_line(e)} (run with --debug for the "
                  f"traceback, and please report it)", file=sys.stderr)
            return 1
        return e.exit_status
    except KeyboardInterrupt:
        print("rmt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
