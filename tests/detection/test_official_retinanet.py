"""RetinaNet against the official RMT RetinaNet (mmdet 2.11) on the dense golden cases
(tests/fixtures/dense_golden, README items 8, 9, 10, 19, 25): the official weights load strictly,
and features, head outputs and final detections equal the official ones."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from dense_golden import DENSE, assert_summary, dense_state_dict, load_dense_golden
from rmt.detection.models import build_detector
from rmt.detection.ops import ImageMeta
from rmt.detection.retinanet import MaxIoUMatcher, RetinaFPN, official_retinanet_state, retina_anchors
from rmt.errors import RMTError

REL = 1e-4


def golden_retinanet(name: str):
    data = load_dense_golden(name)
    model = build_detector("retinanet", backbone=f"rmt_{data['variant']}", num_classes=80)
    model.load_state_dict(official_retinanet_state(dense_state_dict(data["keys"])), strict=True)
    return model.eval(), data


def mmdet_order(det: dict) -> torch.Tensor:
    """Our detections as ``[x1, y1, x2, y2, score, label]`` rows, 0-based labels, in mmdet's result order
    (class by class; within a class by descending score, as multiclass_nms returns them)."""
    rows = torch.cat([det["boxes"], det["scores"][:, None], (det["labels"] - 1)[:, None].float()], dim=1).double()
    return rows[torch.sort(det["labels"], stable=True).indices]


def largest_detection_difference(det: dict, reference: list) -> float:
    """Checks count and labels exactly, boxes and scores within ``REL`` relative (to the value, at least
    1 pixel / score unit); returns the largest relative difference."""
    ours, want = mmdet_order(det), torch.tensor(reference, dtype=torch.float64).view(-1, 6)
    assert len(ours) == len(want), f"{len(ours)} detections, official {len(want)}"
    assert ours[:, 5].tolist() == want[:, 5].tolist(), "labels differ"
    rel = ((ours[:, :5] - want[:, :5]).abs() / want[:, :5].abs().clamp(min=1.0)).max().item() if len(want) else 0.0
    assert rel <= REL, f"largest relative difference {rel:.3g}"
    return rel


def check_calls(calls: dict, backbone, neck, head) -> None:
    """The recorded module outputs: the official backbone computes level 0 too (unused by its FPN)."""
    ref_backbone = calls["backbone"][0]
    assert len(ref_backbone) == 4 and len(backbone) == 3
    for i, (f, ref) in enumerate(zip(backbone, ref_backbone[1:])):
        assert_summary(f, ref, f"backbone level {i + 1}")
    assert len(neck) == len(calls["neck"][0]) == 5
    for i, (f, ref) in enumerate(zip(neck, calls["neck"][0])):
        assert_summary(f, ref, f"neck P{i + 3}")
    for part, ours, refs in zip(("cls", "reg"), head, calls["bbox_head"][0]):
        for i, (f, ref) in enumerate(zip(ours, refs)):
            assert_summary(f, ref, f"bbox_head {part} P{i + 3}")


@pytest.mark.parametrize("variant", ["t", pytest.param("s", marks=pytest.mark.slow)])
def test_retinanet_tensor_case_matches_official(variant):
    """Pipeline-free: a seeded input with a hand-written meta (``simple_test(rescale=True)``)."""
    model, data = golden_retinanet(f"retinanet_{variant}_tensor")
    x = torch.randn(data["input_shape"], generator=torch.Generator().manual_seed(data["input_seed"]))
    meta = data["meta"]
    image_meta = ImageMeta(tuple(meta["ori_shape"][:2]), tuple(meta["img_shape"][:2]),
                           torch.tensor(meta["scale_factor"], dtype=torch.float32))
    with torch.no_grad():
        backbone = list(model.backbone.body(x).values())
        neck = model.backbone.fpn(backbone)
        head = model.head(neck)
        detections = model.postprocess_detections(*head, [image_meta])
    check_calls(data["calls"], backbone, neck, head)
    assert data["detections"], "the golden case has detections"
    largest_detection_difference(detections[0], data["detections"])


def _image_case(variant: str):
    model, data = golden_retinanet(f"retinanet_{variant}")
    recorded = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: recorded.__setitem__(name, out))
             for name, module in (("backbone", model.backbone.body), ("neck", model.backbone.fpn),
                                  ("head", model.head))]
    hooks.append(model.backbone.register_forward_pre_hook(lambda _m, args: recorded.__setitem__("input", args[0])))
    for file, case in data["images"].items():
        image = torch.from_numpy(np.array(Image.open(DENSE / file).convert("RGB"))).permute(2, 0, 1) / 255
        with torch.no_grad():
            detections = model([image])  # one image per batch, as the official test
        assert_summary(recorded["input"], case["input"], f"{file} input")
        check_calls(case["calls"], list(recorded["backbone"].values()), recorded["neck"], recorded["head"])
        largest_detection_difference(detections[0], case["detections"])
    for hook in hooks:
        hook.remove()


@pytest.mark.slow  # about 20 s per 800x1067 image on a CPU core
def test_retinanet_t_images_match_official():
    """Both images through the whole model, DetectionTransform included."""
    _image_case("t")


@pytest.mark.slow
def test_retinanet_s_images_match_official():
    _image_case("s")


def test_official_state_is_strict():
    data = load_dense_golden("retinanet_t_tensor")
    state = dense_state_dict(data["keys"])
    mapped = official_retinanet_state(state)
    assert torch.equal(mapped["head.retina_cls.bias"], state["bbox_head.retina_cls.bias"])
    assert torch.equal(mapped["backbone.fpn.fpn_convs.3.weight"], state["neck.fpn_convs.3.conv.weight"])
    assert not any("extra_norms" in k for k in mapped)
    with pytest.raises(RMTError, match="no place for bbox_head.conv_cls.weight"):
        official_retinanet_state({**state, "bbox_head.conv_cls.weight": torch.zeros(1)})


def test_p7_has_no_relu():
    """P7 = conv(P6) on the raw P6 (mmdet's relu_before_extra_convs=False): negative P6 values count."""
    fpn = RetinaFPN([4, 8, 16], 8).eval()
    inputs = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]
    with torch.no_grad():
        p6, p7 = fpn(inputs)[3:]
        assert (p6 < 0).any()
        assert torch.allclose(p7, fpn.fpn_convs[4](p6))
        assert not torch.allclose(p7, fpn.fpn_convs[4](p6.relu()))


