"""int8 ONNX and OpenVINO models: static quantization with ONNX Runtime (or NNCF for OpenVINO IR,
:func:`quantize_openvino`), calibrated on real images (``rmt export --quantize int8``), and their
accuracy beside the float32 model's.

Static quantization fixes the scale of every activation ahead of time, from the ranges seen on
calibration images; weights are quantized per output channel (symmetric int8) and activations per
tensor (uint8), the u8s8 pairing that x86 VNNI instructions compute. The model is written in the
QDQ form (QuantizeLinear/DequantizeLinear pairs around the quantized operators), which ONNX Runtime
fuses into integer kernels when it loads the file, and which TensorRT reads as explicit
quantization.

What is quantized: the convolutions (stem, downsampling, depthwise position and LePE convolutions),
the linear layers (``qkv``, ``out_proj``, the FFN, ``proj``, ``head``) and the attention matmuls;
softmax, layer norms, GELU, residual adds and the rotation stay in float32 between them.

Where the images come from:

* calibration: ``calib_data`` (any folder of images, searched recursively), else the run's own
  *training* images, read with the evaluation transform. Calibrating on the evaluation images would
  flatter the int8 accuracy, so the default keeps the two apart.
* evaluation: ``eval_data`` (an image folder with one sub-folder per class, or its ``val``), else
  the run's own validation split: the digits test split for digits runs, ``DATA/<val_split>`` of the
  run's ``config.yaml`` for image-folder runs.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import BadSample, DigitsDataset, ImageFolderDataset, collate_skip_bad
from ..data.image import BadImageError, is_image_file
from ..errors import RMTError
from ..files import atomic_copy, atomic_write_bytes
from ..runtime.accuracy import evaluate
from ..runtime.classifier import Classifier, find_images
from ..runtime.processes import DistInfo

__all__ = ["QuantizationReport", "OnnxRuntimeModel", "OpenVINOModel", "write_export_metadata", "read_export_metadata",
           "load_exported_classifier", "EXPORTED_SUFFIXES", "quantize_onnx", "quantize_openvino",
           "quantize_export", "run_datasets", "onnx_session", "openvino_compiled", "openvino_core", "save_openvino",
           "quantize_linear_dynamic"]

_logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise RMTError("int8 export and ONNX Runtime timing need onnxruntime: pip install 'rmt[export]'") from e
    return onnxruntime


def onnx_session(path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with every graph optimisation on (``threads``: intra-op threads)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def save_openvino(model, path: str | os.PathLike) -> None:
    """Save an OpenVINO model (float32 weights) to ``path`` (``.xml`` and ``.bin``) atomically."""
    ov = _openvino()
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        atomic_copy(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        atomic_copy(staged, path)


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise RMTError("OpenVINO exports and timing need openvino: pip install 'rmt[openvino]'") from e
    return openvino


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one OpenVINO ``Core``, kept for the life of the process.

    Why one: OpenVINO's CPU plugin gives the calling thread a new signal stack (``sigaltstack``) for
    each Core that compiles a model and, when that Core is destroyed, puts back the stack that was
    current when it was made. Two Cores destroyed in the order they were made leave the thread on the
    first one's freed stack, and the next Python signal handler (SIGTERM or Ctrl-C during a training
    run in the same process) then kills the process with SIGSEGV.
    """
    return _openvino().Core()


def openvino_compiled(path: str | os.PathLike, threads: int | None = None):
    """An OpenVINO IR compiled for the CPU in float32 (``threads``: inference threads)."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return openvino_core().compile_model(str(path), "CPU", config)


def quantize_linear_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` as PyTorch's dynamically quantized int8 Linear
    (``torch.ao.quantization.quantize_dynamic``: int8 per-tensor weights, activations quantized per
    batch as they arrive; the convolutions, attention and norms stay float32). PyTorch's own int8
    path, for comparison with ONNX Runtime's (``rmt benchmark --backend eager-int8``): RMT's blocks
    run such layers through their own forward (:func:`rmt.models.fast.ops.fused_linear`)."""
    import warnings

    with warnings.catch_warnings():  # torch.ao's eager quantization is flagged deprecated (still there in 2.14)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError as e:  # a future PyTorch without it
            raise RMTError(f"this PyTorch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic") from e
        return quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


