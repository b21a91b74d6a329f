"""The shared training layer (rmt.training) piece by piece: processes and devices, precision, the
optimizer step's host synchronisation, the config mechanism, atomic files."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from rmt.classification import ClassificationConfig
from rmt.detection.config import DetConfig
from rmt.errors import NonFiniteLossError, RMTError
from rmt.files import atomic_save, atomic_write_text
from rmt.models import create_model
from rmt.runtime import processes
from rmt.runtime.precision import amp_dtype, configure_float32, describe_precision
from rmt.segmentation.config import SegConfig
from rmt.training import distributed, load_config
from rmt.training.checkpoint import Progress, RunCheckpoint, read_run_checkpoint
from rmt.training.config import bundled_configs, resolve_config
from rmt.training.optim import create_optimizer
from rmt.training.run import RoundSpec, TrainingRun, constant_buffers


# ------------------------------------------------------------------------------- processes
def test_collectives_take_device_tensors_under_nccl(monkeypatch):
    """NCCL reduces CUDA tensors only: a CPU float64 tensor (the loss sums, a confusion matrix) must reach
    it on the GPU. Simulated without a GPU: fake CUDA tensors and an all_reduce that checks the device."""
    seen = []

    def all_reduce(tensor, op=None):
        if tensor.device.type != "cuda":
            raise RuntimeError("No backend type associated with device type cpu")  # what NCCL says
        seen.append(tensor.device)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    info = processes.DistInfo(rank=1, world_size=2, local_rank=1, backend="nccl")
    with FakeTensorMode(allow_non_fake_inputs=True):
        processes.all_reduce_sum(torch.zeros(2, dtype=torch.float64), info)
    assert seen == [torch.device("cuda", 1)]
    assert processes.comm_device(processes.DistInfo(0, 2, 0, "gloo")) == torch.device("cpu")


def test_nccl_process_group_is_bound_to_the_local_gpu(monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    info = distributed.init_distributed("cuda")
    assert info == processes.DistInfo(1, 2, 1, "nccl")
    assert calls["set_device"] == 1
    assert calls["init"] == {"backend": "nccl", "device_id": torch.device("cuda", 1)}


def test_data_parallel_leaves_masa_constants_alone():
    """DDP re-broadcasts buffers every step, in place; MaSA's decay and angles are the same everywhere, and
    rewriting them would empty its table cache every step, so they are excluded."""

    model = create_model("rmt_t")
    names = constant_buffers(model)
    assert len(names) == 8 and set(names) == {f"layers.{i}.relpos.{b}" for i in range(4) for b in ("angle", "decay")}
    assert set(names) <= dict(model.named_buffers()).keys()


# ------------------------------------------------------------------------------- precision
@pytest.fixture
def tf32_settings():
    """Saves and restores the TF32 switches by plain assignment. torch serves them through its backend
    modules' __getattr__/__setattr__, so pytest >= 9.2's monkeypatch finds no instance attribute to restore
    and tries to delete one at teardown, which fails."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_amp_choice_and_tf32(tf32_settings):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("auto", cpu) is None and amp_dtype("auto", cuda) is torch.bfloat16
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(RMTError, match="fp16 autocast needs CUDA"):
        amp_dtype("fp16", cpu)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configure_float32(cpu, None)
    assert not torch.backends.cuda.matmul.allow_tf32  # nothing changes for the CPU
    configure_float32(cuda, torch.bfloat16)
    assert not torch.backends.cuda.matmul.allow_tf32  # nor under autocast
    configure_float32(cuda, None)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert describe_precision(cuda, None) == "float32 (TF32 matmuls)"
    assert describe_precision(cpu, torch.bfloat16) == "bf16 autocast"


# ------------------------------------------------------------------------------- the optimizer step
_HOST = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
         torch.Tensor.tolist, torch.Tensor.__index__}


