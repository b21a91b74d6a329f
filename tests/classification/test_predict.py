"""`rmt predict` and `rmt.predict`: image modes, bad files, class names, --json, exit codes."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

import rmt
from conftest import write_run_checkpoint
from rmt.cli import main
from rmt.models.weights import save_weights
from rmt.runtime.classifier import Prediction, load_classifier
from rmt.runtime.precision import fast_bf16

RUN_CLASSES = ["cat", "coffee", "rocket"]
RUN_CLASSES_DEFAULT = [f"class_{i}" for i in range(3)]  # a built model without stored names
# a run checkpoint's own preprocessing: 32 px keeps the CLI tests fast
RUN_DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                       "std": [0.5, 0.5, 0.5], "crop_pct": 1.0}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """One real photo (skimage's chelsea) saved in every format and mode predict must read, plus bad files."""
    root = tmp_path_factory.mktemp("photos")
    cat = Image.fromarray(skdata.chelsea()).resize((96, 64))
    rgba = cat.convert("RGBA")
    alpha = np.full((cat.height, cat.width), 255, np.uint8)
    alpha[: cat.height // 2] = 0  # transparent top half, opaque bottom half
    rgba.putalpha(Image.fromarray(alpha))
    grey16 = Image.fromarray((np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    files = {
        "rgb.jpg": cat, "grey.png": cat.convert("L"), "palette.png": cat.convert("P"), "rgba.png": rgba,
        "cmyk.jpg": cat.convert("CMYK"), "grey16.png": grey16, "photo.webp": cat, "photo.bmp": cat,
    }
    for name, image in files.items():
        image.save(root / name)
    assert Image.open(root / "grey16.png").mode.startswith("I")  # really a 16-bit file
    good = sorted(files)
    whole = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "notes.jpg").write_text("this is not a picture\n")
    return root, good, ["notes.jpg", "truncated.jpg"]


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = rmt.RMT(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), projection=32,
                    num_classes=3)
    return model


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A checkpoint as `rmt train` writes it (best.pth): weights plus model name, class names, data config."""
    torch.manual_seed(0)
    model = timm.create_model("rmt_t", num_classes=len(RUN_CLASSES))
    meta = dict(task="classification", model="rmt_t", class_names=RUN_CLASSES, num_classes=len(RUN_CLASSES),
                token_label=False, data_config=RUN_DATA_CONFIG, config={})
    return write_run_checkpoint(tmp_path_factory.mktemp("run") / "best.pth", model, meta)


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
    """Randomly initialised 1000-class rmt_t weights (no downloads in tests)."""
    torch.manual_seed(0)
    return save_weights(timm.create_model("rmt_t"), tmp_path_factory.mktemp("in1k") / "rmt_t.safetensors")


def test_api_reads_every_mode_and_reports_bad_files(photos, tiny_classifier):
    root, good, bad = photos
    names = good + bad
    results = rmt.predict([root / n for n in names], model=tiny_classifier, topk=2, batch_size=4)
    assert [p.path for p in results] == [str(root / n) for n in names]  # input order kept across batches
    for p in results[: len(good)]:
        assert p.ok, p.error
        assert [e["label"] for e in p.topk] == [RUN_CLASSES_DEFAULT[e["index"]] for e in p.topk]
        probs = [e["prob"] for e in p.topk]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    errors = {p.path: p.error for p in results[len(good):]}
    assert not any(p.ok or p.topk for p in results[len(good):])
    assert "cannot identify image file" in errors[str(root / "notes.jpg")]
    assert "truncated" in errors[str(root / "truncated.jpg")]


def test_modes_decode_to_the_same_picture(photos, tiny_classifier):
    """16-bit grey reads as its 8-bit version; RGBA is composited on white (not black); CMYK round-trips."""
    root, _, _ = photos
    classifier = load_classifier(tiny_classifier, device="cpu")

    def as_array(name):
        return np.asarray(classifier.read(root / name), dtype=np.int16)

    assert np.abs(as_array("grey16.png") - as_array("grey.png")).max() <= 1
    rgb, rgba = as_array("rgb.jpg"), as_array("rgba.png")
    half = rgb.shape[0] // 2
    assert rgba[:half].min() == 255  # transparent: white background, not black
    assert np.abs(rgba[half:] - rgb[half:]).mean() < 8  # opaque: the photo (up to JPEG loss in rgb.jpg)
    assert np.abs(as_array("cmyk.jpg") - rgb).mean() < 8
    for name in ("palette.png", "photo.webp", "photo.bmp"):
        assert classifier.read(root / name).mode == "RGB"
    # an in-memory RGBA image gets the same treatment as the file
    assert np.array_equal(np.asarray(classifier.read(Image.open(root / "rgba.png"))), rgba.astype(np.uint8))


def test_directory_input_and_missing_path(photos, tiny_classifier, tmp_path):
    root, good, bad = photos
    results = rmt.predict([root, tmp_path / "missing.png", tmp_path], model=tiny_classifier, topk=1)
    by_path = {p.path: p for p in results}
    assert sorted(by_path) == sorted([str(root / n) for n in good + bad] + [str(tmp_path / "missing.png"),
                                                                           str(tmp_path)])
    assert by_path[str(tmp_path / "missing.png")].error == "no such file or directory"
    assert by_path[str(tmp_path)].error == "no image files in this directory"


def test_predict_is_exported():
    assert rmt.predict is rmt.runtime.classifier.predict
    assert "predict" in rmt.__all__


def test_cli_run_checkpoint_class_names_and_json(photos, run_checkpoint, capsys):
    root, _good, _bad = photos
    rc = main(["predict", str(root / "rgb.jpg"), str(root / "grey16.png"), "--checkpoint", str(run_checkpoint),
               "--topk", "2", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["path"] for d in lines] == [str(root / "rgb.jpg"), str(root / "grey16.png")]
    for d in lines:
        assert set(d) == {"path", "topk"} and len(d["topk"]) == 2
        for entry in d["topk"]:
            assert set(entry) == {"label", "index", "prob"}
            assert entry["label"] == RUN_CLASSES[entry["index"]]  # the names stored in the checkpoint
    # a bad file: an object with an error on stdout too, a message on stderr, exit status 1
    rc = main(["predict", str(root / "notes.jpg"), str(root / "photo.webp"), "--checkpoint", str(run_checkpoint),
               "--json"])
    out, err = capsys.readouterr()
    bad_line, good_line = (json.loads(line) for line in out.splitlines())
    assert rc == 1 and f"skipped {root / 'notes.jpg'}" in err
    assert bad_line["path"] == str(root / "notes.jpg") and bad_line["topk"] == [] and bad_line["error"]
    assert good_line["path"] == str(root / "photo.webp") and len(good_line["topk"]) == 3


def test_cli_imagenet_names_bad_files_and_exit_code(photos, imagenet_weights, capsys):
    root, _, bad = photos
    rc = main(["predict", str(root / "rgb.jpg"), *(str(root / n) for n in bad), "--model", "rmt_t",
               "--checkpoint", str(imagenet_weights), "--topk", "3"])
    out, err = capsys.readouterr()
    assert rc == 1  # some files failed, the good one still printed
    lines = out.splitlines()
    assert lines[0] == str(root / "rgb.jpg") and len(lines) == 4
    info = timm.data.ImageNetInfo()
    for line in lines[1:]:
        index = int(line.rsplit("[", 1)[1].rstrip("]"))
        assert info.index_to_description(index) in line  # ImageNet-1k names for a 1000-class model
    assert f"skipped {root / 'notes.jpg'}" in err and f"skipped {root / 'truncated.jpg'}" in err
    assert "2 of 3 image(s) could not be read" in err


def test_cli_user_errors_exit_2(photos, tmp_path, run_checkpoint, capsys):
    root, _, _ = photos
    assert main(["predict", str(root / "rgb.jpg"), "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["predict", str(root / "rgb.jpg"), "--checkpoint", str(run_checkpoint), "--topk", "0"]) == 2
    assert "--topk" in capsys.readouterr().err
    assert main(["predict", str(root / "rgb.jpg"), "--model", "rmt_x", "--checkpoint", str(run_checkpoint)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_prediction_json_shape():
    p = Prediction("a.png", topk=[{"label": "x", "index": 0, "prob": 0.5}])
    assert json.loads(json.dumps(p.to_dict())) == {"path": "a.png", "topk": [{"label": "x", "index": 0, "prob": 0.5}]}


def test_default_precision_is_bf16_where_the_machine_runs_it_natively(photos, tiny_classifier):
    """`rmt predict` picks bf16 autocast on a CPU with AVX512-BF16/AMX (this project's machine), else
    float32, says which, and its probabilities stay within 0.01 of float32's."""

    root, good, _ = photos
    auto = load_classifier(tiny_classifier, device="cpu")
    exact = load_classifier(tiny_classifier, device="cpu", amp="none")
    assert auto.precision == ("bf16 autocast" if fast_bf16(torch.device("cpu")) else "float32")
    assert exact.precision == "float32"
    batch = torch.stack([exact.preprocess(exact.read(root / name)) for name in good])
    reduced, full = auto.probabilities(batch), exact.probabilities(batch)
    assert reduced.dtype == full.dtype == torch.float32
    torch.testing.assert_close(reduced, full, atol=1e-2, rtol=0)
