"""Official (mmdet 2.11) RMT detector files: the model read from the file gives the official outputs on the
golden cases (tests/fixtures/dense_golden), every released checkpoint is recognised, and the official file
works through the CLI (eval, predict, convert, fine-tuning)."""
import functools
import json
import re

import pytest
import test_official_rcnn as rcnn_golden
import test_official_retinanet as retina_golden
import torch

from conftest import one_line_error
from dense_golden import dense_state_dict, load_dense_golden, save_official_dense_checkpoint
from golden import official_layout
from rmt.cli import main
from rmt.data.shapes import generate_shapes
from rmt.detection.config import DetConfig
from rmt.detection.models import (
    build_detector,
    detector_from_checkpoint,
    init_detector_from,
    official_detector_config,
    official_detector_state,
)
from rmt.detection.ops import ImageMeta
from rmt.errors import RMTError
from rmt.models.backbone import RMTBackbone
from rmt.models.weights import read_metadata
from rmt.tools.convert import find_converter
from rmt.training.dense_checkpoints import describe_init, parse_official_config

FAMILIES = {"maskrcnn": "mask_rcnn", "casrcnn": "cascade_mask_rcnn", "retinanet": "retinanet"}


@functools.lru_cache(maxsize=None)
def golden_config_text(family: str) -> str:
    """The merged config text (mmcv ``pretty_text``) of the golden RMT-T case of ``family``."""
    return load_dense_golden(f"{family}_t")["config_text"]


def official_file(folder, case: str, classes=None, config_text=None):
    """The golden weights of ``case`` (e.g. ``maskrcnn_t_tensor``) in an official-format file."""
    data = load_dense_golden(case)
    family = case.split("_")[0]
    classes = classes or [f"c{i}" for i in range(80)]
    text = config_text if config_text is not None else golden_config_text(family)
    return save_official_dense_checkpoint(folder / f"{case}.pth", dense_state_dict(data["keys"]), classes, text), data


def _image_meta(meta) -> ImageMeta:
    return ImageMeta(tuple(meta["ori_shape"][:2]), tuple(meta["img_shape"][:2]),
                     torch.tensor(meta["scale_factor"], dtype=torch.float32))


# ------------------------------------------------------------------------------ golden parity
@pytest.mark.parametrize("case", ["maskrcnn_t_tensor", pytest.param("casrcnn_t_tensor", marks=pytest.mark.slow)])
def test_rcnn_from_an_official_file_matches_official_code(tmp_path, case):
    """The model detector_from_checkpoint builds from the file (its config read from the file's text)
    gives the golden case's module outputs and detections (the checks of test_official_rcnn.py)."""
    path, data = official_file(tmp_path, case)
    model, cfg, class_names = detector_from_checkpoint(path)
    assert (cfg.arch, cfg.backbone, len(class_names)) == (FAMILIES[case.split("_")[0]], "rmt_t", 80)
    assert (cfg.min_size, cfg.max_size, cfg.score_thresh, cfg.detections_per_img) == ([800], 1333, 0.05, 100)
    calls = rcnn_golden.record_calls(model)
    x = torch.randn(data["input_shape"], generator=torch.Generator().manual_seed(data["input_seed"]))
    meta = _image_meta(data["meta"])
    with torch.no_grad():
        out = model.forward_prepared(x, [meta])[0]
    rcnn_golden.check_calls(calls, data["calls"])
    rcnn_golden.check_detections(out, data["detections"], data["masks"], meta.ori_shape)


def test_retinanet_from_an_official_file_matches_official_code(tmp_path):
    path, data = official_file(tmp_path, "retinanet_t_tensor")
    model, cfg, _ = detector_from_checkpoint(path)
    assert (cfg.arch, cfg.backbone) == ("retinanet", "rmt_t")
    x = torch.randn(data["input_shape"], generator=torch.Generator().manual_seed(data["input_seed"]))
    with torch.no_grad():
        backbone = list(model.backbone.body(x).values())
        neck = model.backbone.fpn(backbone)
        head = model.head(neck)
        detections = model.postprocess_detections(*head, [_image_meta(data["meta"])])
    retina_golden.check_calls(data["calls"], backbone, neck, head)
    retina_golden.largest_detection_difference(detections[0], data["detections"])


