"""Hub-layout model folders (`rmt convert SRC FOLDER`, `save_hub_folder`): loaded by timm's own
`local-dir:` and `hf-hub:` paths and by `rmt predict/export --checkpoint FOLDER`, with the same logits
as the source weights."""
import json

import pytest
import timm
import timm.models._hub as timm_hub
import torch
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

from golden import case_input
from rmt.cli import main
from rmt.data import DigitsDataset
from rmt.errors import RMTError
from rmt.models import checkpoint_info, create_model
from rmt.models.hub import HUB_CARD, HUB_CONFIG, HUB_WEIGHTS, save_hub_folder
from rmt.models.weights import read_metadata, save_weights
from rmt.runtime.classifier import load_classifier
from rmt.tools.export import load_exported

DIGITS_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                 "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "grayscale": True}


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    """A digits run's model.safetensors as `rmt train` writes it: weights plus model name, classes, data config."""
    torch.manual_seed(0)
    model = timm.create_model("rmt_t", num_classes=10)
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    save_weights(model, path, dict(model="rmt_t", class_names=DigitsDataset.classes, num_classes=10,
                                   token_label=False, data_config=DIGITS_CONFIG, epoch=3, val_top1=97.5))
    return path, model.eval()


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_official_checkpoint_to_hub_folder_loads_in_timm(official_rmt_t, tmp_path, capsys):
    folder = tmp_path / "rmt_t_hub"
    assert main(["convert", str(official_rmt_t), str(folder)]) == 0
    assert "Hub-layout folder" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == sorted([HUB_CONFIG, HUB_WEIGHTS, HUB_CARD])
    config = json.loads((folder / HUB_CONFIG).read_text())
    assert config["architecture"] == "rmt_t" and config["num_classes"] == 1000 and "label_names" not in config
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 224, 224] and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["custom_load"] is False and "file" not in cfg and "url" not in cfg
    assert "timm.create_model" in (folder / HUB_CARD).read_text()

    reference = create_model("rmt_t", checkpoint=official_rmt_t)  # the official file, loaded directly
    hub_model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert hub_model.pretrained_cfg["source"] == "local-dir"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _logits(reference, images)
    assert expected.abs().max() > 0.1
    assert torch.equal(_logits(hub_model, images), expected)
    assert torch.equal(_logits(create_model("rmt_t", checkpoint=folder), images), expected)
    assert timm.data.resolve_data_config(model=hub_model)["crop_pct"] == 0.875


def test_hub_folder_loads_through_hf_hub(official_rmt_t, tmp_path, monkeypatch):
    """`hf-hub:` with timm's own download path, the Hub stood in for by the folder (no network in tests)."""

    folder = tmp_path / "repo"
    create_model("rmt_t", checkpoint=official_rmt_t)
    convert_out = main(["convert", str(official_rmt_t), str(folder), "--hub"])
    assert convert_out == 0
    asked = []

    def download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        asked.append((repo_id, filename))
        if not (folder / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(folder / filename)

    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    model = timm.create_model("hf-hub:someone/rmt_t.official", pretrained=True)
    assert ("someone/rmt_t.official", HUB_CONFIG) in asked and ("someone/rmt_t.official", HUB_WEIGHTS) in asked
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(model, images), _logits(create_model("rmt_t", checkpoint=official_rmt_t), images))


def test_digits_run_to_hub_folder_keeps_classes_and_preprocessing(digits_weights, tmp_path, capsys):
    path, model = digits_weights
    folder = tmp_path / "digits"
    assert main(["convert", str(path), str(folder)]) == 0
    config = json.loads((folder / HUB_CONFIG).read_text())
    assert config["label_names"] == DigitsDataset.classes and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["pool_size"] == [1, 1]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    info = checkpoint_info(folder)
    assert info["model"] == "rmt_t" and info["class_names"] == DigitsDataset.classes
    assert info["data_config"]["grayscale"] is True and info["data_config"]["interpolation"] == "bilinear"

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hub_model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert hub_model.pretrained_cfg["label_names"] == DigitsDataset.classes
    assert torch.equal(_logits(hub_model, images), _logits(model, images))
    classifier = load_classifier(None, folder, device="cpu")
    assert classifier.class_names == DigitsDataset.classes and classifier.data_config["grayscale"] is True
    assert torch.equal(_logits(classifier.model, images), _logits(model, images))


