"""Loading official checkpoints and our own format; clear failures for the wrong ones."""
import collections
import logging

import pytest
import timm
import torch

from golden import case_input, load_golden, official_state_dict
from rmt.cli import main
from rmt.errors import RMTError
from rmt.models import CheckpointError, CheckpointMismatchError, convert_checkpoint
from rmt.models.factory import create_model, split_name
from rmt.models.weights import read_metadata


def _load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def test_convert_to_safetensors_keeps_outputs(official_rmt_t, tmp_path, capsys):
    out = tmp_path / "rmt_t.safetensors"
    assert main(["convert", str(official_rmt_t), str(out)]) == 0
    assert "rmt_t" in capsys.readouterr().out
    assert read_metadata(out)["model"] == "rmt_t"
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(_load("rmt_t", official_rmt_t)(x), _load("rmt_t", out)(x))


def test_wrong_variant_names_the_checkpoint_and_first_keys(official_rmt_t):
    with pytest.raises(CheckpointMismatchError) as err:
        _load("rmt_s", official_rmt_t)
    message = str(err.value)
    assert "rmt_t checkpoint" in message and "rmt_s" in message
    # the first key of each kind of misfit: a shape that differs, and the first block rmt_t lacks
    assert "first layers.0.blocks.0.ffn.fc1.weight: checkpoint (192, 64) vs model (256, 64)" in message
    assert "keys missing, first: layers.0.blocks.2." in message


def test_wrong_variant_on_the_cli_is_one_line(official_rmt_t, tmp_path, capsys):
    assert main(["convert", str(official_rmt_t), str(tmp_path / "x.safetensors"), "--model", "rmt_b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmt: error:") and "rmt_t checkpoint" in err and "\n" not in err
    assert "Traceback" not in err


def test_debug_shows_traceback(official_rmt_t, tmp_path):
    with pytest.raises(CheckpointMismatchError):
        main(["convert", str(official_rmt_t), str(tmp_path / "x.safetensors"), "--model", "rmt_b", "--debug"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_unreadable_files_fail_clearly(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        _load("rmt_t", path)


def test_truncated_official_file(official_rmt_t, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(official_rmt_t.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError):
        _load("rmt_t", path)


def test_non_weight_pickle_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"layer": [1, 2, 3]}}, path)
    with pytest.raises(CheckpointError, match="not a tensor"):
        _load("rmt_t", path)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "extra": collections.Counter(a=1)}, path)  # not an allowed global
    with pytest.raises(CheckpointError):
        _load("rmt_t", path)


def test_pretrained_without_file_explains_where_weights_are():
    with pytest.raises(CheckpointError, match="pretrained_cfg_overlay"):
        timm.create_model("rmt_s", pretrained=True)


def test_finetune_head_and_input_channels(official_rmt_t):
    official = _load("rmt_t", official_rmt_t)
    model = _load("rmt_t", official_rmt_t, num_classes=5, in_chans=1)
    assert model.head.out_features == 5
    assert torch.equal(model.layers[2].blocks[3].ffn.fc1.weight, official.layers[2].blocks[3].ffn.fc1.weight)
    assert model.patch_embed.proj[0].weight.shape[1] == 1


def test_features_only_loads_official_weights(official_rmt_t):
    backbone = timm.create_model("rmt_t", features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(official_rmt_t)))
    official = _load("rmt_t", official_rmt_t)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = official.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(backbone.eval()(x), expected))


def test_token_label_checkpoint_into_plain_model_warns(golden_checkpoint, caplog):
    path, data, args = golden_checkpoint("official_tiny_tl")
    args.pop("token_label")
    with caplog.at_level(logging.WARNING):
        model = timm.create_model("rmt_t", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **args)
    assert model.aux_head is None
    assert "aux_head" in caplog.text


def test_factory_reads_class_count_and_head_from_checkpoint(golden_checkpoint):
    path, data, args = golden_checkpoint("official_tiny_tl")
    arch = {k: v for k, v in args.items() if k not in ("num_classes", "token_label")}
    model = create_model("rmt_t", checkpoint=path, **arch).eval()
    assert model.num_classes == 10 and model.aux_head is not None
    case = data["cases"][0]
    with torch.no_grad():
        assert torch.allclose(model(case_input(case)), torch.tensor(case["logits"]), atol=1e-4)


def test_convert_rejects_unknown_architecture(golden_checkpoint, tmp_path):
    path, _, _ = golden_checkpoint("official_tiny")
    with pytest.raises(CheckpointMismatchError, match="no RMT variant"):
        convert_checkpoint(path, tmp_path / "x.safetensors")


@pytest.mark.parametrize("name,message", [("rmt_x", "did you mean 'rmt_t'"), ("RMT_S", "rmt_s"),
                                          ("rmt_s.tl", "tags: in1k, tl_in1k"), ("convnext", "choose from")])
def test_model_names_are_checked(name, message):
    with pytest.raises(RMTError, match=message):
        split_name(name)


def test_model_weights_preferred_over_ema(tmp_path):
    """Official files carry `model` and `model_ema`; the reference evaluates `model`."""
    keys = load_golden("official_keys_rmt_t")["keys"]
    weights = official_state_dict(keys)
    ema = {k: (v + 1 if v.is_floating_point() and "Relpos" not in k else v) for k, v in weights.items()}
    path = tmp_path / "both.pth"
    torch.save({"model_ema": ema, "model": weights}, path)
    model = _load("rmt_t", path)
    assert torch.equal(model.head.weight, weights["head.weight"])
