"""Nothing lost, nothing mixed, one line for every bad input: run directories, atomic files, user errors
that come from the libraries we call, and results that must not pass for success."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_run_checkpoint, write_weights
from rmt.cli import main
from rmt.cliutils import print_json, to_jsonable
from rmt.detection.config import DetConfig
from rmt.detection.models import build_detector, detector_kwargs
from rmt.models import create_model
from rmt.segmentation.config import SegConfig
from rmt.segmentation.models import build_segmentor, segmentor_kwargs
from rmt.training import load_config
from rmt.training.rundir import RunDirectory

TINY = ["--max-train-samples", "32", "--max-val-samples", "16", "--img-size", "16", "--batch-size", "16",
        "--epochs", "1", "--warmup-epochs", "0"]


def one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert err.startswith("rmt") and "error" in err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--output", str(out)]) == 0
    return out


def _snapshot(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------- run directories
def test_a_new_run_into_a_finished_one_is_refused(finished_run, capsys):
    before = _snapshot(finished_run)
    err = one_line_error(capsys, main(["train", *TINY, "--output", str(finished_run)]))
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert _snapshot(finished_run) == before  # nothing replaced


def test_overwrite_replaces_a_run(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "epoch_0007.pth").write_bytes(b"an old retained checkpoint")
    assert main(["train", *TINY, "--output", str(run), "--overwrite", "--seed", "3"]) == 0
    assert not (run / "epoch_0007.pth").exists()
    assert "seed: 3" in (run / "config.yaml").read_text()


def test_a_second_process_in_a_running_directory_is_refused(tmp_path, capsys):
    held = RunDirectory(tmp_path / "run")
    held.claim(resume=None, overwrite=False, restart_hint="")  # as a running `rmt train` holds it
    try:
        err = one_line_error(capsys, main(["train", *TINY, "--output", str(tmp_path / "run")]))
        assert "another rmt process is training in" in err
        err = one_line_error(capsys, main(["train", *TINY, "--output", str(tmp_path / "run"), "--resume", "auto"]))
        assert "another rmt process" in err
    finally:
        held.release()
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("flags,message", [
    (["--resume", "missing.pth"], "--resume: no checkpoint at missing.pth"),
    (["--data", "no_such_dir"], "--data: no such directory"),
    (["--finetune", "missing.pth"], "checkpoint not found: missing.pth"),
])
def test_failed_starts_leave_nothing_behind(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, main(["train", *TINY, "--output", "run", *flags]))
    assert message in err
    assert not (tmp_path / "run").exists()


def test_full_disk_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):  # the checkpoint file, not the size count
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    err = one_line_error(capsys, main(["train", *TINY, "--output", str(tmp_path / "run")]))
    assert "no space left on the device to write" in err and "MB free" in err


def test_interrupted_run_exits_with_128_plus_the_signal(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rmt", "train", "--max-train-samples", "512", "--img-size", "16",
                             "--batch-size", "8", "--epochs", "3", "--output", str(out), "--checkpoint-interval", "1"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300  # a busy machine (or a first kernel build) can take minutes to the checkpoint
    while time.time() < deadline and not (out / "last.pth").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and "--resume auto" in err


# ------------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    good = root / "good.safetensors"
    write_weights(good, create_model("rmt_t", num_classes=3), dict(task="classification", model="rmt_t",
                                                                   num_classes=3))
    (root / "truncated.safetensors").write_bytes(good.read_bytes()[:5000])
    (root / "random.pth").write_bytes(np.random.default_rng(1).bytes(4096))
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "image.png")
    return root


@pytest.mark.parametrize("weights", ["random.safetensors", "truncated.safetensors", "random.pth"])
@pytest.mark.parametrize("command", [
    ["predict", "{root}/image.png", "--checkpoint", "{weights}"],
    ["eval", "--checkpoint", "{weights}"],
    ["visualize", "attention", "{root}/image.png", "--checkpoint", "{weights}", "--output", "{root}/a.png"],
    ["det", "predict", "{root}/image.png", "--checkpoint", "{weights}"],
    ["seg", "predict", "{root}/image.png", "--checkpoint", "{weights}"],
    ["token-labels", "--teacher", "rmt_t", "--checkpoint", "{weights}", "--data", "{root}", "--output", "{root}/l"],
    ["train", "--finetune", "{weights}", "--output", "{root}/run"],
])
def test_damaged_weight_files_are_one_line(bad_weights, capsys, command, weights):
    argv = [a.format(root=bad_weights, weights=bad_weights / weights) for a in command]
    err = one_line_error(capsys, main(argv))
    assert str(bad_weights / weights) in err and ("cannot read" in err or "not" in err), err


def test_other_tools_safetensors_load_where_they_fit(tmp_path, capsys):
    """A file written by plain safetensors ({"format": "pt"} metadata only): the variant and the class count
    are read off the weights."""
    from safetensors.torch import save_file

    model = create_model("rmt_t", num_classes=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "other.safetensors"),
              metadata={"format": "pt"})
    Image.new("RGB", (40, 40)).save(tmp_path / "image.png")
    assert main(["predict", str(tmp_path / "image.png"), "--checkpoint", str(tmp_path / "other.safetensors"),
                 "--json", "--amp", "none"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["label"] for e in result["topk"]] != [] and len(result["topk"]) == 4  # class_0..class_3


def test_zero_input_size_in_a_checkpoint_is_one_line(tmp_path, capsys):
    meta = dict(task="classification", model="rmt_t", class_names=["a", "b"], num_classes=2, token_label=False,
                data_config={"input_size": [3, 0, 0], "interpolation": "bicubic", "mean": [0.5] * 3,
                             "std": [0.5] * 3, "crop_pct": 1.0})
    path = write_run_checkpoint(tmp_path / "best.pth", create_model("rmt_t", num_classes=2), meta)
    Image.new("RGB", (40, 40)).save(tmp_path / "image.png")
    err = one_line_error(capsys, main(["predict", str(tmp_path / "image.png"), "--checkpoint", str(path)]))
    assert "input size [3, 0, 0]" in err


@pytest.mark.parametrize("argv,message", [
    (["train", "--opt", "banana"], "not a timm optimizer"),
    (["train", "--sched", "banana"], "sched must be one of"),
    (["train", "--lr", "nan"], "lr must be a finite number"),
    (["train", "--lr", "inf"], "lr must be a finite number"),
    (["train", "--aa", "banana"], "not a timm auto-augment policy"),
    (["train", "--max-val-samples", "0"], "max_val_samples must be positive"),
    (["train", "--output", "/proc/rmt_cannot_write_here"], "cannot create the run directory"),
    (["eval", "--checkpoint", "x.safetensors", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["predict", "x.png", "--checkpoint", "x.pth", "--batch-size", "-1"], "must be a positive integer"),
    (["predict", "x.png", "--checkpoint", "x.pth", "--batch-size", "0"], "must be a positive integer"),
    (["token-labels", "--teacher", "rmt_t", "--data", ".", "--output", "o", "--topk", "0"], "positive integer"),
    (["det", "train", "--lr", "nan"], "lr must be a finite number"),
    (["seg", "train", "--max-iters", "0"], "max_iters must be positive"),
    (["det", "predict", "x.png", "--checkpoint", "x.pth", "--score-thresh", "2"], "between 0 and 1"),
])
def test_bad_values_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(capsys, main(argv))


def test_token_labels_refuse_a_file_as_output_and_too_many_classes(bad_weights, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "x.png")
    err = one_line_error(capsys, main(["token-labels", "--teacher", "rmt_t", "--data", str(tmp_path / "data"),
                                       "--output", str(tmp_path / "file")]))
    assert "is a file" in err
    err = one_line_error(capsys, main(["token-labels", "--teacher", "rmt_t", "--data", str(tmp_path / "data"),
                                       "--output", str(tmp_path / "labels"), "--topk", "5000"]))
    assert "--topk must be between 1 and the teacher's 1000 classes" in err


# ------------------------------------------------------------------------------- nothing fails as success
def test_single_class_and_empty_data_are_refused(tmp_path, capsys):
    for split in ("train", "val"):
        folder = tmp_path / "one" / split / "only"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(folder / "x.png")
    err = one_line_error(capsys, main(["train", "--data", str(tmp_path / "one"), "--output", str(tmp_path / "r")]))
    assert "at least two classes" in err
    assert not (tmp_path / "r").exists()


def test_json_and_metrics_hold_no_bare_nan(capsys, tmp_path):
    print_json({"loss": float("nan"), "top": [float("inf"), 1.5], "t": torch.tensor([1.0, float("nan")])})
    assert json.loads(capsys.readouterr().out) == {"loss": None, "top": [None, 1.5], "t": [1.0, None]}
    assert to_jsonable(math.nan) is None
    run = RunDirectory(tmp_path)
    run.write_metrics([{"epoch": 1, "loss": float("nan"), "top1": 50.0}], ["epoch", "loss", "top1"])
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,loss,top1", "1,,50"]


def _dense_weights(tmp_path, task):
    """A detection or segmentation run's model.safetensors (random weights), as a run writes it."""
    if task == "detection":
        cfg = load_config(DetConfig, "shapes", {"min_size": [64], "max_size": 64, "neck_channels": 16})
        model = build_detector(cfg.arch, num_classes=3, **detector_kwargs(cfg))
    else:
        cfg = load_config(SegConfig, "shapes", {"channels": 16, "scale": [64, 64]})
        arch, kwargs = segmentor_kwargs(cfg)
        model = build_segmentor(arch, num_classes=3, **kwargs)
    meta = dict(task=task, model="rmt_t", class_names=["circle", "square", "triangle"], num_classes=3,
                config=cfg.to_dict())
    return write_weights(tmp_path / f"{task}.safetensors", model, meta)


