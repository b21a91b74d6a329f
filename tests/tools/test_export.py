"""`rmt export`: each format is written with a dynamic batch, loaded back in its own runtime and
compared with PyTorch (max abs diff <= 1e-4 in float32)."""
import json

import pytest
import timm
import torch

from conftest import write_run_checkpoint
from rmt.cli import main
from rmt.errors import RMTError
from rmt.runtime.classifier import Classifier
from rmt.tools.export import ExportVerificationError, export_model, load_exported, verify_export
from rmt.tools.quantize import openvino_core

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(golden_tiny):
    return golden_tiny


def _check_independently(model, path, fmt, shapes):
    """Run the exported file on fresh inputs, outside export_model's own verification."""
    run = load_exported(path, fmt)
    for shape in shapes:
        images = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = model(images)
        assert expected.abs().max() > 0.1  # the comparison is not between near-zero numbers
        got = run(images)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= ATOL, (fmt, shape)


def test_torchscript_dynamic_batch_and_size(tiny, tmp_path):
    result = export_model(tiny, tmp_path / "tiny.pt", "torchscript", img_size=(32, 32))
    assert result.dynamic == ["batch", "height", "width"]
    assert [c["shape"] for c in result.checks] == [[2, 3, 32, 32], [1, 3, 32, 32], [3, 3, 32, 32], [1, 3, 64, 96]]
    assert result.max_abs_diff <= ATOL
    _check_independently(tiny, result.path, "torchscript", [(4, 3, 32, 32), (2, 3, 48, 80)])


def test_exported_program_dynamic_batch(tiny, tmp_path):
    # a 32 px example: the last stage is 1x1, so torch.export specialises height/width (see export.py)
    result = export_model(tiny, tmp_path / "tiny.pt2", "exported-program", img_size=(32, 32))
    assert result.dynamic == ["batch"] and result.max_abs_diff <= ATOL
    _check_independently(tiny, result.path, None, [(5, 3, 32, 32)])  # format read off the .pt2 suffix


@pytest.mark.parametrize("opset", [None, 18])
def test_onnx_dynamic_batch_in_onnxruntime(tiny, tmp_path, opset):
    """The default opset (23) writes MaSA's attention as ONNX's Attention operator; an earlier one writes
    the same arithmetic in plain ops. Both run in ONNX Runtime like PyTorch."""
    import onnx
    import onnxruntime

    result = export_model(tiny, tmp_path / "tiny.onnx", "onnx", img_size=(32, 32), opset=opset)
    assert result.dynamic == ["batch"] and result.max_abs_diff <= ATOL
    model = onnx.load(str(result.path))
    ops = {n.op_type for n in model.graph.node}
    opset_written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset is None:
        # the rotation is folded into the projection (MaSA.reparameterize): a multiply-add, no RotaryEmbedding
        assert opset_written == 23 and "Attention" in ops and not {"RotaryEmbedding", "Softmax"} & ops, ops
    else:
        assert opset_written == opset and not {"Attention", "RotaryEmbedding"} & ops and "Softmax" in ops, ops
    [images] = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).get_inputs()
    assert images.name == "images" and isinstance(images.shape[0], str) and images.shape[1:] == [3, 32, 32]
    _check_independently(tiny, result.path, "onnx", [(4, 3, 32, 32)])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_dynamic_height_and_width(tiny, tmp_path, fmt):
    result = export_model(tiny, tmp_path / f"tiny.{fmt}", fmt, img_size=(64, 64))
    assert result.dynamic == ["batch", "height", "width"] and result.max_abs_diff <= ATOL
    _check_independently(tiny, result.path, fmt, [(2, 3, 96, 64), (1, 3, 40, 72)])


