"""The compiled CPU kernels (rmt.models.fast.kernel): short-row attention, rotation, depthwise-conv
weight gradient.

They must be built on this machine (C++ compiler and ninja are dependencies of CI), give the PyTorch
numbers and gradients on the strided views MaSA passes them, in float32 and bfloat16, run only where
they apply, and leave tracing and FLOP counting to the PyTorch kernels. Their build cache is keyed on what the binary
requires: the flags and the CPU target that ``-march=native`` resolves to, so that nodes of different CPU
generations sharing one cache directory each get a build they can run.
"""
import platform
import stat

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension
from torch.utils.flop_counter import FlopCounterMode

from golden import TINY_ARGS
from rmt.models import RMT
from rmt.models.fast import kernel
from rmt.tools.flops import count_macs


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


LENGTHS = [(1, 16), (3, 32), (14, 32), (16, 16), (17, 64), (28, 32), (32, 16), (40, 32), (49, 64), (56, 16), (64, 32)]


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("length,d", LENGTHS)
def test_matches_sdpa_on_strided_views(cpu_kernels, layout, length, d):
    torch.manual_seed(length * d)
    q, k, v, bias, view = _views(2, length, length, 3, d, layout)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*map(view, inputs), attn_mask=bias, scale=d ** -0.5)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    out = kernel.short_attention(q, k, v, bias, d ** -0.5, view)
    torch.testing.assert_close(view(out), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(view(out), inputs, grad)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


# bfloat16 against SDPA in float32 on the same (bfloat16-rounded) inputs. The kernel accumulates in
# float32 and rounds each output once, so it is as close as bfloat16 storage allows: outputs (|o| < 4
# here) within 1.6e-2, 2 units in the last place at 2..4 (measured: 8e-3, the same as SDPA's own
# bfloat16 kernel); gradients within 1% of their largest value (measured: 0.3%).
BF16_OUT_ATOL = 1.6e-2
BF16_GRAD_REL = 1e-2


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("length,d", LENGTHS)
def test_bfloat16_matches_float32_sdpa(cpu_kernels, layout, length, d):
    torch.manual_seed(length * d + 1)
    q, k, v, bias, view = _views(2, length, length, 3, d, layout)
    q, k, v, bias = (t.bfloat16() for t in (q, k, v, bias))
    inputs = [t.float().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*map(view, inputs), attn_mask=bias.float(), scale=d ** -0.5)
    grad = torch.randn_like(expected).bfloat16()
    expected_grads = torch.autograd.grad(expected, inputs, grad.float())
    bf16_inputs = [t.requires_grad_() for t in (q, k, v)]
    out = kernel.short_attention(*bf16_inputs, bias, d ** -0.5, view)
    assert out.dtype == torch.bfloat16
    assert (view(out).float() - expected).abs().max() <= BF16_OUT_ATOL
    grads = torch.autograd.grad(view(out), bf16_inputs, grad)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= BF16_GRAD_REL * max(want.abs().max().item(), 1e-3)


def test_bias_shared_across_heads(cpu_kernels):
    """A (1, Hb, L, L) bias with Hb dividing the head count: head h adds table h % Hb (MaSA's column
    pass passes one table per head for all columns)."""
    torch.manual_seed(3)
    q, k, v, _, view = _views(2, 14, 14, 3, 32, "cols")  # 14 columns x 3 heads share 3 tables
    tables = torch.randn(1, 3, 14, 14)
    expected = F.scaled_dot_product_attention(*map(view, (q, k, v)), attn_mask=tables.repeat(1, 14, 1, 1),
                                              scale=32 ** -0.5)
    out = kernel.short_attention(q, k, v, tables, 32 ** -0.5, view)
    torch.testing.assert_close(view(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotation_matches_rotating_first(cpu_kernels, dtype):
    """MaSA's decomposed passes with q and k rotated as the kernel reads them (AVX-512 builds) against
    the same passes on q and k rotated beforehand, forward and gradients."""
    if not kernel._module.fused_rotation:
        pytest.skip("this build does not fuse the rotation (no AVX-512)")
    torch.manual_seed(5)
    b, h, w, n, d = 2, 6, 9, 2, 32
    qkv = torch.randn(b, h, w, 3 * n * d).to(dtype)
    q, k, v = (t.unflatten(-1, (n, d)).requires_grad_() for t in qkv.detach().split(n * d, -1))
    angle = torch.rand(h * w, d // 2).repeat_interleave(2, -1) * 6
    cos, sin = angle.cos().to(dtype), (angle.sin() * torch.tensor([-1.0, 1.0]).repeat(d // 2)).to(dtype)
    rows = lambda t: t.flatten(0, 1).transpose(1, 2)  # noqa: E731
    cols = lambda t: t.flatten(2, 3).transpose(1, 2)  # noqa: E731
    bias_w, bias_h = torch.randn(1, n, w, w).to(dtype), torch.randn(1, n, h, h).to(dtype)

    def passes(fused: bool):
        if fused:
            x = kernel.short_attention(q, k, v, bias_w, d ** -0.5, rows, (cos, sin, (h, w, 1, 1, 0)))
            return kernel.short_attention(q, k, x, bias_h, d ** -0.5, cols, (cos, sin, (1, 0, w, n, 1)))
        table = lambda t: t.reshape(h, w, 1, d)  # noqa: E731
        qr, kr = (kernel.rotate(t, table(cos), table(sin)) if dtype == torch.bfloat16 else
                  t * table(cos) + t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * table(sin) for t in (q, k))
        x = kernel.short_attention(qr, kr, v, bias_w, d ** -0.5, rows)
        return kernel.short_attention(qr, kr, x, bias_h, d ** -0.5, cols)

    grad = torch.randn(b, h, w, n, d).to(dtype)
    fused = passes(True)
    fused_grads = torch.autograd.grad(fused, (q, k, v), grad)
    plain = passes(False)
    plain_grads = torch.autograd.grad(plain, (q, k, v), grad)
    # float32: the same products in another order; bfloat16: the same roundings (rotated q and k are
    # rounded to bfloat16 in both), gradients rounded once more on the unfused path
    atol = 1e-5 if dtype == torch.float32 else BF16_OUT_ATOL
    assert (fused.float() - plain.float()).abs().max() <= atol
    for got, want in zip(fused_grads, plain_grads):
        assert (got.float() - want.float()).abs().max() <= max(atol, BF16_GRAD_REL * want.float().abs().max())


def test_large_scores_stay_finite(cpu_kernels):
    """Softmax subtracts the row maximum: scores of +-1e4 must not overflow."""
    q, k, v, bias, view = _views(1, 14, 14, 2, 32, "rows")
    q *= 100.0
    expected = F.scaled_dot_product_attention(view(q), view(k), view(v), attn_mask=bias)
    out = kernel.short_attention(q, k, v, bias, 32 ** -0.5, view)
    assert out.isfinite().all()
    torch.testing.assert_close(view(out), expected, atol=1e-4, rtol=1e-4)


def test_applies_only_where_compiled():
    q = torch.randn(4, 2, 14, 32)
    bias = torch.zeros(1, 2, 14, 14)
    assert kernel.short_attention_applies(q, bias)
    assert not kernel.short_attention_applies(torch.randn(4, 2, 65, 32), torch.zeros(1, 2, 65, 65))  # too long
    assert not kernel.short_attention_applies(torch.randn(4, 2, 14, 8), bias)  # head dim not compiled
    assert kernel.short_attention_applies(q.bfloat16(), bias.bfloat16())
    assert not kernel.short_attention_applies(q.double(), bias.double())
    assert not kernel.short_attention_applies(q.half(), bias.half())  # no float16 kernel on the CPU
    assert not kernel.short_attention_applies(q.bfloat16(), bias)  # bias in another dtype
    # float32 rows of 33-64 tokens: the lane-parallel kernel (AVX-512 builds) beats the flash kernel, the
    # portable one does not
    assert kernel.short_attention_applies(torch.randn(4, 2, 40, 32), torch.zeros(1, 2, 40, 40)) == \
        kernel._module.fused_rotation
    assert kernel.short_attention_applies(torch.randn(4, 2, 56, 16).bfloat16(), torch.zeros(1, 2, 56, 56).bfloat16())
    too_long = torch.randn(4, 2, 65, 16).bfloat16()
    assert not kernel.short_attention_applies(too_long, torch.zeros(1, 2, 65, 65).bfloat16())
    assert not kernel.short_attention_applies(q, bias.requires_grad_())  # a learned bias has no kernel gradient


# head dims 16/32/32/32: all compiled cases (TINY_ARGS' third stage has 24)
SHORT_ARGS = dict(TINY_ARGS, embed_dims=(32, 64, 128, 128), decomposed=(True, True, True, True))


def _attention_ops(model, x):
    with torch.profiler.profile() as prof, torch.inference_mode():
        out = model(x)
    return out, {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_model_uses_it_in_inference_and_matches(cpu_kernels, monkeypatch):
    torch.manual_seed(0)
    model = RMT(**SHORT_ARGS).eval()
    x = torch.randn(2, 3, 64, 96)  # rows of 24/12/6/3 and columns of 16/8/4/2 tokens: all short
    fast, ops = _attention_ops(model, x)
    assert not ops, ops  # every decomposed pass ran in the compiled kernel
    monkeypatch.setattr(kernel, "_enabled", False)
    plain, ops = _attention_ops(model, x)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_long_rows_keep_sdpa(cpu_kernels):
    model = RMT(**SHORT_ARGS).eval()
    _, ops = _attention_ops(model, torch.randn(1, 3, 288, 288))  # stage-1 rows of 72 > 64: SDPA there
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops


def test_training_step_matches_sdpa(cpu_kernels, monkeypatch):
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
    monkeypatch.setattr(kernel, "_enabled", False)
    loss_plain, plain, ops = grads()
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    torch.testing.assert_close(loss, loss_plain, atol=1e-6, rtol=1e-5)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flop_counting_sees_every_matmul(cpu_kernels):
    """Under FlopCounterMode the fast paths step aside (short-row kernel, fused oneDNN linears): a CPU
    model counts exactly what the same model counts on the meta device, attention included."""

    model = RMT(**SHORT_ARGS).eval()
    with torch.device("meta"):
        meta_model = RMT(**SHORT_ARGS)
    assert count_macs(model, (64, 64)) == count_macs(meta_model, (64, 64)) > 0
    with torch.no_grad():  # and the attention is in the count

        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 64, 64))
    assert any("scaled_dot_product" in str(op) for op in counter.get_flop_counts()["Global"])


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernel, "_module", None)
    monkeypatch.setattr(kernel, "_failed", False)
    model = RMT(**SHORT_ARGS).eval()
    with caplog.at_level("WARNING", logger="rmt.models.fast.kernel"):
        _, ops = _attention_ops(model, torch.randn(1, 3, 64, 64))
        _attention_ops(model, torch.randn(1, 3, 64, 64))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    warnings = [r for r in caplog.records if "kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0].getMessage()


# ------------------------------------------------------------------------------------------ rotation
@pytest.mark.parametrize("d", [16, 32, 24])
def test_rotation_matches_the_plain_arithmetic(cpu_kernels, d):
    """One pass in bfloat16 (float32 arithmetic, one rounding) against the same formula in float32,
    on a q slice of a fused projection (strided); the backward pass rotates the gradient back."""
    torch.manual_seed(d)
    b, h, w, n = 2, 5, 7, 3
    qkv = torch.randn(b, h, w, 3 * n * d).bfloat16()
    x = qkv[..., : n * d].unflatten(-1, (n, d)).requires_grad_()
    angle = torch.rand(h, w, 1, d // 2).repeat_interleave(2, -1) * 6
    signs = torch.tensor([-1.0, 1.0]).repeat(d // 2)
    cos, sin = angle.cos(), angle.sin() * signs
    assert kernel.rotation_applies(x, cos.bfloat16())
    out = kernel.rotate(x, cos.bfloat16(), sin.bfloat16())
    xf = x.detach().float().requires_grad_()
    expected = xf * cos.bfloat16().float() + xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin.bfloat16().float()
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=2 ** -8)  # one bfloat16 rounding
    grad = torch.randn_like(expected).bfloat16()
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, xf, grad.float())
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=2 ** -8)


def test_rotation_applies_only_in_bfloat16():
    x = torch.randn(1, 2, 2, 1, 16)
    cos = torch.randn(2, 2, 1, 16)
    assert not kernel.rotation_applies(x, cos)  # float32 has the complex multiply
    assert not kernel.rotation_applies(x.bfloat16(), cos)  # tables in another dtype


# ------------------------------------------------------------------------- depthwise convolutions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("channels,size,k,batch", [(16, (7, 9), 3, 3), (32, (9, 6), 5, 3), (48, (11, 8), 7, 3),
                                                   (64, (2, 3), 5, 3), (256, (6, 5), 3, 1), (128, (5, 4), 3, 8)])
def test_depthwise_kernels_match_aten(cpu_kernels, dtype, gelu, channels, size, k, batch):
    """Forward and the one-sweep backward against ATen in float64: channel counts and batches that give
    tasks of 1 to 8 blocks of 16 channels, images smaller than the kernel, kernels 3/5/7. Sums are
    float32; only the stored outputs and input gradients are rounded to bfloat16."""
    torch.manual_seed(k)
    x = torch.randn(batch, channels, *size).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(batch, channels, *size).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, 1, k, k) * 0.3, torch.randn(channels)
    assert kernel.depthwise_applies(x, weight, (k // 2, k // 2))
    inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected = F.conv2d(F.gelu(inputs[0]) if gelu else inputs[0], inputs[1], inputs[2], padding=k // 2, groups=channels)
    want_x, want_w, want_b = torch.autograd.grad(expected, inputs, grad.double())
    out = kernel.depthwise_forward(x, weight, bias, gelu)
    grad_x, grad_w, grad_b = kernel.depthwise_backward(x, grad, weight, gelu)
    assert out.dtype == grad_x.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    rel = 1e-6 if dtype == torch.float32 else 2 ** -8  # bfloat16: one rounding of the stored value
    for got, want in [(out, expected), (grad_x, want_x)]:
        assert (got.double() - want).abs().max() <= rel * want.abs().max() + 1e-6
    torch.testing.assert_close(grad_w.double(), want_w, atol=1e-4, rtol=1e-5)  # float32 sums in another order
    torch.testing.assert_close(grad_b.double(), want_b, atol=1e-4, rtol=1e-5)


def test_depthwise_applies_only_where_compiled():
    x = torch.randn(1, 32, 5, 5).contiguous(memory_format=torch.channels_last)
    w3 = torch.randn(32, 1, 3, 3)
    assert kernel.depthwise_applies(x, w3, (1, 1))
    assert not kernel.depthwise_applies(x.contiguous(), w3, (1, 1))  # NCHW memory
    assert not kernel.depthwise_applies(x, w3, (0, 0))  # not "same" padding
    assert not kernel.depthwise_applies(x[:, :24], torch.randn(24, 1, 3, 3), (1, 1))  # 24 channels
    assert not kernel.depthwise_applies(x, torch.randn(32, 1, 4, 4), (2, 2))  # even kernel
    assert not kernel.depthwise_applies(x.half(), w3, (1, 1))


# ---------------------------------------------------------------------------- portable build
@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="builds for x86-64-v3")
def test_portable_build_without_avx512_matches_sdpa(monkeypatch):
    """The kernels built for a CPU without AVX-512 (x86-64-v3: AVX2 + FMA): the per-sequence attention
    kernels and the portable conversions, against the PyTorch ops. Built once (minutes), cached."""

    module = torch.utils.cpp_extension.load(
        name="rmt_cpu_kernels_x86_64_v3_test", sources=[str(kernel._SOURCE)],
        extra_cflags=["-O3", "-march=x86-64-v3", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"])
    monkeypatch.setattr(kernel, "_module", module)
    for dtype, atol in [(torch.float32, 2e-5), (torch.bfloat16, BF16_OUT_ATOL)]:
        for layout, length, d in [("rows", 14, 32), ("cols", 28, 16), ("rows", 56, 16), ("cols", 17, 64)]:
            torch.manual_seed(length)
            q, k, v, bias, view = _views(2, length, length, 3, d, layout)
            q, k, v, bias = (t.to(dtype) for t in (q, k, v, bias))
            inputs = [t.float().requires_grad_() for t in (q, k, v)]
            expected = F.scaled_dot_product_attention(*map(view, inputs), attn_mask=bias.float(), scale=d ** -0.5)
            grad = torch.randn_like(expected).to(dtype)
            expected_grads = torch.autograd.grad(expected, inputs, grad.float())
            own = [t.requires_grad_() for t in (q, k, v)]
            out = kernel.short_attention(*own, bias, d ** -0.5, view)
            assert (view(out).float() - expected).abs().max() <= atol
            for got, want in zip(torch.autograd.grad(view(out), own, grad), expected_grads):
                assert (got.float() - want).abs().max() <= max(atol, BF16_GRAD_REL * want.abs().max())
        x = torch.randn(2, 32, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(2, 32, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(32, 1, 5, 5)
        _, want_w, _ = torch.ops.aten.convolution_backward(
            grad.float(), F.gelu(x.float()), weight, None, [1, 1], [2, 2], [1, 1], False, [0, 0], 32,
            [False, True, False])
        torch.testing.assert_close(kernel.depthwise_backward(x, grad, weight, gelu=True)[1], want_w, atol=1e-4,
                                   rtol=1e-5)


# ------------------------------------------------ the build cache: one build per CPU target, flags and torch
GCC_LINE = (" /usr/lib/gcc/x86_64-linux-gnu/12/cc1plus -E -quiet -v -imultiarch x86_64-linux-gnu -D_GNU_SOURCE - "
            "-march={cpu} -mmmx -msse4.2 -mavx2 {avx512} --param l1-cache-size=32 -mtune={cpu} -dumpbase -")
CLANG_LINE = (' "/usr/lib/llvm-14/bin/clang" -cc1 -triple x86_64-pc-linux-gnu -E '
              '-target-cpu {cpu} -target-feature +avx2 -')


def fake_compiler(tmp_path, name, line):
    """A stand-in `c++` that prints, as gcc/clang -v do, the command line of its compiler proper."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\necho \"COLLECT_GCC_OPTIONS='-march=native' '-E' '-v'\" >&2\necho '{line}' >&2\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_native_target_reads_the_resolved_cpu_and_features(tmp_path):
    gcc = fake_compiler(tmp_path, "gcc", GCC_LINE.format(cpu="znver3", avx512="-mavx512f -mavx512bf16"))
    assert kernel.native_target(gcc) == ("-march=znver3 -mmmx -msse4.2 -mavx2 -mavx512f -mavx512bf16 "
                                         "--param l1-cache-size=32 -mtune=znver3")
    clang = fake_compiler(tmp_path, "clang", CLANG_LINE.format(cpu="skylake"))
    assert kernel.native_target(clang) == "-target-cpu skylake -target-feature +avx2"


def test_native_target_of_this_machine_names_its_cpu():
    target = kernel.native_target()
    assert "-march=" in target or "-target-cpu" in target
    assert "native" not in target


def test_two_feature_sets_get_two_builds(tmp_path, monkeypatch):
    """Two CPUs of different generations (one with AVX-512, one without) load two differently named builds
    from one shared cache; the same CPU finds its own build again."""
    names = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, **kwargs: names.append(name) or object())
    for avx512 in ("-mavx512f -mavx512bf16", "-mno-avx512f -mno-avx512bf16", "-mavx512f -mavx512bf16"):
        monkeypatch.setenv("CXX", fake_compiler(tmp_path, "cxx", GCC_LINE.format(cpu="znver3", avx512=avx512)))
        monkeypatch.setattr(kernel, "_module", None)
        monkeypatch.setattr(kernel, "_failed", False)
        assert kernel._load() is not None
    assert names[0] != names[1] and names[0] == names[2]
    assert all(name.startswith("rmt_cpu_kernels_") for name in names)


def test_a_compiler_that_cannot_resolve_native_turns_the_kernels_off(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'unrecognized option -march=native' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setattr(kernel, "_module", None)
    monkeypatch.setattr(kernel, "_failed", False)
    assert kernel._load() is None
    assert "unrecognized option" in caplog.text


def test_build_name_depends_on_flags_torch_and_source():
    target = "-march=znver3 -mavx2"
    assert kernel.build_name(("-O3",), target) != kernel.build_name(("-O2",), target)
    name = kernel.build_name(("-O3",), target)
    assert name.isidentifier()  # the built extension is imported under this name
    # a function of its inputs only (no time, pid or path of its own): two CPUs that resolve alike share one build
    assert kernel.build_name(["-O3"], "-march=znver3 -mavx2") == name
    # two environments (a venv beside the system's torch) get a build each
    assert kernel.build_name(("-O3",), target, "2.14.1 /venv/torch") != kernel.build_name(("-O3",), target,
                                                                                          "2.14.1 /usr/torch")
    # and two checkouts: the compile command names the source, and ninja rebuilds when it changes
    assert kernel.build_name(("-O3",), target, "t", "/a/cpu_kernels.cpp") != kernel.build_name(("-O3",), target, "t",
                                                                                               "/b/cpu_kernels.cpp")