# ------------------------------------------------------------- every released checkpoint loads
# detect/configs/RMT/<name>.py (m: our rmt_b); the 3x configs differ from the 1x only in training
RELEASED = {
    **{f"maskrcnn_{v}_1x": ("mask_rcnn", f"rmt_{'b' if v == 'm' else v}") for v in "tsml"},
    **{f"maskrcnn_{v}_3x": ("mask_rcnn", f"rmt_{'b' if v == 'm' else v}") for v in "sml"},
    **{f"retinanet_{v}_1x": ("retinanet", f"rmt_{'b' if v == 'm' else v}") for v in "tsml"},
    **{f"casrcnn_{v}_3x": ("cascade_mask_rcnn", f"rmt_{'b' if v == 'm' else v}") for v in "sm"},
}
# the released configs' backbone settings (the same in every detector of a variant)
RELEASED_BACKBONES = {
    "rmt_t": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], drop_path_rate=0.1,
                  chunkwise_recurrents=[True, True, False, False], layerscales=[False] * 4),
    "rmt_s": dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4], drop_path_rate=0.15,
                  chunkwise_recurrents=[True, True, True, False], layerscales=[False] * 4),
    "rmt_b": dict(embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8], drop_path_rate=0.4,
                  chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True]),
    "rmt_l": dict(embed_dims=[112, 224, 448, 640], depths=[4, 8, 25, 8], drop_path_rate=0.5,
                  chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True]),
}
_FAMILY = {"mask_rcnn": "maskrcnn", "cascade_mask_rcnn": "casrcnn", "retinanet": "retinanet"}

# our detector keys -> mmdet's: the inverse of official_rcnn_state / official_retinanet_state, written apart
_TO_OFFICIAL = (
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"^backbone\.fpn\.(lateral_convs|fpn_convs)\.(\d+)\.", r"neck.\1.\2.conv."),
    (r"^rpn\.head\.", "rpn_head."),
    (r"^roi_heads\.box_heads?\.", "roi_head.bbox_head."),
    (r"^roi_heads\.mask_heads?\.", "roi_head.mask_head."),
    (r"^head\.(cls_convs|reg_convs)\.(\d+)\.", r"bbox_head.\1.\2.conv."),
    (r"^head\.", "bbox_head."),
)


def official_shapes(arch: str, variant: str, num_classes: int = 80) -> dict:
    """An official-format state dict of meta tensors (shapes only) for ``arch`` with ``variant``: our
    model's keys and shapes under mmdet's names (RetinaNet's backbone keeps the unused ``extra_norms.0``)."""
    with torch.device("meta"):
        model = build_detector(arch, backbone=variant, num_classes=num_classes)
        all_levels = RMTBackbone(variant, out_indices=(0, 1, 2, 3)).state_dict()
    levels = (1, 2, 3) if arch == "retinanet" else (0, 1, 2, 3)
    ours = model.state_dict()
    body = {k[len("backbone.body.body."):]: v for k, v in ours.items() if k.startswith("backbone.body.body.")}
    out = {"backbone." + k: v for k, v in official_layout(body).items()}
    norms = {k: v for k, v in all_levels.items() if k.startswith("norms.")}
    for key, value in norms.items():
        level, rest = key[len("norms."):].split(".", 1)
        out[f"backbone.extra_norms.{level}.{rest}"] = value
    assert all(f"backbone.body.norms.{levels.index(int(k.split('.')[1]))}.{k.split('.', 2)[2]}" in ours
               for k in norms if int(k.split(".")[1]) in levels)
    for key, value in ours.items():
        if not key.startswith("backbone.body."):
            for pattern, repl in _TO_OFFICIAL:
                key, found = re.subn(pattern, repl, key)
                if found:
                    break
            out[key] = value
    return out


def released_config_text(arch: str, variant: str, **changes) -> str:
    """The golden case's merged config text with the released ``variant``'s backbone settings."""
    settings = dict(RELEASED_BACKBONES[variant], **changes)
    text = golden_config_text(_FAMILY[arch])
    for key, value in settings.items():
        text, found = re.subn(rf"(\n        {key}=)[^\n]*?(,?\n)", rf"\g<1>{value!r}\g<2>", text, count=1)
        assert found, key
    return text


