"""Detection: the four detectors on RMT, the cascade, COCO AP, configs, and the `rmt det` CLI."""
import csv
import json

import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rmt.cli import main
from rmt.data.coco import CocoDetection, coco_split_paths, collate_detection, detection_transforms
from rmt.data.shapes import generate_shapes
from rmt.detection.cascade import CASCADE_IOUS, CASCADE_STDS, CascadeRoIHeads
from rmt.detection.config import DetConfig
from rmt.detection.evaluate import coco_metrics, coco_results
from rmt.detection.models import ARCHS, build_detector
from rmt.detection.ops import ImageMeta
from rmt.errors import RMTError
from rmt.training.checkpoint import read_run_checkpoint
from rmt.training.config import bundled_configs, load_config

# heads small enough for a CPU test; the architecture is the real one
TINY = dict(min_size=(64,), max_size=64, anchor_sizes=(8, 16, 32, 64, 128), neck_channels=32)
RCNN_TINY = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=100,
                 rpn_post_nms_top_n_test=32, box_batch_size_per_image=32, box_detections_per_img=10)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("det_shapes"), num_train=4, num_val=2, image_size=64,
                           mask_format="mixed")


@pytest.fixture(scope="module")
def batch(shapes):
    ds = CocoDetection(*coco_split_paths(shapes, "training"), transforms=detection_transforms(True))
    return collate_detection([ds[0], ds[1]])


