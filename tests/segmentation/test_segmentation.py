"""Segmentation: UperNet / Semantic FPN on RMT, sliding-window inference, mIoU, configs, the `rmt seg` CLI."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from rmt.cli import main
from rmt.data.shapes import generate_shapes
from rmt.errors import RMTError
from rmt.segmentation.config import SegConfig
from rmt.segmentation.evaluate import confusion_matrix, evaluate, segmentation_metrics
from rmt.segmentation.heads import FCNHead
from rmt.segmentation.models import build_segmentor, slide_inference
from rmt.training.checkpoint import read_run_checkpoint
from rmt.training.config import bundled_configs, load_config


@pytest.fixture(scope="module")
def upernet():
    torch.manual_seed(0)
    return build_segmentor("upernet", num_classes=5, channels=32)


def test_upernet_aux_head_only_in_training(upernet):
    assert isinstance(upernet.aux_head, FCNHead) and upernet.aux_index == 2
    calls = []
    handle = upernet.aux_head.register_forward_hook(lambda *_: calls.append(1))
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 255  # ignored pixels
    upernet.train()
    losses = upernet(images, labels)
    assert set(losses) == {"loss_seg", "loss_aux"} and len(calls) == 1
    sum(losses.values()).backward()
    assert upernet.aux_head.classifier[1].weight.grad is not None
    upernet.eval()
    with torch.no_grad():
        logits = upernet(torch.randn(1, 3, 70, 90))
    assert len(calls) == 1  # the auxiliary head did not run
    assert logits.shape == (1, 5, 70, 90)  # logits at the input resolution, any size
    handle.remove()
    assert build_segmentor("upernet", num_classes=5, channels=32, aux_weight=0).aux_head is None


def test_semantic_fpn_logits_at_input_resolution():
    model = build_segmentor("semantic_fpn", num_classes=4, channels=16)
    assert model.aux_head is None and model.neck is not None
    model.train()
    losses = model(torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64)))
    assert set(losses) == {"loss_seg"}
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 64)).shape == (1, 4, 96, 64)
    with pytest.raises(RMTError, match="unknown segmentor"):
        build_segmentor("upernett", num_classes=4)


def test_slide_inference_equals_whole_image():
    """A per-pixel model gives the same logits whole or by overlapping windows (averaged)."""
    torch.manual_seed(0)
    pointwise = nn.Conv2d(3, 6, 1)
    x = torch.randn(2, 3, 50, 77)
    with torch.no_grad():
        whole = pointwise(x)
        for crop, stride in [((32, 32), (20, 20)), ((16, 40), (16, 13)), ((64, 96), None)]:
            assert torch.allclose(slide_inference(pointwise, x, crop, stride), whole, atol=1e-6)


def test_slide_with_one_window_is_whole(upernet):
    upernet.eval()
    x = torch.randn(1, 3, 64, 64)
    whole = upernet.inference(x, mode="whole")
    slide = upernet.inference(x, mode="slide", crop_size=(64, 64), stride=(43, 43))
    assert torch.allclose(slide, whole, atol=1e-5)
    resized = upernet.inference(x, mode="slide", crop_size=(48, 48), stride=(32, 32), output_size=(20, 30))
    assert resized.shape == (1, 5, 20, 30)
    with pytest.raises(RMTError, match="crop_size"):
        upernet.inference(x, mode="slide")


def test_metrics_on_a_known_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    assert segmentation_metrics(confusion_matrix(label.clamp(max=2), label, 3))["mIoU"] == pytest.approx(100.0)
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    cm = confusion_matrix(pred, label, 3)
    assert cm.sum() == 6  # ignored pixels left out
    m = segmentation_metrics(cm, ["a", "b", "c"])
    # a: TP 1, FP 1, FN 1 -> 1/3; b: TP 2, FP 1 -> 2/3; c: TP 1, FN 1 -> 1/2
    assert m["IoU"]["a"] == pytest.approx(100 / 3) and m["IoU"]["b"] == pytest.approx(200 / 3)
    assert m["IoU"]["c"] == pytest.approx(50.0)
    assert m["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert m["aAcc"] == pytest.approx(400 / 6)
    assert m["mAcc"] == pytest.approx((50 + 100 + 50) / 3)
    # a class absent from labels and predictions has no IoU and does not count
    m4 = segmentation_metrics(confusion_matrix(pred, label, 4))
    assert m4["IoU"]["3"] is None and m4["mIoU"] == pytest.approx(m["mIoU"])


class _Oracle(nn.Module):
    """Predicts the label that the image encodes in its first channel."""

    def inference(self, images, mode="whole", crop_size=None, stride=None, output_size=None):
        classes = images[:, 0].round().long()
        logits = nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float()
        return nn.functional.interpolate(logits, size=tuple(output_size), mode="nearest")


def test_evaluate_ground_truth_gives_100_percent():
    labels = [torch.randint(0, 3, (12, 10)) for _ in range(3)]
    for lab in labels:
        lab[0, :4] = 255
    dataset = [(lab.clamp(max=2).float()[None].repeat(3, 1, 1), lab) for lab in labels]
    result = evaluate(_Oracle(), dataset, 3, torch.device("cpu"), progress=False)
    assert result["mIoU"] == pytest.approx(100.0) and result["aAcc"] == pytest.approx(100.0)
    assert result["images"] == 3


def test_paper_schedule_configs():
    assert {"upernet_160k", "semantic_fpn_80k", "shapes"} <= set(bundled_configs(SegConfig))
    upernet = load_config(SegConfig, "upernet_160k")
    assert (upernet.arch, upernet.lr, upernet.max_iters, upernet.poly_power, upernet.weight_decay) == \
           ("upernet", 6e-5, 160000, 1.0, 0.01)
    assert (upernet.scale, upernet.ratio_range, upernet.crop_size, upernet.aux_weight) == \
           ([2048, 512], [0.5, 2.0], [512, 512], 0.4)
    fpn = load_config(SegConfig, "configs/segmentation/semantic_fpn_80k.yaml")
    assert (fpn.arch, fpn.lr, fpn.max_iters, fpn.poly_power) == ("semantic_fpn", 2e-4, 80000, 0.9)
    with pytest.raises(RMTError, match="crop_size"):
        load_config(SegConfig, None, {"crop_size": [512]})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("seg_shapes"), num_train=4, num_val=2, image_size=64)


@pytest.mark.e2e
def test_cli_train_resume_eval_predict(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--data", str(shapes), "--output", str(out), "--batch-size", "2", "--max-iters", "2",
             "--eval-interval", "2", "--scale", "64", "64", "--crop-size", "48", "48", "--channels", "32",
             "--warmup-iters", "1", "--workers", "0", "--device", "cpu"]
    assert main(["seg", "train", "--config", "shapes", *flags]) == 0
    assert "done: upernet with rmt_t" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.csv", "last.pth", "best.pth", "model.safetensors"):
        assert (out / name).is_file(), name
    assert main(["seg", "train", "--config", str(out / "config.yaml"), "--max-iters", "3", "--resume", "auto"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows] == ["2", "3"] and all(0 <= float(r["mIoU"]) <= 100 for r in rows)
    capsys.readouterr()

    assert main(["seg", "eval", "--checkpoint", str(out / "best.pth"), "--mode", "slide", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and set(result["IoU"]) == {"background", "circle", "square", "triangle"}

    image = shapes / "images" / "validation" / "00001.png"
    assert main(["seg", "predict", str(image), "--checkpoint", str(out / "model.safetensors"), "--output",
                 str(tmp_path / "pictures")]) == 0
    picture = tmp_path / "pictures" / "00001_seg.png"
    assert picture.is_file()

    assert Image.open(picture).width == 160  # the image (64 px) widened for the legend
    assert "->" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["seg", "predict", "x.png", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "rmt: error: checkpoint not found" in capsys.readouterr().err
    assert main(["seg", "train", "--data", str(tmp_path), "--output", str(tmp_path / "r")]) == 2
    assert "ADE20K layout" in capsys.readouterr().err
    assert main(["seg", "eval", "--checkpoint", str(tmp_path)]) == 2


@pytest.mark.e2e
def test_two_process_ddp_training(shapes, tmp_path):
    """torchrun with two CPU processes (gloo) through the dense training loop: rank 0 writes the run."""

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "rmt", "seg", "train", "--config", "shapes", "--data", str(shapes), "--output", str(out),
           "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--scale", "64", "64",
           "--crop-size", "48", "48", "--channels", "32", "--warmup-iters", "1", "--workers", "0", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.yaml", "metrics.csv", "last.pth", "model.safetensors"):
        assert (out / name).is_file(), name
    assert read_run_checkpoint(out / "last.pth", task="segmentation").world_size == 2
    assert "2 process(es)" in done.stdout + done.stderr
    if importlib.util.find_spec("tensorboard") is not None:  # the run is logged by rank 0 only: one event file
        assert len(list(out.glob("events.out.tfevents.*"))) == 1
    with open(out / "metrics.csv", newline="") as f:
        assert [r["iteration"] for r in csv.DictReader(f)] == ["2"]
