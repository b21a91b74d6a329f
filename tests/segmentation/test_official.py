"""Official (mmseg 0.13) RMT segmentors: golden parity with the official code (tests/fixtures/dense_golden,
see its README.md), recognition of every released checkpoint, and the official file through the CLI
(eval, predict, convert, fine-tuning)."""
import functools
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error
from dense_golden import DENSE, assert_summary, dense_state_dict, load_dense_golden, save_official_dense_checkpoint
from golden import official_layout
from rmt.cli import main
from rmt.data.ade20k import SegEvalTransform
from rmt.data.dense_pipeline import SEGMENTATION_SCALE
from rmt.data.shapes import generate_shapes
from rmt.errors import RMTError
from rmt.models.weights import read_metadata
from rmt.segmentation.config import SegConfig
from rmt.segmentation.models import (
    build_segmentor,
    init_segmentor_from,
    official_segmentor_config,
    official_segmentor_state,
    segmentor_from_checkpoint,
)
from rmt.tools.convert import find_converter
from rmt.training.dense_checkpoints import describe_init, parse_official_config

CASES = {"fpn_t": ("semantic_fpn", "rmt_t"), "uper_t": ("upernet", "rmt_t"), "fpn_s": ("semantic_fpn", "rmt_s"),
         "uper_s": ("upernet", "rmt_s")}
IMAGES = ("img_wide.png", "img_tall.png")


# ------------------------------------------------------------------------------- golden parity
def test_official_segmentor_file_matches_official_code_on_a_tensor(tmp_path):
    """Pipeline-free case (RMT-T Semantic FPN and UperNet): features, decode-head logits, probabilities
    (the official two resizes: to the input, then to the original size; softmax) and the map."""
    for name in ("fpn_t", "uper_t"):
        data = load_dense_golden(f"{name}_tensor")
        classes = [f"c{i}" for i in range(150)]
        path = save_official_dense_checkpoint(tmp_path / f"{name}.pth", dense_state_dict(data["keys"]), classes,
                                              "model = dict(type='EncoderDecoder')")
        model, cfg, class_names = segmentor_from_checkpoint(path)
        assert (cfg.arch, cfg.backbone, class_names) == (CASES[name][0], "rmt_t", classes)
        x = torch.randn(data["input_shape"], generator=torch.Generator().manual_seed(data["input_seed"]))
        with torch.no_grad():
            feats = model.backbone(x)
            for i, (f, ref) in enumerate(zip(feats.values(), data["calls"]["backbone"][0])):
                assert_summary(f, ref, f"{name} backbone level {i}")
            if model.neck is not None:
                for i, (f, ref) in enumerate(zip(model.neck(feats).values(), data["calls"]["neck"][0])):
                    assert_summary(f, ref, f"{name} neck level {i}")
            _, decoded = model._features(x)
            assert_summary(model.decode_head(decoded), data["calls"]["decode_head"][0], f"{name} decode head")
            prob = model.inference(x, output_size=data["meta"]["ori_shape"][:2])
        assert_summary(prob, data["seg_prob"], f"{name} probabilities")
        assert prob.argmax(1)[0].flatten().tolist() == data["seg"]


@functools.lru_cache(maxsize=1)
def _golden_segmentor(name: str, folder: str):
    """The golden weights of case ``name`` in an official-format file (with the case's real config text),
    read back by segmentor_from_checkpoint."""
    data = load_dense_golden(name)
    path = save_official_dense_checkpoint(f"{folder}/{name}.pth", dense_state_dict(data["keys"]), data["classes"],
                                          data["config_text"])
    return data, segmentor_from_checkpoint(path)


_slow = pytest.mark.slow
_IMAGE_CASES = [pytest.param(name, image, marks=[_slow] if name.endswith("_s") else [])
                for name in CASES for image in IMAGES]