class OnnxRuntimeModel(nn.Module):
    """An ONNX classifier run by ONNX Runtime, called like the PyTorch model: images -> logits (CPU)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class OpenVINOModel(nn.Module):
    """An OpenVINO IR classifier (float32 or int8, run with float32 between the int8 operators), called
    like the PyTorch model: images -> logits (CPU)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.request = openvino_compiled(path, threads).create_infer_request()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.request.infer({0: array})[0].copy())


EXPORTED_SUFFIXES = (".onnx", ".xml")
"""Exported models that :func:`load_exported_classifier` runs: ONNX (ONNX Runtime) and OpenVINO IR."""
EXPORT_METADATA_KEY = "rmt"
"""Name under which an exported model carries its class names and preprocessing (ONNX ``metadata_props``,
OpenVINO ``rt_info``)."""


def write_export_metadata(path: str | os.PathLike, classifier: Classifier) -> None:
    """Store in the exported file itself what reading an image for it takes: the class names and the data config
    (input size, resize, crop, mean/std, grayscale), so that ``rmt predict --checkpoint FILE`` needs nothing else."""
    path = Path(path)
    metadata = json.dumps({"class_names": list(classifier.class_names), "data_config": classifier.data_config})
    if path.suffix == ".xml":
        model = openvino_core().read_model(str(path))
        model.set_rt_info(metadata, [EXPORT_METADATA_KEY])
        save_openvino(model, path)
        return
    import onnx  # the export extra

    proto = onnx.load(str(path))
    kept = [entry for entry in proto.metadata_props if entry.key != EXPORT_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=EXPORT_METADATA_KEY, value=metadata)
    atomic_write_bytes(path, proto.SerializeToString())


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """What :func:`write_export_metadata` stored, or None (a file exported by other tools)."""
    path = Path(path)
    if path.suffix == ".xml":
        model = openvino_core().read_model(str(path))
        if not model.has_rt_info([EXPORT_METADATA_KEY]):
            return None
        return json.loads(model.get_rt_info([EXPORT_METADATA_KEY]).astype(str))
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    found = [entry.value for entry in proto.metadata_props if entry.key == EXPORT_METADATA_KEY]
    return json.loads(found[-1]) if found else None


def load_exported_classifier(path: str | os.PathLike, threads: int | None = None) -> Classifier:
    """A :class:`Classifier` running an exported model (ONNX in ONNX Runtime, ``.xml`` in OpenVINO; float32 or
    int8, on the CPU) with the class names and preprocessing stored in the file by ``rmt export``."""
    path = Path(path)
    if path.suffix not in EXPORTED_SUFFIXES or not path.is_file():
        raise RMTError(f"{path}: not an exported model file (.onnx or OpenVINO .xml)")
    metadata = read_export_metadata(path)
    if metadata is None:
        raise RMTError(f"{path} does not say how to read images for it (no '{EXPORT_METADATA_KEY}' metadata): "
                       "export it with `rmt export`, or run the PyTorch checkpoint")
    model = OpenVINOModel(path, threads) if path.suffix == ".xml" else OnnxRuntimeModel(path, threads)
    model.num_classes = len(metadata["class_names"])
    return Classifier(model, metadata["data_config"], metadata["class_names"], device="cpu", amp="none")