@pytest.mark.parametrize("case", ["maskrcnn_t", "retinanet_t", "casrcnn_t", "maskrcnn_s", "retinanet_s", "casrcnn_s"])
def test_official_names_of_our_models_are_the_golden_keys(case):
    """The synthetic official state dicts below have exactly the official keys and shapes (checked against
    the official models' key lists of the golden cases, T and S)."""
    family, variant = case.split("_")
    golden = {k: tuple(shape) for k, shape, _ in load_dense_golden(f"{case}_tensor")["keys"]}
    synthetic = official_shapes(FAMILIES[family], f"rmt_{variant}")
    assert {k: tuple(v.shape) for k, v in synthetic.items()} == golden


@pytest.mark.parametrize("name", list(RELEASED))
def test_every_released_detector_is_recognised_and_fits(name):
    arch, variant = RELEASED[name]
    state = official_shapes(arch, variant)
    for text in (None, released_config_text(arch, variant)):
        cfg, num_classes = official_detector_config(state, text, where="x.pth")
        assert (cfg.arch, cfg.backbone, cfg.neck_channels, num_classes) == (arch, variant, 256, 80)
    released = RELEASED_BACKBONES[variant]
    assert (cfg.decomposed, cfg.drop_path) == (released["chunkwise_recurrents"], released["drop_path_rate"])
    assert (cfg.min_size, cfg.max_size, cfg.anchor_sizes) == ([800], 1333, [32, 64, 128, 256, 512])
    assert (cfg.score_thresh, cfg.detections_per_img, cfg.rpn_post_nms_test) == (0.05, 100, 1000)
    with torch.device("meta"):
        model = build_detector(arch, backbone=variant, num_classes=80)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in official_detector_state(state, arch).items()} == expected


def test_faster_rcnn_and_other_class_counts_are_read_off_the_heads():
    mask_rcnn = official_shapes("mask_rcnn", "rmt_t", num_classes=3)
    faster = {k: v for k, v in mask_rcnn.items() if not k.startswith("roi_head.mask_head.")}
    assert official_detector_config(faster)[0].arch == "faster_rcnn"
    assert official_detector_config(mask_rcnn)[1] == 3
    assert official_detector_config(official_shapes("retinanet", "rmt_t", num_classes=7))[1] == 7


def test_mmdet_config_text_gives_the_test_scale():
    text = golden_config_text("maskrcnn")
    model_cfg, scale = parse_official_config(text)
    assert model_cfg["type"] == "MaskRCNN" and scale == (1333, 800)
    assert parse_official_config(text.replace("img_scale=(1333, 800),\n        flip", "img_scale=[(1000, 600)],\n"
                                              "        flip"))[1] == (1000, 600)
    without_top = re.sub(r"\ntest_pipeline = \[.*?\n\]\n", "\n", text, flags=re.S)
    assert "test_pipeline" not in without_top.split("data = dict")[0]
    assert parse_official_config(without_top)[1] == (1333, 800)  # data.test.pipeline