@pytest.mark.parametrize("name,image", _IMAGE_CASES)
def test_official_segmentor_on_images_matches_official_code(tmp_path_factory, name, image):
    """The whole official test path on a real image: the ADE20K test pipeline (OpenCV resize of the uint8
    image to 2048x512, normalisation, no padding), whole inference, the two resizes and the softmax:
    probabilities within 1e-4 and the argmax map equal, pixel for pixel, to the official ones (up to
    float32 ties, see below)."""
    data, (model, cfg, class_names) = _golden_segmentor(name, str(tmp_path_factory.getbasetemp()))
    case = data["images"][image]
    assert (cfg.arch, cfg.backbone, cfg.test_mode, tuple(cfg.scale)) == CASES[name] + ("whole", SEGMENTATION_SCALE)
    assert case["meta"]["flip"] is False  # the configs test without flipping
    picture = Image.open(DENSE / image).convert("RGB")
    x = SegEvalTransform(cfg.scale)(picture)
    assert_summary(x[None], case["input"], "network input")
    with torch.no_grad():
        prob = model.inference(x[None], mode=cfg.test_mode, output_size=(picture.height, picture.width))
    assert_summary(prob, case["seg_logit"], "probabilities")
    want = torch.from_numpy(np.array(Image.open(DENSE / f"{name}_{image[:-4]}_seg.png")).astype(np.int64))
    top2 = prob[0].topk(2, dim=0)
    got = top2.indices[0]
    assert got.shape == want.shape
    differ = got != want
    # Equal, except where the two most probable classes tie to float32 round-off: at most 1e-4 of the
    # pixels, each with the official class our second and the two within 1e-5 relative (fpn_s on the wide
    # image: 2 pixels, margins 1.2e-7 and 1.0e-6; our model in float64 agrees with the official map at one
    # of them and with our float32 map at the other, so neither side's float32 is the exact answer there).
    near_tie = top2.values[0] - top2.values[1] <= 1e-5 * top2.values[0]
    assert differ.sum() <= 1e-4 * differ.numel(), f"{int(differ.sum())} pixels differ"
    assert bool((near_tie[differ] & (top2.indices[1][differ] == want[differ])).all()), \
        f"{int(differ.sum())} pixels differ, not all at float32 ties"
    if not differ.any():
        assert torch.bincount(got.flatten(), minlength=150).tolist() == case["seg_hist"]


# ------------------------------------------------------------- every released checkpoint loads
RELEASED = [("semantic_fpn", v) for v in ("rmt_t", "rmt_s", "rmt_b", "rmt_l")] + \
           [("upernet", v) for v in ("rmt_s", "rmt_b", "rmt_l")]
# the released configs' backbone settings (segmentation/configs/RMT/RMT_{FPN,Uper}_*.py; b is their "m")
RELEASED_BACKBONES = {
    "rmt_t": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], chunkwise_recurrents=[True, True, False, False],
                  layerscales=[False] * 4, drop_path_rate=0.1),
    "rmt_s": dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4], chunkwise_recurrents=[True, True, True, False],
                  layerscales=[False] * 4, drop_path_rate=0.15),
    "rmt_b": dict(embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8], chunkwise_recurrents=[True, True, True, False],
                  layerscales=[False, False, True, True], drop_path_rate=0.4),
    "rmt_l": dict(embed_dims=[112, 224, 448, 640], depths=[4, 8, 25, 8],
                  chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True],
                  drop_path_rate=0.5),
}

# our Segmentor keys -> mmseg's: the inverse of official_segmentor_state, written apart from it
_TO_OFFICIAL = (
    (r"^backbone\.norms\.", "backbone.extra_norms."),
    (r"^neck\.inner_blocks\.(\d+)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"^neck\.layer_blocks\.(\d+)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"^aux_head\.", "auxiliary_head."),
    (r"\.classifier\.1\.", ".conv_seg."),
    (r"^decode_head\.ppm\.branches\.", "decode_head.psp_modules."),
    (r"^decode_head\.ppm_bottleneck\.", "decode_head.bottleneck."),
    (r"^((?:decode|auxiliary)_head\..*)\.0\.weight$", r"\1.conv.weight"),
    (r"^((?:decode|auxiliary)_head\..*)\.1\.(weight|bias|running_mean|running_var|num_batches_tracked)$",
     r"\1.bn.\2"),
)


