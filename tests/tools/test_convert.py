"""`rmt convert`'s dispatch (rmt.tools.convert): a task's registered converter takes the files it
recognises, classification files convert as before, and the dense tasks' model folder."""
import json

import pytest
import torch
from torch import nn

import rmt.segmentation  # noqa: F401  registers the segmentation converter, as the rmt command does
from rmt.errors import RMTError
from rmt.models.hub import HUB_CARD, HUB_CONFIG, HUB_WEIGHTS
from rmt.models.weights import read_metadata
from rmt.tools import convert as registry


@pytest.fixture
def fake_task(monkeypatch):
    """A registered task that recognises files named *.fake and records what it was asked to write."""
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    calls = []

    def write(src, dst, hub, overwrite):
        calls.append((src.name, dst.name, hub, overwrite))
        return "fake model", dst

    registry.register_converter("fake", lambda path: path.suffix == ".fake", write)
    return calls


def test_a_registered_task_gets_the_files_it_recognises(fake_task, tmp_path):
    src = tmp_path / "model.fake"
    src.write_bytes(b"x")
    assert registry.find_converter(src).task == "fake"
    assert registry.convert(src, tmp_path / "out.safetensors") == ("fake", "fake model", tmp_path / "out.safetensors")
    registry.convert(src, tmp_path / "folder", overwrite=True)
    assert fake_task == [("model.fake", "out.safetensors", False, False), ("model.fake", "folder", True, True)]
    with pytest.raises(RMTError, match="a fake checkpoint: --model and --use-ema apply to classification"):
        registry.convert(src, tmp_path / "x.safetensors", model_name="rmt_s")
    with pytest.raises(RMTError, match="the output is a .safetensors file, or a folder"):
        registry.convert(src, tmp_path / "x.onnx")
    with pytest.raises(RMTError, match="checkpoint not found"):
        registry.convert(tmp_path / "missing.fake", tmp_path / "y.safetensors")


def test_a_classification_checkpoint_converts_as_before(fake_task, official_rmt_t, tmp_path):
    assert registry.find_converter(official_rmt_t) is None  # neither segmentation nor the fake task
    task, name, path = registry.convert(official_rmt_t, tmp_path / "rmt_t.safetensors")
    assert (task, name) == ("classification", "rmt_t") and read_metadata(path)["model"] == "rmt_t"
    assert fake_task == []


def test_model_folder_of_a_dense_task(tmp_path):
    model = nn.Conv2d(3, 4, 1)
    folder = registry.save_model_folder(model, tmp_path / "out", dict(task="segmentation", model="rmt_t"),
                                        dict(task="segmentation", arch="upernet"), ["# card", "text"])
    assert sorted(p.name for p in folder.iterdir()) == sorted([HUB_CONFIG, HUB_WEIGHTS, HUB_CARD])
    assert json.loads((folder / HUB_CONFIG).read_text()) == dict(task="segmentation", arch="upernet")
    assert read_metadata(folder / HUB_WEIGHTS) == dict(task="segmentation", model="rmt_t")
    assert (folder / HUB_CARD).read_text() == "# card\ntext\n"
    with pytest.raises(RMTError, match="is not empty"):
        registry.save_model_folder(model, folder, {}, {}, [])
    with torch.no_grad():
        model.weight.zero_()
    registry.save_model_folder(model, folder, dict(task="segmentation"), {}, [], overwrite=True)
    assert read_metadata(folder / HUB_WEIGHTS) == dict(task="segmentation")