def test_unrecognised_official_detectors_are_one_line():
    mask_t = official_shapes("mask_rcnn", "rmt_t")
    cascade = official_shapes("cascade_mask_rcnn", "rmt_t")
    mask_text = released_config_text("mask_rcnn", "rmt_t")
    cases = [
        ({k: v for k, v in mask_t.items() if not k.startswith("roi_head.")} | {"decode_head.conv_seg.weight": 0},
         None, r"not an official detector \(found top-level keys backbone, decode_head, neck, rpn_head\); expected "
               r"an mmdet RMT Mask R-CNN"),
        ({k: v for k, v in cascade.items() if "mask_head" not in k}, None, "a Cascade R-CNN without mask heads"),
        ({k: v for k, v in mask_t.items() if not k.startswith("backbone.layers.3.")}, None,
         r"RMT backbone not recognised \(found widths 64-128-256, depths 2-2-8\); expected one of rmt_t"),
        ({k: v for k, v in official_shapes("retinanet", "rmt_b").items() if "gamma" not in k}, None,
         "rmt_b backbone with layer scale in stages none; the released rmt_b has it in stages 2, 3"),
        (official_shapes("mask_rcnn", "rmt_t", num_classes=3) | {"roi_head.mask_head.conv_logits.weight":
                                                                  torch.empty(5, 256, 1, 1, device="meta")},
         None, "the box head predicts 3 classes, the mask head 5"),
        (mask_t, released_config_text("cascade_mask_rcnn", "rmt_t"),
         "its config says detector CascadeRCNN, its weights mask_rcnn"),
        (mask_t, released_config_text("mask_rcnn", "rmt_s"), r"its config says backbone depths \[3, 4, 18, 4\]"),
        (mask_t, mask_text.replace("iou_threshold=0.5", "iou_threshold=0.6"),
         "its config sets test_cfg rcnn nms iou_threshold 0.6; the detectors here compute 0.5"),
        (mask_t, mask_text.replace("num_classes=80", "num_classes=81"),
         "its config says num_classes 81, its weights 80"),
    ]
    for state, text, message in cases:
        with pytest.raises(RMTError, match=message) as e:
            official_detector_config(state, text, where="x.pth")
        assert "\n" not in str(e.value) and len(str(e.value)) < 1000


def test_an_official_detector_file_that_does_not_fit_is_one_line(tmp_path):
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in official_shapes("retinanet", "rmt_t").items()
             if k != "neck.fpn_convs.4.conv.bias"}
    path = save_official_dense_checkpoint(tmp_path / "cut.pth", state, [], "")
    with pytest.raises(RMTError, match="do not fit the model .*missing backbone.fpn.fpn_convs.4.bias"):
        detector_from_checkpoint(path)


# ----------------------------------------------------------------- an official file in use
def test_fine_tuning_from_an_official_detector_reinitialises_the_class_layers(tmp_path):
    path, _ = official_file(tmp_path, "maskrcnn_t_tensor")
    cfg = DetConfig(arch="mask_rcnn", backbone="rmt_t")
    model = build_detector("mask_rcnn", backbone="rmt_t", num_classes=3)
    report = init_detector_from(model, path, cfg)
    assert report["reinitialised"] == [f"roi_heads.{k}" for k in (
        "box_head.fc_cls.bias", "box_head.fc_cls.weight", "box_head.fc_reg.bias", "box_head.fc_reg.weight",
        "mask_head.conv_logits.bias", "mask_head.conv_logits.weight")]
    assert report["unused"] == [] and report["classes"] == [80]
    official = official_detector_state(torch.load(path, weights_only=False)["state_dict"], "mask_rcnn")
    assert torch.equal(model.state_dict()["roi_heads.box_head.shared_fcs.1.weight"],
                       official["roi_heads.box_head.shared_fcs.1.weight"])
    assert "reinitialised (80 -> 3 classes): roi_heads.box_head.fc_cls.bias" in describe_init(str(path), report, 3)
    cfg.neck_channels = 64
    with pytest.raises(RMTError, match="holds a mask_rcnn with rmt_t and neck_channels 256, the config builds a "
                                       "mask_rcnn with rmt_t and neck_channels 64"):
        init_detector_from(model, path, cfg)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("det_shapes"), num_train=4, num_val=2, image_size=64)


@pytest.fixture(scope="module")
def official_maskrcnn_t(tmp_path_factory):
    """An official-format RMT-T Mask R-CNN file (COCO's 80 classes, the golden weights and config), its
    test scale made 128x128 in its config text to keep the CPU runs short (the file's config sets it)."""
    data = load_dense_golden("maskrcnn_t")
    text = data["config_text"].replace("img_scale=(1333, 800),\n        flip", "img_scale=(128, 128),\n        flip")
    folder = tmp_path_factory.mktemp("official_det")
    path = save_official_dense_checkpoint(folder / "maskrcnn_t_official.pth", dense_state_dict(data["keys"]),
                                          data["classes"], text)
    return path, list(data["classes"])


