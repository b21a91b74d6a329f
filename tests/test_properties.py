"""Property tests (hypothesis): any input size, batch and dtype; any bytes given to the image decoder."""
import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from golden import TINY_ARGS
from rmt.data.image import BadImageError, load_rgb
from rmt.models import RMT
from rmt.models.reference import ReferenceRMT

ARGS = dict(TINY_ARGS, decomposed=(True, True, False, False), layer_scale=(False, False, True, True))


def _pair():
    torch.manual_seed(0)
    fast = RMT(**ARGS).eval()
    ref = ReferenceRMT(**ARGS).eval()
    state = {}
    for k, v in fast.state_dict().items():
        if ".qkv." in k:
            prefix, kind = k.rsplit(".qkv.", 1)
            for part, chunk in zip("qkv", v.chunk(3)):
                state[f"{prefix}.{part}_proj.{kind}"] = chunk
        else:
            state[k.replace(".relpos.", ".Relpos.")] = v
    ref.load_state_dict(state)
    return fast, ref


FAST, REF = _pair()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), height=st.integers(1, 72), width=st.integers(1, 72))
def test_any_size_matches_the_oracle(batch, height, width):
    """Every stage down to 1x1 tokens: the fast model equals the straightforward one."""
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 100 + width))
    with torch.no_grad():
        out = FAST(x)
        expected = REF(x)
    assert out.shape == (batch, 10)
    assert (out - expected).abs().max() <= 1e-4


@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), height=st.integers(8, 48),
       width=st.integers(8, 48), batch=st.integers(1, 2))
def test_dtypes(dtype, height, width, batch):
    model = copy.deepcopy(FAST).to(dtype)
    x = torch.randn(batch, 3, height, width, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = model(x)
        reference = FAST(x.float())
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-4, torch.bfloat16: 0.1}[dtype]
    assert (out.float() - reference).abs().max() <= tolerance


@settings(max_examples=6, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40))
def test_backward_at_any_size(height, width):
    model = RMT(**ARGS)
    x = torch.randn(2, 3, height, width, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def _valid_image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048))
def test_decoder_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "x.jpg"
    path.write_bytes(data)
    _decode_or_bad(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP", "GIF"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                  max_size=8))
def test_decoder_on_damaged_images(tmp_path, fmt, cut, flips):
    data = bytearray(_valid_image_bytes(fmt))
    for position, value in flips:
        data[position % len(data)] = value
    path = tmp_path / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    _decode_or_bad(path)


def _decode_or_bad(path):
    """Decoding either gives an RGB image or raises BadImageError: nothing else escapes."""
    try:
        image = load_rgb(path)
    except BadImageError:
        return
    assert image.mode == "RGB" and image.size[0] > 0 and image.size[1] > 0
