"""The run directory: what a training run writes, and the rules that keep runs apart.

Every task's run writes the same files into its ``--output`` directory::

    config.yaml         the resolved config
    metrics.csv         one row per evaluation (rewritten from the checkpoint's history)
    curves.png          loss and metrics per evaluation
    events.out.tfevents.*   TensorBoard's event files; wandb/, mlruns/: W&B's, MLflow's (rmt.training.tracking)
    last.pth            everything needed to resume (``--resume auto``); see rmt.training.checkpoint
    best.pth            the checkpoint of the best evaluation
    model.safetensors   the best weights, with what they are in the metadata (rmt.models.weights)
    hub/                classification: the best weights in timm's Hub layout (rmt.models.hub), at the end
    resumes.log         one line per resume that changed a setting that may change (rmt.training.config)
    epoch_NNNN.pth / iter_NNNNNNNN.pth   the most recent evaluations' checkpoints (--keep-checkpoints N)

All of them are written atomically (rmt.files).

Rules (:meth:`RunDirectory.claim`):

* a directory belongs to one run. Starting a new run where another run's files are is refused,
  with what to do: ``--resume auto`` to continue it, another ``--output``, or ``--overwrite`` to
  replace it;
* replacing is a transaction: ``--overwrite`` moves the old run's files aside (into the hidden
  ``.replaced-run/``, :meth:`RunDirectory.start`) once the new run has passed every check, deletes
  them only once the new run has written its first checkpoint (:meth:`RunDirectory.commit`), and puts
  them back if the new run fails before that (an error, a signal). A process killed in between
  leaves ``.replaced-run/``: the next run claiming the directory finishes the transaction (the old
  run back if the new one never wrote ``last.pth``);
* a lock (``flock`` on the directory itself) is held for the life of the run, so a second process
  training into the same directory is refused while the first runs;
* nothing is written into the directory before every check of the start has passed; a new run that
  fails before its first checkpoint leaves nothing behind: its files are removed, and so are the
  directory and the parents it created.
"""
from __future__ import annotations

import csv
import fcntl
import io
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import RMTError
from ..files import (
    atomic_copy,
    atomic_write,
    atomic_write_text,
    make_directories,
    put_back,
    remove_empty_directories,
    set_aside,
)

__all__ = ["RunDirectory", "RUN_FILES", "format_metric", "read_metrics_csv", "plot_curves"]

RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "last.pth", "best.pth", "model.safetensors", "hub",
             "resumes.log", "wandb", "mlruns")
_FILE_PATTERNS = ("epoch_*.pth", "iter_*.pth", "events.out.tfevents.*")
_ASIDE = ".replaced-run"
_logger = logging.getLogger("rmt.train")


def format_metric(value: Any) -> str:
    """A metric value for CSV: 6 significant digits; non-finite values as an empty cell (never NaN)."""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return "" if value is None else str(value)