@pytest.fixture(scope="module")
def shapes_as_coco(shapes, tmp_path_factory, official_maskrcnn_t):
    """The shapes validation data declared with COCO's 80 categories (ids 1..80; the shapes' objects are
    then person, bicycle and car): data a COCO model can be evaluated on."""
    root = tmp_path_factory.mktemp("shapes80")
    (root / "images" / "validation").mkdir(parents=True)
    for f in (shapes / "images" / "validation").iterdir():
        (root / "images" / "validation" / f.name).write_bytes(f.read_bytes())
    annotations = json.loads((shapes / "annotations" / "instances_validation.json").read_text())
    annotations["categories"] = [dict(id=i + 1, name=n, supercategory="thing")
                                 for i, n in enumerate(official_maskrcnn_t[1])]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_validation.json").write_text(json.dumps(annotations))
    return root


@pytest.mark.e2e
def test_cli_eval_predict_convert_finetune_an_official_detector(official_maskrcnn_t, shapes, shapes_as_coco,
                                                                tmp_path, capsys, caplog):
    path, classes = official_maskrcnn_t
    # the shapes' own 3 categories are not the model's 80: one line, pointing at fine-tuning
    err = one_line_error(capsys, main(["det", "eval", "--checkpoint", str(path), "--data", str(shapes),
                                       "--split", "validation"]))
    assert "names 3 classes" in err and "predicts 80" in err and "--init-from" in err

    assert main(["det", "eval", "--checkpoint", str(path), "--data", str(shapes_as_coco), "--split", "validation",
                 "--json"]) == 0
    official = json.loads(capsys.readouterr().out)
    assert (official["arch"], official["backbone"], official["images"], official["masks"]) == \
           ("mask_rcnn", "rmt_t", 2, True)
    assert official["detections"] > 0

    image = shapes / "images" / "validation" / "00001.png"
    assert main(["det", "predict", str(image), "--checkpoint", str(path), "--output", str(tmp_path / "pics"),
                 "--score-thresh", "0", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert (tmp_path / "pics" / "00001_det.png").is_file()
    assert predicted["detections"] and all(d["label"] in classes for d in predicted["detections"])

    # rmt convert: our detection model file and a model folder, both evaluating as the official file
    assert find_converter(path).task == "detection"
    metrics = [k for k in official if k.startswith(("bbox_", "segm_"))] + ["detections"]
    for out in (tmp_path / "maskrcnn_t.safetensors", tmp_path / "maskrcnn_t_folder"):
        assert main(["convert", str(path), str(out)]) == 0
        assert "(detection: mask_rcnn rmt_t;" in capsys.readouterr().out
        weights = out / "model.safetensors" if out.is_dir() else out
        meta = read_metadata(weights)
        assert (meta["task"], meta["model"], meta["class_names"], meta["source"]) == \
               ("detection", "rmt_t", classes, path.name)
        assert main(["det", "eval", "--checkpoint", str(out), "--data", str(shapes_as_coco), "--split",
                     "validation", "--json"]) == 0
        converted = json.loads(capsys.readouterr().out)
        assert {k: converted[k] for k in metrics} == {k: official[k] for k in metrics}
    assert json.loads((tmp_path / "maskrcnn_t_folder" / "config.json").read_text())["arch"] == "mask_rcnn"
    assert "rmt det eval --checkpoint FOLDER" in (tmp_path / "maskrcnn_t_folder" / "README.md").read_text()

    # fine-tuning on the shapes' 3 classes from the official file: the class layers are reinitialised and reported
    out = tmp_path / "finetune"
    flags = ["--data", str(shapes), "--train-split", "training", "--val-split", "validation", "--output", str(out),
             "--epochs", "1", "--lr-steps", "1", "--batch-size", "2", "--eval-batch-size", "2", "--min-size", "64",
             "--max-size", "64", "--neck-channels", "256", "--warmup-iters", "1", "--workers", "0",
             "--device", "cpu", "--init-from", str(path)]
    with caplog.at_level("INFO", logger="rmt.train"):
        assert main(["det", "train", "--config", "shapes", *flags]) == 0
    assert "reinitialised (80 -> 3 classes): roi_heads.box_head.fc_cls.bias, roi_heads.box_head.fc_cls.weight, " \
           "roi_heads.box_head.fc_reg.bias" in caplog.text
    assert read_metadata(out / "model.safetensors")["class_names"] == ["circle", "square", "triangle"]
