"""Run logging (rmt.training.tracking): what a run writes for TensorBoard, read back with TensorBoard's own
reader; resume (after an exception, and after SIGKILL) continues the steps without repeating one; W&B
(offline) and MLflow (local file store) through the same seam; a missing tracker is a one-line error."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmt.classification import ClassificationConfig
from rmt.classification import train as train_classifier
from rmt.cli import build_parser, main
from rmt.data.shapes import generate_shapes
from rmt.detection import DetConfig
from rmt.detection import train as train_detector
from rmt.errors import RMTError
from rmt.segmentation import SegConfig
from rmt.segmentation import train as train_segmentor
from rmt.training import OptimizerStep, load_config
from rmt.training.checkpoint import read_run_checkpoint
from rmt.training.config import config_from_flags
from rmt.training.tracking import resolve_trackers

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 2 epochs of 2 updates of 16 images at 16 px: iterations 1..4, evaluations at 2 and 4
TINY = dict(max_train_samples=32, max_val_samples=16, img_size=16, batch_size=16, epochs=2, warmup_epochs=1,
            repeated_aug=False, log_interval=1)


def tiny_config(output: Path, **overrides) -> ClassificationConfig:
    return load_config(ClassificationConfig, "digits", dict(TINY, output=str(output), **overrides))


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str):
    return [e.step for e in accumulator.Scalars(tag)]


def texts(accumulator: EventAccumulator, tag: str):
    return {e.step: e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors(f"{tag}/text_summary")}


def metrics_csv(run: Path):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_classification_run_writes_tensorboard_events(tmp_path):
    run = train_classifier(tiny_config(tmp_path / "run")).output
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    logged = events(run)
    tags = logged.Tags()
    assert {"train/loss", "train/lr", "train/images_per_second", "metrics/train_loss", "metrics/val_loss",
            "metrics/val_top1", "metrics/val_top5", "metrics/lr", "metrics/images_per_second"} <= set(tags["scalars"])
    assert steps(logged, "train/loss") == [1, 2, 3, 4]  # every update (log_interval 1), by optimizer step
    assert steps(logged, "metrics/val_top1") == [2, 4]  # each epoch's evaluation, at its optimizer step
    rows = metrics_csv(run)
    assert [e.value for e in logged.Scalars("metrics/val_top1")] == pytest.approx([float(r["val_top1"]) for r in rows],
                                                                                       rel=1e-5)
    assert [e.value for e in logged.Scalars("metrics/epoch")] == [1, 2]
    assert all(e.value > 0 for e in logged.Scalars("train/images_per_second"))
    about = texts(logged, "run")
    assert list(about) == [0]
    assert all(f"- {line}" in about[0] for line in ("task: classification", "device: cpu", "precision: float32",
                                                    "world_size: 1"))
    assert "img_size: 16" in texts(logged, "config")[0]
    curves = logged.Images("curves")
    assert [c.step for c in curves] == [2, 4] and (curves[0].width, curves[0].height) == (1000, 400)


class _Crash(Exception):
    pass


def test_resume_after_a_crash_drops_the_steps_logged_after_the_checkpoint(tmp_path, monkeypatch):
    """Steps logged after the last checkpoint by a run that then died are replaced, not repeated (purge_step);
    a resume logs the run text again at its step."""
    original = OptimizerStep.optimizer_step

    def crash_at_update_4(self):
        original(self)
        if self.progress.iteration == 4:  # update 3 was logged and flushed (at exit); last.pth is at update 2
            raise _Crash

    monkeypatch.setattr(OptimizerStep, "optimizer_step", crash_at_update_4)
    with pytest.raises(_Crash):
        train_classifier(tiny_config(tmp_path / "run", epochs=3))
    run = tmp_path / "run"
    assert read_run_checkpoint(run / "last.pth").progress.iteration == 2
    assert steps(events(run), "train/loss") == [1, 2, 3]
    monkeypatch.setattr(OptimizerStep, "optimizer_step", original)
    train_classifier(load_config(ClassificationConfig, str(run / "config.yaml"), {"resume": "auto"}))
    logged = events(run)
    assert steps(logged, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert steps(logged, "metrics/val_top1") == [2, 4, 6]
    assert list(texts(logged, "run")) == [0, 2] and "resumed: from" in texts(logged, "run")[2]
    assert [c.step for c in logged.Images("curves")] == [2, 4, 6]


@pytest.mark.slow
def test_sigkill_then_resume_auto_continues_the_steps(tmp_path):
    """A run killed with SIGKILL mid-run and resumed with --resume auto has each step once, in order."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "rmt", "train", "--output", str(out), "--max-train-samples", "64",
               "--max-val-samples", "16", "--img-size", "16", "--batch-size", "16", "--epochs", "2",
               "--warmup-epochs", "1", "--no-repeated-aug", "--log-interval", "1", "--checkpoint-interval", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if read_run_checkpoint(out / "last.pth").progress.iteration >= 3:
                break
        except RMTError:  # not written yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = read_run_checkpoint(out / "last.pth").progress.iteration
    assert killed_at < 8
    done = subprocess.run(command + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = events(out)
    assert steps(logged, "train/loss") == list(range(1, 9)), f"killed at iteration {killed_at}"
    assert steps(logged, "metrics/val_top1") == [4, 8]
    assert list(texts(logged, "run")) == [0, killed_at]
    assert [float(r["val_top1"]) for r in metrics_csv(out)] == \
        pytest.approx([e.value for e in logged.Scalars("metrics/val_top1")], rel=1e-5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2, image_size=64)


def test_segmentation_run_logs_metrics_and_drawn_predictions(shapes, tmp_path):
    cfg = load_config(SegConfig, "shapes", dict(
        data=str(shapes), output=str(tmp_path / "seg"), batch_size=2, max_iters=2, eval_interval=1, scale=[64, 64],
        crop_size=[48, 48], channels=16, warmup_iters=1, workers=0, device="cpu", log_interval=1))
    run = train_segmentor(cfg).output
    logged = events(run)
    assert steps(logged, "train/loss") == [1, 2]
    for tag in ("metrics/mIoU", "metrics/mAcc", "metrics/aAcc", "metrics/train_loss"):
        assert steps(logged, tag) == [1, 2], tag
    assert [e.value for e in logged.Scalars("metrics/mIoU")] == pytest.approx([float(r["mIoU"])
                                                                              for r in metrics_csv(run)], rel=1e-5)
    assert "task: segmentation" in texts(logged, "run")[0]
    for tag in ("predictions/0", "predictions/1"):  # the two validation images, drawn at each evaluation
        pictures = logged.Images(tag)
        assert [p.step for p in pictures] == [1, 2] and pictures[0].width == 160  # 64 px widened for the legend
    assert [c.step for c in logged.Images("curves")] == [1, 2]


@pytest.mark.slow
def test_detection_run_logs_box_ap_and_drawn_predictions(shapes, tmp_path):
    cfg = load_config(DetConfig, "shapes", dict(
        data=str(shapes), output=str(tmp_path / "det"), train_split="training", val_split="validation", epochs=1,
        lr_steps=[1], batch_size=2, eval_batch_size=2, min_size=[64], max_size=64, anchor_sizes=[8, 16, 32, 64, 128],
        neck_channels=16, rpn_post_nms_train=32, rpn_post_nms_test=16, box_batch_size_per_image=16,
        detections_per_img=5, warmup_iters=1, workers=0, device="cpu", log_interval=1))
    run = train_detector(cfg).output
    logged = events(run)
    assert steps(logged, "train/loss") == [1, 2]
    assert steps(logged, "metrics/bbox_AP") == steps(logged, "metrics/segm_AP") == [2]
    assert "task: detection" in texts(logged, "run")[0]
    for tag in ("predictions/0", "predictions/1"):
        pictures = logged.Images(tag)
        assert [p.step for p in pictures] == [2] and (pictures[0].width, pictures[0].height) == (64, 64)


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    train_classifier(tiny_config(run, epochs=1, log_to=["wandb,mlflow"]))
    assert not list(run.glob("events.out.tfevents.*"))  # only the trackers asked for
    train_classifier(load_config(ClassificationConfig, str(run / "config.yaml"), {"resume": "auto", "epochs": 2}))

    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({p.name.rsplit("-", 1)[1] for p in offline}) == 1  # the same run, resumed
    records = b"".join(p.read_bytes() for d in offline for p in d.glob("run-*.wandb"))
    assert all(tag in records for tag in (b"train/loss", b"metrics/val_top1", b"curves"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("rmt")
    (found,) = client.search_runs([experiment.experiment_id])  # one run, continued by the resume
    assert found.info.status == "FINISHED" and found.data.tags["rmt.output"] == str(run.resolve())
    assert found.data.params["img_size"] == "16"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [1, 2, 3, 4]
    val = sorted(client.get_metric_history(found.info.run_id, "metrics/val_top1"), key=lambda m: m.step)
    assert [m.step for m in val] == [2, 4]
    assert [m.value for m in val] == pytest.approx([float(r["val_top1"]) for r in metrics_csv(run)], rel=1e-5)
    assert {a.path for a in client.list_artifacts(found.info.run_id)} >= {"curves", "run", "config"}


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_missing_tracker_is_a_one_line_error(tracker, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["train", "--log-to", tracker, "--img-size", "16", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--log-to {tracker} needs the {tracker} package" in err
    assert f"pip install 'rmt[{tracker}]'" in err
    assert not out.exists()  # refused before anything was written


def test_auto_without_tensorboard_is_one_info_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with caplog.at_level("INFO", logger="rmt.train"):
        assert resolve_trackers(["auto"]) == []
    assert len(caplog.records) == 1 and "tensorboard is not installed" in caplog.text
    monkeypatch.delitem(sys.modules, "tensorboard")
    assert resolve_trackers(["auto"]) == ["tensorboard"]
    assert resolve_trackers(["none"]) == []


def test_log_to_flag_values():
    parser = build_parser()

    def parsed(*flags):
        return config_from_flags(ClassificationConfig, parser.parse_args(["train", *flags]), "digits").log_to

    assert parsed() == ["auto"]
    assert parsed("--log-to", "tensorboard,mlflow") == ["tensorboard", "mlflow"]
    assert parsed("--log-to", "tensorboard", "--log-to", "wandb") == ["tensorboard", "wandb"]  # repeated: added
    assert parsed("--log-to", "none") == ["none"]
    with pytest.raises(RMTError, match="none cannot be combined"):
        parsed("--log-to", "none,wandb")
    with pytest.raises(RMTError, match="log_to must be one of"):
        parsed("--log-to", "tensorbord")
    assert load_config(ClassificationConfig, None, {"log_to": "wandb mlflow"}).log_to == ["wandb", "mlflow"]
