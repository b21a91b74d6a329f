"""Crash safety and exact resume of every task's training: in process (signals, checkpoints of odd data,
clear errors on bad input) and end to end in subprocesses.

* Each task's run is killed with SIGKILL at random iterations and resumed with ``--resume auto``; it
  must end bit for bit where an uninterrupted run ends: the same weights, optimizer state and metrics.
* A two-process run under ``torchrun --max-restarts 1`` loses a worker to SIGKILL mid-epoch; torchrun's
  elastic agent restarts the group, which resumes from the last checkpoint and ends with the weights of
  an uninterrupted two-process run.
"""
import csv
import errno
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rmt.classification import ClassificationConfig, train
from rmt.cli import main
from rmt.data import DigitsDataset, ImageFolderDataset
from rmt.data.shapes import generate_shapes
from rmt.errors import NonFiniteLossError, RMTError
from rmt.files import WriteError, atomic_save
from rmt.training import load_config
from rmt.training.checkpoint import read_run_checkpoint

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TIME_COLUMNS = {"seconds", "epoch_seconds"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=6, num_val=2, image_size=64)


def _commands(shapes: Path):
    """Per task: the command and its tiny settings (a few iterations per epoch, a checkpoint every update)."""
    dense = ["--data", str(shapes), "--batch-size", "2", "--workers", "0", "--device", "cpu", "--warmup-iters", "2",
             "--checkpoint-interval", "1"]
    return {
        "classification": ["train", "--max-train-samples", "96", "--max-val-samples", "32", "--img-size", "16",
                           "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--checkpoint-interval", "1"],
        "detection": ["det", "train", "--config", "shapes", *dense, "--train-split", "training",
                      "--val-split", "validation", "--epochs", "2", "--lr-steps", "1", "--eval-batch-size", "2",
                      "--min-size", "64", "--max-size", "64", "--anchor-sizes", "8", "16", "32", "64", "128",
                      "--neck-channels", "16", "--rpn-post-nms-train", "32", "--rpn-post-nms-test", "16",
                      "--box-batch-size-per-image", "16", "--detections-per-img", "5"],
        "segmentation": ["seg", "train", "--config", "shapes", *dense, "--max-iters", "6", "--eval-interval", "3",
                         "--scale", "64", "64", "--crop-size", "48", "48", "--channels", "16"],
    }


