"""`rmt export`: each format is written with a dynamic batch, loaded back in its own runtime and
compared with PyTorch (max abs diff <= 1e-4 in float32); and the deployment exports: constant weights,
`--static` graphs (fixed shapes, MaSA tables as initializers, no control flow), int8 static quantization with
its accuracy report, and ONNX Runtime in `rmt benchmark`."""
import copy
import errno
import json
import math
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import onnx
import pytest
import timm
import torch
from PIL import Image

from conftest import one_line_error, write_run_checkpoint
from rmt.cli import main
from rmt.data import DigitsDataset, collate_skip_bad
from rmt.errors import RMTError
from rmt.models import RMT
from rmt.models.fast.ops import fused_linear, linear_chunks
from rmt.models.hub import save_hub_folder
from rmt.models.masa import MaSA, TokenConv
from rmt.models.rmt import FFN
from rmt.runtime.accuracy import evaluate
from rmt.runtime.classifier import Classifier
from rmt.tools.benchmark import _OnnxRunner, _OpenVINORunner, benchmark, profile_onnx
from rmt.tools.export import ExportVerificationError, export_form, export_model, load_exported, verify_export
from rmt.tools.quantize import (
    OnnxRuntimeModel,
    OpenVINOModel,
    load_exported_classifier,
    openvino_core,
    quantize_linear_dynamic,
    read_export_metadata,
)

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


# ------------------------------------------------ deployment: constant weights, --static graphs, int8, ONNX Runtime
DIGITS_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                 "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "grayscale": True}


@pytest.fixture(scope="module")
def tiny_digits_folder(tiny, tmp_path_factory):
    """The tiny model as a digits model: a Hub folder with the digits classes and preprocessing."""
    return save_hub_folder(tiny, tmp_path_factory.mktemp("tiny") / "digits", model_name="rmt_t",
                           class_names=DigitsDataset.classes, data_config=DIGITS_CONFIG)


def _graph(path):
    return onnx.load(str(path)).graph


def test_fold_keeps_outputs_and_removes_computed_weights(tiny):
    folded = export_form(tiny)  # a copy, through RMT.reparameterize
    assert not any(m.residual for m in folded.modules() if isinstance(m, TokenConv))
    assert any(m.residual for m in tiny.modules() if isinstance(m, TokenConv))  # the original is untouched
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        once = folded(images)
        assert (once - tiny(images)).abs().max() < 1e-5
        folded.reparameterize()  # a second time changes nothing
        assert torch.equal(folded(images), once)


def test_export_form_of_masa(tiny):
    """MaSA's export form: the pair swap and the scale folded into a 5C projection, attention as
    softmax(q k^T + decay) v with scale 1; the same logits eagerly and in a plain-ops trace (the path
    exporters take), full and decomposed MaSA alike."""
    folded = export_form(tiny)
    layers = [m for m in folded.modules() if isinstance(m, MaSA)]
    assert {m.decomposed for m in layers} == {True, False}
    assert all(m.reparameterized and m.qkv.out_features == 5 * m.qkv.in_features for m in layers)
    assert not any(m.reparameterized for m in tiny.modules() if isinstance(m, MaSA))
    images = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny(images)
        assert (folded(images) - expected).abs().max() < 1e-5
        traced = torch.jit.trace(folded, images, check_trace=False)
        assert (traced(images) - expected).abs().max() < 1e-5
    graph = str(traced.inlined_graph)
    assert "aten::scaled_dot_product_attention" in graph and "aten::flip" not in graph  # no pair swap left



