"""Nothing lost, second round (issue 23): replacing is a transaction, a resume is the same run, a signal
is never reported as success, a failed start leaves nothing behind."""
import errno
import importlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import rmt.models.hub as hub
from rmt.classification import ClassificationConfig
from rmt.cli import main
from rmt.detection.config import DetConfig
from rmt.errors import RMTError
from rmt.files import WriteError, atomic_write
from rmt.models.weights import save_weights
from rmt.segmentation.config import SegConfig
from rmt.training.run import RoundSpec, TrainingRun
from rmt.training.rundir import RunDirectory, read_metrics_csv
from rmt.training.step import OptimizerStep

TINY = ["--max-train-samples", "32", "--max-val-samples", "16", "--img-size", "16", "--batch-size", "16",
        "--epochs", "1", "--warmup-epochs", "0"]


def one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert err.startswith("rmt") and "\n" not in err and "Traceback" not in err, err
    return err


def snapshot(folder: Path):
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--output", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


# ------------------------------------------------------------------------------- --overwrite
def test_a_batch_that_cannot_train_is_refused_before_the_old_run_is_touched(run_copy, capsys):
    before = snapshot(run_copy)
    code = main(["train", "--output", str(run_copy), "--overwrite", "--batch-size", "1", "--epochs", "1",
                 "--max-train-samples", "4", "--max-val-samples", "4", "--img-size", "32"])
    err = one_line_error(capsys, code)
    assert "batch_size 1 with img_size 32" in err and "--batch-size 2" in err
    assert snapshot(run_copy) == before


def _nan_loss(original):
    def backward(self, loss):
        return original(self, loss * float("nan"))
    return backward


def _a_bug(original):
    def backward(self, loss):
        raise ZeroDivisionError("a bug in the new run")
    return backward


def _sigterm(original):
    def backward(self, loss):
        os.kill(os.getpid(), signal.SIGTERM)  # as if the user stopped the new run during its first step
        return original(self, loss)
    return backward


@pytest.mark.parametrize("failure,status", [(_nan_loss, 3), (_a_bug, 1), (_sigterm, 128 + signal.SIGTERM)])
def test_overwrite_puts_the_old_run_back_when_the_new_one_fails_before_its_first_checkpoint(
        run_copy, capsys, monkeypatch, failure, status):
    before = snapshot(run_copy)
    monkeypatch.setattr(OptimizerStep, "backward", failure(OptimizerStep.backward))
    code = main(["train", *TINY, "--output", str(run_copy), "--overwrite", "--seed", "3"])
    err = capsys.readouterr().err
    assert code == status, err
    assert snapshot(run_copy) == before  # every file back, byte for byte; nothing of the new run, no .replaced-run


def test_overwrite_deletes_the_old_run_only_once_the_new_one_has_a_checkpoint(run_copy, monkeypatch):
    old_last = (run_copy / "last.pth").read_bytes()
    seen = []
    commit = RunDirectory.commit

    def watched(self):
        if self.replacing:
            seen.append(((self.path / ".replaced-run" / "last.pth").read_bytes() == old_last,
                         (self.path / "last.pth").read_bytes() != old_last))
        commit(self)

    monkeypatch.setattr(RunDirectory, "commit", watched)
    assert main(["train", *TINY, "--output", str(run_copy), "--overwrite", "--seed", "3"]) == 0
    assert seen == [(True, True)]  # the old run was kept aside until the new last.pth existed
    assert "seed: 3" in (run_copy / "config.yaml").read_text()
    assert not (run_copy / ".replaced-run").exists()


_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from rmt.training.rundir import RunDirectory
    run = RunDirectory(Path(sys.argv[1]))
    run.claim(resume=None, overwrite=True, restart_hint="")
    run.start()
    (run.path / "config.yaml").write_text("the new run's config")
    if sys.argv[2] == "checkpoint":
        (run.path / "last.pth").write_text("the new run's first checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("killed", ["before", "checkpoint"])
def test_a_replacement_cut_short_by_sigkill_is_completed_by_the_next_start(run_copy, killed):
    before = snapshot(run_copy)
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(run_copy), killed], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run_copy / ".replaced-run" / "last.pth").is_file()  # the old run, aside
    directory = RunDirectory(run_copy)
    directory.claim(resume="auto", overwrite=False, restart_hint="")
    directory.release()
    assert not (run_copy / ".replaced-run").exists()
    if killed == "before":  # the new run never wrote a checkpoint: the old one is back
        assert snapshot(run_copy) == before
    else:  # the new run had its checkpoint: it stays, the old one is gone
        assert (run_copy / "last.pth").read_text() == "the new run's first checkpoint"


def test_batchnorm_with_one_value_per_channel_is_bad_input(tmp_path):
    cfg = ClassificationConfig(output=str(tmp_path / "run"), batch_size=1, img_size=64)
    run = TrainingRun(cfg, task="classification", spec=RoundSpec(metric="m", columns=[], plotted=[]),
                      default_output=str(tmp_path / "run"), command="rmt train")
    with pytest.raises(RMTError, match=r"one value per channel .*\[1, 8, 1, 1\].*--batch-size 2"):
        with run.autocast():
            nn.BatchNorm2d(8).train()(torch.zeros(1, 8, 1, 1))


# ------------------------------------------------------------------------------- folders of other commands
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    return save_weights(timm.create_model("rmt_t", num_classes=3), path, dict(model="rmt_t", num_classes=3))


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# my project\n")
    (folder / "config.json").write_text('{"mine": true}\n')
    (folder / "notes.txt").write_text("keep me\n")
    return folder


