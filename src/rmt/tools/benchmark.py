"""Throughput and memory, side by side (``rmt benchmark``).

All models are built in one process and timed *interleaved*: each round runs one timed iteration
of every model in turn, so that a slow moment of the machine hits them all alike; the reported
figure is the median over rounds, after warm-up iterations. Modes: ``infer`` (images -> logits,
inference mode), ``features`` (images -> last feature map, what a dense-prediction backbone
costs) and ``train`` (forward, cross-entropy, backward and an AdamW step). ``amp`` runs the
forward under autocast in bfloat16 or float16 (CUDA; bfloat16 also on CPU).

Peak memory is measured in a separate, untimed iteration: the largest total size of the tensors
alive at once during the iteration (activations, gradients, optimizer state, temporaries), over
the tensors that exist before it (parameters). It is exact on every device, unlike process RSS.

Model specs: ``rmt_s`` (this package), ``reference:rmt_s`` (the straightforward implementation of
the spec, :mod:`rmt.models.reference`), or any timm model name (``swin_tiny_patch4_window7_224``).

Backends (``backends``; every model is timed in each, all interleaved in one loop):

* ``eager``: PyTorch eager mode (the default);
* ``onnxruntime``: the model exported to ONNX the way ``rmt export --static`` does it (fixed batch and
  size, weights folded, MaSA tables as constants) and run by ONNX Runtime's CPU provider with all
  graph optimisations;
* ``onnxruntime-int8``: that export statically quantized as ``rmt export --quantize int8`` does
  (:func:`rmt.tools.quantize.quantize_onnx`), calibrated here on random inputs, which sets the
  scales but not the work: the timing is that of a model calibrated on images.
* ``openvino``: the same fixed-shape export form converted to OpenVINO IR as ``rmt export --format
  openvino`` does it (:func:`rmt.tools.export.write_openvino`), run by OpenVINO's CPU plugin in float32;
* ``openvino-int8``: that IR quantized by NNCF as ``rmt export --format openvino --quantize int8`` does
  (:func:`rmt.tools.quantize.quantize_openvino`), calibrated on random inputs like ``onnxruntime-int8``;
* ``eager-bf16``: PyTorch eager mode under bfloat16 autocast (the ``eager`` row with ``amp="bf16"``, so
  that float32 and bfloat16 share one interleaved loop);
* ``eager-int8``: PyTorch's own int8 path, the eager model with its linear layers dynamically
  quantized (:func:`rmt.tools.quantize.quantize_linear_dynamic`; activations quantized as they
  arrive, so no calibration).

ONNX Runtime and OpenVINO run with as many intra-op threads as torch uses. Its rows have no peak-memory figure
(the tensors are not torch's), and ``parity`` is the float32 export's max abs difference to the
eager model's logits on the benchmark input. :func:`profile_onnx` tells which operators an ONNX
Runtime session spends its time in.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import RMTError

__all__ = ["BenchResult", "benchmark", "build_model", "PeakMemory", "DEFAULT_PEERS", "BACKENDS", "ONNX_BACKENDS",
           "OPENVINO_BACKENDS", "profile_onnx"]

DEFAULT_PEERS = ("swin_tiny_patch4_window7_224", "convnext_tiny")
MODES = ("infer", "features", "train")
ONNX_BACKENDS = ("onnxruntime", "onnxruntime-int8")
OPENVINO_BACKENDS = ("openvino", "openvino-int8")
BACKENDS = ("eager", "eager-bf16", "eager-int8") + ONNX_BACKENDS + OPENVINO_BACKENDS
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchResult:
    model: str
    mode: str
    batch_size: int
    img_size: Tuple[int, int]
    img_per_s: float
    ms_per_batch: float
    peak_mb: Optional[float]
    amp: Optional[str] = None
    times_ms: List[float] = field(default_factory=list)
    backend: str = "eager"
    parity: Optional[float] = None  # onnxruntime: max abs diff of the float32 export to the eager logits
    export_path: Optional[str] = None  # onnxruntime: the file timed (gone after the run unless export_dir)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d


class PeakMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the context and still alive; ``peak`` is
    the maximum of their sum. Storages are counted once, however many tensors view them."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: that memory exists already (if it was
        # created in here, it is counted; if before, e.g. a weight's transpose, it is not new)
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out


def build_model(spec: str, img_size: Tuple[int, int], num_classes: int = 1000) -> nn.Module:
    """A model from a spec: ``rmt_s``, ``reference:rmt_s`` or a timm model name."""
    import timm

    from ..models.factory import list_models, split_name

    if spec.startswith("reference:"):
        from ..models.reference import reference_rmt

        name = spec.split(":", 1)[1]
        split_name(name)
        return reference_rmt(name, num_classes=num_classes)
    if spec.partition(".")[0] in list_models():
        return timm.create_model(spec.partition(".")[0], num_classes=num_classes)
    if not timm.is_model(spec):
        raise RMTError(f"unknown model {spec!r}: an rmt_* name, reference:rmt_*, or a timm model")
    try:  # windowed transformers are built for one input size
        return timm.create_model(spec, num_classes=num_classes, img_size=img_size)
    except TypeError:
        return timm.create_model(spec, num_classes=num_classes)


class _Runner:
    def __init__(self, name: str, model: nn.Module, mode: str, batch: int, size: Tuple[int, int],
                 device: torch.device, compile_model: bool, channels_last: bool, amp: Optional[str],
                 backend: str = "eager"):
        self.name, self.mode, self.backend = name, mode, backend
        self.autocast = (torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp
                         else torch.autocast(device.type, enabled=False))
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, *size, generator=g).to(device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.device = device
        forward = self.model.forward_features if mode == "features" else self.model
        self.forward = torch.compile(forward) if compile_model else forward
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" and mode == "train" else None
        if mode == "train":
            self.model.train()
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        else:
            self.model.eval()

    def step(self) -> None:
        if self.mode == "train":
            with self.autocast:
                loss = F.cross_entropy(self.forward(self.x), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
        else:
            with torch.inference_mode(), self.autocast:
                self.forward(self.x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self) -> float:
        start = time.perf_counter()
        self.step()
        return (time.perf_counter() - start) * 1000

    def peak_mb(self) -> float:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.step()
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        tracker = PeakMemory()
        with tracker:
            self.step()
        return tracker.peak / 2**20


class _ExportedRunner:
    """Times one exported model in an inference runtime on a fixed input (see the module doc): the float32
    export and its int8 version share one export, made once per model, batch and size in ``workdir``; the
    float32 row records its largest difference from the eager model (``parity``). A runtime fills in the
    four hooks below."""

    suffix = ""  # the exported file's suffix

    def __init__(self, name: str, model: nn.Module, backend: str, batch: int, size: Tuple[int, int],
                 workdir: Path):
        self.name, self.mode, self.backend = name, "infer", backend
        model = model.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, *size, generator=g)
        stem = workdir / f"{''.join(c if c.isalnum() else '_' for c in name)}_b{batch}_{size[0]}x{size[1]}"
        float_path = stem.with_suffix(self.suffix)
        if not float_path.is_file():
            self._export(model, x, float_path)
        self.path = float_path
        if backend.endswith("-int8"):
            self.path = stem.with_suffix(".int8" + self.suffix)
            if not self.path.is_file():
                calibration = [torch.randn(batch, 3, *size, generator=g).numpy() for _ in range(2)]
                self._quantize(float_path, self.path, calibration)
        self._open(self.path, x.numpy())
        self.parity = None
        if not backend.endswith("-int8"):
            with torch.inference_mode():
                expected = model(x).float()
            self.parity = float((torch.from_numpy(self._run()) - expected).abs().max())

    def _export(self, model: nn.Module, x: torch.Tensor, path: Path) -> None:
        raise NotImplementedError

    def _quantize(self, float_path: Path, path: Path, calibration: List) -> None:
        raise NotImplementedError

    def _open(self, path: Path, feed) -> None:
        raise NotImplementedError

    def _run(self):
        """One inference on the fixed input; returns the first output as a NumPy array."""
        raise NotImplementedError

    def step(self) -> None:
        self._run()

    def timed(self) -> float:
        start = time.perf_counter()
        self.step()
        return (time.perf_counter() - start) * 1000


class _OnnxRunner(_ExportedRunner):
    """ONNX Runtime (``onnxruntime``, ``onnxruntime-int8``)."""

    suffix = ".onnx"

    def _export(self, model, x, path):
        from .export import export_form, write_export

        write_export(export_form(model, x), x, "onnx", path)

    def _quantize(self, float_path, path, calibration):
        from .quantize import quantize_onnx

        quantize_onnx(float_path, path, calibration)

    def _open(self, path, feed):
        from .quantize import onnx_session

        self.session = onnx_session(path, torch.get_num_threads())
        self.feed = {self.session.get_inputs()[0].name: feed}

    def _run(self):
        return self.session.run(None, self.feed)[0]


class _OpenVINORunner(_ExportedRunner):
    """OpenVINO (``openvino``, ``openvino-int8``)."""

    suffix = ".xml"

    def _export(self, model, x, path):
        from .export import export_form, write_openvino

        write_openvino(export_form(model, x), x, path, dynamic_batch=False)

    def _quantize(self, float_path, path, calibration):
        from .quantize import quantize_openvino

        quantize_openvino(float_path, path, calibration)

    def _open(self, path, feed):
        from .quantize import openvino_compiled

        self.request = openvino_compiled(path, torch.get_num_threads()).create_infer_request()
        self.feed = {0: feed}

    def _run(self):
        return self.request.infer(self.feed)[0].copy()


def profile_onnx(path: str | os.PathLike, batch_size: int, img_size: Tuple[int, int] = (224, 224),
                 iters: int = 3, threads: Optional[int] = None) -> List[Dict[str, object]]:
    """Where an ONNX Runtime session spends its time, from its own profiler: one row per operator
    type, ``{"op", "nodes", "ms", "share"}`` (ms per run, summed over that type's nodes), slowest first."""
    from .quantize import onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(path, threads or torch.get_num_threads(), profile_prefix=str(Path(tmp) / "ort"))
        feed = {session.get_inputs()[0].name: torch.randn(batch_size, 3, *img_size).numpy()}
        for _ in range(iters + 1):  # the first run does one-off work: left out below
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Dict[str, float] = defaultdict(float)
    nodes: Dict[str, set] = defaultdict(set)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    start = runs[-iters]["ts"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"] / 1000 / iters
            nodes[op].add(e["name"])
    total = sum(per_op.values()) or 1.0
    return [{"op": op, "nodes": len(nodes[op]), "ms": ms, "share": ms / total}
            for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])]


