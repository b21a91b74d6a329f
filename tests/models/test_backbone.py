"""RMTBackbone: feature maps at strides 4-32, per-level LayerNorms, frozen stages, ImageNet weight loading."""
import pytest
import torch
from torch import nn

from rmt.errors import RMTError
from rmt.models import RMTBackbone, load_backbone_weights
from rmt.models.factory import create_model
from rmt.models.weights import save_weights


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return RMTBackbone("rmt_t").eval()


def test_levels_strides_and_channels(backbone):
    assert backbone.out_channels == [64, 128, 256, 512] and backbone.strides == [4, 8, 16, 32]
    assert len(backbone.norms) == 4 and all(isinstance(n, nn.LayerNorm) for n in backbone.norms)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3"]
    for f, c, s in zip(feats.values(), backbone.out_channels, backbone.strides):
        assert f.shape == (2, c, 64 // s, 96 // s)
    # each level is LayerNorm-ed over channels: zero mean, unit variance per position at init
    assert torch.allclose(feats["2"].mean(1), torch.zeros(()), atol=1e-4)
    # the classifier's projection, norm and head are gone
    assert not any(k.startswith(("body.proj", "body.norm", "body.head")) for k in backbone.state_dict())


def test_matches_the_classifier_features(backbone):
    """Before the extra LayerNorms, the levels are the classification network's stage outputs."""
    classifier = create_model("rmt_t", num_classes=0).eval()
    classifier.load_state_dict(backbone.body.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NHWC", intermediates_only=True)
        got = backbone(x)
    for (_, f), e, norm in zip(got.items(), expected, backbone.norms):
        assert torch.allclose(f, norm(e).permute(0, 3, 1, 2), atol=1e-5)


def test_out_indices_subset():
    bb = RMTBackbone("rmt_t", out_indices=(1, 2, 3))
    assert bb.out_channels == [128, 256, 512] and bb.strides == [8, 16, 32] and len(bb.norms) == 3
    with pytest.raises(RMTError, match="out_indices"):
        RMTBackbone("rmt_t", out_indices=(2, 1))
    with pytest.raises(RMTError, match="frozen_stages"):
        RMTBackbone("rmt_t", frozen_stages=7)


def test_frozen_stages_and_norm_eval():
    bb = RMTBackbone("rmt_t", frozen_stages=1, norm_eval=True).train()
    frozen = list(bb.body.patch_embed.parameters()) + list(bb.body.layers[0].parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in bb.body.layers[1].parameters() if p.ndim > 1)
    assert not bb.body.patch_embed.training and not bb.body.layers[0].training and bb.body.layers[1].training
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    before = bb.body.layers[0].state_dict()
    before = {k: v.clone() for k, v in before.items()}
    sum(f.sum() for f in bb(torch.randn(1, 3, 64, 64)).values()).backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in bb.body.layers[1].parameters() if p.requires_grad)
    after = bb.body.layers[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched too


@pytest.mark.parametrize("fmt", ["safetensors", "official_pth"])
def test_imagenet_weights_report(tmp_path, fmt):
    torch.manual_seed(1)
    classifier = create_model("rmt_t", num_classes=10)
    if fmt == "safetensors":
        path = save_weights(classifier, tmp_path / "rmt_t.safetensors")
    else:  # the official release: {"model": state_dict} in a .pth
        path = tmp_path / "rmt_t.pth"
        torch.save({"model": classifier.state_dict()}, path)
    bb = RMTBackbone("rmt_t", weights=path)
    report = bb.load_report
    assert report["missing"] and all(k.startswith("norms.") for k in report["missing"])  # only the new LayerNorms
    assert {k.split(".")[0] for k in report["unexpected"]} == {"proj", "norm", "head"}
    assert len(report["loaded"]) == len(classifier.state_dict()) - len(report["unexpected"])
    own = bb.state_dict()
    for k, v in classifier.state_dict().items():
        if f"body.{k}" in own:
            assert torch.equal(own[f"body.{k}"], v), k
    again = load_backbone_weights(RMTBackbone("rmt_t"), path)
    assert again == report
    with pytest.raises(RMTError, match="not found"):
        RMTBackbone("rmt_t", weights=tmp_path / "missing.pth")


def test_weights_of_a_dense_run(tmp_path):
    """A detection or segmentation run's weights give the whole backbone, level norms included."""
    torch.manual_seed(2)
    source = RMTBackbone("rmt_t")
    nn.init.normal_(source.norms[1].weight)
    for name, wrapper in [("seg", nn.ModuleDict(dict(backbone=source))),
                          ("det", nn.ModuleDict(dict(backbone=nn.ModuleDict(dict(body=source)))))]:
        path = save_weights(wrapper, tmp_path / f"{name}.safetensors")
        bb = RMTBackbone("rmt_t", weights=path)
        assert bb.load_report["missing"] == [] and bb.load_report["unexpected"] == []
        assert torch.equal(bb.norms[1].weight, source.norms[1].weight)