def test_convert_refuses_a_folder_that_holds_files(weights, tmp_path, capsys):
    folder = _project(tmp_path / "project")
    before = snapshot(folder)
    err = one_line_error(capsys, main(["convert", str(weights), str(folder)]))
    assert "is not empty" in err and "--overwrite" in err
    assert snapshot(folder) == before


def test_convert_overwrite_replaces_the_model_files_and_keeps_the_others(weights, tmp_path):
    folder = _project(tmp_path / "project")
    assert main(["convert", str(weights), str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert json.loads((folder / "config.json").read_text())["architecture"] == "rmt_t"
    assert (folder / "notes.txt").read_text() == "keep me\n"


def test_convert_overwrite_that_fails_keeps_the_old_files(weights, tmp_path, capsys, monkeypatch):
    folder = _project(tmp_path / "project")
    before = snapshot(folder)
    write_text = hub.atomic_write_text

    def full_at_config(path, text):
        if Path(path).name == "config.json":
            raise WriteError(f"no space left on the device to write {path}")
        return write_text(path, text)

    monkeypatch.setattr(hub, "atomic_write_text", full_at_config)
    one_line_error(capsys, main(["convert", str(weights), str(folder), "--overwrite"]))
    assert snapshot(folder) == before  # README.md and config.json as they were, no staging folder left
    one_line_error(capsys, main(["convert", str(weights), str(tmp_path / "new" / "deeper" / "hub")]))
    assert not (tmp_path / "new").exists()  # nor the folders it created


def test_token_labels_refuse_a_folder_that_holds_files(tmp_path, capsys):
    folder = _project(tmp_path / "labels")
    before = snapshot(folder)
    err = one_line_error(capsys, main(["token-labels", "--teacher", "rmt_t", "--data", str(tmp_path),
                                       "--output", str(folder)]))
    assert "not empty" in err and "--overwrite" in err
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------- a resume is the same run
def test_resume_with_settings_that_change_the_result_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    code = main(["train", "--config", str(run_copy / "config.yaml"), "--output", str(run_copy), "--resume", "auto",
                 "--lr", "0.5", "--batch-size", "8", "--epochs", "2"])
    err = one_line_error(capsys, code)
    assert "not the same run" in err and "lr 0.002 -> 0.5" in err and "batch_size 16 -> 8" in err, err
    assert "epochs" not in err.partition("Resume it")[0]  # more epochs is allowed
    assert f"--config {run_copy / 'config.yaml'} --resume auto" in err and str(run_copy / "last.pth") in err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("cls,length", [(ClassificationConfig, "epochs"), (DetConfig, "epochs"),
                                        (SegConfig, "max_iters")])
def test_resume_changes_are_declared_once_per_task(cls, length):
    saved = cls(lr=0.001).to_dict()
    given = cls(lr=0.5, batch_size=8, seed=1, amp="bf16", workers=0, log_interval=7, output="elsewhere",
                **{length: 99})
    refused, allowed = given.resume_changes(saved)
    assert [name for name, _, _ in refused] == ["batch_size", "lr", "amp", "seed"]
    assert {name for name, _, _ in allowed} == {length, "workers", "log_interval", "output"}
    assert ("lr", 0.001, 0.5) in refused
    assert given.resume_changes(given.to_dict()) == ([], [])


def test_resume_with_more_epochs_follows_the_longer_schedule_and_records_it(run_copy, capsys):
    code = main(["train", "--config", str(run_copy / "config.yaml"), "--output", str(run_copy), "--resume", "auto",
                 "--epochs", "3", "--log-interval", "7"])
    assert code == 0, capsys.readouterr().err
    log = (run_copy / "resumes.log").read_text().splitlines()
    assert len(log) == 1 and "at epoch 2, iteration 2" in log[0]
    assert "epochs 1 -> 3" in log[0] and "log_interval 10 -> 7" in log[0]
    assert "epochs: 3" in (run_copy / "config.yaml").read_text()
    rows = read_metrics_csv(run_copy / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # the cosine of a 3-epoch run (2 updates per epoch), at update 4 of 6: not the 1-epoch schedule's floor
    expected = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 4 / 6))
    assert rows[1]["lr"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------- exit statuses
def test_sigterm_while_the_final_files_are_written_exits_143(tmp_path, capsys, monkeypatch):
    classification_train = importlib.import_module("rmt.classification.train")  # the module, not the function
    save_hub_folder = classification_train.save_hub_folder

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while hub/ is being written
        return save_hub_folder(*args, **kwargs)

    monkeypatch.setattr(classification_train, "save_hub_folder", signalled)
    out = tmp_path / "run"
    code = main(["train", *TINY, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM after the last round" in err
    assert (out / "hub" / "config.json").is_file() and (out / "last.pth").is_file()  # what could be saved, was


# ------------------------------------------------------------------------------- failed starts, full disks
def test_a_failed_start_leaves_no_directories_it_created(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    one_line_error(capsys, main(["train", "--data", str(tmp_path / "missing"), "--output", str(out), "--epochs", "1"]))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_reports_the_space_free_once_the_failed_file_is_closed(tmp_path, monkeypatch):
    closed = []

    class Tracked(io.FileIO):
        def close(self):
            if not self.closed:
                closed.append(True)
            super().close()

    def fill(tmp):
        handle = Tracked(tmp, "wb")  # held open by this frame, as torch.save's writer holds its file
        handle.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_usage(path):  # a deleted file's blocks are free only once it is closed
        return shutil._ntuple_diskusage(100 << 20, 80 << 20, (20 << 20) if closed else 0)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(WriteError, match=r"20\.0 MB free"):
        atomic_write(tmp_path / "last.pth", fill)
