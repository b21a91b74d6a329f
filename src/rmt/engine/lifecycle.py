"""The life of a training run: open its directory (config, optional resume), then run it so that
SIGTERM/SIGINT stop it cleanly at the end of the current step with a resumable checkpoint.

Shared by classification (``rmt train``) and dense prediction (``rmt det/seg train``).
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, Optional, TypeVar

from ..errors import RMTError
from .distributed import DistInfo, barrier, cleanup

__all__ = ["Interrupted", "start_run", "run_until_signal"]

Result = TypeVar("Result")


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived during training."""


def start_run(output: Path, resume: Optional[str], info: DistInfo, write_config: Callable[[Path], None],
              load: Callable[[Path], None], log: Callable[[str], None]) -> None:
    """Open a run directory: rank 0 creates it and writes ``config.yaml`` (via ``write_config``); then,
    for ``resume`` = ``"auto"`` (``OUTPUT/last.pth`` if it exists yet) or a path, ``load`` the checkpoint."""
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_config(output / "config.yaml")
    barrier(info)
    if not resume:
        return
    path = output / "last.pth" if resume == "auto" else Path(resume)
    if path.is_file():
        load(path)
    elif resume != "auto":
        raise RMTError(f"--resume: no checkpoint at {path}")
    else:
        log(f"--resume auto: no {path} yet, starting from scratch")


def run_until_signal(info: DistInfo, make_trainer: Callable[[], "object"],
                     on_interrupt: Callable[["object"], Result]) -> Result:
    """``make_trainer().run()`` with SIGTERM/SIGINT handlers that set ``trainer.interrupted``; the
    trainer raises :class:`Interrupted` at the end of its current step, and ``on_interrupt(trainer)``
    saves and reports. The previous handlers and the process group are restored/torn down after."""
    trainer = None
    previous = {}

    def on_signal(signum, frame):
        if trainer is not None:
            trainer.interrupted = True

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        trainer = make_trainer()
        try:
            return trainer.run()
        except Interrupted:
            return on_interrupt(trainer)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup(info)