@pytest.mark.parametrize("task,command,key", [("detection", "det", "detections"), ("segmentation", "seg", "classes")])
def test_dense_predict_skips_bad_images_and_shares_the_json_shape(tmp_path, capsys, task, command, key):
    weights = _dense_weights(tmp_path, task)
    Image.new("RGB", (64, 64), (90, 120, 30)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    code = main([command, "predict", str(tmp_path / "bad.png"), str(tmp_path / "good.png"), "--checkpoint",
                 str(weights), "--json", "--output", str(tmp_path / "pictures")])
    out, err = capsys.readouterr()
    assert code == 1 and "skipped" in err and "1 of 2 image(s) could not be read" in err
    bad, good = [json.loads(line) for line in out.splitlines()]
    assert set(bad) == {"path", "error"} and bad["path"] == str(tmp_path / "bad.png")
    assert set(good) == {"path", "output", key} and (tmp_path / "pictures" / "good_" f"{command}.png").is_file()
    for entry in good[key]:
        assert {"label", "index"} <= set(entry) and entry["label"] in ("circle", "square", "triangle")



# ------------------------------------------------------------------------------- exports
@pytest.fixture
def tiny_export(monkeypatch):
    """`rmt export` of a tiny classifier standing in for a checkpoint's."""
    from rmt.models import RMT
    from rmt.runtime.classifier import Classifier

    torch.manual_seed(0)
    tiny = RMT(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), projection=32, num_classes=3)
    config = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
              "crop_pct": 1.0}
    classifier = Classifier(tiny.eval(), config, device="cpu")
    monkeypatch.setattr("rmt.tools.export.load_classifier", lambda *a, **k: classifier)