def test_verification_catches_a_wrong_export(tiny):
    shapes = [(2, 3, 32, 32)]
    [check] = verify_export(tiny, lambda images: tiny(images) + 1e-3, shapes)
    assert check["shape"] == [2, 3, 32, 32] and check["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ExportVerificationError, match=r"returns \[2, 9\] for input \[2, 3, 32, 32\]"):
        verify_export(tiny, lambda images: tiny(images)[:, :9], shapes)
    with pytest.raises(ExportVerificationError, match="fails on input"):
        verify_export(tiny, lambda images: images.view(-1, 7), shapes)


def test_user_errors(tiny, tmp_path, capsys):
    with pytest.raises(RMTError, match="at least 33 px"):
        export_model(tiny, tmp_path / "x.onnx", "onnx", img_size=(32, 32), dynamic_size=True)
    with pytest.raises(RMTError, match="unknown export format"):
        export_model(tiny, tmp_path / "x.tflite", "tflite")
    with pytest.raises(RMTError, match="no exported model"):
        load_exported(tmp_path / "missing.onnx")
    assert main(["export", "--checkpoint", str(tmp_path / "none.pth"), "--format", "onnx",
                 "--output", str(tmp_path / "x.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # argparse rejects the format: a usage error, status 2
    assert main(["export", "--checkpoint", "x.pth", "--format", "tflite", "--output", "x.tflite"]) == 2


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "crop_pct": 1.0}
    meta = dict(task="classification", model="rmt_t", class_names=list("abcd"), num_classes=4, token_label=False,
                data_config=config)
    return write_run_checkpoint(tmp_path_factory.mktemp("run") / "best.pth",
                                timm.create_model("rmt_t", num_classes=4), meta)


def test_cli_prints_the_checks(tiny, tmp_path, capsys, monkeypatch):
    """The command's wiring and output, with the tiny model standing in for a checkpoint's."""
    config = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
              "crop_pct": 1.0}
    monkeypatch.setattr("rmt.tools.export.load_classifier",
                        lambda *a, **k: Classifier(tiny, config, device="cpu"))
    out = tmp_path / "tiny.pt"
    assert main(["export", "--checkpoint", "ignored.pth", "--format", "torchscript", "--output", str(out),
                 "--static-size"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {out} (torchscript, example input 3x32x32; dynamic: batch)"
    assert [line.split(":")[0] for line in lines[1:4]] == ["  input 2x3x32x32", "  input 1x3x32x32",
                                                          "  input 3x3x32x32"]
    assert lines[4].startswith("verified: max abs diff ") and lines[4].endswith("<= 0.0001")
    # the atol guard of export_model itself: an export that differs is refused
    monkeypatch.setattr("rmt.tools.export.verify_export", lambda *a, **k: [{"shape": [2, 3, 32, 32],
                                                                             "max_abs_diff": 0.5}])
    assert main(["export", "--checkpoint", "ignored.pth", "--format", "torchscript", "--output", str(out),
                 "--static-size"]) == 2
    assert "differs from the PyTorch model by up to 0.5" in capsys.readouterr().err
    # a tolerance that can never hold is a usage error
    assert main(["export", "--checkpoint", "ignored.pth", "--format", "torchscript", "--output", str(out),
                 "--atol", "-1"]) == 2
    assert "--atol: must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_torchscript_of_a_run_checkpoint(run_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(run_checkpoint), "--format", "torchscript", "--output", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and result["input_size"] == [3, 64, 64]
    assert result["dynamic"] == ["batch", "height", "width"] and result["max_abs_diff"] <= ATOL
    assert load_exported(out)(torch.randn(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_cli_other_formats_of_a_run_checkpoint(run_checkpoint, tmp_path, capsys, fmt):
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    assert main(["export", "--checkpoint", str(run_checkpoint), "--format", fmt, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} ({fmt}, example input 3x64x64; dynamic: batch, height, width)")
    assert "input 1x3x96x128: max abs diff vs PyTorch" in printed and "verified: max abs diff" in printed


def _traced_with_check(model, images):
    """``torch.jit.trace`` with its default check, which traces again (under ``no_grad``) and compares graphs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit is deprecated
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(model, images)


def test_jit_trace_passes_its_own_check(tiny):
    """The traced graph depends on the input's shape only, not on grad mode or the table cache: the
    fast paths pick their fusions by grad mode, which made the check's second trace differ."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tiny(images)  # tables cached by an eager call first, as in a user's session
    traced = _traced_with_check(tiny, images)
    with torch.no_grad():
        assert (traced(images) - tiny(images)).abs().max() <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name,token_label", [("rmt_t", False), ("rmt_s", False), ("rmt_b", False),
                                              ("rmt_l", False), ("rmt_s", True)])
def test_jit_trace_passes_its_check_on_every_variant(name, token_label):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, token_label=token_label).eval()
    images = torch.randn(1, 3, 64, 64)
    traced = _traced_with_check(model, images)
    with torch.no_grad():
        assert (traced(images) - model(images)).abs().max() <= ATOL


@pytest.mark.slow
def test_openvino_convert_model_of_a_timm_model():
    """How OpenVINO users convert timm models: ``convert_model(model, example_input=x)`` traces it."""
    ov = pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = timm.create_model("rmt_t", num_classes=10).eval()
    images = torch.randn(1, 3, 64, 64)
    compiled = openvino_core().compile_model(ov.convert_model(model, example_input=images), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        expected = model(images)
    assert (torch.from_numpy(compiled(images.numpy())[0]) - expected).abs().max() <= ATOL
