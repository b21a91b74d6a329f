"""What ``rmt det`` and ``rmt seg`` share: the task parser with its ``train``/``eval``/``predict``
subcommands, the ``--debug`` flag on each, and running ``train`` from a config plus flags."""
from __future__ import annotations

import argparse
import json
from typing import Callable, Type

from .config import DenseConfig, add_config_flags, flag_overrides, load_config

__all__ = ["add_task_parser", "add_subcommand", "add_train_command", "print_json"]


def print_json(obj) -> None:
    from .engine import to_jsonable

    print(json.dumps(to_jsonable(obj)), flush=True)


def add_task_parser(subparsers, name: str, help: str, description: str):
    """``rmt <name>`` with its own sub-subcommands; returns their ``add_parser`` holder."""
    parser = subparsers.add_parser(name, help=help, description=description)
    tasks = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
    tasks.required = True
    return tasks


def add_subcommand(tasks, name: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-subcommand that also takes ``--debug`` after its name (the top-level parser only sees it
    before); SUPPRESS keeps an absent flag from overwriting one given earlier."""
    parser = tasks.add_parser(name, **kwargs)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    return parser


def add_train_command(tasks, cls: Type[DenseConfig], default_config: str, run: Callable, help: str,
                      description: str) -> argparse.ArgumentParser:
    """``train --config NAME|FILE`` plus one flag per config field; ``run(cfg)`` does the job."""
    parser = add_subcommand(tasks, "train", help=help, description=description)
    parser.add_argument("--config", default=None,
                        help=f"YAML config: a path or a bundled name (default: {default_config}, the shapes demo)")
    add_config_flags(parser, cls)

    def command(args) -> int:
        overrides = flag_overrides(args)
        config = args.config
        if config is None and overrides.get("data") is None:
            config = default_config
        return run(load_config(cls, config, overrides))

    parser.set_defaults(func=command)
    return parser
