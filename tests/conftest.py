"""Shared fixtures. Files of our own formats are written through the formats' own code (the run-checkpoint
schema of rmt.training.checkpoint, rmt.models.weights.save_weights), never by hand."""
import os

import pytest
import torch

import rmt  # noqa: F401  registers the models
from golden import TINY_CASES, load_golden, official_state_dict, save_official_checkpoint
from rmt.files import atomic_save
from rmt.models import RMT
from rmt.models.fast import kernel
from rmt.models.rmt import checkpoint_filter_fn
from rmt.models.weights import save_weights
from rmt.training.checkpoint import Progress, RunCheckpoint

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where PyTorch sees a GPU and are skipped (and say so) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    """The command's exit status is ``expected_code`` and its stderr one short ``rmt: error`` line: returns it."""
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert err.startswith("rmt") and "error" in err and "\n" not in err and "Traceback" not in err, err
    assert len(err) < 1000, err[:300]
    return err


def write_run_checkpoint(path, model: torch.nn.Module, meta: dict, **fields):
    """A run checkpoint (``last.pth``/``best.pth``) for ``model``, as `rmt train` writes it."""
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = RunCheckpoint(meta=meta, model=model.state_dict(), optimizer=optimizer.state_dict(),
                               progress=Progress(epoch=1), history=[], ranks=[{}], **fields)
    return atomic_save(checkpoint.to_dict(), path)


def write_weights(path, model: torch.nn.Module, meta: dict):
    """A ``model.safetensors`` with metadata, as a run writes it."""
    return save_weights(model, path, meta)


@pytest.fixture
def golden_checkpoint(tmp_path):
    """Save a golden case's weights as an official checkpoint file; returns (path, golden data, model args)."""

    def make(name: str, **save_kwargs):
        data = load_golden(name)
        path = save_official_checkpoint(tmp_path / f"{name}.pth", official_state_dict(data["keys"]), **save_kwargs)
        return path, data, dict(TINY_CASES[name])

    return make


@pytest.fixture(scope="session")
def official_rmt_t(tmp_path_factory):
    """A full-size RMT-T checkpoint in the official key layout with the golden seeded weights, saved as the
    official training script saves it."""
    path = tmp_path_factory.mktemp("official") / "RMT-T.pth"
    return save_official_checkpoint(path, official_state_dict(load_golden("official_keys_rmt_t")["keys"]))


@pytest.fixture(scope="session")
def cpu_kernels():
    """The compiled CPU kernels of rmt.models.fast, built or found in the build cache. Where they do not build,
    the test fails (it would otherwise pass on the PyTorch fallback)."""
    assert kernel._load() is not None, "the CPU kernels failed to build (see the warning in the log)"


@pytest.fixture(scope="module")
def one_thread():
    """Export and the runtimes' first calls are op-by-op work on small tensors: on a small shared CPU,
    a second intra-op thread only adds wake-up latency (TorchScript calls measured ~1 s vs ~0.01 s).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden_tiny():
    """The golden tiny model (full and decomposed MaSA, layer scale) with its seeded weights, in eval
    mode: logits of order one, so 1e-4 is a real bound."""
    model = RMT(**TINY_CASES["official_tiny"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state_dict(load_golden("official_tiny")["keys"]), model))
    return model
