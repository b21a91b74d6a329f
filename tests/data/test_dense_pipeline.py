"""The official dense test pipelines (rmt.data.dense_pipeline) give the official network inputs, byte for byte.

The golden inputs were produced by the official code's own pipelines (mmdet 2.11 / mmseg 0.13 on mmcv 1.7.2,
see tests/fixtures/dense_golden/README.md) from the two committed images."""
import numpy as np
import pytest
import torch
from PIL import Image

from dense_golden import DENSE, load_dense_golden
from rmt.data.dense_pipeline import DETECTION_SCALE, SEGMENTATION_SCALE, keep_ratio_size, prepare_image


def assert_same_values(t: torch.Tensor, ref: dict) -> None:
    flat = t.double().flatten()
    assert list(t.shape) == ref["shape"]
    assert flat.sum().item() == pytest.approx(ref["sum"], rel=1e-12)
    assert flat.abs().sum().item() == pytest.approx(ref["abs_sum"], rel=1e-12)
    assert flat[: len(ref["first"])].tolist() == ref["first"]
    assert flat[ref["sample_index"]].tolist() == ref["sample"]


@pytest.mark.parametrize("case,scale,divisor", [("maskrcnn_t", DETECTION_SCALE, 32), ("fpn_t", SEGMENTATION_SCALE, 0)])
@pytest.mark.parametrize("image", ["img_wide.png", "img_tall.png"])
def test_official_pipeline_inputs(case, scale, divisor, image):
    golden = load_dense_golden(case)["images"][image]
    pixels = np.asarray(Image.open(DENSE / image).convert("RGB"))
    prepared = prepare_image(pixels, scale, divisor)
    meta = golden["meta"]
    assert list(prepared.img_shape) == meta["img_shape"][:2]
    assert list(prepared.ori_shape) == meta["ori_shape"][:2]
    assert prepared.scale_factor.tolist() == meta["scale_factor"]
    assert_same_values(prepared.tensor[None], golden["input"])


def test_sizes_are_rounded_not_floored():
    """240x320 at (1333, 800): 800 x 1066.67 -> 1067 (torchvision's transform floors it to 1066)."""
    assert keep_ratio_size(240, 320, DETECTION_SCALE) == (800, 1067)
    assert keep_ratio_size(300, 200, SEGMENTATION_SCALE) == (768, 512)
    assert keep_ratio_size(2000, 100, DETECTION_SCALE) == (1333, 67)  # the long side binds


def test_a_float_image_is_refused():
    with pytest.raises(TypeError, match="uint8"):
        prepare_image(np.zeros((8, 8, 3), np.float32), DETECTION_SCALE)