def _start(command, output: Path, *extra):
    return subprocess.Popen([sys.executable, "-m", "rmt", *command, "--output", str(output), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _iteration(path: Path):
    try:
        return read_run_checkpoint(path).progress.iteration
    except RMTError:  # not written yet
        return None


def _finish(proc) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _rows(path: Path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(f)]


def _assert_same_end(expected_dir: Path, run_dir: Path, what: str) -> None:
    expected, final = read_run_checkpoint(expected_dir / "last.pth"), read_run_checkpoint(run_dir / "last.pth")
    assert expected.progress == final.progress, what
    for key, value in expected.model.items():
        assert torch.equal(value, final.model[key]), (what, key)
    for key, state in expected.optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(value, final.optimizer["state"][key][name]), (what, key, name)
    assert _rows(expected_dir / "metrics.csv") == _rows(run_dir / "metrics.csv"), what
    assert [{k: v for k, v in r.items() if k not in TIME_COLUMNS | {"images_per_second"}} for r in expected.history] \
        == [{k: v for k, v in r.items() if k not in TIME_COLUMNS | {"images_per_second"}} for r in final.history]


@pytest.mark.e2e
@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_sigkill_at_random_iterations_then_resume_is_bit_exact(task, shapes, tmp_path):
    command = _commands(shapes)[task]
    reference = tmp_path / "reference"
    _finish(_start(command, reference))
    total = read_run_checkpoint(reference / "last.pth").progress.iteration
    kill_points = sorted(random.Random(task).sample(range(1, total), 2))
    for n, target in enumerate(kill_points):
        out = tmp_path / f"killed{n}"
        proc = _start(command, out)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and (_iteration(out / "last.pth") or 0) < target:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run finished before iteration {target}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed_at = _iteration(out / "last.pth")
        _finish(_start(command, out, "--resume", "auto"))
        _assert_same_end(reference, out, f"{task}, killed at iteration {killed_at}")


def _workers(agent_pid: int):
    """``{rank: pid}`` of the worker processes torchrun's agent started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")), None)
        if ppid == agent_pid and rank is not None:
            workers[int(rank)] = int(entry.name)
    return workers


@pytest.mark.e2e
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(tmp_path):
    """The distributed engine is torchrun's: rmt only resumes (`--resume auto`) when the agent restarts it."""
    args = ["-m", "rmt", "train", "--max-train-samples", "128", "--max-val-samples", "32", "--img-size", "16",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--checkpoint-interval", "1",
            "--resume", "auto"]

    # torch 2.14's agent shares its rendezvous store with the workers, where a restarted group finds the
    # killed worker's address and cannot connect; a store per attempt (this variable) restarts cleanly
    env = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")

    def torchrun(output: Path, *options):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 *options, *args, "--output", str(output)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    reference = tmp_path / "reference"
    _finish(torchrun(reference))
    elastic = tmp_path / "elastic"
    agent = torchrun(elastic, "--max-restarts", "1")
    deadline = time.time() + 300
    while time.time() < deadline and agent.poll() is None and (_iteration(elastic / "last.pth") or 0) < 3:
        time.sleep(0.02)  # 8 updates per epoch: iteration 3 is mid-epoch
    workers = _workers(agent.pid)
    assert agent.poll() is None and set(workers) == {0, 1}, workers
    killed_at = _iteration(elastic / "last.pth")
    os.kill(workers[1], signal.SIGKILL)
    out, err = agent.communicate(timeout=600)
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in err  # the restarted group continued the run, it did not start over
    _assert_same_end(reference, elastic, f"worker killed at iteration {killed_at}")


# ------------------------------------------------ crash safety, exact resume and clear errors in process
TINY = dict(max_train_samples=96, max_val_samples=32, img_size=16, batch_size=16, epochs=2, warmup_epochs=1)


def config(name, overrides=None):
    return load_config(ClassificationConfig, name, overrides)


def tiny(tmp_path, **overrides):
    return config("digits", dict(TINY, output=str(tmp_path / "run"), **overrides))


# ------------------------------------------------------------------------------- atomic writes
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"epoch": 1}, path)

    def half_written(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary file left


def test_full_disk_is_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"epoch": 1}, path)

    def no_space(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    full = r"no space left on the device to write .*last.pth \(needs .* MB, .* MB free\); the previous last.pth is kept"
    with pytest.raises(WriteError, match=full):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}


@pytest.mark.e2e
def test_keep_n_epoch_checkpoints(tmp_path):
    train(tiny(tmp_path, epochs=3, keep_checkpoints=2))
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pth")) == ["epoch_0002.pth", "epoch_0003.pth"]


# ------------------------------------------------------------------------------- kill and resume
def _run(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "rmt", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _progress(path: Path):
    try:
        progress = read_run_checkpoint(path).progress
    except RMTError:  # not written yet
        return None
    return progress.epoch * 1000 + progress.step


@pytest.mark.e2e
def test_sigint_saves_and_exits_130_with_resume_hint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    proc = _run(["--max-train-samples", "512", "--max-val-samples", "32", "--img-size", "16", "--batch-size", "8",
                 "--epochs", "3", "--output", str(out), "--checkpoint-interval", "2"], env)
    deadline = time.time() + 120
    while time.time() < deadline and not (_progress(out / "last.pth") or 0) >= 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]  # an interrupted run does not report success
    assert "interrupted by SIGINT at epoch 1" in stderr and "--resume auto" in stderr
    progress = read_run_checkpoint(out / "last.pth").progress
    assert progress.epoch == 0 and progress.step > 2  # saved where it stopped, not only the periodic checkpoint


# ------------------------------------------------------------------------------- non-finite loss
def _poison(monkeypatch, index: int):
    original = DigitsDataset.__getitem__

    def getitem(self, i):
        image, label = original(self, i)
        if self.augment and i == index:
            image = torch.full_like(image, float("nan"))
        return image, label

    monkeypatch.setattr(DigitsDataset, "__getitem__", getitem)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, epochs=2)
    train(config("digits", dict(TINY, output=cfg.output, epochs=1)))  # a good epoch 1 checkpoint
    good = read_run_checkpoint(Path(cfg.output) / "last.pth")
    _poison(monkeypatch, 5)
    with pytest.raises(NonFiniteLossError, match=r"not finite at epoch 2, step \d+; stopped") as error:
        train(config(str(Path(cfg.output) / "config.yaml"), {"epochs": 2, "resume": "auto"}))
    assert error.value.exit_status == 3
    kept = read_run_checkpoint(Path(cfg.output) / "last.pth")
    assert kept.progress == good.progress


