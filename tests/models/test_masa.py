"""MaSA's per-resolution tables (RelPos2d): a bounded cache that never serves stale, inference-mode
or low-precision tables."""
import copy

import pytest
import torch

from golden import TINY_CASES
from rmt.models import RMT, RelPos2d

ARGS = TINY_CASES["official_tiny"]  # decomposed and full stages, layer scale on the last two


def _relpos(decomposed=True):
    return RelPos2d(64, 4, init_value=2, heads_range=4, decomposed=decomposed)


def _x(dtype=torch.float32):
    return torch.zeros(1, dtype=dtype)  # tables take device and dtype from it


def test_cache_is_a_bounded_lru():
    relpos = _relpos()
    sizes = [(s, s + 1) for s in range(2, 12)]
    for h, w in sizes:
        relpos(h, w, _x())
    assert len(relpos._cache) == relpos.cache_size  # not one entry per size ever seen
    newest = relpos(*sizes[-1], _x())
    assert relpos(*sizes[-1], _x()) is newest  # kept
    oldest_kept = sizes[-relpos.cache_size]
    kept = relpos(*oldest_kept, _x())  # a hit moves it to the front ...
    relpos(30, 30, _x())  # ... so this insertion evicts the next oldest instead
    assert relpos(*oldest_kept, _x()) is kept
    assert len(relpos._cache) == relpos.cache_size


def test_cache_size_zero_disables_caching():
    relpos = _relpos()
    relpos.cache_size = 0
    first = relpos(6, 6, _x())
    assert relpos(6, 6, _x()) is not first and not relpos._cache
    assert torch.equal(relpos(6, 6, _x()).bias, first.bias)


def test_entries_are_keyed_on_dtype_and_inference_mode():
    relpos = _relpos()
    plain = relpos(8, 8, _x())
    double = relpos(8, 8, _x(torch.float64))
    with torch.inference_mode():
        inference = relpos(8, 8, _x())
    assert double.cos.dtype == torch.float64 and torch.equal(double.cos.float(), plain.cos)
    assert inference.cos.is_inference() and not plain.cos.is_inference()
    assert relpos(8, 8, _x()) is plain  # outside inference mode the plain entry is served again
    assert len(relpos._cache) == 3


def test_changed_buffers_drop_every_stale_entry():
    relpos = _relpos()
    for s in (4, 5, 6):
        relpos(s, s, _x())
    first = relpos(4, 4, _x())
    relpos.decay.mul_(2)  # in place, as load_state_dict and EMA updates do
    rebuilt = relpos(4, 4, _x())
    assert rebuilt is not first and torch.allclose(rebuilt.bias, 2 * first.bias)
    assert len(relpos._cache) == 1  # the three tables of the old values are gone, not kept beside the new

    relpos.load_state_dict({"angle": relpos.angle.clone(), "decay": relpos.decay / 2})
    assert torch.allclose(relpos(4, 4, _x()).bias, first.bias) and len(relpos._cache) == 1

    before = relpos(4, 4, _x())
    relpos.decay = relpos.decay * 3  # a replaced buffer (as load_state_dict(assign=True) leaves) too
    assert torch.allclose(relpos(4, 4, _x()).bias, 3 * before.bias) and len(relpos._cache) == 1


def test_moving_or_copying_carries_no_tables():
    relpos = _relpos()
    relpos(6, 6, _x())
    assert not copy.deepcopy(relpos)._cache  # an EMA copy starts empty instead of duplicating tables
    relpos.double()
    assert not relpos._cache


def test_training_after_inference_mode_at_the_same_size():
    torch.manual_seed(0)
    model = RMT(**ARGS)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        model.eval()
        with torch.inference_mode():
            model(x)
        model.train()
        model(x).sum().backward()  # used to fail: "Inference tensors cannot be saved for backward"
        with torch.no_grad():
            model.eval()(x)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_build_tables_in_float32(dtype):
    torch.manual_seed(0)
    model = RMT(**ARGS).eval()
    low = copy.deepcopy(model).to(dtype)
    for stage, low_stage in zip(model.layers, low.layers):
        expected = stage.relpos(56, 56, _x())
        tables = low_stage.relpos(56, 56, _x(dtype))  # 3136 positions: a rotation off by up to 2.0 before
        for name in ("cos", "sin", "bias", "bias_h"):
            want, got = getattr(expected, name), getattr(tables, name)
            if want is None:
                assert got is None
            else:
                assert got.dtype == dtype and torch.equal(got, want.to(dtype)), name
    assert all(buf.dtype == torch.float32 for name, buf in low.named_buffers() if "relpos" in name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference, output = model(x), low(x.to(dtype))
    assert output.dtype == dtype
    error = (output.float() - reference).norm() / reference.norm()
    assert error < (0.02 if dtype == torch.bfloat16 else 0.005)


def test_half_conversion_keeps_the_buffer_values():
    relpos = _relpos()
    angle = relpos.angle.clone()
    relpos.half()
    assert relpos.angle.dtype == torch.float32 and torch.equal(relpos.angle, angle)
    relpos.double()  # higher precision is taken as asked
    assert relpos.angle.dtype == torch.float64