def official_shapes(arch: str, variant: str, num_classes: int = 150) -> dict:
    """An official-format state dict of meta tensors (shapes only, nothing allocated) for ``arch`` with
    ``variant``: our model's keys and shapes under mmseg's names."""
    with torch.device("meta"):
        model = build_segmentor(arch, backbone=variant, num_classes=num_classes)
    ours = model.state_dict()
    body = official_layout({k[len("backbone.body."):]: v for k, v in ours.items() if k.startswith("backbone.body.")})
    out = {"backbone." + k: v for k, v in body.items()}
    for key, value in ours.items():
        if not key.startswith("backbone.body."):
            for pattern, repl in _TO_OFFICIAL:
                key = re.sub(pattern, repl, key)
            out[key] = value
    return out


def _config_text(arch: str, variant: str, **changes) -> str:
    head = "UPerHead" if arch == "upernet" else "FPNHead"
    backbone = dict(RELEASED_BACKBONES[variant], **changes)
    args = ", ".join(f"{k}={v!r}" for k, v in backbone.items())
    return (f"norm_cfg = dict(type='SyncBN', requires_grad=True)\nmodel = dict(\n    type='EncoderDecoder',\n"
            f"    backbone=dict(type='RMT', {args}, layer_init_values=1e-06, out_indices=(0, 1, 2, 3)),\n"
            f"    decode_head=dict(type='{head}', num_classes=150, norm_cfg=norm_cfg, align_corners=False),\n"
            f"    test_cfg=dict(mode='whole'))\n"
            f"test_pipeline = [dict(type='LoadImageFromFile'), dict(type='MultiScaleFlipAug', img_scale=(2048, 512), "
            f"flip=False, transforms=[dict(type='Resize', keep_ratio=True)])]\n"
            f"lr_config = dict(policy='poly', warmup_iters=1500 // (gpu_multipliers // 2))\n")


@pytest.mark.parametrize("name", list(CASES))
def test_official_names_of_our_model_are_the_golden_keys(name):
    """The synthetic official state dicts below have exactly the official keys and shapes (checked
    against the official models' key lists of the golden cases, T and S)."""
    arch, variant = CASES[name]
    golden = {k: tuple(shape) for k, shape, _ in load_dense_golden(name)["keys"]}
    assert {k: tuple(v.shape) for k, v in official_shapes(arch, variant).items()} == golden


@pytest.mark.parametrize("arch,variant", RELEASED)
def test_every_released_segmentor_is_recognised_and_fits(arch, variant):
    state = official_shapes(arch, variant)
    for text in (None, _config_text(arch, variant)):
        cfg = official_segmentor_config(state, text, where="x.pth")
        assert (cfg.arch, cfg.backbone, cfg.num_classes) == (arch, variant, 150)
        assert cfg.aux_weight == (0.4 if arch == "upernet" else 0.0)
        assert cfg.channels == (512 if arch == "upernet" else 128)
    released = RELEASED_BACKBONES[variant]
    assert (cfg.decomposed, cfg.drop_path, cfg.test_mode, cfg.scale) == \
           (released["chunkwise_recurrents"], released["drop_path_rate"], "whole", [2048, 512])
    with torch.device("meta"):
        model = build_segmentor(arch, backbone=variant, num_classes=150)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in official_segmentor_state(state).items()} == expected


def test_official_config_is_read_without_running_it():
    model_cfg, scale = parse_official_config(_config_text("upernet", "rmt_b"))
    assert model_cfg["backbone"]["embed_dims"] == [80, 160, 320, 512] and scale == (2048, 512)
    assert parse_official_config("model = dict(\n") == (None, None)
    assert parse_official_config("import os\nos.system('exit 1')\n") == (None, None)


