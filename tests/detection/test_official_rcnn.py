"""Our R-CNN detectors against the official RMT detection code (tests/fixtures/dense_golden, README.md there):
the golden weights loaded through :func:`official_rcnn_state`, every recorded module output within 1e-4
relative, the final detections (count, labels, order) equal, boxes and scores within 1e-4 relative, the
masks (``>= MASK_THRESHOLD``) pixel-equal."""
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dense_golden import DENSE, assert_summary, dense_state_dict, load_dense_golden
from rmt.detection.models import build_detector, official_rcnn_state
from rmt.detection.ops import MASK_THRESHOLD, ImageMeta
from rmt.errors import RMTError

ARCH = {"maskrcnn": "mask_rcnn", "casrcnn": "cascade_mask_rcnn"}
REL = 1e-4
MASK_ROUNDOFF = 1e-5


def golden_detector(case: str):
    """The official model of ``case`` (e.g. ``maskrcnn_t_tensor``) as ours, with the golden weights."""
    data = load_dense_golden(case)
    family, variant = case.split("_")[:2]
    model = build_detector(ARCH[family], backbone=f"rmt_{variant}", num_classes=80)
    model.load_state_dict(official_rcnn_state(dense_state_dict(data["keys"])), strict=True)
    return model.eval(), data


def record_calls(model):
    """Forward hooks recording each module's output under the official module's name."""
    calls = {}
    modules = {"backbone": model.backbone.body, "neck": model.backbone, "rpn_head": model.rpn.head}
    heads = model.roi_heads
    if hasattr(heads, "box_heads"):
        modules.update({f"roi_head.bbox_head.{i}": h for i, h in enumerate(heads.box_heads)})
        modules.update({f"roi_head.mask_head.{i}": h for i, h in enumerate(heads.mask_heads)})
    else:
        modules.update({"roi_head.bbox_head": heads.box_head, "roi_head.mask_head": heads.mask_head})
    for name, module in modules.items():
        module.register_forward_hook(lambda m, i, out, name=name: calls.setdefault(name, []).append(out))
    return calls


def compare(ours, ref, what):
    if isinstance(ref, dict):
        assert_summary(ours, ref, what)
        return
    ours = list(ours.values()) if isinstance(ours, dict) else list(ours)
    assert len(ours) == len(ref), f"{what}: {len(ours)} outputs, expected {len(ref)}"
    for i, (o, r) in enumerate(zip(ours, ref)):
        compare(o, r, f"{what}[{i}]")


def check_calls(calls, ref_calls, skip=()):
    assert set(calls) == set(ref_calls)
    for name, ref in ref_calls.items():
        if not name.startswith(tuple(skip)):
            compare(calls[name], ref, name)


def check_detections(out, ref_rows, ref_masks, ori_shape):
    """Returns the largest box and score differences (relative)."""
    ref = torch.tensor(ref_rows, dtype=torch.float64).reshape(-1, 6)
    # mmdet's result order: class by class, by descending score within a class (ours: by score)
    order = torch.sort(out["labels"], stable=True).indices
    out = {k: v[order] for k, v in out.items()}
    assert len(out["boxes"]) == len(ref), f"{len(out['boxes'])} detections, expected {len(ref)}"
    assert torch.equal(out["labels"].cpu() - 1, ref[:, 5].long())
    if len(ref) == 0:
        return 0.0, 0.0, 0
    # relative to the coordinate (at least 1 pixel) and to the score
    box_err = ((out["boxes"].double() - ref[:, :4]).abs() / ref[:, :4].abs().clamp(min=1)).max().item()
    score_err = ((out["scores"].double() - ref[:, 4]).abs() / ref[:, 4]).max().item()
    assert box_err <= REL and score_err <= REL, (box_err, score_err)
    assert out["masks"].shape == (len(ref), 1, *ori_shape)
    borderline = 0
    for k, rle in enumerate(ref_masks):
        want = torch.from_numpy(mask_utils.decode(dict(rle, counts=rle["counts"].encode())).astype(bool))
        prob = out["masks"][k, 0]
        differ = (prob >= MASK_THRESHOLD) != want
        # the network's outputs carry float round-off (~1e-6, the features' differences above): a pixel
        # may only differ where its probability is that close to the threshold
        far = differ & ((prob - MASK_THRESHOLD).abs() > MASK_ROUNDOFF)
        assert not far.any(), f"mask {k}: {int(far.sum())} pixels differ"
        borderline += int(differ.sum())
    return box_err, score_err, borderline


def run_tensor_case(case):
    """Returns (largest relative box difference, largest relative score difference, mask pixels that differ
    within the round-off band of the threshold)."""
    model, data = golden_detector(case)
    calls = record_calls(model)
    x = torch.randn(data["input_shape"], generator=torch.Generator().manual_seed(data["input_seed"]))
    meta = data["meta"]
    image_meta = ImageMeta(tuple(meta["ori_shape"][:2]), tuple(meta["img_shape"][:2]),
                           torch.tensor(meta["scale_factor"], dtype=torch.float32))
    with torch.no_grad():
        out = model.forward_prepared(x, [image_meta])[0]
    check_calls(calls, data["calls"])
    return check_detections(out, data["detections"], data["masks"], image_meta.ori_shape)


def run_image_case(case, skip_calls=()):
    model, data = golden_detector(case)
    errors = []
    for name, ref in data["images"].items():
        calls = record_calls(model)
        image = torch.from_numpy(np.array(Image.open(DENSE / name).convert("RGB"))).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            out = model([image])[0]
        check_calls(calls, ref["calls"], skip_calls)
        errors.append(check_detections(out, ref["detections"], ref["masks"], tuple(image.shape[1:])))
    return errors


# the cascade runs three 4conv heads on 1000 RoIs: ~35 s on a CPU, so slow; the image cases ~1-3 min each
@pytest.mark.parametrize("case", ["maskrcnn_t_tensor", pytest.param("casrcnn_t_tensor", marks=pytest.mark.slow),
                                  pytest.param("maskrcnn_s_tensor", marks=pytest.mark.slow),
                                  pytest.param("casrcnn_s_tensor", marks=pytest.mark.slow)])
def test_rcnn_matches_official_on_tensor(case):
    run_tensor_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["maskrcnn_t", "casrcnn_t"])
def test_rcnn_matches_official_on_images(case):
    run_image_case(case)


# RMT-S at 800x1067: one of the 1000 RoIs fed to the box head differs from the official one -- level P2's
# 1000th and 1001st RPN scores are 6e-6 apart, within the float round-off of the (reimplemented) backbone,
# so the per-level top-1000 cut can pick either anchor. The box and mask heads' raw outputs (one row each)
# are therefore not compared; the backbone, neck and RPN outputs and the final detections and masks are.
@pytest.mark.slow
@pytest.mark.parametrize("case", ["maskrcnn_s", "casrcnn_s"])
def test_rcnn_s_matches_official_on_images(case):
    run_image_case(case, skip_calls=("roi_head.",))


def test_official_rcnn_state_is_strict():
    data = load_dense_golden("maskrcnn_t_tensor")
    state = dense_state_dict(data["keys"])
    model = build_detector("mask_rcnn", num_classes=80)
    mapped = official_rcnn_state(state)
    assert set(mapped) == set(model.state_dict())
    with pytest.raises(RMTError, match="unexpected key"):
        official_rcnn_state(dict(state, **{"roi_head.extra.weight": torch.zeros(1)}))