class _NoHostSync(torch.Tensor):
    """A loss whose value must not be copied to the host (what a CUDA synchronisation would be)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _HOST:
            raise AssertionError(f"the step synchronised with the host: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def _run(tmp_path, **overrides):
    cfg = load_config(ClassificationConfig, "digits", dict(output=str(tmp_path / "run"), log_interval=1000,
                                                           **overrides))
    return TrainingRun(cfg, task="classification", spec=RoundSpec("top1", ["epoch"], ["top1"]),
                       default_output="", command="rmt train")


def _train_batch(run, step, loss, count=1):
    """One batch as the task loops train it."""
    if not step.backward(loss):
        return
    run.record_loss(loss, count=count)
    if step.due:
        step.clip_gradients()
        step.optimizer_step()
        step.update_ema()
        step.schedule()
        run.log_update(loss)


def test_optimizer_steps_do_not_synchronise_with_the_host(tmp_path):
    with _run(tmp_path, accum_steps=2) as run:
        model = nn.Linear(4, 2)
        step = run.begin(model, torch.optim.AdamW(model.parameters()), meta=dict(model="x", class_names=["a", "b"]))
        for position in range(1, 7):
            step.start_batch(position, total=6)
            loss = model(torch.randn(3, 4)).square().mean().as_subclass(_NoHostSync)
            _train_batch(run, step, loss, count=3)
        assert run.progress.iteration == 3
        # the host learns of a bad loss at log intervals and before saves, not at every step
        step._first_bad = step._first_bad.as_subclass(torch.Tensor)
        step.check_finite()


def test_a_non_finite_loss_is_found_at_the_check_and_named(tmp_path):
    with _run(tmp_path) as run:
        model = nn.Linear(4, 2)
        step = run.begin(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         meta=dict(model="x", class_names=["a", "b"]))
        for position, value in enumerate([1.0, float("nan"), 2.0]):
            run.progress.step = position + 1
            _train_batch(run, step, model(torch.randn(1, 4)).sum() * value)
        with pytest.raises(NonFiniteLossError, match="not finite at epoch 1, step 2;"):
            step.check_finite()


def test_optimizer_is_fused_where_pytorch_has_the_kernel():
    """Adam/AdamW come fused (one kernel over every tensor, not a loop per tensor) on CPU and CUDA, with
    timm's parameter groups kept; the update is AdamW's to float rounding. Others come as timm builds them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    fused = create_optimizer(model, "adamw", torch.device("cpu"), lr=0.1, weight_decay=0.05)
    assert isinstance(fused, torch.optim.AdamW) and all(g["fused"] for g in fused.param_groups)
    # timm's groups: no weight decay on biases and norms
    assert sorted(g["weight_decay"] for g in fused.param_groups) == [0.0, 0.05]
    plain = torch.optim.AdamW([{"params": [r for r, p in zip(reference, model.parameters()) if id(p) in ids],
                                "weight_decay": g["weight_decay"]}
                               for g in fused.param_groups for ids in [{id(p) for p in g["params"]}]], lr=0.1)
    assert not any(g["fused"] for g in plain.param_groups)
    for _ in range(3):
        x = torch.randn(5, 4)
        for params, optimizer in ((list(model.parameters()), fused), (reference, plain)):
            optimizer.zero_grad()
            y = torch.nn.functional.linear(x, params[0], params[1])
            y = torch.nn.functional.layer_norm(y, (8,), params[2], params[3])
            torch.nn.functional.linear(y, params[4], params[5]).square().sum().backward()
            optimizer.step()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert not create_optimizer(model, "sgd", torch.device("cpu"), lr=0.1).defaults.get("fused")
    assert not create_optimizer(model, "adamw", torch.device("meta"), lr=0.1).defaults.get("fused")


# ------------------------------------------------------------------------------- configs
def test_one_config_mechanism_for_every_task(tmp_path):
    assert "digits" in bundled_configs(ClassificationConfig) and "det_shapes" not in bundled_configs(DetConfig)
    assert {"shapes", "mask_rcnn_1x"} <= set(bundled_configs(DetConfig))
    assert resolve_config(DetConfig, "mask_rcnn_3x").name == "mask_rcnn_3x.yaml"
    assert resolve_config(SegConfig, "upernet_160k.yaml").parent.name == "segmentation"
    # a base: relative to the file naming it
    (tmp_path / "base.yaml").write_text("epochs: 7\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nbatch_size: 3\n")
    cfg = load_config(DetConfig, str(tmp_path / "child.yaml"))
    assert (cfg.epochs, cfg.batch_size) == (7, 3)
    for cls in (ClassificationConfig, DetConfig, SegConfig):
        for key, value, message in (("batch_size", 0, "batch_size must be positive"),
                                    ("lr", float("nan"), "lr must be a finite number"),
                                    ("amp", "fp8", "amp must be one of"),
                                    ("keep_checkpoints", -1, "must not be negative")):
            with pytest.raises(RMTError, match=message):
                load_config(cls, None, {key: value})


def test_the_run_checkpoint_schema_round_trips(tmp_path):
    model = nn.Linear(2, 2)
    ckpt = RunCheckpoint(meta=dict(task="segmentation", model="rmt_t", class_names=["a"], config={}),
                         model=model.state_dict(), optimizer={}, progress=Progress(epoch=2, step=3, iteration=9),
                         history=[{"iteration": 9, "mIoU": 1.0}], ranks=[{"loss_sum": 1.0}], world_size=1)
    path = atomic_save(ckpt.to_dict(), tmp_path / "last.pth")
    back = read_run_checkpoint(path, task="segmentation")
    assert back.progress == ckpt.progress and back.history == ckpt.history and back.meta == ckpt.meta
    with pytest.raises(RMTError, match="is a segmentation checkpoint, not a detection one"):
        read_run_checkpoint(path, task="detection")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(RMTError, match="not a training checkpoint of this tool"):
        read_run_checkpoint(tmp_path / "other.pth")


def test_atomic_text_keeps_mode_and_replaces(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["b.txt"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RMTError, match="is a file, not a directory"):
        atomic_write_text(Path(path) / "c.txt", "x")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
