"""Writing files so that a failure never leaves a half-written one (for every layer of the package:
weights files, run directories, exports, pictures).

Every file a command writes -- checkpoints, weights, exports, pictures, CSV, JSON -- goes through
:func:`atomic_write`: the content is written to a temporary file in the target's directory, flushed
and fsynced, then renamed over the target. A kill at any moment leaves either the old file or the
new one; a failure (a full disk, an exception in the writer) leaves the old file and no temporary
file behind (nor the directories created for it). A full disk is reported as one
:class:`WriteError` line naming the path, the space the file needs and the space that is free.

Commands that write into a folder go through :func:`output_folder`: a non-empty folder they did not
create is refused unless the user asked to replace what is there; the new files are staged in a
hidden folder inside it and moved over the old ones only once all of them exist (the old ones set
aside meanwhile, put back if anything fails); a folder the command created is removed again, with
the parents it created, if the command fails. :func:`set_aside` / :func:`put_back` are the two halves
of that replacement, for a caller (the training run directory) whose "new files exist" comes later.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

from .errors import RMTError

__all__ = ["WriteError", "atomic_write", "atomic_save", "atomic_copy", "atomic_write_bytes", "atomic_write_text",
           "make_directories", "remove_empty_directories", "set_aside", "put_back", "output_folder"]


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


def make_directories(path: str | os.PathLike) -> List[Path]:
    """``mkdir -p path``; returns the directories it created, deepest first (for
    :func:`remove_empty_directories` after a failure)."""
    path = Path(path)
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_directories(created: Sequence[Path]) -> None:
    """Remove the directories of :func:`make_directories`, deepest first, as long as they are empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): leave it and its parents
            return


def _prepare_directory(path: Path) -> List[Path]:
    """Create ``path``'s missing parents; returns them (see :func:`make_directories`)."""
    try:
        created = make_directories(path.parent)
    except FileExistsError:
        raise WriteError(f"cannot write {path}: {path.parent} is a file, not a directory") from None
    except OSError as e:
        raise WriteError(f"cannot write {path}: cannot create {path.parent} ({e.strerror or e})") from None
    if path.is_dir():
        raise WriteError(f"cannot write {path}: it is a directory; give a file name")
    return created


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 size: Optional[Callable[[], int]] = None) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which is
    then fsynced and renamed over ``path``. On any failure ``path`` is untouched and the temporary
    file removed. ``size()``, when given, says how many bytes the file needs, for the full-disk
    message (otherwise the bytes written before the failure are reported as a lower bound)."""
    path = Path(path)
    created = _prepare_directory(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        error = _full_disk_error(path, 0, size) if _disk_full(e) else WriteError(f"cannot write {path}: "
                                                                                 f"{e.strerror or e}")
        remove_empty_directories(created)
        raise error from None
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
        error = None
        if _disk_full(e):
            _release_frames(e)
            error = _full_disk_error(path, written, size)
        remove_empty_directories(created)
        if error is not None:
            raise error from e
        raise
    return path


def _release_frames(error: Optional[BaseException]) -> None:
    """Drop the local variables of the frames an exception (and those it happened during) went through.

    A failed writer's frames, kept alive by the traceback, may still hold the temporary file open
    (torch.save's zip writer does): the blocks of a deleted file are freed only once it is closed, so
    the free space is measured after this, or it reads as if the partial file were still there."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__context__


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


# ------------------------------------------------------------------------- replacing files of a folder
def set_aside(folder: Path, names: Sequence[str], aside: Path) -> List[str]:
    """Move ``folder/name`` for each name that exists into the folder ``aside`` (in ``folder``, so the
    moves are renames); returns the names moved. :func:`put_back` undoes it."""
    moved = []
    for name in names:
        if (folder / name).exists() or (folder / name).is_symlink():
            aside.mkdir(exist_ok=True)
            os.replace(folder / name, aside / name)
            moved.append(name)
    _fsync_dir(folder)
    return moved


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def put_back(folder: Path, aside: Path, written: Sequence[str] = ()) -> None:
    """Undo :func:`set_aside`: remove the entries ``written`` since (the failed replacement's), then
    move everything in ``aside`` back into ``folder`` and remove ``aside``."""
    for name in written:
        _remove(folder / name)
    if aside.is_dir():
        for entry in sorted(aside.iterdir()):
            _remove(folder / entry.name)
            os.replace(entry, folder / entry.name)
        aside.rmdir()
    _fsync_dir(folder)


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Iterator[Path]:
    """Write a command's files into ``folder`` as one replacement (see the module doc).

    Yields a hidden staging folder inside ``folder``: write every new file there. When the block
    ends, each staged entry replaces the entry of the same name in ``folder`` (other entries are
    kept); if anything fails before that, ``folder`` is as it was. A non-empty ``folder`` is refused
    unless ``overwrite`` (``flag`` names the option, for the message)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{folder} is a file, not a folder")
    if folder.is_dir() and not overwrite:
        present = sorted(p.name for p in folder.iterdir())
        if present:
            names = ", ".join(present[:4]) + (" ..." if len(present) > 4 else "")
            raise WriteError(f"{folder} is not empty ({names}); choose a new or empty folder, or replace the files "
                             f"this command writes there with {flag}")
    try:
        created = make_directories(folder)
    except OSError as e:
        raise WriteError(f"cannot create {folder}: {e.strerror or e}") from None
    staging = Path(tempfile.mkdtemp(prefix=".rmt-staging-", dir=folder))
    aside = staging.with_name(staging.name.replace("staging", "replaced"))
    done = False
    try:
        yield staging
        # in the order they were written (a writer that writes its index file last keeps it last)
        names = [p.name for p in sorted(staging.iterdir(), key=lambda p: (p.lstat().st_mtime_ns, p.name))]
        moved: List[str] = []
        try:
            set_aside(folder, names, aside)
            for name in names:
                os.replace(staging / name, folder / name)
                moved.append(name)
        except BaseException:
            put_back(folder, aside, moved)
            raise
        _fsync_dir(folder)
        if aside.is_dir():
            shutil.rmtree(aside)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            remove_empty_directories(created)
