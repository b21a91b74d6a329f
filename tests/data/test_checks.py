"""Bad data and bad files are one line (exit status 2) before anything runs: annotation and label files
checked up front (nothing of a run directory is created), configs read with bounded effort, special
files refused instead of waited on, user-edited model folders checked. Fixtures are generated here."""
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import one_line_error, write_weights
from rmt.cli import main
from rmt.data.ade20k import ADE20KDataset
from rmt.data.checks import DataError, check_coco, check_label_maps, rle_counts
from rmt.data.folder import ImageFolderDataset
from rmt.data.shapes import generate_shapes
from rmt.detection.config import DetConfig
from rmt.detection.models import build_detector, detector_kwargs
from rmt.models import RMT
from rmt.models.hub import save_hub_folder
from rmt.segmentation.config import SegConfig
from rmt.segmentation.models import build_segmentor, segmentor_kwargs
from rmt.training import load_config

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Both splits in both layouts; the training split's masks are RLE, the validation split's polygons."""
    root = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=3, num_val=2, image_size=32,
                           mask_format="rle", max_objects=2)
    polygons = generate_shapes(tmp_path_factory.mktemp("polygons"), num_train=3, num_val=2, image_size=32,
                               mask_format="polygon", max_objects=2)
    shutil.copy(polygons / "annotations" / "instances_validation.json",
                root / "annotations" / "instances_validation.json")
    return root


@pytest.fixture
def dataset(shapes, tmp_path):
    """A copy of the shapes to corrupt."""
    return shutil.copytree(shapes, tmp_path / "data")


@pytest.fixture(scope="module")
def dense_weights(tmp_path_factory):
    """A detection and a segmentation run's model.safetensors (random weights) for the shapes' 3 classes."""
    folder = tmp_path_factory.mktemp("weights")
    det_cfg = load_config(DetConfig, "shapes", {"min_size": [32], "max_size": 32, "neck_channels": 16})
    seg_cfg = load_config(SegConfig, "shapes", {"channels": 16, "scale": [32, 32]})
    arch, kwargs = segmentor_kwargs(seg_cfg)
    seg_names = ["background", *CLASSES]
    return dict(
        det=write_weights(folder / "det.safetensors", build_detector(det_cfg.arch, num_classes=3,
                                                                     **detector_kwargs(det_cfg)),
                          dict(task="detection", model="rmt_t", class_names=CLASSES, num_classes=3,
                               config=det_cfg.to_dict())),
        seg=write_weights(folder / "seg.safetensors", build_segmentor(arch, num_classes=4, **kwargs),
                          dict(task="segmentation", model="rmt_t", class_names=seg_names, num_classes=4,
                               config=seg_cfg.to_dict())))


def _edit_coco(root, split, edit):
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _with_rle(data):
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))


def _with_polygon(data):
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list))


# the cases, each with a word the one-line error must hold
COCO_CASES = {
    "no bbox": (lambda d: d["annotations"][1].pop("bbox"), "no 'bbox'"),
    "bbox abc": (lambda d: d["annotations"][0].update(bbox="abc"), "bbox must be 4 finite numbers"),
    "image without file_name": (lambda d: d["images"][1].pop("file_name"), "has no 'file_name'"),
    "broken RLE": (lambda d: _with_rle(d).update(segmentation=dict(_with_rle(d)["segmentation"], counts="0")),
                   "RLE runs cover"),
    "RLE size unlike the image": (lambda d: _with_rle(d)["segmentation"].update(size=[31, 32]),
                                  "is not the image's"),
    "short polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), "at least 3 points"),
}


DET_FLAGS = ["--train-split", "training", "--val-split", "validation", "--epochs", "1", "--batch-size", "2",
             "--min-size", "32", "--max-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_bad_coco_annotations_are_one_line_before_the_run_starts(dataset, tmp_path, capsys, case):
    edit, message = COCO_CASES[case]
    # the RLE cases need RLE masks: the training split has them
    _edit_coco(dataset, "training", edit)
    out = tmp_path / "runs" / "run"
    err = one_line_error(capsys, main(["det", "train", "--config", "shapes", "--data", str(dataset), "--output",
                                       str(out), *DET_FLAGS]))
    assert "instances_training.json" in err and message in err
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("case", ["no bbox", "bbox abc", "image without file_name", "short polygon"])
def test_det_eval_checks_the_annotations_too(dataset, dense_weights, capsys, case):
    edit, message = COCO_CASES[case]
    _edit_coco(dataset, "validation", edit)
    err = one_line_error(capsys, main(["det", "eval", "--checkpoint", str(dense_weights["det"]), "--data",
                                       str(dataset), "--split", "validation", "--device", "cpu"]))
    assert "instances_validation.json" in err and message in err


def test_coco_checks_name_the_first_problems_and_count_the_rest():
    images = [dict(id=i, file_name=f"{i}.png", height=10, width=10) for i in range(5)]
    anns = [dict(id=i, image_id=i, category_id=1, bbox="abc") for i in range(5)]
    with pytest.raises(DataError) as e:
        check_coco(dict(images=images, annotations=anns, categories=[dict(id=1, name="a")]), "x.json")
    text = str(e.value)
    assert text.count("bbox must be") == 3 and "(and 2 more)" in text and "annotations[0] (id 0)" in text
    data = dict(images=images, categories=[dict(id=1, name="a")],
                annotations=[dict(id=1, image_id=0, category_id=1, bbox=[0, 0, 2, 3])])
    check_coco(data, "x.json")
    assert data["annotations"][0]["area"] == 6  # COCOeval needs one
    for bad in (dict(data, annotations=[dict(id=1, image_id=0, category_id=9, bbox=[0, 0, 1, 1])]),
                dict(data, annotations=[dict(id=1, image_id=0, category_id=[1], bbox=[0, 0, 1, 1])]),
                dict(data, categories=[dict(id=1)]), [], dict(data, images={"a": 1})):
        with pytest.raises(DataError):
            check_coco(bad, "x.json")


def test_rle_strings_are_decoded_as_pycocotools_encodes_them():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.asfortranarray((rng.random((13, 7)) < rng.random()).astype(np.uint8))
        rle = mask_utils.encode(mask)
        runs = rle_counts(rle["counts"].decode("ascii"))
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
        assert sum(runs) == 91 and np.array_equal(flat, mask.flatten(order="F"))
    assert rle_counts("zz") is None and rle_counts("0`") is None and rle_counts([3, -1]) is None


def test_a_missing_or_special_image_file_is_found_before_the_run(dataset, tmp_path, capsys):
    image = dataset / "images" / "training" / "00001.png"
    image.unlink()
    os.mkfifo(image)
    out = tmp_path / "run"
    err = one_line_error(capsys, main(["det", "train", "--config", "shapes", "--data", str(dataset), "--output",
                                       str(out), *DET_FLAGS]))
    assert "00001.png is not a regular file" in err and not out.exists()
    image.unlink()
    err = one_line_error(capsys, main(["det", "train", "--config", "shapes", "--data", str(dataset), "--output",
                                       str(out), *DET_FLAGS]))
    assert "00001.png is missing" in err and not out.exists()


# ------------------------------------------------------------------------------ segmentation labels
SEG_FLAGS = ["--batch-size", "2", "--max-iters", "1", "--eval-interval", "1", "--scale", "32", "32",
             "--crop-size", "32", "32", "--channels", "16", "--warmup-iters", "1", "--workers", "0", "--device", "cpu"]


def _set_label(root, split, index, value):
    path = sorted((root / "annotations" / split).glob("*.png"))[index]
    label = np.array(Image.open(path))
    label[0, :3] = value
    Image.fromarray(label).save(path)
    return path


def test_a_validation_label_outside_the_classes_stops_the_run_before_it_starts(dataset, tmp_path, capsys):
    label = _set_label(dataset, "validation", 1, 9)  # 4 classes: raw labels 1..4 (reduce_zero_label), 0, 255
    out = tmp_path / "run"
    err = one_line_error(capsys, main(["seg", "train", "--config", "shapes", "--data", str(dataset), "--output",
                                       str(out), *SEG_FLAGS]))
    assert f"{label}: label value 9 out of range" in err and "1..4" in err and not out.exists()


def test_seg_eval_checks_labels_size_and_channels(dataset, dense_weights, capsys):
    argv = ["seg", "eval", "--checkpoint", str(dense_weights["seg"]), "--data", str(dataset), "--split",
            "validation", "--device", "cpu"]
    label = _set_label(dataset, "validation", 0, 77)
    assert "label value 77 out of range" in one_line_error(capsys, main(argv))
    Image.new("RGB", (32, 32)).save(label)
    assert "single-channel" in one_line_error(capsys, main(argv))
    Image.new("L", (32, 31)).save(label)
    assert "sizes differ" in one_line_error(capsys, main(argv))
    Image.new("L", (32, 32), 255).save(label)  # all ignored: valid
    assert main(argv + ["--json"]) == 0


def test_the_label_scan_reads_a_label_in_well_under_a_second(tmp_path):
    """The scan reads each label once: 40 labels of 512x683 (ADE20K's size) take well under a second each."""


    rng = np.random.default_rng(0)
    samples = []
    for i in range(40):
        image, label = tmp_path / f"{i}.jpg", tmp_path / f"{i}.png"
        Image.new("RGB", (683, 512)).save(image)
        blocks = rng.integers(0, 151, (16, 22)).astype(np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((32, 32), np.uint8))[:512, :683]).save(label)
        samples.append((image, label))
    start = time.perf_counter()
    check_label_maps(samples, 150, True, 255, str(tmp_path))
    assert (time.perf_counter() - start) / len(samples) < 0.5


