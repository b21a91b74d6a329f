"""Exporting a classifier to ONNX, TorchScript or a ``torch.export`` program (``rmt export``).

Every export is checked right after it is written: the file is loaded back (ONNX with ONNX
Runtime) and run on random inputs of several batch sizes (and image sizes, when those are dynamic);
the largest absolute difference to the PyTorch model's logits is reported, and the export fails
when it exceeds ``atol``.

What each format supports (all in float32, eval mode):

=================== =========================== =============================================
format              file                        dynamic dimensions
=================== =========================== =============================================
exported-program    ``torch.export.save`` .pt2  batch, height, width (height/width >= 33 px)
onnx                ONNX (weights embedded)     batch, height, width (height/width >= 33 px)
torchscript         ``torch.jit.trace`` .pt     batch, height, width (any size)
openvino            OpenVINO IR .xml + .bin     batch
=================== =========================== =============================================

The MaSA tables (decay biases, rotation) are built inside the graph when a model is traced or
exported (see :class:`rmt.models.masa.RelPos2d`), which is what makes height and width dynamic.
``torch.export`` proves its shape guards for sizes of at least 33 pixels (below that the last
stage has a single token and the graph specialises), so for ONNX and exported programs, models
whose own input is smaller (the 32x32 digits models) are exported with a fixed height and width
unless a larger ``img_size`` is given. A TorchScript trace records the size arithmetic itself and
works at any size; like the others, it is checked at a second, non-square size after export.

Every weight reaches the exported graph as a constant: the residual depthwise convolutions
(``x + DWConv(x)``, computed in eager mode as one convolution with ``weight + centre``) are folded
into plain convolutions on a copy of the model first (:func:`export_form`, through
:meth:`rmt.models.rmt.RMT.reparameterize`), so graph tools that need constant weights (ONNX Runtime's
quantizer, TensorRT) see them.

``static=True`` (ONNX) fixes every dimension, batch included, and computes the MaSA tables of that
size ahead of time (:meth:`rmt.models.rmt.RMT.freeze_tables`): they become initializers, and the graph
holds no size arithmetic and no control flow -- what TensorRT builders want.

ONNX exports at opset 23 or later (the default) write MaSA's passes as ONNX's ``Attention``
operator (the export form, :meth:`rmt.models.masa.MaSA.reparameterize`: its rotation is a multiply-add),
which ONNX Runtime runs as single kernels; an earlier ``opset`` (for runtimes without those operators)
gets the same arithmetic in plain ops (``MatMul``, ``Softmax``, ...).

OpenVINO exports are made by ``openvino.convert_model`` from the export form of the model (weights
folded, MaSA tables of the example's size as constants, see :func:`export_form`): a dynamic
batch, a fixed height and width, float32 weights; they are loaded back (and timed) in float32
(``INFERENCE_PRECISION_HINT`` ``f32``: OpenVINO would otherwise run bfloat16 on CPUs that have it).

``quantize="int8"`` (ONNX, OpenVINO) writes a statically quantized model (:mod:`rmt.tools.quantize`:
ONNX Runtime's quantizer, NNCF for OpenVINO) next to its float32 export, and reports the top-1 of
both on an evaluation set.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RMTError
from ..files import atomic_write_bytes
from ..models.factory import checkpoint_info
from ..models.fast import ONNX_OPERATORS_AVAILABLE, onnx_operators
from ..models.rmt import RMT
from ..runtime.classifier import Classifier, load_classifier
from .quantize import (
    _openvino,
    check_data_folders,
    openvino_compiled,
    quantize_export,
    save_openvino,
    write_export_metadata,
)

__all__ = ["FORMATS", "QUANTIZE", "ExportResult", "ExportVerificationError", "export_form", "export_model",
           "load_exported", "verify_export", "write_openvino"]

_logger = logging.getLogger(__name__)

ONNX_OPERATORS_OPSET = 23
"""The first opset with ``Attention`` and ``RotaryEmbedding``: ONNX exports default to it (where this
PyTorch can record those operators), and from it on MaSA is written with them."""

FORMATS = ("onnx", "torchscript", "exported-program", "openvino")
QUANTIZE = ("int8",)
MIN_DYNAMIC_SIZE = 33
"""Smallest height/width an export with dynamic height/width accepts (torch.export's guard)."""


class ExportVerificationError(RMTError):
    """The exported file's outputs differ from the PyTorch model's by more than the tolerance."""


@dataclass
class ExportResult:
    """What was written and how it compared with the PyTorch model."""

    path: Path
    format: str
    input_size: tuple[int, int, int]  # (C, H, W) of the example the model was exported with
    dynamic: list[str]  # "batch", "height", "width"
    checks: list[dict[str, Any]] = field(default_factory=list)  # {"shape": [B, C, H, W], "max_abs_diff"}
    batch_size: int | None = None  # the fixed batch of a static export
    quantization: dict[str, Any] | None = None  # see rmt.tools.quantize.QuantizationReport.to_dict

    @property
    def max_abs_diff(self) -> float | None:
        return max((c["max_abs_diff"] for c in self.checks), default=None)

    def to_dict(self) -> dict[str, Any]:
        out = {"path": str(self.path), "format": self.format, "input_size": list(self.input_size),
               "dynamic": self.dynamic, "checks": self.checks, "max_abs_diff": self.max_abs_diff}
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out


def export_form(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` in the form the exports trace: every RMT in it reparameterized
    (:meth:`rmt.models.rmt.RMT.reparameterize`: every weight a constant of the graph, MaSA's rotation
    swap and scale folded into its projection, attention in the pattern runtimes fuse) and, given
    ``example``, its MaSA tables fixed to ``example``'s size (:meth:`rmt.models.rmt.RMT.freeze_tables`:
    initializers, no size arithmetic; the copy then takes inputs of that size only). Other models are
    copied unchanged.
    """
    model = copy.deepcopy(model)
    for net in [m for m in model.modules() if isinstance(m, RMT)]:
        net.reparameterize()
        if example is not None:
            net.freeze_tables(example)
    return model


def _repeat_interleave_int(x: torch.Tensor, repeats, dim: int | None = None, output_size=None) -> torch.Tensor:
    """``x.repeat_interleave(repeats, dim)`` for an integer ``repeats``, as unsqueeze + expand + flatten.

    Used before the ONNX translation: onnxscript's ``aten::repeat_interleave.self_int`` builds the
    tile shape ``[repeats, 1]`` instead of ``[1, repeats]`` when ``repeats`` is symbolic, which breaks
    the full-MaSA distance table (``arange(h).repeat_interleave(w)``) at every input size.
    """
    if dim is None:
        x, dim = x.reshape(-1), 0
    dim = dim % x.dim()
    shape = list(x.shape)
    expanded = x.unsqueeze(dim + 1).expand(*shape[:dim + 1], repeats, *shape[dim + 1:])
    return expanded.flatten(dim, dim + 1)


def _torch_export(model: nn.Module, example: torch.Tensor, dynamic: Sequence[str]):
    from torch.export import Dim

    axes = {"batch": 0, "height": 2, "width": 3}
    spec = {axes[name]: Dim.DYNAMIC for name in dynamic}
    return torch.export.export(model, (example,), dynamic_shapes=(spec,) if spec else None)


def _serialize(model: nn.Module, example: torch.Tensor, fmt: str, dynamic: Sequence[str],
               opset: int | None) -> bytes:
    """The exported file's bytes, made in memory: it is written atomically afterwards (rmt.files), so a
    failure -- a full disk included -- never leaves a partial or corrupt file at the output path."""
    buffer = io.BytesIO()
    if fmt == "exported-program":
        torch.export.save(_torch_export(model, example, dynamic), buffer)
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, and warns about constants that
            # depend only on the head size (they are constants of the model, not of the input)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, buffer)
    elif fmt == "onnx":
        _require("onnxscript", "onnx")
        if opset is None and ONNX_OPERATORS_AVAILABLE:
            opset = ONNX_OPERATORS_OPSET
        with onnx_operators(opset is not None and opset >= ONNX_OPERATORS_OPSET):
            program = _torch_export(model, example, dynamic)
        if "height" in dynamic or "width" in dynamic:  # the translation bug needs a symbolic `repeats`
            program = program.run_decompositions({torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_int})
        with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"):
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            onnx_program = torch.onnx.export(program, (example,), None, dynamo=True, input_names=["images"],
                                             output_names=["logits"], opset_version=opset, verbose=False)
        onnx_program.save(buffer)
        written = onnx_opset(buffer.getvalue())
        if opset is not None and written != opset:  # the exporter falls back to its own opset when it cannot convert
            raise RMTError(f"--opset {opset}: the ONNX exporter cannot convert this model to opset {opset} (it "
                           f"wrote opset {written}); use {written} or a later opset")
    else:
        raise RMTError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return buffer.getvalue()


def write_export(model: nn.Module, example: torch.Tensor, fmt: str, path: str | os.PathLike,
                 dynamic: Sequence[str] = (), opset: int | None = None) -> None:
    """Export `model` traced on `example` to `path` in `fmt`, written atomically (see `_serialize`)."""
    if fmt == "openvino":
        write_openvino(model, example, path, "batch" in dynamic)
        return
    atomic_write_bytes(path, _serialize(model, example, fmt, dynamic, opset))


def write_openvino(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, dynamic_batch: bool = True
                   ) -> None:
    """``openvino.convert_model(model, example_input=example)`` saved as OpenVINO IR at ``path`` (``.xml``,
    weights in the ``.bin`` beside it, float32), written atomically: both files are made in a temporary
    folder and moved in, the weights first. The batch is dynamic with ``dynamic_batch``."""
    ov = _openvino()
    path = Path(path)
    shape = list(example.shape)
    if dynamic_batch:
        shape[0] = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # convert_model traces with torch.jit
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        converted = ov.convert_model(model, example_input=example, input=[ov.PartialShape(shape)])
    converted.outputs[0].get_tensor().set_names({"logits"})
    save_openvino(converted, path)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence the exporter's own log lines (opset fallbacks, conversion tracebacks): the outcome is
    checked and reported in one line instead."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def onnx_opset(model: bytes) -> int:
    """The default-domain opset of a serialized ONNX model."""
    import onnx  # the export extra

    return next(o.version for o in onnx.load_from_string(model).opset_import if o.domain in ("", "ai.onnx"))


def _require(module: str, fmt: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RMTError(f"exporting to {fmt} needs the {module} package: pip install 'rmt[export]'")


def load_exported(path: str | os.PathLike, fmt: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an exported file as a function ``images (B, C, H, W) -> logits`` (CPU, float32).

    ``fmt`` is guessed from the suffix when not given: ``.onnx``, ``.pt2`` (exported program), ``.xml``
    (OpenVINO), anything else TorchScript.
    """
    path = Path(path)
    if not path.is_file():
        raise RMTError(f"no exported model at {path}")
    fmt = fmt or {".onnx": "onnx", ".pt2": "exported-program", ".xml": "openvino"}.get(path.suffix, "torchscript")
    if fmt == "openvino":
        request = openvino_compiled(path).create_infer_request()

        def run_openvino(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(request.infer({0: images.detach().cpu().numpy()})[0].copy())

        return run_openvino
    if fmt == "onnx":
        _require("onnxruntime", "onnx")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run_onnx(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {input_name: images.detach().cpu().numpy()})[0])

        return run_onnx
    if fmt == "exported-program":
        with open(path, "rb") as f:
            module = torch.export.load(f).module()
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit is deprecated
            module = torch.jit.load(str(path), map_location="cpu")
    else:
        raise RMTError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")

    @torch.no_grad()
    def run_torch(images: torch.Tensor) -> torch.Tensor:
        return module(images)

    return run_torch


def verify_shapes(input_size: tuple[int, int, int], dynamic: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """The input shapes an export is checked at: the example's (batch 2), other batch sizes when the batch
    is dynamic, and a larger, non-square size when height and width are."""
    c, h, w = input_size
    shapes = [(2, c, h, w)]
    if "batch" in dynamic:
        shapes += [(1, c, h, w), (3, c, h, w)]
    if "height" in dynamic or "width" in dynamic:
        shapes.append((1, c, h + 32 if "height" in dynamic else h, w + 64 if "width" in dynamic else w))
    return shapes


@torch.no_grad()
def verify_export(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
                  shapes: Sequence[tuple[int, int, int, int]], seed: int = 0) -> list[dict[str, Any]]:
    """Max abs difference between ``model`` and the exported ``run`` on random inputs of each shape."""
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for shape in shapes:
        images = torch.randn(shape, generator=generator)
        expected = model(images).float()
        try:
            got = run(images).float()
        except Exception as e:  # the runtimes raise their own types for a shape they do not accept
            raise ExportVerificationError(f"the exported model fails on input {list(shape)}: "
                                          f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
        if got.shape != expected.shape:
            raise ExportVerificationError(f"the exported model returns {list(got.shape)} for input {list(shape)}, "
                                          f"PyTorch {list(expected.shape)}")
        checks.append({"shape": list(shape), "max_abs_diff": float((got - expected).abs().max())})
    return checks


def _check_options(fmt: str, dynamic_size: bool | None, static: bool, batch_size: int | None,
                   quantize: str | None, calib_data, eval_data) -> None:
    if fmt not in FORMATS:
        raise RMTError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise RMTError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE)}")
    if static and fmt != "onnx":
        raise RMTError(f"--static is for --format onnx, not {fmt}")
    if quantize and fmt not in ("onnx", "openvino"):
        raise RMTError(f"--quantize is for --format onnx or openvino, not {fmt}")
    if fmt == "openvino" and dynamic_size:
        raise RMTError("an OpenVINO export has a fixed height and width (its MaSA tables are constants): "
                       "drop the dynamic size")
    if static and dynamic_size:
        raise RMTError("a --static export has a fixed height and width: drop the dynamic size")
    if batch_size is not None and not static:
        raise RMTError("--batch-size fixes the batch of a --static export; other exports have a dynamic batch")
    if batch_size is not None and batch_size < 1:
        raise RMTError(f"--batch-size must be positive, got {batch_size}")
    if quantize is None and (calib_data is not None or eval_data is not None):
        raise RMTError("--calib-data and --eval-data go with --quantize int8")


def export_model(
    model: str | nn.Module | None,
    output: str | os.PathLike,
    fmt: str = "onnx",
    checkpoint: str | os.PathLike | None = None,
    img_size: tuple[int, int] | None = None,
    dynamic_size: bool | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
    *,
    static: bool = False,
    batch_size: int | None = None,
    quantize: str | None = None,
    calib_data: str | os.PathLike | None = None,
    eval_data: str | os.PathLike | None = None,
    calib_images: int = 256,
    progress: bool = False,
) -> ExportResult:
    """Export a classifier (image -> logits) and check the file against PyTorch.

    Args:
        model: a variant name (``rmt_t``), ``None`` to take it from one of our checkpoints, or a
            built model.
        output: the file to write.
        fmt: ``"onnx"``, ``"torchscript"`` or ``"exported-program"``.
        checkpoint: weights to load (official ``.pth``, ours, a run checkpoint or a Hub-layout
            folder); without one the weights are random.
        img_size: ``(H, W)`` of the example input; default: the model's evaluation size (the
            checkpoint's data config for ours, else ``pretrained_cfg``).
        dynamic_size: export height and width as dynamic; default: when the example is at least
            33 px both ways. The batch is dynamic unless ``static``.
        verify: load the file back and compare it with PyTorch (see :func:`verify_export`).
        atol: the largest absolute difference of logits the check accepts (float32 exports).
        opset: ONNX opset (default: 23, the first with the ``Attention`` and ``RotaryEmbedding``
            operators MaSA is written with; earlier opsets get MaSA in plain ops).
        static: ONNX only: every dimension fixed (batch ``batch_size``, default 1), the MaSA tables
            as initializers, no control flow (:meth:`rmt.models.rmt.RMT.freeze_tables`).
        batch_size: the batch of a ``static`` export.
        quantize: ``"int8"`` (ONNX, OpenVINO): ``output`` is the statically quantized model, and the
            float32 export is kept beside it as ``<stem>.fp32.onnx`` (``.fp32.xml``); see
            :func:`rmt.tools.quantize.quantize_export`.
        calib_data: a folder of images to calibrate on; default: the run's own training images.
        eval_data: an image folder with class sub-folders to measure top-1 on; default: the run's
            own validation split.
        calib_images: at most this many calibration images.
        progress: show progress bars (calibration and evaluation).
    """
    _check_options(fmt, dynamic_size, static, batch_size, quantize, calib_data, eval_data)
    check_data_folders(calib_data, eval_data)  # a wrong folder is reported before minutes of exporting

    classifier = load_classifier(model, checkpoint, device="cpu", amp="none")  # exports are float32 graphs
    net = classifier.model.float().eval()
    channels = int(classifier.data_config["input_size"][0])
    h, w = img_size or classifier.data_config["input_size"][-2:]
    h, w = int(h), int(w)
    if [h, w] != list(classifier.data_config["input_size"][-2:]):  # images are read at the size exported
        classifier = Classifier(net, dict(classifier.data_config, input_size=[channels, h, w]),
                                classifier.class_names, device="cpu", amp="none")
    if static or fmt == "openvino":
        dynamic_size = False
    elif dynamic_size is None:  # a trace has no shape guards: any size (checked below)
        dynamic_size = fmt == "torchscript" or min(h, w) >= MIN_DYNAMIC_SIZE
    elif dynamic_size and min(h, w) < MIN_DYNAMIC_SIZE and fmt != "torchscript":
        raise RMTError(f"dynamic height/width needs an example of at least {MIN_DYNAMIC_SIZE} px "
                       f"(got {h}x{w}): pass --img-size, or export a fixed size")
    if fmt == "openvino" and min(h, w) < MIN_DYNAMIC_SIZE:
        # measured with OpenVINO 2026.4: a one-token last stage converts to a graph that fails with a dynamic
        # batch (a Transpose made a Reshape of the wrong size) and is off by ~5e-3 with a fixed one
        raise RMTError(f"an OpenVINO export needs an input of at least {MIN_DYNAMIC_SIZE} px (got {h}x{w}; below "
                       "that the last stage is a single token, which OpenVINO converts wrongly): pass --img-size")
    dynamic = ([] if static else ["batch"]) + (["height", "width"] if dynamic_size else [])
    path = Path(output)
    if fmt == "openvino" and path.suffix != ".xml":
        raise RMTError(f"--output {path}: an OpenVINO model is written to a .xml file (its weights beside it, .bin)")
    if quantize and fmt == "onnx" and path.suffix != ".onnx":
        raise RMTError(f"--output {path}: an int8 ONNX model is written to a .onnx file")
    float_path = path.with_suffix(f".fp32{path.suffix}") if quantize else path
    batch = (batch_size or 1) if static else 2
    example = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(0))
    graph_model = export_form(net, example if static or fmt == "openvino" else None)
    try:
        write_export(graph_model, example, fmt, float_path, dynamic, opset)
    except RMTError:  # a full disk (rmt.files.WriteError) or an opset the exporter cannot write
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RMTError(f"exporting to {fmt} failed: {type(e).__name__}: {first[:300]}") from e
    result = ExportResult(float_path, fmt, (channels, h, w), dynamic, batch_size=batch if static else None)
    shapes = [tuple(example.shape)] if static else verify_shapes((channels, h, w), dynamic)
    if verify:
        result.checks = verify_export(net, load_exported(float_path, fmt), shapes)
        if result.max_abs_diff > atol:
            raise ExportVerificationError(
                f"{float_path} differs from the PyTorch model by up to {result.max_abs_diff:.3g} (> {atol:g}) "
                f"on inputs {[c['shape'] for c in result.checks]}; the file is kept for inspection")
    if fmt in ("onnx", "openvino"):  # for `rmt predict --checkpoint FILE`
        write_export_metadata(float_path, classifier)
    if quantize:
        stored_names = checkpoint_info(checkpoint).get("class_names") if checkpoint is not None else None
        report = quantize_export(classifier, checkpoint, float_path, path, class_names=stored_names,
                                 calib_data=calib_data,
                                 eval_data=eval_data, calib_images=calib_images, progress=progress)
        write_export_metadata(path, classifier)
        result.path, result.quantization = path, report.to_dict()
    return result
