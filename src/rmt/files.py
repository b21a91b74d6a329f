"""Writing files so that a failure never leaves a half-written one (for every layer of the package:
weights files, run directories, exports, pictures).

Every file a command writes -- checkpoints, weights, exports, pictures, CSV, JSON -- goes through
:func:`atomic_write`: the content is written to a temporary file in the target's directory, flushed
and fsynced, then renamed over the target. A kill at any moment leaves either the old file or the
new one; a failure (a full disk, an exception in the writer) leaves the old file and no temporary
file behind. A full disk is reported as one :class:`WriteError` line naming the path, the space
the file needs and the space that is free.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import RMTError

__all__ = ["WriteError", "atomic_write", "atomic_save", "atomic_copy", "atomic_write_bytes", "atomic_write_text"]


class WriteError(RMTError):
    """A file could not be written (the previous file, if any, is kept)."""


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


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return isinstance(e, (OSError, RuntimeError)) and ("No space left" in text or "unexpected pos" in text)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _prepare_directory(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"cannot write {path}: {path.parent} is a file, not a directory") from None
    except OSError as e:
        raise WriteError(f"cannot write {path}: cannot create {path.parent} ({e.strerror or e})") from None
    if path.is_dir():
        raise WriteError(f"cannot write {path}: it is a directory; give a file name")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 size: Optional[Callable[[], int]] = None) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which is
    then fsynced and renamed over ``path``. On any failure ``path`` is untouched and the temporary
    file removed. ``size()``, when given, says how many bytes the file needs, for the full-disk
    message (otherwise the bytes written before the failure are reported as a lower bound)."""
    path = Path(path)
    _prepare_directory(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _disk_full(e):
            raise _full_disk_error(path, 0, size) from None
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            raise _full_disk_error(path, written, size) from e
        raise
    return path


def _full_disk_error(path: Path, written: int, size: Optional[Callable[[], int]]) -> WriteError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    try:
        needed = f"needs {_megabytes(size())}" if size is not None else None
    except Exception:  # measuring must never hide the error being reported
        needed = None
    needed = needed or f"needs more than {_megabytes(written)}"
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    available = f", {_megabytes(free)} free" if free is not None else ""
    return WriteError(f"no space left on the device to write {path} ({needed}{available}){kept}")


class _ByteCounter(io.RawIOBase):
    """A write-only stream that only counts what is written to it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.count += n
        return n


def _saved_size(obj: Any) -> int:
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), size=lambda: _saved_size(obj))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file atomically."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), size=lambda: os.path.getsize(src))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=lambda: len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