def test_export_form_of_the_ffn(tiny):
    """The FFN's export form: NCHW, fc1/fc2 as 1x1 convolutions around the (folded) depthwise one, so that an
    exported graph changes the layout of the C-channel input and output only; the same logits, and the
    model it was made from is untouched."""
    folded = export_form(tiny)
    ffns = [m for m in folded.modules() if isinstance(m, FFN)]
    assert ffns and all(m.reparameterized and isinstance(m.fc1, torch.nn.Conv2d) and m.fc1.kernel_size == (1, 1)
                        and not m.dwconv.residual for m in ffns)
    assert not any(m.reparameterized for m in tiny.modules() if isinstance(m, FFN))
    images = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (folded(images) - tiny(images)).abs().max() < 1e-5
        traced = torch.jit.trace(folded, images, check_trace=False)
    # the FFN's layout changes now move its C-channel input and output, not its hidden tensor: far fewer values
    unfolded_ffns = copy.deepcopy(tiny)
    for module in unfolded_ffns.modules():
        if isinstance(module, (MaSA, TokenConv)):
            module.reparameterize()
    with torch.no_grad():
        before = _permuted_values(torch.jit.trace(unfolded_ffns, images, check_trace=False))
    inputs = []  # what each FFN call permutes now (its input and output) instead of its hidden tensor (twice)
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.append((args[0].numel(), m.fc1.out_channels
                                                                         // m.fc1.in_channels))) for m in ffns]
    with torch.no_grad():
        folded(images)
    for hook in hooks:
        hook.remove()
    saved = sum(2 * numel * (ratio - 1) for numel, ratio in inputs)
    assert _permuted_values(traced) == before - saved


def _permuted_values(traced) -> int:
    """How many tensor elements the permutes of a traced model move."""
    return sum(math.prod(next(n.inputs()).type().sizes()) for n in traced.inlined_graph.nodes()
               if n.kind() == "aten::permute")

@pytest.mark.e2e
def test_static_graph_for_accelerators(tiny, tmp_path, capsys):
    out = tmp_path / "static.onnx"
    result = export_model(tiny, out, "onnx", img_size=(64, 96), static=True, batch_size=2)
    assert result.dynamic == [] and result.batch_size == 2 and result.max_abs_diff < 1e-4
    graph = _graph(out)
    ops = Counter(n.op_type for n in graph.node)
    assert not {"If", "Loop", "Scan", "Shape", "Range"} & set(ops), ops
    for value in list(graph.input) + list(graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        assert all(isinstance(d, int) and d > 0 for d in dims), (value.name, dims)
    # MaSA's attention as ONNX's operator (opset 23), one per pass; the rotation, folded into the projection
    # (MaSA.reparameterize), is a multiply-add
    blocks = [b for stage in tiny.layers for b in stage.blocks]
    decomposed = sum(b.retention.decomposed for b in blocks)
    assert "RotaryEmbedding" not in ops and ops["Attention"] == len(blocks) + decomposed, ops
    assert "Softmax" not in ops, ops
    # every stage's tables are in the file as constants: no rotation is computed in the graph, and the
    # decay biases are initializers (columns: one copy per head; the exporter leaves a slice of a large
    # table unfolded, which runtimes fold when they load the graph)
    assert not {"Cos", "Sin"} & set(ops), ops
    initializers = {i.name for i in graph.initializer}
    assert all(n.input[0] in initializers for n in graph.node if n.op_type == "Slice")
    constants = [torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.initializer]
    frozen = export_form(tiny, torch.zeros(1, 3, 64, 96))  # through RMT.freeze_tables
    for stage in frozen.layers:
        tables, heads = stage.relpos, stage.blocks[0].retention.num_heads
        expected = {"bias": [tables.bias]}
        if tables.bias_h is not None:  # the whole table is there, or the slice of it the graph uses
            expected["bias_h"] = [tables.bias_h[:, :heads], tables.bias_h]
        for name, candidates in expected.items():
            assert any(c.shape == t.shape and torch.equal(c, t) for t in candidates for c in constants), \
                (tables.grid, name)
    # and it runs in ONNX Runtime like PyTorch, on new inputs of its shape
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = tiny(images)
    assert (load_exported(out)(images) - expected).abs().max() < 1e-4
    with pytest.raises(ValueError, match="frozen for a 16x24 token grid, got 8x8"):
        frozen(torch.zeros(1, 3, 32, 32))
    # the command
    assert main(["export", "--checkpoint", "x.pth", "--format", "torchscript", "--output", "x.pt", "--static"]) == 2
    assert "--static is for --format onnx" in capsys.readouterr().err


@pytest.fixture(scope="module")
def int8_export(tiny_digits_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    return export_model(None, out, "onnx", checkpoint=tiny_digits_folder, quantize="int8", calib_images=64)


@pytest.mark.e2e
def test_float_export_weights_are_initializers(int8_export):
    """The residual depthwise convs reach the graph folded: every conv/linear weight is a constant."""
    graph = _graph(int8_export.quantization["float_path"])
    constants = {i.name for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) >= 20
    assert all(n.input[1] in constants for n in convs), [n.name for n in convs if n.input[1] not in constants]


@pytest.mark.e2e
def test_int8_on_the_runs_own_data(tiny, int8_export):
    """Defaults for a digits model: calibrated on the digits train split, evaluated on the test split;
    the float32 accuracy reported is the PyTorch model's."""
    result, out = int8_export, int8_export.path
    tmp_path = out.parent
    q = result.quantization
    assert result.path == out and q["int8_path"] == str(out) and q["float_path"] == str(tmp_path / "int8.fp32.onnx")
    assert q["calibration"] == "the digits train split" and q["calib_images"] == 64
    assert q["evaluation"] == "the digits test split" and q["eval_images"] == 360
    test_set = DigitsDataset("test", img_size=32)
    loader = torch.utils.data.DataLoader(test_set, batch_size=64, collate_fn=collate_skip_bad)
    torch_acc = evaluate(tiny, loader, torch.device("cpu"), progress=False)
    assert q["float_top1"] == pytest.approx(torch_acc["top1"]) and q["float_top5"] == pytest.approx(torch_acc["top5"])
    assert abs(q["int8_top1"] - q["float_top1"]) < 5 and q["agreement"] > 90
    assert q["int8_mb"] < q["float_mb"] / 2
    graph = _graph(out)
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8_weights) >= 20  # convolution and linear weights stored as int8
    # what the report says matches a fresh ONNX Runtime session on the int8 file
    fresh = evaluate(OnnxRuntimeModel(out), loader, torch.device("cpu"), progress=False)
    assert fresh["top1"] == pytest.approx(q["int8_top1"])


@pytest.mark.e2e
def test_int8_with_image_folders(tiny_digits_folder, tmp_path, capsys):
    """--calib-data (any images) and --eval-data (class folders), through the command."""
    calib, evaluation = tmp_path / "calib", tmp_path / "eval"
    test_set = DigitsDataset("test", img_size=32)
    for i in range(40):
        image, label = test_set[i]
        picture = Image.fromarray(((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy())
        (evaluation / str(label)).mkdir(parents=True, exist_ok=True)
        picture.save(evaluation / str(label) / f"{i}.png")
        (calib / "nested").mkdir(parents=True, exist_ok=True)
        picture.save(calib / "nested" / f"{i}.png")
    (calib / "notes.txt").write_text("not an image")
    out = tmp_path / "int8.onnx"
    assert main(["export", "--checkpoint", str(tiny_digits_folder), "--format", "onnx", "--output", str(out),
                 "--quantize", "int8", "--calib-data", str(calib), "--eval-data", str(evaluation)]) == 0
    printed = capsys.readouterr().out
    assert f"calibrated on 40 images of {calib}" in printed
    assert f"accuracy on 40 images of {evaluation}: float32 top-1" in printed and "points lost" in printed


def test_int8_user_errors(tiny_digits_folder, tmp_path, capsys):
    base = ["export", "--checkpoint", str(tiny_digits_folder), "--output", str(tmp_path / "m.onnx")]
    cases = [
        (["--format", "torchscript", "--quantize", "int8"], "--quantize is for --format onnx"),
        (["--format", "onnx", "--calib-data", str(tmp_path)], "go with --quantize int8"),
        (["--format", "onnx", "--quantize", "int8", "--calib-data", str(tmp_path / "none")], "no such folder"),
        (["--format", "onnx", "--quantize", "int8", "--calib-data", str(tmp_path)], "no image files"),
        (["--format", "onnx", "--batch-size", "4"], "--batch-size fixes the batch of a --static export"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)


@pytest.fixture(scope="module")
def openvino_int8_export(tiny, tmp_path_factory):
    """The tiny model as a digits model read at 64 px (OpenVINO exports need a last stage of more than one token)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    folder = save_hub_folder(tiny, tmp_path_factory.mktemp("tiny64") / "digits", model_name="rmt_t",
                             class_names=DigitsDataset.classes, data_config=dict(DIGITS_CONFIG, input_size=[3, 64, 64]))
    out = tmp_path_factory.mktemp("ov") / "int8.xml"
    return export_model(None, out, "openvino", checkpoint=folder, quantize="int8", calib_images=64)


@pytest.mark.e2e
def test_openvino_float_and_int8_on_the_runs_own_data(tiny, openvino_int8_export):
    """--format openvino: the float32 IR matches PyTorch (dynamic batch, fixed size), its MaSA is
    OpenVINO's fused attention; --quantize int8 quantizes it with NNCF on the digits train split and
    reports both accuracies on the test split, the float32 one equal to PyTorch's."""

    result, out = openvino_int8_export, openvino_int8_export.path
    q = result.quantization
    assert result.format == "openvino" and result.dynamic == ["batch"] and result.max_abs_diff < 1e-4
    assert q["float_path"] == str(out.parent / "int8.fp32.xml") and (out.parent / "int8.fp32.bin").is_file()
    assert q["calibration"] == "the digits train split" and q["calib_images"] == 64
    assert q["evaluation"] == "the digits test split" and q["eval_images"] == 360
    test_set = DigitsDataset("test", img_size=64)
    loader = torch.utils.data.DataLoader(test_set, batch_size=64, collate_fn=collate_skip_bad)
    torch_acc = evaluate(tiny, loader, torch.device("cpu"), progress=False)
    assert q["float_top1"] == pytest.approx(torch_acc["top1"])
    assert abs(q["int8_top1"] - q["float_top1"]) < 5 and q["agreement"] > 90
    core = openvino_core()
    float_ops = Counter(op.get_type_name() for op in core.read_model(q["float_path"]).get_ops())
    assert float_ops["ScaledDotProductAttention"] > 0 and not float_ops["Slice"], float_ops
    int8_ops = Counter(op.get_type_name() for op in core.read_model(str(out)).get_ops())
    assert int8_ops["FakeQuantize"] + int8_ops["FakeConvert"] > 0, int8_ops
    assert read_export_metadata(out)["class_names"] == DigitsDataset.classes  # rmt predict reads them
    assert read_export_metadata(out)["data_config"]["input_size"] == [3, 64, 64]
    fresh = evaluate(OpenVINOModel(out), loader, torch.device("cpu"), progress=False)
    assert fresh["top1"] == pytest.approx(q["int8_top1"])
    run = load_exported(q["float_path"])  # read back by its suffix, any batch
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (run(images) - tiny(images)).abs().max() < 1e-4


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_predict_runs_an_exported_model(tiny, tiny_digits_folder, tmp_path, capsys, fmt, suffix):
    """`rmt predict --checkpoint FILE.onnx|.xml` runs the exported graph with the class names and preprocessing the
    export stored in it -- here a 32-px digits model exported at 64 px: images are read grey at 64 px -- and gives
    PyTorch's probabilities."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    out = tmp_path / f"digits{suffix}"
    export_model(None, out, fmt, checkpoint=tiny_digits_folder, img_size=(64, 64))
    paths = []
    for i in range(3):
        pixels = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels.numpy()).save(paths[-1])
    assert main(["predict", "--checkpoint", str(out), "--json", "--topk", "10", *map(str, paths)]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reference = Classifier(tiny, dict(DIGITS_CONFIG, input_size=[3, 64, 64]), DigitsDataset.classes, device="cpu",
                           amp="none")
    for path, result in zip(paths, got):
        probs = reference.probabilities(reference.preprocess(reference.read(path))[None])[0]
        order = probs.argsort(descending=True).tolist()
        assert [e["label"] for e in result["topk"]] == [DigitsDataset.classes[i] for i in order]
        assert max(abs(e["prob"] - probs[e["index"]].item()) for e in result["topk"]) < 1e-5


def test_predict_refuses_an_exported_model_without_our_metadata(tiny, tmp_path):
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(path), dynamo=False)
    with pytest.raises(RMTError, match="does not say how to read images"):
        load_exported_classifier(path)


def test_openvino_user_errors(tiny, tmp_path, capsys):
    with pytest.raises(RMTError, match="written to a .xml file"):
        export_model(tiny, tmp_path / "m.onnx", "openvino", img_size=(64, 64))
    with pytest.raises(RMTError, match="needs an input of at least 33 px"):
        export_model(tiny, tmp_path / "m.xml", "openvino", img_size=(32, 32))
    with pytest.raises(RMTError, match="OpenVINO export has a fixed height and width"):
        export_model(tiny, tmp_path / "m.xml", "openvino", img_size=(64, 64), dynamic_size=True)
    with pytest.raises(RMTError, match="--static is for --format onnx"):
        export_model(tiny, tmp_path / "m.xml", "openvino", static=True)


_SIGNAL_AFTER_OPENVINO = """
import gc, os, signal, sys
import openvino as ov
import torch
from rmt.tools.quantize import openvino_compiled, save_openvino
save_openvino(ov.convert_model(torch.nn.Conv2d(3, 4, 3), example_input=torch.randn(1, 3, 8, 8)), sys.argv[1])
first = openvino_compiled(sys.argv[1])
second = openvino_compiled(sys.argv[1], threads=1)
del first
gc.collect()
del second
gc.collect()
handled = []
signal.signal(signal.SIGTERM, lambda *_: handled.append(True))
os.kill(os.getpid(), signal.SIGTERM)
print("handled" if handled else "not handled")
"""


@pytest.mark.e2e
def test_signals_still_work_after_openvino_models_are_freed(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's signal stack for each Core and puts the previous one
    back when the Core dies: models compiled on two Cores and freed in order left the thread on a freed
    stack, and the next Python signal handler (SIGTERM during a training run in the same process)
    crashed it with SIGSEGV. All our models share one Core, so the handler runs."""
    pytest.importorskip("openvino")
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_OPENVINO, str(tmp_path / "conv.xml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1:] == ["handled"], (done.returncode, done.stderr[-2000:])


@pytest.mark.e2e
def test_openvino_runner(tiny, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    runner = _OpenVINORunner("tiny", tiny, "openvino", 2, (64, 64), tmp_path)
    assert runner.path.name == "tiny_b2_64x64.xml" and runner.parity < 1e-4 and runner.timed() > 0
    int8 = _OpenVINORunner("tiny", tiny, "openvino-int8", 2, (64, 64), tmp_path)
    assert int8.path.name == "tiny_b2_64x64.int8.xml" and int8.timed() > 0 and int8.parity is None


@pytest.mark.e2e
def test_onnxruntime_runner_and_profile(tiny, tmp_path):
    runner = _OnnxRunner("tiny", tiny, "onnxruntime", 2, (32, 32), tmp_path)
    assert runner.parity < 1e-4 and runner.timed() > 0
    int8 = _OnnxRunner("tiny", tiny, "onnxruntime-int8", 2, (32, 32), tmp_path)
    assert int8.path.name == "tiny_b2_32x32.int8.onnx" and int8.timed() > 0
    rows = profile_onnx(runner.path, 2, (32, 32), iters=2)
    ops = {r["op"] for r in rows}
    # MaSA's attention is ONNX's operator; its rotation, folded into the projection, is a multiply-add
    assert {"Attention", "Gemm"} <= ops and "RotaryEmbedding" not in ops, ops
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert all(r["ms"] >= 0 and r["nodes"] >= 1 for r in rows)


def test_pytorch_dynamic_int8(tiny):
    """PyTorch's own int8 path: every linear layer becomes torch.ao's dynamic int8 Linear, which the
    blocks' fused linear calls run through its own forward; the float model is left as it was."""
    int8 = quantize_linear_dynamic(tiny)
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    assert all(type(m) is torch.nn.Linear for m in (tiny.head, tiny.layers[0].blocks[0].retention.qkv))
    layer = int8.layers[0].blocks[0].ffn.fc2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, layer.in_features, generator=g)
    residual = torch.randn(2, 4, 4, layer.out_features, generator=g)
    scale = torch.rand(layer.out_features, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(fused_linear(x, layer, gelu=True, scale=scale, residual=residual),
                                   residual + scale * torch.nn.functional.gelu(layer(x)), rtol=0, atol=0)
        qkv = int8.layers[0].blocks[0].retention.qkv
        x = torch.randn(2, 4, 4, qkv.in_features, generator=g)
        assert all(torch.equal(a, b) for a, b in zip(linear_chunks(x, qkv, 3), qkv(x).chunk(3, -1)))
        images = torch.randn(4, 3, 64, 64, generator=g)
        expected, got = tiny(images), int8(images)
    # int8 weights and activations: within 5% of the largest logit (measured 2.8%), same top-1
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_benchmark_eager_int8_backend():
    rows = benchmark(["rmt_t"], batch_size=1, img_size=(32, 32), iters=1, warmup=0, memory=False,
                     backends=("eager", "eager-bf16", "eager-int8"))
    assert [(r.model, r.backend, r.amp) for r in rows] == [("rmt_t", "eager", None), ("rmt_t", "eager-bf16", "bf16"),
                                                          ("rmt_t", "eager-int8", None)]
    assert all(r.img_per_s > 0 for r in rows)
    with pytest.raises(RMTError, match="eager-int8 times inference only"):
        benchmark(["rmt_t"], backends=("eager-int8",), mode="train")


def test_benchmark_backend_errors(capsys):
    with pytest.raises(RMTError, match="backend must be among"):
        benchmark(["rmt_t"], backends=("tensorrt",))
    with pytest.raises(RMTError, match="inference only"):
        benchmark(["rmt_t"], backends=("onnxruntime",), mode="train")
    with pytest.raises(RMTError, match="for the eager backend"):
        benchmark(["rmt_t"], backends=("eager", "onnxruntime"), amp="bf16")
    with pytest.raises(RMTError, match="eager-bf16 is eager with --amp bf16"):
        benchmark(["rmt_t"], backends=("eager", "eager-bf16"), amp="bf16")
    assert main(["benchmark", "rmt_t", "--profile", "--no-peers"]) == 2
    assert "--profile shows ONNX Runtime" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_benchmark_onnxruntime(capsys):
    assert main(["benchmark", "rmt_t", "--no-peers", "--batch-size", "1", "--img-size", "32", "32", "--iters", "1",
                 "--warmup", "0", "--backend", "eager", "onnxruntime", "onnxruntime-int8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["backend"]) for r in rows] == [("rmt_t", "eager"), ("rmt_t", "onnxruntime"),
                                                         ("rmt_t", "onnxruntime-int8")]
    assert rows[1]["parity"] < 1e-4 and all(r["img_per_s"] > 0 for r in rows)


# ------------------------------------------------------------------------------- user errors of the tools
@pytest.fixture
def tiny_export(monkeypatch):
    """`rmt export` of a tiny classifier standing in for a checkpoint's."""
    torch.manual_seed(0)
    tiny = RMT(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), projection=32, num_classes=3)
    config = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
              "crop_pct": 1.0}
    classifier = Classifier(tiny.eval(), config, device="cpu")
    monkeypatch.setattr("rmt.tools.export.load_classifier", lambda *a, **k: classifier)


def test_export_onto_a_full_disk_keeps_the_old_file(tiny_export, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous export")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    err = one_line_error(capsys, main(["export", "--checkpoint", "x.pth", "--format", "torchscript", "--output",
                                       str(out), "--no-verify"]))
    monkeypatch.undo()
    assert "no space left on the device to write" in err and "the previous model.pt is kept" in err
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_export_refuses_an_opset_it_cannot_write(tiny_export, tmp_path, capsys):
    err = one_line_error(capsys, main(["export", "--checkpoint", "x.pth", "--format", "onnx", "--output",
                                       str(tmp_path / "m.onnx"), "--opset", "3", "--static-size"]))
    assert "cannot convert this model to opset 3" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("argv,message", [
    (["flops", "rmt_t", "--img-size", "0", "224"], "must be a positive integer"),
    (["flops", "rmt_t", "--img-size", "-32", "32"], "must be a positive integer"),
    (["export", "--checkpoint", "x.pth", "--format", "onnx", "--output", "m.onnx", "--atol", "nan"],
     "not a finite number"),
    (["visualize", "decay", "--model", "rmt_t", "--output", "d.xyz"], "cannot write .xyz pictures"),
    (["benchmark", "rmt_t", "--iters", "0"], "must be a positive integer"),
])
def test_tool_values_that_cannot_be_honoured_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(capsys, main(argv))