def test_predict_and_export_take_a_folder(digits_weights, tmp_path, capsys):
    path, model = digits_weights
    folder = save_hub_folder(model, tmp_path / "digits", model_name="rmt_t", class_names=DigitsDataset.classes,
                             data_config=DIGITS_CONFIG, metrics={"val_top1": 97.5})
    assert "val_top1: 97.50" in (folder / HUB_CARD).read_text()
    image = DigitsDataset("test", img_size=32)[0][0][0]  # one real test digit, (32, 32) in [-1, 1]
    Image.fromarray(((image + 1) * 127.5).clamp(0, 255).byte().numpy()).save(tmp_path / "digit.png")
    assert main(["predict", str(tmp_path / "digit.png"), "--checkpoint", str(folder), "--json", "--topk", "3"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert [e["label"] for e in json.loads(line)["topk"]] == [DigitsDataset.classes[e["index"]]
                                                             for e in json.loads(line)["topk"]]
    out = tmp_path / "digits.pt"
    assert main(["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(load_exported(out)(images), _logits(model, images), atol=1e-4)


def test_token_label_folder(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("rmt_t", num_classes=5, token_label=True).eval()
    folder = save_hub_folder(model, tmp_path / "tl", model_name="rmt_t", class_names=list("abcde"))
    config = json.loads((folder / HUB_CONFIG).read_text())
    assert config["model_args"] == {"token_label": True}
    assert config["pretrained_cfg"]["classifier"] == ["head", "aux_head"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert loaded.aux_head is not None
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(loaded, images), _logits(model, images))


def test_metadata_of_a_converted_run_file(digits_weights, tmp_path):
    """Converting to one file keeps a run's class names and data config too."""
    path, _ = digits_weights
    assert main(["convert", str(path), str(tmp_path / "copy.safetensors")]) == 0
    meta = read_metadata(tmp_path / "copy.safetensors")
    assert meta["class_names"] == DigitsDataset.classes and meta["data_config"]["grayscale"] is True


@pytest.mark.parametrize("name", ["official_tiny", "official_tiny_tl"])
def test_golden_outputs_through_a_folder(golden_checkpoint, tmp_path, name):
    """The official-format file of a golden case -> model -> folder -> timm: the reference logits.

    The golden models are narrower than any variant: their widths and depths travel in ``model_args``."""
    path, data, args = golden_checkpoint(name)
    overlay = dict(file=str(path), num_classes=args["num_classes"])
    model = timm.create_model("rmt_t", pretrained=True, pretrained_cfg_overlay=overlay, **args)
    folder = save_hub_folder(model, tmp_path / name, model_name="rmt_t")
    model_args = json.loads((folder / HUB_CONFIG).read_text())["model_args"]
    assert model_args["embed_dims"] == [32, 64, 96, 128] and model_args["depths"] == [1, 1, 2, 1]
    assert model_args.get("token_label", False) == args.get("token_label", False)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    ours = create_model("rmt_t", checkpoint=folder)
    for case in data["cases"]:
        expected = torch.tensor(case["logits"])
        images = case_input(case)
        assert (_logits(loaded, images) - expected).abs().max() < 1e-4
        assert torch.equal(_logits(ours, images), _logits(loaded, images))


def test_user_errors(official_rmt_t, digits_weights, tmp_path, capsys):
    assert main(["convert", str(official_rmt_t), str(tmp_path / "out.pt")]) == 2
    assert "a .safetensors file, or a folder" in capsys.readouterr().err
    assert main(["convert", str(official_rmt_t), str(tmp_path / "out.safetensors"), "--hub"]) == 2
    assert "drop the .safetensors suffix" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", "x.png", "--checkpoint", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folder without config.json" in err[0]
    with pytest.raises(RMTError, match="2 class names for a model with 10 outputs"):
        save_hub_folder(digits_weights[1], tmp_path / "bad", model_name="rmt_t", class_names=["a", "b"])
    with pytest.raises(RMTError, match="unknown model"):
        save_hub_folder(digits_weights[1], tmp_path / "bad", model_name="rmt_q")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / HUB_CONFIG).write_text("{not json")
    with pytest.raises(RMTError, match="cannot read"):
        checkpoint_info(broken)