# ------------------------------------------------------------------------------ hidden files
def test_hidden_files_and_folders_are_not_data(tmp_path, dataset):
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "._x.png")  # macOS metadata named like an image
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / ".ipynb_checkpoints" / "y.png")
    ds = ImageFolderDataset(tmp_path / "train")
    assert ds.classes == ["a", "b"] and sorted(os.path.basename(p) for p, _ in ds.samples) == ["x.png", "x.png"]


    shutil.copy(dataset / "images" / "training" / "00000.png", dataset / "images" / "training" / "._00000.png")
    shutil.copy(dataset / "annotations" / "training" / "00000.png",
                dataset / "annotations" / "training" / "._00000.png")
    assert len(ADE20KDataset(dataset, "training", num_classes=4)) == 3


# ------------------------------------------------------------------------------ configs
def _bomb(depth, fan=10):
    """``lr`` holding ``depth`` lists, each ``fan`` aliases of the one before: ``fan ** depth`` values."""
    lines = ["lr:", "  - &a0 [" + ", ".join(["1"] * fan) + "]"]
    lines += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(6))  # 10^6 values: before, a multi-megabyte error line
    err = one_line_error(capsys, main(["train", "--config", str(path), "--output", str(tmp_path / "r")]))
    assert "alias bomb" in err and len(err) < 300 and not (tmp_path / "r").exists()
    path.write_text("lr: &a [1, *a]\n")
    assert "refers to the node that contains it" in one_line_error(capsys, main(["train", "--config", str(path)]))
    path.write_text("lr: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in one_line_error(capsys, main(["train", "--config", str(path)]))
    path.write_text("weight_decay: &w [0.1]\nlr: " + "[" * 3 + "*w" + "]" * 3 + "\n")  # a few aliases are fine
    err = one_line_error(capsys, main(["train", "--config", str(path)]))
    assert "config key 'weight_decay'" in err


@pytest.mark.e2e
def test_a_full_size_alias_bomb_stays_within_memory(tmp_path):
    """The 1.5 KB bomb of the issue (10^40 values): refused within a 6 GB address space and 120 s."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(40))
    assert len(path.read_bytes()) < 3000

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # importing torch maps 3.6 GB

    proc = subprocess.run([sys.executable, "-m", "rmt", "train", "--config", str(path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "alias bomb" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_long_config_value_is_quoted_short(tmp_path, capsys):
    path = tmp_path / "long.yaml"
    path.write_text("lr: " + "x" * 500_000 + "\n")  # before: a 500 KB error line
    err = one_line_error(capsys, main(["train", "--config", str(path)]))
    assert "config key 'lr': 'xxx" in err and len(err) < 300
    path.write_text("lr: [" + ", ".join(["abc"] * 20_000) + "]\n")
    err = one_line_error(capsys, main(["train", "--config", str(path)]))
    assert "config key 'lr': ['abc', 'abc'" in err and len(err) < 300


# ------------------------------------------------------------------------------ special files
@pytest.mark.e2e
def test_fifos_are_refused_not_waited_on(tmp_path, hub_folder, capsys):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(capsys, main(["train", "--config", str(fifo)]))
    assert "not a regular file" in one_line_error(capsys, main(["eval", "--checkpoint", str(fifo)]))
    # an image: opening a FIFO would block until a writer comes, so a subprocess with a timeout;
    # predict's contract: an unreadable input is reported and skipped (exit status 1)
    proc = subprocess.run([sys.executable, "-m", "rmt", "predict", str(fifo), "--checkpoint", str(hub_folder),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a regular file" in json.loads(proc.stdout)["error"], proc.stderr


# ------------------------------------------------------------------------------ smaller cases
@pytest.mark.e2e
def test_det_predict_gives_inputs_with_one_name_their_own_pictures(tmp_path, dense_weights, capsys):
    for folder, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / folder / "x.png")
    out = tmp_path / "pictures"
    assert main(["det", "predict", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "--checkpoint",
                 str(dense_weights["det"]), "--output", str(out), "--json", "--device", "cpu"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["output"] for r in results] == [str(out / "x_det.png"), str(out / "x-2_det.png")]
    first, second = (np.array(Image.open(r["output"]))[16, 16] for r in results)
    assert first[0] > first[2] and second[2] > second[0]  # each picture is its own image


def test_a_garbage_teacher_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "a" / "x.png")
    (tmp_path / "garbage.pth").write_bytes(os.urandom(4096))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    for checkpoint, message in (("garbage.pth", "cannot read"), ("other.pth", "do not fit the teacher resnet18")):
        err = one_line_error(capsys, main(["token-labels", "--teacher", "resnet18", "--checkpoint",
                                           str(tmp_path / checkpoint), "--data", str(tmp_path / "data"), "--output",
                                           str(tmp_path / "labels")]))
        assert message in err


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "model"
    model = RMT(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=3)
    return save_hub_folder(model, folder, model_name="rmt_t", class_names=["a", "b", "c"],
                           data_config=dict(input_size=[3, 32, 32]))


HUB_EDITS = {
    "num_classes text": (lambda c: c.update(num_classes="3"), "num_classes must be a positive integer"),
    "negative num_classes": (lambda c: c.update(num_classes=-3), "num_classes must be a positive integer"),
    "unknown architecture": (lambda c: c.update(architecture="resnet_x"), "is not an RMT variant"),
    "architecture number": (lambda c: c.update(architecture=5), "names no architecture"),
    "mean of 2": (lambda c: c["pretrained_cfg"].update(mean=[0.5, 0.5]), "mean must be 3 numbers"),
    "std zero": (lambda c: c["pretrained_cfg"].update(std=[0, 1, 1]), "std must be positive"),
    "input_size text": (lambda c: c["pretrained_cfg"].update(input_size="big"), "input_size must be"),
    "model_args list": (lambda c: c.update(model_args=[1]), "model_args must be an object"),
    "unknown model arg": (lambda c: c["model_args"].update(wings=2), "unknown model_args key wings"),
    "depths text": (lambda c: c["model_args"].update(depths="1111"), "model_args depths must be like"),
    "heads that do not divide": (lambda c: c["model_args"].update(num_heads=[3, 3, 3, 3]), "cannot build rmt_t"),
    "label_names short": (lambda c: c.update(label_names=["a"]), "label_names must be a list of 3"),
    "pretrained_cfg text": (lambda c: c.update(pretrained_cfg="x"), "pretrained_cfg must be an object"),
    "crop_pct text": (lambda c: c["pretrained_cfg"].update(crop_pct="0.9"), "crop_pct must be"),
    "interpolation": (lambda c: c["pretrained_cfg"].update(interpolation=3), "interpolation 3 is not"),
}


@pytest.mark.parametrize("case", list(HUB_EDITS))
def test_hand_edited_hub_config_values_are_one_line(hub_folder, tmp_path, capsys, case):
    folder = shutil.copytree(hub_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    edit, message = HUB_EDITS[case]
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    err = one_line_error(capsys, main(["predict", str(image), "--checkpoint", str(folder)]))
    assert message in err and "config.json" in err


def test_an_unedited_hub_folder_still_predicts(hub_folder, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(hub_folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(image)