def benchmark(models: Sequence[str], batch_size: int = 32, img_size: Tuple[int, int] = (224, 224),
              mode: str = "infer", warmup: int = 2, iters: int = 5, device: str = "cpu",
              compile_model: bool = False, channels_last: bool = False, memory: bool = True,
              amp: Optional[str] = None, progress=None, backends: Sequence[str] = ("eager",),
              export_dir: Optional[str | os.PathLike] = None) -> List[BenchResult]:
    """Median throughput (and peak memory) of each model in each backend, timed interleaved; see the
    module doc. Results are ordered by model, then backend. ``export_dir`` keeps the ONNX files (and
    reuses them in later runs: the models are built from seed 0, so their weights are the same);
    default: a temporary directory."""
    if mode not in MODES:
        raise RMTError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise RMTError(f"backend must be among {', '.join(BACKENDS)}, got {', '.join(unknown) or 'none'}")
    inference_only = [b for b in backends if b not in ("eager", "eager-bf16")]
    if inference_only:
        if mode != "infer":
            raise RMTError(f"{inference_only[0]} times inference only: use --mode infer")
        if amp or compile_model or channels_last or device != "cpu":
            raise RMTError("--amp, --compile, --channels-last and --device are for the eager backends; "
                           f"{', '.join(inference_only)} run float32 or int8 on the CPU")
    if any(b in ONNX_BACKENDS for b in backends):
        from .quantize import _onnxruntime

        _onnxruntime()  # a one-line error when it is missing
    if any(b in OPENVINO_BACKENDS for b in backends):
        from .quantize import _openvino

        _openvino()
    if "eager-bf16" in backends and amp is not None:
        raise RMTError("--backend eager-bf16 is eager with --amp bf16: drop --amp")
    if batch_size <= 0 or iters <= 0 or warmup < 0:
        raise RMTError("batch size and iterations must be positive")
    if amp is not None and amp not in AMP_DTYPES:
        raise RMTError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise RMTError(f"unknown device {device!r}") from e
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RMTError("CUDA is not available on this machine: use --device cpu")
    if amp == "fp16" and torch_device.type == "cpu":
        raise RMTError("fp16 autocast is for CUDA; use --amp bf16 on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(export_dir) if export_dir is not None else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runners = []
        for name in models:
            torch.manual_seed(0)  # the same random weights in every run, so that kept exports match the models
            model = build_model(name, img_size)
            for backend in backends:
                if backend == "eager":
                    runners.append(_Runner(name, model, mode, batch_size, img_size, torch_device, compile_model,
                                           channels_last, amp))
                elif backend == "eager-bf16":
                    runners.append(_Runner(name, model, mode, batch_size, img_size, torch_device, compile_model,
                                           channels_last, "bf16", backend=backend))
                elif backend == "eager-int8":
                    from .quantize import quantize_linear_dynamic

                    runners.append(_Runner(name, quantize_linear_dynamic(model), mode, batch_size, img_size,
                                           torch_device, compile_model=False, channels_last=False, amp=None,
                                           backend=backend))
                elif backend in OPENVINO_BACKENDS:
                    runners.append(_OpenVINORunner(name, model, backend, batch_size, img_size, workdir))
                else:
                    runners.append(_OnnxRunner(name, model, backend, batch_size, img_size, workdir))
        for runner in runners:
            for _ in range(warmup):
                runner.step()
        times: List[List[float]] = [[] for _ in runners]
        for i in range(iters):
            for runner, runner_times in zip(runners, times):
                runner_times.append(runner.timed())
            if progress is not None:
                progress(i + 1, iters)
        results = []
        for runner, runner_times in zip(runners, times):
            median = statistics.median(runner_times)
            peak = runner.peak_mb() if memory and isinstance(runner, _Runner) else None
            backend = runner.backend
            results.append(BenchResult(runner.name, mode, batch_size, tuple(img_size), batch_size / median * 1000,
                                       median, peak, "bf16" if backend == "eager-bf16" else amp, runner_times,
                                       backend, getattr(runner, "parity", None),
                                       str(runner.path) if hasattr(runner, "path") else None))
        del runners
        gc.collect()
    return results
