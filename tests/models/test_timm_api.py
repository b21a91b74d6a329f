"""RMT as timm and torchvision tools expect a model to behave: the pooling contract, classifier
resets, factory placement, TorchScript, FX graphs and FX feature extraction (issue 16). timm's own
generic suite runs on our models in CI through tests/timm_suite.py."""
import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from golden import TINY_CASES
from rmt.models import RMT

ARGS = TINY_CASES["official_tiny"]  # decomposed and full stages, layer scale on the last two
TL_ARGS = TINY_CASES["official_tiny_tl"]
TIMM_TRACER = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
STAGES = {f"layers.{i}": f"stage{i}" for i in range(4)}


def _model(args=ARGS, **kwargs):
    torch.manual_seed(0)
    model = RMT(**dict(args, **kwargs)).eval()
    with torch.no_grad():  # BN statistics off their init values, so that the head's norm matters
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model


def _image(batch=2, h=64, w=96):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------- pooling contract
def test_unpooled_head_is_the_projection_map():
    model = _model()
    x = _image()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(x)
        classifier = copy.deepcopy(model.head.state_dict())
        model.reset_classifier(10, global_pool="")
        model.head.load_state_dict(classifier)  # the same classifier, no pooling
        dense_pre = model.forward_head(features, pre_logits=True)
        dense_logits = model(x)
    assert features.shape == (2, 128, 2, 3) and logits.shape == (2, 10)
    assert dense_pre.shape == (2, model.head_hidden_size, 2, 3)
    torch.testing.assert_close(dense_pre.mean((2, 3)), pooled)  # pooling is the only difference
    assert dense_logits.shape == (2, 10, 2, 3)
    # the classifier is linear: the mean of the per-position logits is the logit of the mean
    torch.testing.assert_close(dense_logits.mean((2, 3)), logits)


def test_reset_classifier_and_creation_honour_both_pools():
    model = _model()
    x = _image()
    with torch.no_grad():
        model.reset_classifier(0, "")
        assert model(x).shape == (2, model.head_hidden_size, 2, 3)
        model.reset_classifier(3)  # keeps the pooling: still unpooled
        assert model(x).shape == (2, 3, 2, 3)
        model.reset_classifier(0, "avg")
        assert model(x).shape == (2, model.head_hidden_size)
        assert RMT(**dict(ARGS, num_classes=0), global_pool="").eval()(x).shape == (2, 64, 2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")
    with pytest.raises(ValueError, match="global_pool"):
        RMT(**ARGS, global_pool="avgmax")


def test_token_label_head_unpooled_adds_aux_per_position():
    model = _model(TL_ARGS, token_label=True)
    x = _image()
    with torch.no_grad():
        features = model.forward_features(x)
        model.global_pool = ""
        dense = model.forward_head(features)
        projected = model.forward_head(features, pre_logits=True)
    expected = model.head(projected.permute(0, 2, 3, 1)) + 0.5 * model.aux_head(features.permute(0, 2, 3, 1))
    torch.testing.assert_close(dense, expected.permute(0, 3, 1, 2))


def test_reset_classifier_takes_device_dtype_and_mode():
    model = _model(token_label=True).double().eval()
    model.reset_classifier(4)
    for head in (model.head, model.aux_head):
        assert head.weight.dtype == torch.float64 and not head.training
    model.train().reset_classifier(2)
    assert model.head.training


def test_factory_device_and_dtype():
    model = timm.create_model("rmt_t", device="meta", dtype=torch.bfloat16)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError):
        timm.create_model("rmt_t", device="meta", not_a_model_arg=1)


# ---------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("args", [ARGS, dict(TL_ARGS, token_label=True)], ids=["plain", "token_label"])
def test_scripted_model_matches_eager(args):
    model = _model(args)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # the scripted path is self-contained: it saves and loads
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = _image()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-5)


def test_scripted_model_trains():
    model = _model().train()
    scripted = torch.jit.script(model)
    scripted(_image()).sum().backward()
    assert all(p.grad is not None for p in scripted.parameters())


# ---------------------------------------------------------------------------------- FX
def test_fx_graph_with_timm_leaves_matches_eager_exactly():
    """timm's tracer keeps the blocks and the tables as leaves: the graph runs the same code."""
    model = _model()
    graph = torch.fx.GraphModule(model, NodePathTracer(**TIMM_TRACER).trace(model))
    leaves = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert {"layers.0.relpos", "layers.0.blocks.0", "layers.3.blocks.0"} <= leaves
    x = _image()
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
        assert torch.equal(graph(_image(h=96, w=64)), model(_image(h=96, w=64)))  # any size: no baked shapes


def test_fx_graph_of_plain_ops_matches_eager():
    """Traced without timm's leaf list, every op is in the graph (plain math)."""
    model = _model()
    graph = torch.fx.symbolic_trace(model)
    assert not [n for n in graph.graph.nodes if n.op == "call_module" and n.target.endswith(("retention", "relpos"))]
    with torch.no_grad():
        for x in (_image(), _image(h=32, w=128)):
            torch.testing.assert_close(graph(x), model(x), rtol=1e-4, atol=1e-5)


def test_fx_graph_trains_and_scripts():
    model = _model()
    graph = torch.fx.GraphModule(model, NodePathTracer(**TIMM_TRACER).trace(model.train()))
    graph(_image()).sum().backward()
    assert all(p.grad is not None for p in graph.parameters())
    model.eval()
    graph = torch.fx.GraphModule(model, NodePathTracer(**TIMM_TRACER).trace(model))
    scripted = torch.jit.script(graph)
    with torch.no_grad():
        torch.testing.assert_close(scripted(_image()), model(_image()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tracer", ["timm", "torchvision"])
def test_create_feature_extractor_returns_the_stage_outputs(tracer):
    model = _model()
    kwargs = {"tracer_kwargs": TIMM_TRACER} if tracer == "timm" else {}
    extractor = create_feature_extractor(model, return_nodes=STAGES, **kwargs)
    x = _image()
    with torch.no_grad():
        features = extractor(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert list(features) == list(STAGES.values())
    for got, want in zip(features.values(), expected):
        if tracer == "timm":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_timm_fx_features_match_getter_features():
    x = _image()
    torch.manual_seed(0)
    getter = timm.create_model("rmt_t", features_only=True).eval()
    torch.manual_seed(0)  # the same weights
    fx = timm.create_model("rmt_t", features_only=True, feature_cls="fx").eval()
    with torch.no_grad():
        for a, b in zip(fx(x), getter(x)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- timm's own suite
def test_timm_suite_fails_loudly_without_the_index(tmp_path):
    """No index -> the CI step says so and fails; it never skips silently."""
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path), PIP_CONFIG_FILE=os.devnull)
    script = Path(__file__).parents[1] / "timm_suite.py"
    result = subprocess.run([sys.executable, str(script), "--keep", str(tmp_path / "suite")], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "cannot fetch the source distribution of timm==" in result.stdout + result.stderr