@dataclass
class QuantizationReport:
    """The int8 model, what it was calibrated and evaluated on, and how it compares with float32."""

    float_path: str
    int8_path: str
    calibration: str  # where the calibration images came from
    calib_images: int
    evaluation: str | None  # where the evaluation images came from (None: not evaluated)
    eval_images: int
    float_top1: float | None
    int8_top1: float | None
    float_top5: float | None
    int8_top5: float | None
    agreement: float | None  # % of evaluation images with the same top-1 class in both
    max_abs_diff: float | None  # largest difference of int8 and float32 logits on the evaluation images
    float_mb: float
    int8_mb: float

    @property
    def top1_drop(self) -> float | None:
        return None if self.float_top1 is None else self.float_top1 - self.int8_top1

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), top1_drop=self.top1_drop)


# ----------------------------------------------------------------------------------------- data
class _ImageFiles(Dataset):
    """Unlabelled images of a folder (recursive), prepared as the classifier's evaluation transform does."""

    def __init__(self, files: Sequence[Path], classifier: Classifier):
        self.files, self.classifier = list(files), classifier

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return self.classifier.preprocess(self.classifier.read(self.files[index])), -1
        except BadImageError as e:
            return BadSample(str(self.files[index]), str(e))


def _image_folder(root: Path, classifier: Classifier, class_names: Sequence[str] | None) -> ImageFolderDataset:
    """A labelled folder read like ``rmt predict`` reads images (grayscale models get grey images)."""
    root = root / "val" if (root / "val").is_dir() else root
    return ImageFolderDataset(root, transform=lambda image: classifier.preprocess(classifier.read(image)),
                              classes=class_names)


