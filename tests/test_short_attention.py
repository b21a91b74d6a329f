"""The compiled CPU kernel for MaSA's short decomposed passes (rmt.models.fast.kernel).

It must be built on this machine (C++ compiler and ninja are dependencies of CI), give SDPA's numbers
and gradients on the strided views MaSA passes it, run only where it applies, and leave tracing and
FLOP counting to the PyTorch kernels.
"""
import pytest
import torch
import torch.nn.functional as F

from golden import TINY_ARGS
from rmt.models import RMT
from rmt.models.fast import kernel as kernels


@pytest.fixture(scope="module")
def built():
    module = kernels._load()
    assert module is not None, "the short-attention kernel failed to build (see the warning in the log)"
    return module


def _views(b, h, w, n, d, layout):
    q, k, v = (torch.randn(b, h, w, n, d) for _ in range(3))
    if layout == "rows":
        view = lambda t: t.flatten(0, 1).transpose(1, 2)  # noqa: E731
        length, heads = w, n
    else:
        view = lambda t: t.flatten(2, 3).transpose(1, 2)  # noqa: E731
        length, heads = h, w * n
    bias = torch.randn(1, heads, length, length)
    return q, k, v, bias, view


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("length,d", [(1, 16), (3, 32), (14, 32), (16, 16), (17, 64), (28, 32), (32, 16)])
def test_matches_sdpa_on_strided_views(built, layout, length, d):
    torch.manual_seed(length * d)
    q, k, v, bias, view = _views(2, length, length, 3, d, layout)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*map(view, inputs), attn_mask=bias, scale=d ** -0.5)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    out = kernels.short_attention(q, k, v, bias, d ** -0.5, view)
    torch.testing.assert_close(view(out), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(view(out), inputs, grad)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_large_scores_stay_finite(built):
    """Softmax subtracts the row maximum: scores of +-1e4 must not overflow."""
    q, k, v, bias, view = _views(1, 14, 14, 2, 32, "rows")
    q *= 100.0
    expected = F.scaled_dot_product_attention(view(q), view(k), view(v), attn_mask=bias)
    out = kernels.short_attention(q, k, v, bias, 32 ** -0.5, view)
    assert out.isfinite().all()
    torch.testing.assert_close(view(out), expected, atol=1e-4, rtol=1e-4)


def test_applies_only_where_compiled():
    q = torch.randn(4, 2, 14, 32)
    bias = torch.zeros(1, 2, 14, 14)
    assert kernels.short_attention_applies(q, bias)
    assert not kernels.short_attention_applies(torch.randn(4, 2, 33, 32), torch.zeros(1, 2, 33, 33))  # too long
    assert not kernels.short_attention_applies(torch.randn(4, 2, 14, 8), bias)  # head dim not compiled
    assert not kernels.short_attention_applies(q.double(), bias.double())
    assert not kernels.short_attention_applies(q, bias.requires_grad_())  # a learned bias has no kernel gradient


# head dims 16/32/32/32: all compiled cases (TINY_ARGS' third stage has 24)
SHORT_ARGS = dict(TINY_ARGS, embed_dims=(32, 64, 128, 128), decomposed=(True, True, True, True))


def _attention_ops(model, x):
    with torch.profiler.profile() as prof, torch.inference_mode():
        out = model(x)
    return out, {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_model_uses_it_in_inference_and_matches(built, monkeypatch):
    torch.manual_seed(0)
    model = RMT(**SHORT_ARGS).eval()
    x = torch.randn(2, 3, 64, 96)  # rows of 24/12/6/3 and columns of 16/8/4/2 tokens: all short
    fast, ops = _attention_ops(model, x)
    assert not ops, ops  # every decomposed pass ran in the compiled kernel
    monkeypatch.setattr(kernels, "_enabled", False)
    plain, ops = _attention_ops(model, x)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_long_rows_keep_sdpa(built):
    model = RMT(**SHORT_ARGS).eval()
    _, ops = _attention_ops(model, torch.randn(1, 3, 160, 160))  # stage-1 rows of 40 > 32: SDPA there
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops


def test_training_step_matches_sdpa(built, monkeypatch):
    torch.manual_seed(0)
    model = RMT(**SHORT_ARGS).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        with torch.profiler.profile() as prof:
            loss = model(x).square().mean()
            loss.backward()
        ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, ops

    loss, fast, ops = grads()
    assert not ops, ops  # forward and backward in the compiled kernel
    monkeypatch.setattr(kernels, "_enabled", False)
    loss_plain, plain, ops = grads()
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    torch.testing.assert_close(loss, loss_plain, atol=1e-6, rtol=1e-5)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flop_counting_sees_every_matmul(built):
    """Under FlopCounterMode the fast paths step aside (short-row kernel, fused oneDNN linears): a CPU
    model counts exactly what the same model counts on the meta device, attention included."""
    from rmt.tools.flops import count_macs

    model = RMT(**SHORT_ARGS).eval()
    with torch.device("meta"):
        meta_model = RMT(**SHORT_ARGS)
    assert count_macs(model, (64, 64)) == count_macs(meta_model, (64, 64)) > 0
    with torch.no_grad():  # and the attention is in the count
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 64, 64))
    assert any("scaled_dot_product" in str(op) for op in counter.get_flop_counts()["Global"])


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpp, "load", no_compiler)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", False)
    model = RMT(**SHORT_ARGS).eval()
    with caplog.at_level("WARNING", logger="rmt.models.fast.kernel"):
        _, ops = _attention_ops(model, torch.randn(1, 3, 64, 64))
        _attention_ops(model, torch.randn(1, 3, 64, 64))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    warnings = [r for r in caplog.records if "kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0].getMessage()
