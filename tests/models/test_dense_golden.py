"""Parity of the dense backbone with the official detection/segmentation code (tests/fixtures/dense_golden;
the segmentors' parity is in tests/segmentation/test_official.py).

The golden data were produced by the official repository's own dense code (vendored mmdet 2.11 /
mmseg 0.13) with seeded synthetic weights: see tests/fixtures/dense_golden/README.md and make_goldens.py.
"""

import pytest
import torch

from dense_golden import assert_summary, load_dense_golden
from golden import official_state_dict
from rmt.errors import RMTError
from rmt.models.backbone import RMTBackbone, official_backbone_state


def golden_backbone(variant: str, **kwargs):
    data = load_dense_golden(f"backbone_{variant}")
    model = RMTBackbone(f"rmt_{variant}", decomposed=data["settings"]["chunkwise_recurrents"], **kwargs)
    model.load_state_dict(official_backbone_state(official_state_dict(data["keys"])), strict=True)
    return model, data


@pytest.mark.parametrize("variant", ["t", pytest.param("s", marks=pytest.mark.slow)])
def test_backbone_eval_matches_official_dense_code(variant):
    model, data = golden_backbone(variant)
    case = data["eval"]
    x = torch.randn(case["input_shape"], generator=torch.Generator().manual_seed(case["input_seed"]))
    with torch.no_grad():
        outs = list(model.eval()(x).values())
    assert len(outs) == len(case["outputs"]) == 4
    for i, (o, ref) in enumerate(zip(outs, case["outputs"])):
        assert_summary(o, ref, f"level {i}")


@pytest.mark.parametrize("variant", ["t", pytest.param("s", marks=pytest.mark.slow)])
def test_backbone_train_mode_matches_official_dense_code(variant):
    """In train mode the official BatchNorms use batch statistics (its norm_eval misses SyncBatchNorm)
    and update their running buffers; drop path is off on both sides."""
    model, data = golden_backbone(variant, drop_path_rate=0.0)
    case = data["train"]
    assert "SyncBatchNorm:True" in case["norm_modes"]
    x = torch.randn(case["input_shape"], generator=torch.Generator().manual_seed(case["input_seed"]))
    with torch.no_grad():
        outs = list(model.train()(x).values())
    for i, (o, ref) in enumerate(zip(outs, case["outputs"])):
        assert_summary(o, ref, f"level {i}")
    ours = model.state_dict()
    mapped = official_backbone_state({"backbone." + k: v for k, v in case["buffers_after"].items()})
    assert len(mapped) == len(case["buffers_after"])
    for key, ref in mapped.items():
        assert_summary(ours[key].double(), ref, key)


def test_golden_check_detects_a_wrong_backbone():
    """The comparison can fail: the same weights with stage 3 running decomposed MaSA (the official
    RMT-T dense configs run it whole) move the features by more than the tolerance."""
    data = load_dense_golden("backbone_t")
    model = RMTBackbone("rmt_t", decomposed=(True, True, True, False))
    model.load_state_dict(official_backbone_state(official_state_dict(data["keys"])), strict=True)
    case = data["eval"]
    x = torch.randn(case["input_shape"], generator=torch.Generator().manual_seed(case["input_seed"]))
    with torch.no_grad():
        out = list(model.eval()(x).values())[2]
    with pytest.raises(AssertionError):
        assert_summary(out, case["outputs"][2], "level 2")


def test_official_backbone_state_keys():
    data = load_dense_golden("backbone_t")
    state = official_state_dict(data["keys"])
    retina = official_backbone_state(state, out_indices=(1, 2, 3))
    assert torch.equal(retina["norms.0.weight"], state["backbone.extra_norms.1.weight"])
    assert not any(k.startswith("norms.3") for k in retina)
    model = RMTBackbone("rmt_t", out_indices=(1, 2, 3))
    model.load_state_dict(retina, strict=True)
    with pytest.raises(RMTError, match="no official RMT backbone"):
        official_backbone_state({"model.layers.0.x": torch.zeros(1)})
