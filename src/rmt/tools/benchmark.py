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
"""
from __future__ import annotations

import gc
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import RMTError

__all__ = ["BenchResult", "benchmark", "build_model", "PeakMemory", "DEFAULT_PEERS"]

DEFAULT_PEERS = ("swin_tiny_patch4_window7_224", "convnext_tiny")
MODES = ("infer", "features", "train")
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
                 device: torch.device, compile_model: bool, channels_last: bool, amp: Optional[str]):
        self.name, self.mode = name, mode
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


def benchmark(models: Sequence[str], batch_size: int = 32, img_size: Tuple[int, int] = (224, 224),
              mode: str = "infer", warmup: int = 2, iters: int = 5, device: str = "cpu",
              compile_model: bool = False, channels_last: bool = False, memory: bool = True,
              amp: Optional[str] = None, progress=None) -> List[BenchResult]:
    """Median throughput (and peak memory) of each model, timed interleaved; see the module doc."""
    if mode not in MODES:
        raise RMTError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
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
    runners = [_Runner(name, build_model(name, img_size), mode, batch_size, img_size, torch_device,
                       compile_model, channels_last, amp) for name in models]
    for runner in runners:
        for _ in range(warmup):
            runner.step()
    times: Dict[str, List[float]] = {r.name: [] for r in runners}
    for i in range(iters):
        for runner in runners:
            times[runner.name].append(runner.timed())
        if progress is not None:
            progress(i + 1, iters)
    results = []
    for runner in runners:
        median = statistics.median(times[runner.name])
        peak = runner.peak_mb() if memory else None
        results.append(BenchResult(runner.name, mode, batch_size, tuple(img_size), batch_size / median * 1000,
                                   median, peak, amp, times[runner.name]))
    del runners
    gc.collect()
    return results
