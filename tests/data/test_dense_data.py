"""Dense-prediction data: the shapes generator, COCO (polygon / RLE masks), ADE20K layout, augmentations."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rmt.data.ade20k import (
    IGNORE_INDEX,
    ADE20KDataset,
    SegEvalTransform,
    SegTrainTransform,
    read_class_names,
)
from rmt.data.coco import CocoDetection, coco_split_paths, collate_detection, detection_transforms
from rmt.data.dense_pipeline import keep_ratio_size
from rmt.data.shapes import SHAPE_CLASSES, ensure_shapes, generate_shapes
from rmt.detection.models import build_detector
from rmt.errors import RMTError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=6, num_val=3, image_size=64,
                           mask_format="mixed")


def _mask_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.where(mask > 0)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _grow(mask: torch.Tensor) -> torch.Tensor:
    """The mask dilated by one pixel."""
    return torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool()


def test_shapes_layout_is_deterministic_and_consistent(shapes, tmp_path):
    for sub in ("images/training/00000.png", "annotations/training/00000.png", "annotations/instances_training.json",
                "annotations/instances_validation.json", "classes.txt"):
        assert (shapes / sub).is_file(), sub
    again = generate_shapes(tmp_path / "again", num_train=6, num_val=3, image_size=64, mask_format="mixed")
    for sub in ("images/training/00003.png", "annotations/training/00003.png"):
        assert np.array_equal(np.array(Image.open(shapes / sub)), np.array(Image.open(again / sub)))
    coco = json.loads((shapes / "annotations/instances_training.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
    assert kinds == {"list", "dict"}  # "mixed": polygons and compressed RLE
    assert read_class_names(shapes) == ["background", *SHAPE_CLASSES]


def test_ensure_shapes_caches(tmp_path):
    root = ensure_shapes(tmp_path, num_train=2, num_val=1, image_size=32)
    assert ensure_shapes(tmp_path, num_train=2, num_val=1, image_size=32) == root
    assert len(list((root / "images/training").iterdir())) == 2


def test_coco_polygon_and_rle_masks_match_the_label_maps(shapes):
    ds = CocoDetection(*coco_split_paths(shapes, "training"))
    assert ds.class_names == list(SHAPE_CLASSES) and len(ds) == 6
    anns = ds.coco.loadAnns(ds.coco.getAnnIds())
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        label = torch.from_numpy(np.array(Image.open(shapes / "annotations/training" / f"{index:05d}.png")))
        own = [a for a in anns if a["image_id"] == ds.ids[index]]
        assert len(target["boxes"]) == len(own) == len(target["masks"])
        for box, cls, mask, ann in zip(target["boxes"], target["labels"], target["masks"], own):
            drawn = label == int(cls) + 1  # label maps: 1 background, 2.. the shapes
            x0, y0, x1, y1 = (int(v) for v in box.round())
            inside = torch.zeros_like(drawn)
            inside[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True  # objects are >= 2 px apart
            drawn &= inside
            if isinstance(ann["segmentation"], dict):  # RLE: exactly the drawn pixels
                assert torch.equal(mask.bool(), drawn)
            else:  # polygon: rasterised again by pycocotools, equal up to one pixel at the edges
                assert torch.all(_grow(drawn)[mask.bool()]) and torch.all(_grow(mask.bool())[drawn])
            assert torch.allclose(box, _mask_box(drawn), atol=1.5)


def test_coco_uncompressed_rle_crowd_and_errors(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "val" / "a.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 3:13] = 1
    counts = []  # uncompressed RLE: column-major run lengths starting with zeros
    flat, value, run = mask.flatten(order="F"), 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    assert mask_utils.decode(mask_utils.frPyObjects({"counts": counts, "size": [20, 30]}, 20, 30)).sum() == 50
    coco = dict(images=[dict(id=7, file_name="a.png", height=20, width=30)],
                categories=[dict(id=3, name="thing")],
                annotations=[dict(id=1, image_id=7, category_id=3, bbox=[3, 5, 10, 5], area=50, iscrowd=0,
                                  segmentation={"counts": counts, "size": [20, 30]}),
                             dict(id=2, image_id=7, category_id=3, bbox=[15, 0, 10, 10], area=100, iscrowd=1,
                                  segmentation=[[15, 0, 25, 0, 25, 10, 15, 10]])])
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    ds = CocoDetection(*coco_split_paths(tmp_path, "val"))
    _, target = ds[0]
    assert target["labels"].tolist() == [1]  # the crowd region is not a training target
    assert torch.equal(target["masks"][0], torch.from_numpy(mask))
    assert target["boxes"].tolist() == [[3, 5, 13, 10]]
    with pytest.raises(RMTError, match="instances_train.json"):
        coco_split_paths(tmp_path, "train")
    with pytest.raises(RMTError, match="not found"):
        coco_split_paths(tmp_path / "nope", "val")


def test_detection_flip_keeps_boxes_and_masks_together(shapes):
    plain = CocoDetection(*coco_split_paths(shapes, "training"))
    flipped = CocoDetection(*coco_split_paths(shapes, "training"), transforms=detection_transforms(True, hflip=1.0))
    image, target = plain[1]
    f_image, f_target = flipped[1]
    assert torch.equal(f_image, image.flip(-1))
    assert torch.equal(f_target["masks"], target["masks"].flip(-1))
    for box, mask in zip(f_target["boxes"], f_target["masks"]):
        assert torch.allclose(box, _mask_box(mask), atol=1.5)
    images, targets = collate_detection([plain[0], plain[1]])
    assert len(images) == len(targets) == 2


def test_detector_multiscale_resize_keeps_boxes_and_masks_together(shapes):
    """The reference's multi-scale resize happens in the detector's transform: one short side per image."""

    model = build_detector("mask_rcnn", num_classes=3, min_size=(48, 80), max_size=96, neck_channels=16)
    assert model.transform.min_sizes == (48, 80) and model.transform.max_size == 96
    ds = CocoDetection(*coco_split_paths(shapes, "training"))
    image, target = ds[2]
    model.train()
    sizes = set()
    torch.manual_seed(0)
    for _ in range(12):
        batch, targets = model.transform([image], [{k: v.clone() for k, v in target.items()}])
        h, w = batch.image_sizes[0]
        sizes.add(min(h, w))
        scale = batch.metas[0].scale_factor
        assert torch.allclose(targets[0]["boxes"], target["boxes"] * scale, atol=1e-3)
        for box, mask in zip(targets[0]["boxes"], targets[0]["masks"]):
            assert torch.allclose(box, _mask_box(mask), atol=2.5)
    assert sizes == {48, 80}


def test_ade20k_layout_and_ignore_label(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    label = np.array([[0, 1, 2], [150, 0, 3]], np.uint8)
    Image.fromarray(np.full((2, 3, 3), 90, np.uint8)).save(tmp_path / "images/training/x.jpg")
    Image.fromarray(label).save(tmp_path / "annotations/training/x.png")
    ds = ADE20KDataset(tmp_path, "training")
    assert ds.class_names is None
    image, target = ds[0]
    assert image.shape == (3, 2, 3)
    assert target.tolist() == [[IGNORE_INDEX, 0, 1], [149, IGNORE_INDEX, 2]]  # 0 ignored, k -> k - 1
    assert ADE20KDataset(tmp_path, "training", reduce_zero_label=False)[0][1].tolist() == label.tolist()
    (tmp_path / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n"
                                                "2,0.1,1,1,building;edifice\n")
    assert read_class_names(tmp_path) == ["wall", "building"]
    with pytest.raises(RMTError, match="ADE20K layout"):
        ADE20KDataset(tmp_path, "test")
    Image.fromarray(np.full((2, 3, 3), 90, np.uint8)).save(tmp_path / "images/validation/y.jpg")
    with pytest.raises(RMTError, match="no label PNG"):
        ADE20KDataset(tmp_path, "validation")


def test_seg_train_transform_keeps_image_and_label_aligned():
    """The label is drawn into the image (value = 40 * label), so after rescale, crop, flip and pad the
    image must still say which label each pixel has."""
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 5, size=(6, 8)), np.ones((20, 20), np.int64))  # 120 x 160, 20 px blocks
    image = Image.fromarray(np.repeat((label * 40).astype(np.uint8)[..., None], 3, axis=2))
    transform = SegTrainTransform(scale=(160, 120), ratio_range=(0.5, 2.0), crop_size=(64, 64), cat_max_ratio=0.75,
                                  hflip=0.5, photometric=False)
    mean, std = 123.675, 58.395
    torch.manual_seed(0)
    for _ in range(8):
        img, lab = transform(image, label)
        assert img.shape == (3, 64, 64) and lab.shape == (64, 64) and lab.dtype == torch.int64
        pixels = img[0] * std + mean
        valid = lab != IGNORE_INDEX
        from_image = (pixels / 40).round().long()
        agree = (from_image[valid] == lab[valid]).float().mean()
        assert agree > 0.9  # interpolation blurs block edges only (misaligned: ~0.2)
        if (~valid).any():  # padding: label 255, image 0 after normalisation
            assert torch.all(img[:, ~valid] == 0)
    torch.manual_seed(1)
    photometric = SegTrainTransform(scale=(80, 60), crop_size=(64, 64), photometric=True)
    img, lab = photometric(image, label)
    assert img.shape == (3, 64, 64) and torch.isfinite(img).all()


def test_seg_eval_transform_rescales_image_only():
    image = Image.fromarray(np.zeros((100, 50, 3), np.uint8))
    label = np.zeros((100, 50), np.int64)
    img, lab = SegEvalTransform(scale=(2048, 512))(image, label)
    assert img.shape[1:] == keep_ratio_size(100, 50, (2048, 512)) == (1024, 512)
    assert lab.shape == (100, 50)
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