def test_anchor_sizes_must_follow_the_strides():
    assert retina_anchors((32, 64, 128, 256, 512)).base_anchors.shape == (5, 9, 4)
    with pytest.raises(RMTError, match="one multiple of the strides"):
        retina_anchors((32, 64, 128, 256, 256))


def test_low_quality_matches_go_to_the_claiming_box():
    """mmdet's assigner: an anchor that is the best for a box joins *that* box even when it overlaps
    another box more; torchvision's Matcher would keep the other box."""
    iou = torch.tensor([[0.60, 0.45, 0.1],
                        [0.20, 0.30, 0.0]])  # box 1's best anchor is anchor 1 (0.3), whose own best is box 0 (0.45)
    assert MaxIoUMatcher(0.5, 0.4)(iou.clone()).tolist() == [0, 1, -1]
    assert Matcher(0.5, 0.4, allow_low_quality_matches=True)(iou.clone()).tolist() == [0, 0, -1]
    # a box overlapping nothing (min_pos_iou=0) claims every anchor: all tie at its best IoU, 0
    assert MaxIoUMatcher(0.5, 0.4)(torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.0]])).tolist() == [1, 1, 1]


@pytest.fixture(scope="module")
def small_retinanet():
    return build_detector("retinanet", num_classes=2, neck_channels=8, min_size=(64,), max_size=64).eval()


def _level_maps(model, values_at_p3: torch.Tensor, width: int) -> list:
    """Head outputs for 1x1 feature maps at every level: ``values_at_p3 (A, width)`` at P3, -20 elsewhere."""
    anchors = model.anchor_generator.num_anchors_per_location()[0]
    maps = [torch.full((1, anchors * width, 1, 1), -20.0) for _ in range(5)]
    maps[0] = values_at_p3.reshape(1, anchors * width, 1, 1)
    return maps


def test_candidates_are_anchors_ranked_by_their_best_class(small_retinanet):
    """mmdet's nms_pre keeps whole anchors (all their class scores) ranked by their best class, where
    torchvision keeps (anchor, class) pairs: with one candidate, anchor 0 gives both its classes."""
    model = small_retinanet
    logits = torch.full((9, 2), -20.0)
    logits[0] = torch.logit(torch.tensor([0.9, 0.8]))
    logits[1] = torch.logit(torch.tensor([0.85, 0.1]))
    meta = ImageMeta((64, 64), (64, 64), torch.ones(4))
    model.topk_candidates = 1
    try:
        det = model.postprocess_detections(_level_maps(model, logits, 2), _level_maps(model, torch.zeros(9, 4), 4),
                                           [meta])[0]
    finally:
        model.topk_candidates = 1000
    assert det["labels"].tolist() == [1, 2]
    assert torch.allclose(det["scores"], torch.tensor([0.9, 0.8]))
    assert torch.equal(det["boxes"][0], det["boxes"][1])  # the same anchor, clipped to the image


def test_losses_are_normalised_by_the_batch_positives(small_retinanet):
    """mmdet divides the batch's summed losses by its positive anchors (at least one per image), where
    torchvision averages per-image means; anchors beyond an image's own padded area take no part."""
    model = small_retinanet
    generator = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    cls = [torch.randn(2, 18, h, w, generator=generator) for h, w in sizes]
    reg = [torch.randn(2, 36, h, w, generator=generator) * 0.1 for h, w in sizes]
    with_box = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([2])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    meta = ImageMeta((64, 64), (64, 64), torch.ones(4))
    one = model.compute_loss([with_box], [c[:1] for c in cls], [r[:1] for r in reg], [meta])
    other = model.compute_loss([empty], [c[1:] for c in cls], [r[1:] for r in reg], [meta])
    both = model.compute_loss([with_box, empty], cls, reg, [meta, meta])
    anchors = torch.cat(model.anchor_generator.grid(sizes))
    positives = int((model.proposal_matcher(box_iou(with_box["boxes"], anchors)) >= 0).sum())
    assert positives > 1
    expected_cls = (one["classification"] * positives + other["classification"]) / (positives + 1)
    assert torch.allclose(both["classification"], expected_cls)
    assert torch.allclose(both["bbox_regression"], one["bbox_regression"] * positives / (positives + 1))
    # a smaller image in the same batch: its anchors beyond 32x32 (padded) are neither positive nor negative
    small = ImageMeta((32, 32), (20, 30), torch.ones(4))
    valid = model._valid_anchors(sizes, small, torch.device("cpu"))
    assert int(valid.sum()) == 9 * (4 * 4 + 2 * 2 + 1 + 1 + 1)