def _run_config(checkpoint: str | os.PathLike | None) -> dict[str, Any] | None:
    """The resolved config of the run a checkpoint belongs to (``config.yaml`` beside it), if any."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    config = (path if path.is_dir() else path.parent) / "config.yaml"
    if not config.is_file():
        return None
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def run_datasets(classifier: Classifier, checkpoint: str | os.PathLike | None,
                 class_names: Sequence[str] | None) -> tuple[Dataset, str, Dataset, str]:
    """The run's own ``(calibration set, its description, evaluation set, its description)``: its
    training images and its validation split (see the module docstring)."""
    config = _run_config(checkpoint)
    size = int(classifier.data_config["input_size"][-1])
    if list(class_names or []) == DigitsDataset.classes and (config is None or config.get("data") is None):
        return (DigitsDataset("train", img_size=size), "the digits train split",
                DigitsDataset("test", img_size=size), "the digits test split")
    if config is not None and config.get("data"):
        root = Path(config["data"])
        train, val = root / config.get("train_split", "train"), root / config.get("val_split", "val")
        if train.is_dir() and val.is_dir():
            return (_image_folder(train, classifier, class_names), str(train),
                    _image_folder(val, classifier, class_names), str(val))
    raise RMTError("cannot find this checkpoint's own data (a digits run, or a run directory whose "
                   "config.yaml names its image folder): pass --calib-data DIR and --eval-data DIR")


def check_data_folders(calib_data: str | os.PathLike | None, eval_data: str | os.PathLike | None) -> None:
    """Refuse a missing ``--calib-data``/``--eval-data`` folder, or a calibration folder without images,
    before any export work (the search stops at the first image: a big folder is listed only once)."""
    if calib_data is not None:
        root = Path(calib_data)
        if not root.is_dir():
            raise RMTError(f"--calib-data {root}: no such folder")
        if not any(p.is_file() and is_image_file(p) for p in root.rglob("*")):
            raise RMTError(f"--calib-data {root}: no image files in it")
    if eval_data is not None and not Path(eval_data).is_dir():
        raise RMTError(f"--eval-data {eval_data}: no such folder")


def _calibration_set(classifier: Classifier, calib_data: str | os.PathLike | None, own: Dataset | None,
                     own_name: str | None) -> tuple[Dataset, str]:
    if calib_data is None:
        assert own is not None
        return own, own_name or "the run's own training images"
    check_data_folders(calib_data, None)
    files = [f for f in find_images([Path(calib_data)]) if isinstance(f, Path)]
    return _ImageFiles(files, classifier), str(calib_data)


def _batches(dataset: Dataset, limit: int, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Up to ``limit`` images of ``dataset`` in a seeded random order, as float32 arrays ``(B, C, H, W)``;
    unreadable images are skipped."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    chunk: list[torch.Tensor] = []
    taken = 0
    for index in order:
        item = dataset[index]
        if isinstance(item, BadSample):
            continue
        chunk.append(item[0])
        taken += 1
        if len(chunk) == batch_size or taken == limit:
            yield torch.stack(chunk).numpy()
            chunk = []
        if taken == limit:
            return
    if chunk:
        yield torch.stack(chunk).numpy()


# ----------------------------------------------------------------------------------- quantize
def quantize_onnx(float_path: str | os.PathLike, int8_path: str | os.PathLike,
                  calibration: Sequence[np.ndarray], per_channel: bool = True) -> Path:
    """Statically quantize a float32 ONNX classifier (QDQ, u8 activations, s8 per-channel weights;
    the outputs of linear layers stay float32: one quantize/dequantize pair less per layer, 1.2x (rmt_s)
    to 1.4x (Swin-T) faster in ONNX Runtime here).

    ``calibration``: batches ``(B, C, H, W)`` of preprocessed images; the activation ranges are their
    minima and maxima. The graph is first optimised by ONNX Runtime's pre-processing (shape
    inference, folding batch norms into convolutions), as its quantization guide advises.
    """
    _onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if not calibration:
        raise RMTError("no calibration images could be read")

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter({name: batch} for batch in calibration)

        def get_next(self):
            return next(self.batches, None)

    import onnx

    input_name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), Reader(input_name), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       # linear layers write float32 (QGemm does it in its epilogue)
                                       # instead of int8 that the next, unquantized op dequantizes
                                       "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        atomic_copy(quantized, int8_path)  # the output appears whole or not at all
    return int8_path


def quantize_openvino(float_path: str | os.PathLike, int8_path: str | os.PathLike,
                      calibration: Sequence[np.ndarray]) -> Path:
    """Statically quantize a float32 OpenVINO classifier with NNCF's post-training quantization
    (``nncf.quantize``, transformer preset: the softmax and layer-norm inputs stay float; per-tensor
    activation ranges from ``calibration``, batches ``(B, C, H, W)`` of preprocessed images)."""
    _openvino()  # a clear error first when OpenVINO is missing
    try:
        import nncf
    except ImportError as e:
        raise RMTError("OpenVINO int8 needs nncf: pip install 'rmt[openvino]'") from e
    if not calibration:
        raise RMTError("no calibration images could be read")
    logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress lines and notes: the outcome is reported
    model = openvino_core().read_model(str(float_path))
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars: `--json` output stays JSON
        quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=sum(b.shape[0] for b in calibration))
    save_openvino(quantized, int8_path)
    return Path(int8_path)


def _accuracy(model: nn.Module, dataset: Dataset, batch_size: int, progress: bool, desc: str) -> dict[str, Any]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_skip_bad)
    return evaluate(model, loader, torch.device("cpu"), DistInfo(), progress=progress, desc=desc)


@torch.no_grad()
def _agreement(a: nn.Module, b: nn.Module, dataset: Dataset, batch_size: int) -> tuple[float, float]:
    """% of images with the same top-1 class from ``a`` and ``b``, and the largest difference of their logits."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_skip_bad)
    same = total = 0
    diff = 0.0
    for batch, _ in loader:
        if batch is None:
            continue
        logits_a, logits_b = a(batch[0]), b(batch[0])
        same += int((logits_a.argmax(1) == logits_b.argmax(1)).sum())
        total += len(batch[0])
        diff = max(diff, float((logits_a - logits_b).abs().max()))
    return 100.0 * same / max(total, 1), diff