def read_metrics_csv(path: Path) -> List[Dict[str, Any]]:
    """The rows of a ``metrics.csv`` (numbers as int/float, empty cells dropped)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in ("epoch", "iteration") else float(v)) for k, v in row.items() if v != ""}
            for row in rows]


def plot_curves(rows: Sequence[Dict[str, Any]], path: Path, x: str, losses: Sequence[str],
                metrics: Sequence[str]) -> None:
    """Losses (left) and metrics (right) against ``x``, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r[x] for r in rows]
    for ax, keys, title in ((ax_loss, losses, "loss"), (ax_metric, metrics, "validation")):
        for key in keys:
            points = [(xv, r[key]) for xv, r in zip(xs, rows) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), "o-", label=key)
        ax.set(xlabel=x, title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


class RunDirectory:
    """A run's ``--output`` directory: claimed and locked by one run (see the module doc)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._created: List[Path] = []  # the directories this run created (the run directory and parents)
        self._fresh = False  # the files in the directory are a new run's that has no checkpoint yet
        self._replacing = False  # ... and another run's files are set aside for it

    # ----------------------------------------------------------------------------- claiming
    def run_files(self) -> List[Path]:
        """The files of a run in the directory (see the module doc)."""
        if not self.path.is_dir():
            return []
        found = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        for pattern in _FILE_PATTERNS:
            found += sorted(self.path.glob(pattern))
        return found

    def claim(self, resume: Optional[str], overwrite: bool, restart_hint: str) -> None:
        """Lock the directory for this run and check that the run may start here (module doc).

        ``restart_hint`` is the command that continues the run, for the refusal message."""
        if self.path.exists() and not self.path.is_dir():
            raise RMTError(f"--output {self.path} is a file, not a directory")
        if not self.path.exists():
            try:
                self._created = make_directories(self.path)
            except OSError as e:
                raise RMTError(f"cannot create the run directory {self.path}: {e.strerror or e}") from None
        self._lock()
        self._finish_replacement()
        if resume or overwrite:
            return
        existing = self.run_files()
        if existing:
            names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
            self.release()
            raise RMTError(f"{self.path} already holds a run ({names}). Continue it with --resume auto "
                           f"({restart_hint}), choose another --output, or replace it with --overwrite")

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RMTError(f"another rmt process is training in {self.path}; wait for it to finish, or choose "
                           f"another --output") from None
        self._lock_fd = fd

    # ----------------------------------------------------------------------------- replacing
    def start(self) -> None:
        """A new run starts writing here: the files of a run already here (``--overwrite``, or the remains
        of a run without ``last.pth`` under ``--resume auto``) are moved aside until :meth:`commit`
        (module doc)."""
        self._replacing = bool(set_aside(self.path, [p.name for p in self.run_files()], self.path / _ASIDE))
        self._fresh = True

    @property
    def replacing(self) -> bool:
        """Whether a new run without a checkpoint yet holds another run's files aside."""
        return self._fresh and self._replacing

    def commit(self) -> None:
        """The new run has written its first checkpoint: the old run it replaces is deleted now."""
        if self._fresh:
            self._fresh = self._replacing = False  # first: an interruption from here on leaves the new run
            shutil.rmtree(self.path / _ASIDE, ignore_errors=True)

    def _roll_back(self) -> None:
        """A new run failed before its first checkpoint: its files go, the old run's come back."""
        put_back(self.path, self.path / _ASIDE, [p.name for p in self.run_files()])
        self._fresh = self._replacing = False

    def _finish_replacement(self) -> None:
        """Complete the replacement of a process that was killed in the middle of one (module doc)."""
        if not (self.path / _ASIDE).is_dir():
            return
        if (self.path / "last.pth").is_file():
            shutil.rmtree(self.path / _ASIDE)
        else:
            self._roll_back()
            _logger.warning("%s: a run started with --overwrite stopped before its first checkpoint; the run it "
                            "was replacing is back in place", self.path)

    def release(self, failed: bool = False) -> None:
        """Unlock. After a failure, a new run without a checkpoint is rolled back (module doc) and the
        directories this run created are removed again if they are empty; after a success, the
        replacement is committed."""
        try:
            if self._fresh:
                self._roll_back() if failed else self.commit()
            if failed:
                remove_empty_directories(self._created)
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # ----------------------------------------------------------------------------- files
    def write_metrics(self, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
        """``metrics.csv`` from the run's history (columns in order; others ignored)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_metric(row.get(k)) for k in columns})
        atomic_write_text(self.path / "metrics.csv", out.getvalue())

    def retain(self, last: Path, name: str, keep: int) -> None:
        """Keep a copy of ``last`` as ``name`` and only the ``keep`` most recent such copies."""
        atomic_copy(last, self.path / name)
        pattern = "epoch_*.pth" if name.startswith("epoch_") else "iter_*.pth"
        for old in sorted(self.path.glob(pattern))[:-keep]:
            old.unlink(missing_ok=True)
