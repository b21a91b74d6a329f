"""The RMT network: variants, parity with the oracle, the timm API, odd inputs and token labelling."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import rmt.models.rmt as rmt_module
from golden import TINY_ARGS, load_golden, official_layout, oracle_pair
from rmt.models import MODEL_ARGS, RMT, checkpoint_filter_fn
from rmt.models.masa import RelPos2d, _rotate
from rmt.models.reference import reference_rmt

SPEC_PARAMS = {  # ../shared/spec/RMT.md
    "rmt_t": (14_334_216, None),
    "rmt_s": (26_967_240, 27_480_240),
    "rmt_b": (54_154_896, 54_667_896),
    "rmt_l": (95_464_864, 96_105_864),
}


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_param_counts_match_spec(name):
    plain, token_label = SPEC_PARAMS[name]
    with torch.device("meta"):
        assert _trainable(timm.create_model(name)) == plain
        if token_label is not None:
            assert _trainable(timm.create_model(name, token_label=True)) == token_label


@pytest.mark.parametrize("name", ["rmt_t", "rmt_s", "rmt_b", "rmt_l", "rmt_s_tl"])
def test_official_key_layout_loads_exactly(name):
    """Every official key maps onto our model, shapes and decay/rotation buffers included."""
    keys = load_golden(f"official_keys_{name}")["keys"]
    official = {k: (torch.tensor(fixed) if fixed is not None else torch.zeros(shape)) for k, shape, fixed in keys}
    base = name.removesuffix("_tl")
    model = timm.create_model(base, token_label=name.endswith("_tl"))
    result = model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


PARITY_CONFIGS = {
    "tiny-full-last": dict(TINY_ARGS, decomposed=(True, True, False, False), layer_scale=(False, False, True, True)),
    "tiny-all-decomposed": dict(TINY_ARGS, decomposed=(True, True, True, True)),
    "tiny-all-full": dict(TINY_ARGS, decomposed=(False, False, False, False)),
}


@pytest.mark.parametrize("config", list(PARITY_CONFIGS))
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (40, 24)])
def test_fast_matches_oracle_forward_and_gradients(config, size):
    fast, ref = oracle_pair(PARITY_CONFIGS[config])
    x = torch.randn(2, 3, *size)
    for model in (fast, ref):
        model.eval()
    out_fast, out_ref = fast(x), ref(x)
    assert (out_fast - out_ref).abs().max() <= 1e-4
    grad = torch.randn_like(out_fast)
    out_fast.backward(grad)
    out_ref.backward(grad)
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if ".qkv." in name:
            prefix, kind = name.rsplit(".qkv.", 1)
            expected = torch.cat([ref_grads[f"{prefix}.{c}_proj.{kind}"].grad for c in "qkv"])
        else:
            expected = ref_grads[name].grad
        assert (p.grad - expected).abs().max() <= 1e-4, name


def test_full_size_rmt_t_matches_oracle():
    torch.manual_seed(0)
    fast = timm.create_model("rmt_t").eval()
    ref = reference_rmt("rmt_t").eval()
    ref.load_state_dict(official_layout(fast.state_dict()))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (fast(x) - ref(x)).abs().max() <= 1e-4


def test_backward_reaches_every_parameter():
    model = timm.create_model("rmt_t", num_classes=10, drop_path_rate=0.1)
    model.train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(224, 224), (97, 131), (33, 65), (8, 8), (1, 1), (250, 64)])
def test_any_input_size(size):
    model = RMT(**dict(TINY_ARGS, decomposed=(True, True, False, False))).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert out.shape == (1, 10)
    h, w = size
    for f in feats:  # stem /4, then /2 per stage, rounding up (3x3 convs, stride 2, padding 1)
        h, w = -(-h // 4) if f is feats[0] else -(-h // 2), -(-w // 4) if f is feats[0] else -(-w // 2)
        assert f.shape[-2:] == (h, w)


def test_features_only():
    model = timm.create_model("rmt_t", features_only=True, out_indices=(1, 2, 3))
    assert model.feature_info.channels() == [128, 256, 512]
    assert model.feature_info.reduction() == [8, 16, 32]
    feats = model(torch.randn(2, 3, 96, 160))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 12, 20), (2, 256, 6, 10), (2, 512, 3, 5)]
    full = timm.create_model("rmt_t", features_only=True)
    assert full.feature_info.channels() == [64, 128, 256, 512]
    assert len(full(torch.randn(1, 3, 64, 64))) == 4


def test_features_only_drops_unneeded_stages():
    model = timm.create_model("rmt_t", features_only=True, out_indices=(0, 1))
    assert not any(name.startswith(("model.layers.2", "model.layers.3", "model.head", "model.proj"))
                   for name, _ in model.named_parameters())
    assert [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == [64, 128]


def test_intermediates_match_features_and_formats():
    model = RMT(**TINY_ARGS).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        forward_features = model.forward_features(x)
    assert torch.equal(final, forward_features)
    assert torch.equal(feats[-1], forward_features)
    assert torch.equal(nhwc[0], feats[1].permute(0, 2, 3, 1))
    assert torch.equal(nhwc[1], feats[3].permute(0, 2, 3, 1))
    assert [f.shape[1] for f in early] == [96, 128]


def test_timm_head_api():
    model = timm.create_model("rmt_t", num_classes=7, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 1024)
    assert torch.allclose(model.forward_head(feats), model(x))
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 1024)
    assert model.num_features == 512 and model.head_hidden_size == 1024
    with pytest.raises(ValueError):
        model.reset_classifier(5, global_pool="max")


def test_drop_path_override_and_defaults():
    assert timm.create_model("rmt_s").layers[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.15)
    model = timm.create_model("rmt_s", drop_path_rate=0.3)
    assert model.layers[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert isinstance(timm.create_model("rmt_t", drop_path_rate=0.0).layers[3].blocks[-1].drop_path,
                      torch.nn.Identity)


def test_no_weight_decay_and_param_groups():
    model = timm.create_model("rmt_b", num_classes=10)
    assert model.no_weight_decay() == set()

    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():  # norms and biases (1-D) are not decayed; gammas are, as in the reference
        assert (id(p) in decayed) == (p.ndim > 1), name
        assert "relpos" not in name  # the decay/rotation tables are buffers, never optimised


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = RMT(**TINY_ARGS)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.layers)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[n], atol=1e-6), n


def test_registered_in_timm_with_pretrained_cfgs():
    assert sorted(timm.list_models("rmt_*")) == sorted(MODEL_ARGS) == ["rmt_b", "rmt_l", "rmt_s", "rmt_t"]
    for tag in ["rmt_t.in1k", "rmt_s.in1k", "rmt_s.tl_in1k", "rmt_b.tl_in1k", "rmt_l.tl_in1k"]:
        with torch.device("meta"):
            cfg = timm.create_model(tag).pretrained_cfg
        assert cfg["tag"] == tag.split(".")[1]
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
        assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("rmt_t"))
    transform = timm.data.create_transform(**data_cfg)
    assert "Resize(size=256, interpolation=bicubic" in str(transform)
    assert "CenterCrop(size=(224, 224))" in str(transform)


def test_tables_are_cached_and_follow_buffers():
    model = RMT(**TINY_ARGS).eval()
    relpos = model.layers[0].relpos
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        first = relpos(16, 16, torch.zeros(1))
        assert relpos(16, 16, torch.zeros(1)) is first  # cached
        relpos.decay.mul_(2)  # in-place change (what load_state_dict does) invalidates the tables
        assert relpos(16, 16, torch.zeros(1)) is not first
        assert not torch.allclose(model(x), before)
        model.double()
        assert model(x.double()).dtype == torch.float64


class TestTokenLabel:
    args = dict(TINY_ARGS, decomposed=(True, True, True, False))

    def _model(self):
        torch.manual_seed(0)
        return self._train_mode(RMT(**self.args, token_label=True))

    @staticmethod
    def _train_mode(model):
        model.train()
        for m in model.modules():  # batch statistics would couple the images of the batch
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        return model

    def test_eval_output_combines_aux_head(self):
        model = self._model().eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            feats = model.forward_features(x)
            head = model.head(model.forward_head(feats, pre_logits=True))
            aux = model.aux_head(feats.permute(0, 2, 3, 1)).flatten(1, 2)
            assert torch.allclose(model(x), head + 0.5 * aux.amax(1), atol=1e-6)

    def test_train_output_and_mixtoken(self, monkeypatch):
        model = self._model()
        x = torch.randn(2, 3, 64, 64)
        logits, aux, box = model(x)
        assert logits.shape == (2, 10) and aux.shape == (2, 4, 10) and len(box) == 4
        r0, c0, r1, c1 = box
        assert 0 <= r0 <= r1 <= 2 and 0 <= c0 <= c1 <= 2

        def plain(images):
            model.eval()
            with torch.no_grad():
                feats = model.forward_features(images)
                out = model.head(model.forward_head(feats, pre_logits=True))
                aux_out = model.aux_head(feats.permute(0, 2, 3, 1)).flatten(1, 2)
            self._train_mode(model)
            return out, aux_out

        # empty box: nothing mixed
        monkeypatch.setattr(rmt_module, "_cutmix_box", lambda h, w: (0, 0, 0, 0))
        with torch.no_grad():
            logits, aux, _ = model(x)
        expected_logits, expected_aux = plain(x)
        assert torch.allclose(logits, expected_logits, atol=1e-5) and torch.allclose(aux, expected_aux, atol=1e-5)
        # full box: every token comes from the flipped batch; the aux logits are flipped back
        monkeypatch.setattr(rmt_module, "_cutmix_box", lambda h, w: (0, 0, h, w))
        with torch.no_grad():
            logits, aux, _ = model(x)
        flipped_logits, flipped_aux = plain(x.flip(0))
        assert torch.allclose(logits, flipped_logits, atol=1e-5)
        assert torch.allclose(aux, flipped_aux.flip(0), atol=1e-5)

    def test_tag_builds_token_label_model(self):
        with torch.device("meta"):
            assert timm.create_model("rmt_s.tl_in1k").aux_head is not None
            assert timm.create_model("rmt_s").aux_head is None


@pytest.mark.parametrize("decomposed", [True, False])
def test_complex_and_real_rotation_agree(decomposed):
    """The complex-multiply fast path and the real-arithmetic path (used when tracing) rotate alike."""

    relpos = RelPos2d(dim=64, num_heads=4, init_value=2, heads_range=4, decomposed=decomposed)
    tables = relpos(5, 7, torch.zeros(1))
    assert tables.phase is not None
    x = torch.randn(2, 5, 7, 4, 16, requires_grad=True)
    fast = _rotate(x, tables)
    real = _rotate(x, tables._replace(phase=None))
    torch.testing.assert_close(fast, real, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad(fast, x, grad)
    (g_real,) = torch.autograd.grad(real, x, grad)
    torch.testing.assert_close(g_fast, g_real, atol=1e-6, rtol=1e-6)