@pytest.mark.parametrize("arch", ARCHS)
def test_detector_train_step_and_eval_forward(arch, batch):
    torch.manual_seed(0)
    extra = dict(score_thresh=0.0, detections_per_img=10, topk_candidates=50) if arch == "retinanet" else RCNN_TINY
    model = build_detector(arch, num_classes=3, **TINY, **extra)
    images, targets = batch
    model.train()
    losses = model(images, targets)
    expected = {"retinanet": {"classification", "bbox_regression"}}.get(arch, {"loss_objectness", "loss_rpn_box_reg"})
    assert expected <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    if "mask" in arch:  # the cascade: one per stage (loss_mask_s1...)
        assert any(k.startswith("loss_mask") for k in losses)
    sum(losses.values()).backward()
    assert model.backbone.body.norms[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, image in zip(outputs, images):
        assert {"boxes", "labels", "scores"} <= set(out)
        assert len(out["boxes"]) <= 10
        if len(out["labels"]):
            assert 1 <= out["labels"].min() and out["labels"].max() <= 3
        if "mask" in arch:
            assert out["masks"].shape[1:] == (1, *image.shape[1:])  # masks at the input resolution


def test_cascade_has_three_stages_at_rising_iou(batch):
    model = build_detector("cascade_mask_rcnn", num_classes=3, **TINY, **RCNN_TINY)
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert CASCADE_IOUS == (0.5, 0.6, 0.7)
    assert [(s.matcher.high_threshold, s.matcher.low_threshold) for s in heads.samplers] == [(0.5, 0.5), (0.6, 0.6),
                                                                                              (0.7, 0.7)]
    assert heads.stage_loss_weights == (1.0, 0.5, 0.25)
    assert heads.stds == CASCADE_STDS == ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
    assert len(heads.box_heads) == len(heads.mask_heads) == 3
    # 4conv1fc heads with class-specific regression and the background as the last class
    assert len(heads.box_heads[0].shared_convs) == 4 and len(heads.box_heads[0].shared_fcs) == 1
    assert heads.box_heads[0].fc_cls.out_features == 4 and heads.box_heads[0].fc_reg.out_features == 12
    model.train()
    losses = model(*batch)
    assert {f"loss_{kind}_s{i}" for kind in ("classifier", "box_reg", "mask") for i in (1, 2, 3)} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # zero deltas leave a (clipped) RoI where it is
    _, targets = batch
    gt = [t["boxes"] for t in targets]
    metas = [ImageMeta((64, 64), (64, 64), torch.ones(4))] * 2
    refined = heads.refine(2, gt, torch.zeros(sum(len(b) for b in gt), 12), torch.zeros(sum(len(b) for b in gt),
                                                                                        dtype=torch.int64), metas)
    assert all(torch.allclose(a, b) for a, b in zip(refined, gt))


def test_bad_arguments():
    with pytest.raises(RMTError, match="unknown detector"):
        build_detector("mask_rcnnn", num_classes=3)
    with pytest.raises(RMTError, match="no option"):
        build_detector("faster_rcnn", num_classes=3, bogus=1, **TINY)
    with pytest.raises(RMTError, match="one scale times the level strides"):
        build_detector("mask_rcnn", num_classes=3, anchor_sizes=(32, 40, 128, 256, 512))


def test_rcnn_heads_have_the_official_layout():
    """Background-last classifier, class-specific deltas, one mask channel per class; RPN anchors 8 x stride."""
    model = build_detector("mask_rcnn", num_classes=3, min_size=(64,), max_size=64)
    head = model.roi_heads.box_head
    assert (head.fc_cls.out_features, head.fc_reg.out_features) == (4, 12)
    assert model.roi_heads.mask_head.conv_logits.out_channels == 3
    anchors = model.rpn.anchors
    assert anchors.strides == (4, 8, 16, 32, 64)
    sizes = (anchors.base_anchors[:, 1, 2] - anchors.base_anchors[:, 1, 0]).tolist()  # ratio 1
    assert sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    assert not hasattr(build_detector("faster_rcnn", num_classes=3, **TINY).roi_heads, "mask_heads")


def test_coco_ap_of_ground_truth_is_one(shapes):
    """The ground truth given back as detections (score 1) scores AP 1.0 for boxes and masks."""

    ds = CocoDetection(*coco_split_paths(shapes, "validation"))
    outputs, ids = [], []
    for image_id in ds.ids:
        info = ds.coco.imgs[image_id]
        target = ds.load_target(image_id, info["height"], info["width"])
        outputs.append(dict(boxes=target["boxes"], labels=target["labels"], scores=torch.ones(len(target["labels"])),
                            masks=target["masks"][:, None].float()))
        ids.append(image_id)
    results = coco_results(outputs, ids, ds.category_ids)
    metrics = coco_metrics(ds.coco, results, ids, ["bbox", "segm"])
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["bbox_AP50"] == pytest.approx(1.0)
    assert metrics["segm_AP"] == pytest.approx(1.0)
    # a pixel whose probability equals the threshold is in the mask (mmdet's mask_thr_binary, >=)
    half = dict(outputs[0], masks=torch.full_like(outputs[0]["masks"], 0.5))
    assert mask_area(coco_results([half], ids[:1], ds.category_ids)[0]) == half["masks"][0].numel()
    # nothing detected: AP 0, not an error
    assert coco_metrics(ds.coco, [], ids, ["bbox"])["bbox_AP"] == 0.0


def mask_area(result):
    return int(mask_utils.area(result["segmentation"]))


def test_paper_schedule_configs():
    assert {"mask_rcnn_1x", "mask_rcnn_3x", "cascade_mask_rcnn_3x", "shapes"} <= set(bundled_configs(DetConfig))
    one = load_config(DetConfig, "mask_rcnn_1x")
    assert (one.arch, one.epochs, one.lr_steps, one.lr, one.weight_decay) == ("mask_rcnn", 12, [8, 11], 1e-4, 0.05)
    assert (one.min_size, one.max_size, one.neck_channels) == ([800], 1333, 256)
    three = load_config(DetConfig, "configs/detection/mask_rcnn_3x.yaml")
    assert (three.epochs, three.lr_steps, min(three.min_size), max(three.min_size)) == (36, [27, 33], 480, 800)
    cascade = load_config(DetConfig, "cascade_mask_rcnn_3x")
    assert (cascade.arch, cascade.epochs, cascade.rpn_post_nms_train) == ("cascade_mask_rcnn", 36, 2000)
    with pytest.raises(RMTError, match="unknown config key"):
        load_config(DetConfig, None, {"epoch": 3})
    with pytest.raises(RMTError, match="arch must be one of"):
        load_config(DetConfig, None, {"arch": "yolo"})


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tiny_flags(shapes, output):
    return ["--data", str(shapes), "--train-split", "training", "--val-split", "validation", "--output", str(output),
            "--batch-size", "2", "--eval-batch-size", "2", "--min-size", "64", "--max-size", "64",
            "--anchor-sizes", "8", "16", "32", "64", "128", "--neck-channels", "32", "--rpn-post-nms-train", "64",
            "--rpn-post-nms-test", "32", "--box-batch-size-per-image", "32", "--detections-per-img", "10",
            "--warmup-iters", "1", "--workers", "0", "--device", "cpu", "--lr", "1e-4"]


@pytest.mark.e2e
def test_cli_train_resume_eval_predict(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["det", "train", "--config", "shapes", "--epochs", "1", "--lr-steps", "1",
                 *_tiny_flags(shapes, out)]) == 0
    assert "done: mask_rcnn with rmt_t" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.csv", "last.pth", "best.pth", "model.safetensors"):
        assert (out / name).is_file(), name
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["iteration"] == "2" and "segm_AP" in rows[0]
    # resume: one more epoch continues from iteration 2
    assert main(["det", "train", "--config", str(out / "config.yaml"), "--epochs", "2", "--resume", "auto"]) == 0
    rows = _rows(out / "metrics.csv")
    assert [r["iteration"] for r in rows] == ["2", "4"]
    assert read_run_checkpoint(out / "last.pth", task="detection").progress.iteration == 4
    capsys.readouterr()

    assert main(["det", "eval", "--checkpoint", str(out / "model.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and result["masks"] and 0 <= result["bbox_AP"] <= 1 and "segm_AP50" in result

    image = shapes / "images" / "validation" / "00000.png"
    picture = tmp_path / "pred.png"
    assert main(["det", "predict", str(image), "--checkpoint", str(out / "last.pth"), "--output", str(picture),
                 "--score-thresh", "0.0"]) == 0
    assert picture.is_file() and picture.stat().st_size > 0

    assert Image.open(picture).size == (64, 64)
    assert "->" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["det", "predict", "x.png", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "rmt: error: checkpoint not found" in capsys.readouterr().err
    assert main(["det", "train", "--data", str(tmp_path / "no_such_dir"), "--output", str(tmp_path / "r")]) == 2
    assert "dataset root not found" in capsys.readouterr().err
    assert main(["det", "train", "--config", "nope"]) == 2
    assert "not found" in capsys.readouterr().err