def test_bad_steps_can_be_skipped(tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, 5)
    with caplog.at_level(logging.INFO):
        result = train(tiny(tmp_path, max_bad_steps=2))
    assert len(result.history) == 2
    state = read_run_checkpoint(result.output / "last.pth")
    assert state.progress.bad_steps == 2  # one poisoned batch per epoch
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


# ------------------------------------------------------------------------------- bad data
def _odd_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)

    def rgb(size=(20, 24)):
        return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                rgb().save(d / f"ok{i}.png")
    train_a = root / "train" / "a"
    good = train_a / "good.jpg"
    rgb((64, 64)).save(good, quality=90)
    (train_a / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    (train_a / "not_an_image.jpg").write_text("this is text")
    Image.fromarray((rng.integers(0, 65535, (16, 16))).astype(np.uint16)).save(train_a / "deep.png")
    rgb().convert("CMYK").save(train_a / "cmyk.jpg")
    rgb().convert("P", palette=Image.ADAPTIVE).save(train_a / "palette.png")
    rgb().convert("RGBA").save(train_a / "alpha.png")
    (train_a / "notes.txt").write_text("ignored: no image extension")
    (root / "train" / "empty").mkdir()
    return root


def test_bad_files_are_skipped_and_reported(tmp_path, caplog):
    root = _odd_folder(tmp_path / "data")
    dataset = ImageFolderDataset(root / "train")
    assert dataset.classes == ["a", "b", "empty"]
    deep = dataset[[p for p, _ in dataset.samples].index(str(root / "train" / "a" / "deep.png"))][0]
    assert np.asarray(deep).std() > 10  # 16-bit scaled to 8 bits, not clipped to white
    cfg = config("rmt_t", dict(data=str(root), img_size=32, batch_size=4, epochs=1, warmup_epochs=0,
                                    workers=0, output=str(tmp_path / "run"), mixup=0.0, cutmix=0.0,
                                    repeated_aug=False))
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert len(result.history) == 1
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert "truncated.jpg" in caplog.text and "not_an_image.jpg" in caplog.text
    assert "empty class folder" in caplog.text


@pytest.mark.parametrize("layout,message", [
    ("missing", "--data: no such directory"),
    ("no_val", "expected .*/train/<class>/\\* and .*/val/<class>/\\*"),
    ("class_mismatch", "has classes that the training split does not: zebra"),
])
def test_bad_dataset_layouts_exit_2_with_one_line(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        _odd_folder(root)
    if layout == "no_val":

        shutil.rmtree(root / "val")
    if layout == "class_mismatch":
        (root / "val" / "zebra").mkdir()
        Image.new("RGB", (8, 8)).save(root / "val" / "zebra" / "z.png")
    code = main(["train", "--data", str(root), "--output", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rmt: error:") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err


# ------------------------------------------------------------------------------- bad checkpoints
def test_corrupt_resume_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"\x00" * 100)
    assert main(["train", "--output", str(run), "--resume", "auto", "--epochs", "1"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_resume_of_another_model(tmp_path, capsys):
    result = train(tiny(tmp_path, epochs=1))
    saved_config = (result.output / "config.yaml").read_text()
    code = main(["train", "--output", str(result.output), "--resume", "auto", "--model", "rmt_s", "--epochs", "2",
                 "--img-size", "16", "--max-train-samples", "96"])
    err = capsys.readouterr().err
    assert code == 2 and "not the same run" in err and "model rmt_t -> rmt_s" in err
    assert (result.output / "config.yaml").read_text() == saved_config  # refused before anything was written


@pytest.mark.parametrize("argv,message", [
    (["eval", "--checkpoint", "nope.safetensors"], "checkpoint not found"),
    (["eval", "--model", "rmt_x", "--checkpoint", __file__], "unknown model 'rmt_x'"),
    (["train", "--finetune", __file__, "--epochs", "1"], "cannot read"),
    (["train", "--config", "digitz"], "did you mean 'digits'"),
    (["train", "--batch-size", "0"], "batch_size must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmt: error:") and message in err and "\n" not in err, err


def test_bugs_are_not_reported_as_user_errors(tmp_path, monkeypatch, capsys):
    """A bug is one line too, but exit status 1 and "internal error"; --debug shows its traceback."""

    def broken(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("rmt.classification.cli.train", broken)
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmt: internal error: ZeroDivisionError: a bug") and "\n" not in err
    with pytest.raises(ZeroDivisionError):
        main(["train", "--epochs", "1", "--output", str(tmp_path / "r"), "--debug"])