def test_unrecognised_official_files_are_one_line():
    fpn_t = official_shapes("semantic_fpn", "rmt_t")
    cases = [
        ({k: v for k, v in fpn_t.items() if not k.startswith("decode_head.")} | {"roi_head.x": torch.zeros(1)},
         None, r"not an official segmentor \(found top-level keys backbone, neck, roi_head.*expected an mmseg"),
        ({k: v for k, v in fpn_t.items() if "scale_heads" not in k}, None, "expected UperNet .* or Semantic FPN"),
        ({k: v for k, v in fpn_t.items() if not k.startswith("backbone.layers.3.")}, None,
         r"RMT backbone not recognised \(found widths 64-128-256, depths 2-2-8\); expected one of rmt_t"),
        ({k: v for k, v in official_shapes("upernet", "rmt_b").items() if "gamma" not in k}, None,
         "rmt_b backbone with layer scale in stages none; the released rmt_b has it in stages 2, 3"),
        (fpn_t, _config_text("upernet", "rmt_t"), "its config says decode head UPerHead, its weights semantic_fpn"),
        (fpn_t, _config_text("semantic_fpn", "rmt_s"), r"its config says backbone depths \[3, 4, 18, 4\]"),
    ]
    for state, text, message in cases:
        with pytest.raises(RMTError, match=message) as e:
            official_segmentor_config(state, text, where="x.pth")
        assert "\n" not in str(e.value) and len(str(e.value)) < 1000


def test_an_official_file_that_does_not_fit_is_one_line(tmp_path):
    state = official_shapes("semantic_fpn", "rmt_t")
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items() if k != "neck.fpn_convs.0.conv.bias"}
    path = save_official_dense_checkpoint(tmp_path / "cut.pth", state, [], "")
    with pytest.raises(RMTError, match="do not fit the model .*missing neck.layer_blocks.0.0.bias"):
        segmentor_from_checkpoint(path)


# ----------------------------------------------------------------- an official file in use
@pytest.fixture(scope="module")
def official_fpn_t(tmp_path_factory):
    """An official-format RMT-T Semantic FPN file (150 ADE20K classes, the golden weights and config)."""
    data = load_dense_golden("fpn_t")
    folder = tmp_path_factory.mktemp("official")
    return save_official_dense_checkpoint(folder / "fpn_t_official.pth", dense_state_dict(data["keys"]),
                                          data["classes"], data["config_text"]), data["classes"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("seg_shapes"), num_train=4, num_val=2, image_size=64)


@pytest.fixture(scope="module")
def shapes_as_ade20k(shapes, tmp_path_factory, official_fpn_t):
    """The shapes data declared with the official file's 150 classes (its labels 1..3 are then ADE20K's
    classes 0..2): data an ADE20K model can be evaluated on."""
    root = tmp_path_factory.mktemp("shapes150")
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
        for f in (shapes / sub).iterdir():
            (root / sub / f.name).write_bytes(f.read_bytes())
    (root / "classes.txt").write_text("\n".join(official_fpn_t[1]) + "\n")
    return root


def test_fine_tuning_from_an_official_file_reinitialises_the_classifiers(official_fpn_t):
    path, _ = official_fpn_t
    cfg = SegConfig(arch="semantic_fpn", backbone="rmt_t")
    model = build_segmentor("semantic_fpn", backbone="rmt_t", num_classes=4)
    report = init_segmentor_from(model, path, cfg)
    assert report["reinitialised"] == ["decode_head.classifier.1.bias", "decode_head.classifier.1.weight"]
    assert report["unused"] == [] and report["classes"] == [150]
    official, _, _ = segmentor_from_checkpoint(path)
    assert torch.equal(model.state_dict()["neck.layer_blocks.0.0.weight"],
                       official.state_dict()["neck.layer_blocks.0.0.weight"])
    line = describe_init(str(path), report, 4)
    assert "reinitialised (150 -> 4 classes): decode_head.classifier.1.bias" in line
    cfg.arch = "upernet"
    with pytest.raises(RMTError, match="holds a semantic_fpn with rmt_t, the config builds a upernet"):
        init_segmentor_from(model, path, cfg)


