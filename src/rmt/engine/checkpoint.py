"""Run checkpoints: atomic writes, safe reads, and the random-number state of a process.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the old one: a kill at any moment leaves either the old or the new file, never a
half-written one. A full disk fails the save with a clear message and keeps the old file.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from ..errors import RMTError
from ..models.weights import read_checkpoint

__all__ = ["atomic_write", "atomic_save", "atomic_copy", "load_run_checkpoint", "rng_state", "set_rng_state",
           "CheckpointWriteError"]


class CheckpointWriteError(RMTError):
    """A checkpoint could not be written (the previous one is kept)."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same directory, which
    is then fsynced and renamed over ``path``. On any failure ``path`` is untouched and the
    temporary file removed; a full disk raises :class:`CheckpointWriteError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            raise CheckpointWriteError(f"no space left on the device to write {path}; "
                                       f"the previous {path.name} is kept") from e
        raise
    return path


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, (OSError, RuntimeError)) and "No space left" in str(e)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file atomically (see :func:`atomic_write`)."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def load_run_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a run checkpoint written by :func:`atomic_save` (``weights_only``)."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        raise RMTError(f"{path} is not a training checkpoint of this tool (no model/epoch entries)")
    return checkpoint


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) generator states, in weights-only-safe types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