def test_export_onto_a_full_disk_keeps_the_old_file(tiny_export, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous export")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    err = one_line_error(capsys, main(["export", "--checkpoint", "x.pth", "--format", "torchscript", "--output",
                                       str(out), "--no-verify"]))
    monkeypatch.undo()
    assert "no space left on the device to write" in err and "the previous model.pt is kept" in err
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_export_refuses_an_opset_it_cannot_write(tiny_export, tmp_path, capsys):
    err = one_line_error(capsys, main(["export", "--checkpoint", "x.pth", "--format", "onnx", "--output",
                                       str(tmp_path / "m.onnx"), "--opset", "3", "--static-size"]))
    assert "cannot convert this model to opset 3" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("argv,message", [
    (["flops", "rmt_t", "--img-size", "0", "224"], "must be a positive integer"),
    (["flops", "rmt_t", "--img-size", "-32", "32"], "must be a positive integer"),
    (["export", "--checkpoint", "x.pth", "--format", "onnx", "--output", "m.onnx", "--atol", "nan"],
     "not a finite number"),
    (["visualize", "decay", "--model", "rmt_t", "--output", "d.xyz"], "cannot write .xyz pictures"),
    (["benchmark", "rmt_t", "--iters", "0"], "must be a positive integer"),
])
def test_tool_values_that_cannot_be_honoured_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(capsys, main(argv))