@pytest.mark.e2e
def test_cli_eval_predict_convert_finetune_an_official_file(official_fpn_t, shapes, shapes_as_ade20k, tmp_path,
                                                             capsys, caplog):
    path, classes = official_fpn_t
    classes = [c.strip() for c in classes]  # mmseg's ADE20K names: 'bed ' has a trailing space
    # the shapes' own 4 classes are not the model's 150: one line, pointing at fine-tuning
    err = one_line_error(capsys, main(["seg", "eval", "--checkpoint", str(path), "--data", str(shapes),
                                       "--split", "validation"]))
    assert "names 4 classes" in err and "predicts 150" in err and "--init-from" in err

    assert main(["seg", "eval", "--checkpoint", str(path), "--data", str(shapes_as_ade20k), "--split", "validation",
                 "--json"]) == 0
    official = json.loads(capsys.readouterr().out)
    assert (official["arch"], official["backbone"], official["images"]) == ("semantic_fpn", "rmt_t", 2)
    assert list(official["IoU"]) == classes

    image = shapes / "images" / "validation" / "00001.png"
    assert main(["seg", "predict", str(image), "--checkpoint", str(path), "--output", str(tmp_path / "pics"),
                 "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert (tmp_path / "pics" / "00001_seg.png").is_file() and predicted["classes"][0]["label"] in classes

    # rmt convert: our segmentation model file and a model folder, both evaluating as the official file
    assert find_converter(path).task == "segmentation"
    for out in (tmp_path / "fpn_t.safetensors", tmp_path / "fpn_t_folder"):
        assert main(["convert", str(path), str(out)]) == 0
        assert "(segmentation: semantic_fpn rmt_t;" in capsys.readouterr().out
        weights = out / "model.safetensors" if out.is_dir() else out
        meta = read_metadata(weights)
        assert (meta["task"], meta["model"], meta["class_names"], meta["source"]) == \
               ("segmentation", "rmt_t", classes, path.name)
        assert main(["seg", "eval", "--checkpoint", str(out), "--data", str(shapes_as_ade20k), "--split",
                     "validation", "--json"]) == 0
        converted = json.loads(capsys.readouterr().out)
        assert {k: converted[k] for k in ("mIoU", "mAcc", "aAcc", "IoU")} == \
               {k: official[k] for k in ("mIoU", "mAcc", "aAcc", "IoU")}
    assert json.loads((tmp_path / "fpn_t_folder" / "config.json").read_text())["arch"] == "semantic_fpn"
    assert "rmt seg eval --checkpoint FOLDER" in (tmp_path / "fpn_t_folder" / "README.md").read_text()
    err = one_line_error(capsys, main(["convert", str(path), str(tmp_path / "x.safetensors"), "--model", "rmt_s"]))
    assert "segmentation checkpoint: --model and --use-ema apply to classification" in err

    # fine-tuning on the shapes' 4 classes from the official file: the classifier is reinitialised and reported
    out = tmp_path / "finetune"
    flags = ["--data", str(shapes), "--output", str(out), "--batch-size", "2", "--max-iters", "1", "--eval-interval",
             "1", "--scale", "64", "64", "--crop-size", "48", "48", "--warmup-iters", "1", "--workers", "0",
             "--device", "cpu", "--arch", "semantic_fpn", "--init-from", str(path)]
    with caplog.at_level("INFO", logger="rmt.train"):
        assert main(["seg", "train", "--config", "shapes", *flags]) == 0
    assert "reinitialised (150 -> 4 classes): decode_head.classifier.1.bias, decode_head.classifier.1.weight" in \
        caplog.text
    assert read_metadata(out / "model.safetensors")["class_names"] == ["background", "circle", "square", "triangle"]
