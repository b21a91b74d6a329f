"""Run logging through one seam: TensorBoard, Weights & Biases and MLflow, for every task's run.

:class:`RunTrackers` is what :class:`rmt.training.run.TrainingRun` logs to (``run.trackers``), on the
main process only. The x axis (global step) of everything is the optimizer-update count, the run's
``iteration``:

* every ``log_interval`` updates: the batch loss, the learning rate and the throughput so far in the
  round (``train/loss``, ``train/lr``, ``train/images_per_second``);
* every evaluation: each number of the ``metrics.csv`` row (``metrics/val_top1``, ``metrics/bbox_AP``,
  ``metrics/mIoU``, ``metrics/train_loss``, ...) and ``curves.png`` as the image ``curves``; the dense
  tasks add a few validation predictions drawn (``predictions/N``);
* at the start (and at each resume): the task, device, precision and process count (text ``run``)
  and the resolved config (text ``config``).

Which trackers: the config's ``log_to`` (``--log-to``, several may be combined): ``auto`` (the
default: TensorBoard when the ``tensorboard`` package is installed, else nothing), ``tensorboard``,
``wandb``, ``mlflow``, or ``none``. Each is an optional extra (``pip install 'rmt[tensorboard]'``,
``rmt[wandb]``, ``rmt[mlflow]``; ``rmt[track]`` for all three); naming one that is not installed is
an error that names the extra. Where they write:

* TensorBoard: event files in the run directory (``tensorboard --logdir runs`` shows every run);
* W&B: ``OUTPUT/wandb``, project ``rmt`` (W&B's own settings apply: ``WANDB_MODE=offline``,
  ``WANDB_PROJECT``, ...);
* MLflow: ``MLFLOW_TRACKING_URI`` when set, else a local file store ``OUTPUT/mlruns`` (``mlflow ui
  --backend-store-uri OUTPUT/mlruns``; ``MLFLOW_ALLOW_FILE_STORE`` is set for it, MLflow 3's opt-in);
  experiment ``rmt`` unless ``MLFLOW_EXPERIMENT_NAME`` says otherwise.

Resume continues the same run from the restored step, with no step logged twice: everything logged
up to a checkpoint is flushed before the checkpoint is written; TensorBoard's ``purge_step`` drops
what a crashed process logged after its last checkpoint; the W&B run is resumed by its id; the
MLflow run is found again by its ``rmt.output`` tag and the steps it already holds are not logged
again (a resumed run recomputes them exactly).
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import RMTError

__all__ = ["TRACKERS", "LOG_TO_CHOICES", "resolve_trackers", "RunTrackers"]

_logger = logging.getLogger("rmt.train")

# tracker -> (the package it needs, the extra of rmt that installs it)
TRACKERS: Dict[str, tuple] = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                              "mlflow": ("mlflow", "mlflow")}
LOG_TO_CHOICES = ("auto", "none", *TRACKERS)


def _require(name: str) -> Any:
    """Import the package of tracker ``name``, or raise the one-line error naming the extra."""
    package, extra = TRACKERS[name]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise RMTError(f"--log-to {name} needs the {package} package: pip install 'rmt[{extra}]'") from None


def resolve_trackers(log_to: Sequence[str], announce: bool = True) -> List[str]:
    """The trackers ``log_to`` asks for, each checked to be installed (:class:`RMTError` otherwise).
    ``auto`` is TensorBoard when installed, else nothing (one info line when ``announce``)."""
    names: List[str] = []
    for name in log_to:
        if name in ("none", "auto") or name in names:
            continue
        _require(name)
        names.append(name)
    if "auto" in log_to and "tensorboard" not in names:
        try:
            _require("tensorboard")
            names.insert(0, "tensorboard")
        except RMTError:
            if announce:
                _logger.info("tensorboard is not installed: the run is not logged for TensorBoard "
                             "(pip install 'rmt[tensorboard]')")
    return names


class _TensorBoard:
    """Event files in the run directory."""

    def __init__(self, output: Path, step: int, resumed: bool, config: Mapping[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        # a fresh start drops everything an earlier attempt logged here; a resume what followed its checkpoint
        earlier = any(output.glob("events.out.tfevents.*"))
        purge = (step + 1 if resumed else 0) if earlier else None
        self.writer = SummaryWriter(log_dir=str(output), purge_step=purge)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def _last_wandb_id(directory: Path) -> Optional[str]:
    """The id of the newest W&B run under ``directory`` (``[offline-]run-<time>-<id>`` folders)."""
    runs = sorted(directory.glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


class _Wandb:
    """A W&B run whose files are in ``OUTPUT/wandb``; a resume continues the same run (by its id)."""

    def __init__(self, output: Path, step: int, resumed: bool, config: Mapping[str, Any]):
        wandb = self.wandb = _require("wandb")
        (output / "wandb").mkdir(exist_ok=True)
        previous = _last_wandb_id(output / "wandb") if resumed else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rmt"), name=output.name, dir=str(output),
                              id=previous, resume="allow" if previous else None, config=dict(config),
                              reinit="create_new", settings=wandb.Settings(console="off"))

    def scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.config.update({tag: text}, allow_val_change=True)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def flush(self) -> None:
        pass  # W&B's service process writes as it receives

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class _MLflow:
    """An MLflow run (``MLFLOW_TRACKING_URI``, else a file store in ``OUTPUT/mlruns``) tagged with the run
    directory; a resume finds it again and does not log the steps it already holds."""

    def __init__(self, output: Path, step: int, resumed: bool, config: Mapping[str, Any]):
        _require("mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 asks for this opt-in to its file store, which needs no server and no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output / "mlruns").resolve().as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rmt")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        where = str(output.resolve())
        found = client.search_runs([experiment_id], filter_string=f"tags.`rmt.output` = '{where}'",
                                   order_by=["attributes.start_time DESC"], max_results=1) if resumed else []
        self.logged_through = -1
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            self.logged_through = max((m.step for key in found[0].data.metrics
                                       for m in client.get_metric_history(self.run_id, key)), default=-1)
        else:
            self.run_id = client.create_run(experiment_id, run_name=output.name, tags={"rmt.output": where}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in config.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=params[start:start + 100])

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in values.items()])

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:08d}.txt")

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.client.log_image(self.run_id, image.convert("RGB"), f"{tag}/step_{step:08d}.png")

    def flush(self) -> None:
        pass  # every call is written when it is made

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class RunTrackers:
    """The trackers a run logs to (see the module doc); empty on the other processes and with
    ``--log-to none``, where every method does nothing."""

    def __init__(self, trackers: Sequence[Any] = ()):
        self._trackers = list(trackers)

    @classmethod
    def open(cls, names: Sequence[str], output: Path, *, step: int, resumed: bool, config: Mapping[str, Any],
             about: Mapping[str, Any], config_text: str) -> "RunTrackers":
        """Open ``names`` (from :func:`resolve_trackers`) for the run in ``output``, continuing from
        ``step`` when ``resumed``; log ``about`` (task, device, precision, ...) and the config as text."""
        opened = []
        for name in names:
            try:
                opened.append(_OPENERS[name](output, step, resumed, config))
            except RMTError:
                raise
            except Exception as e:
                for tracker in opened:
                    tracker.close("FAILED")
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RMTError(f"--log-to {name}: cannot start logging: {first}") from e
        trackers = cls(opened)
        if trackers.active:
            lines = [f"- {key}: {value}" for key, value in about.items()]
            trackers.text("run", "\n".join(lines), step)
            trackers.text("config", "```\n" + config_text + "```", step)
        return trackers

    @property
    def active(self) -> bool:
        """Whether anything is logged (worth computing what only the trackers use, e.g. drawings)."""
        return bool(self._trackers)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log the finite numbers of ``values`` (tag -> value) at ``step``; other entries are skipped."""
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            for tracker in self._trackers:
                tracker.scalars(numbers, step)

    def text(self, tag: str, text: str, step: int) -> None:
        for tracker in self._trackers:
            tracker.text(tag, text, step)

    def images(self, images: Mapping[str, Image.Image], step: int) -> None:
        """Log each picture (tag -> PIL image) at ``step``."""
        for tag, image in images.items():
            for tracker in self._trackers:
                tracker.image(tag, image, step)

    def image_file(self, tag: str, path: Path, step: int) -> None:
        """Log the picture in ``path`` (e.g. ``curves.png``), if it is there."""
        if self._trackers and path.is_file():
            with Image.open(path) as image:
                self.images({tag: image.convert("RGB")}, step)

    def flush(self) -> None:
        """Write out what was logged (before a checkpoint, so that a resume never misses a step)."""
        for tracker in self._trackers:
            tracker.flush()

    def close(self, status: str = "FINISHED") -> None:
        """End the trackers' runs: ``status`` ``FINISHED``, ``KILLED`` (interrupted) or ``FAILED``."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                tracker.close(status)
            except Exception as e:  # closing a tracker must not hide how the run ended
                _logger.warning("could not close the %s tracker: %s", type(tracker).__name__.strip("_"), e)