def quantize_export(
    classifier: Classifier,
    checkpoint: str | os.PathLike | None,
    float_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    calib_data: str | os.PathLike | None = None,
    eval_data: str | os.PathLike | None = None,
    calib_images: int = 256,
    batch_size: int = 32,
    progress: bool = False,
) -> QuantizationReport:
    """Quantize the float32 export ``float_path`` of ``classifier`` to ``int8_path`` and measure both.

    Calibrates on ``calib_data`` or the run's training images, evaluates top-1/top-5 of the float32 and
    the int8 model in ONNX Runtime on ``eval_data`` or the run's validation split (see the module
    docstring), and how often their top-1 classes agree.
    ``class_names``: the names the checkpoint stores (ours), which map evaluation folders to outputs;
    without them the sorted folder names are the class indices.
    """
    if calib_images < 1:
        raise RMTError(f"--calib-images must be positive, got {calib_images}")
    own = None
    if calib_data is None or eval_data is None:
        own = run_datasets(classifier, checkpoint, class_names)
    calib_set, calib_name = _calibration_set(classifier, calib_data, own[0] if own else None,
                                             own[1] if own else None)
    if eval_data is not None:
        check_data_folders(None, eval_data)
        root = Path(eval_data)
        eval_set, eval_name = _image_folder(root, classifier, class_names), str(root)
        if len(eval_set.classes) != classifier.model.num_classes:
            raise RMTError(f"--eval-data {root} has {len(eval_set.classes)} classes, the model "
                           f"{classifier.model.num_classes} outputs")
    else:
        eval_set, eval_name = own[2], own[3]
    openvino = Path(float_path).suffix == ".xml"
    fixed_batch = None if openvino else _fixed_batch(float_path)
    calibration = list(_batches(calib_set, calib_images, fixed_batch or batch_size))
    if fixed_batch:  # a static graph takes only full batches
        calibration = [b for b in calibration if b.shape[0] == fixed_batch]
    if openvino:
        quantize_openvino(float_path, int8_path, calibration)
        float_model, int8_model = OpenVINOModel(float_path), OpenVINOModel(int8_path)
    else:
        quantize_onnx(float_path, int8_path, calibration)
        float_model, int8_model = OnnxRuntimeModel(float_path), OnnxRuntimeModel(int8_path)
    eval_batch = fixed_batch or batch_size
    if fixed_batch and len(eval_set) % fixed_batch:
        _logger.warning("evaluating %d of %d images: the static graph takes batches of %d",
                        len(eval_set) - len(eval_set) % fixed_batch, len(eval_set), fixed_batch)
        eval_set = torch.utils.data.Subset(eval_set, range(len(eval_set) - len(eval_set) % fixed_batch))
    float_acc = _accuracy(float_model, eval_set, eval_batch, progress, "float32")
    int8_acc = _accuracy(int8_model, eval_set, eval_batch, progress, "int8")
    agreement, max_abs_diff = _agreement(float_model, int8_model, eval_set, eval_batch)
    return QuantizationReport(
        float_path=str(float_path), int8_path=str(int8_path), calibration=calib_name,
        calib_images=sum(b.shape[0] for b in calibration), evaluation=eval_name, eval_images=int8_acc["images"],
        float_top1=float_acc["top1"], int8_top1=int8_acc["top1"], float_top5=float_acc["top5"],
        int8_top5=int8_acc["top5"], agreement=agreement, max_abs_diff=max_abs_diff,
        float_mb=_size_mb(float_path), int8_mb=_size_mb(int8_path))


def _size_mb(path: str | os.PathLike) -> float:
    """The size of a model file, with its weights file (OpenVINO's ``.bin``) where it has one."""
    path = Path(path)
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return (path.stat().st_size + (weights.stat().st_size if weights and weights.is_file() else 0)) / 2**20


def _fixed_batch(path: str | os.PathLike) -> int | None:
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None
