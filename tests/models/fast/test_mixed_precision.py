"""Mixed precision: every fast path runs under autocast (bfloat16 on the CPU; float16 and bfloat16 on
CUDA), forward and backward, in the compute dtype, and no fast path steps aside silently.

The counts below are exact: each decomposed MaSA pass is one call of the compiled attention kernel,
each block rotates q and k once, runs four linears, two depthwise convolutions and one GELU +
depthwise convolution. A pass that fell back to a PyTorch kernel changes a count.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from golden import TINY_ARGS, TINY_CASES, case_input
from rmt.models import RMT
from rmt.models.fast import compute_dtype, ops
from rmt.models.fast import kernel as kernels

BF16 = torch.bfloat16
# head dims 16/32/32/32 (all compiled), every stage decomposed: every attention pass is a short one
SHORT_ARGS = dict(TINY_ARGS, embed_dims=(32, 64, 128, 128), decomposed=(True, True, True, True))


class _OpDtypes(TorchDispatchMode):
    """(ATen operator name, dtype of its first tensor argument) of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.calls.append((func.overloadpacket.__name__, None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))

    def dtypes(self, *names):
        return {dtype for name, dtype in self.calls if name in names}


def _profile(fn):
    with torch.profiler.profile() as prof:
        fn()
    counts = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def _count(counts, name):
    return counts.get(name, 0)


def _blocks(model):
    return sum(len(stage.blocks) for stage in model.layers)


def _plain_convs(model):
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)


# ------------------------------------------------------------------------------ no silent fallback
def test_bf16_inference_takes_every_fast_path(cpu_kernels):
    torch.manual_seed(0)
    model = RMT(**SHORT_ARGS).eval()
    x = torch.randn(2, 3, 64, 96)
    blocks = _blocks(model)
    out = {}

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            out["logits"] = model(x)

    counts = _profile(run)
    assert out["logits"].dtype == BF16
    assert _count(counts, "_ShortAttention") == 2 * blocks  # a row and a column pass per block
    # q and k rotated as the kernel reads them (AVX-512 builds), else in one pass each
    assert _count(counts, "_Rotate") == (0 if kernels._module.fused_rotation else 2 * blocks)
    if ops._ONEDNN and BF16 in ops._ONEDNN_DTYPES:
        assert _count(counts, "mkldnn::_linear_pointwise") == 6 * blocks  # q, k, v, out_proj, fc1, fc2
    assert not [k for k in counts if "scaled_dot_product" in k], counts


def test_bf16_training_takes_every_fast_path_forward_and_backward(cpu_kernels):
    torch.manual_seed(0)
    model = RMT(**SHORT_ARGS).train()
    x = torch.randn(2, 3, 64, 96)
    blocks = _blocks(model)
    log = _OpDtypes()

    def run():
        with log:
            with torch.autocast("cpu", dtype=BF16):
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()

    counts = _profile(run)
    rotations = 0 if kernels._module.fused_rotation else 2 * blocks
    for name, calls in [("_ShortAttention", 2 * blocks), ("_Rotate", rotations),
                        ("_DepthwiseConv", 2 * blocks),  # the block's 3x3 and LePE's 5x5
                        ("_GeluDWConv", blocks)]:         # the FFN's GELU + 3x3
        assert _count(counts, name) == calls, (name, counts.get(name))
        assert _count(counts, name + "Backward") == calls, name + "Backward"
    assert not [k for k in counts if "scaled_dot_product" in k]
    # the depthwise weight gradients come from the kernel: ATen's backward only for the plain convs
    assert sum(1 for name, _ in log.calls if name == "convolution_backward") == _plain_convs(model)
    # and no matmul or convolution was left in float32
    assert log.dtypes("mm", "addmm", "convolution", "convolution_backward") == {BF16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_bf16_training_runs_sdpa_in_float32(cpu_kernels):
    """Passes the kernel does not take (full MaSA; a head dim of 24) run the CPU flash kernel in
    float32: its bfloat16 backward is 6-9x slower."""
    torch.manual_seed(0)
    model = RMT(**TINY_CASES["official_tiny"]).train()  # stage 3 full, stage 3 head dim 24
    log = _OpDtypes()
    with log:
        with torch.autocast("cpu", dtype=BF16):
            loss = model(torch.randn(2, 3, 64, 64)).float().logsumexp(-1).mean()
        loss.backward()
    assert log.dtypes("_scaled_dot_product_flash_attention_for_cpu",
                      "_scaled_dot_product_flash_attention_for_cpu_backward") == {torch.float32}
    assert log.dtypes("mm", "addmm") == {BF16}


# --------------------------------------------------------------------------------- fused paths
@pytest.mark.parametrize("gelu,scaled,with_residual", [(True, False, False), (False, True, True), (False, False, True)])
def test_fused_linear_keeps_the_autocast_dtype(gelu, scaled, with_residual):
    torch.manual_seed(0)
    layer = nn.Linear(48, 64)
    x = torch.randn(2, 5, 7, 48).bfloat16()
    scale = torch.rand(1, 1, 1, 64) if scaled else None
    residual = torch.randn(2, 5, 7, 64).bfloat16() if with_residual else None
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        fused = ops.fused_linear(x, layer, gelu=gelu, scale=scale, residual=residual)
        ops.use_onednn(False)
        try:
            plain = ops.fused_linear(x, layer, gelu=gelu, scale=scale, residual=residual)
        finally:
            ops.use_onednn(True)
    expected = F.linear(x.float(), layer.weight, layer.bias)
    expected = F.gelu(expected) if gelu else expected
    expected = expected * scale if scaled else expected
    expected = expected + residual.float() if with_residual else expected
    assert fused.dtype == plain.dtype == BF16
    # bfloat16 inputs and weights, float32 accumulation: within 1% of the output scale (measured 0.3%)
    bound = 1e-2 * expected.abs().max()
    assert (fused.float() - expected).abs().max() <= bound
    assert (plain.float() - expected).abs().max() <= bound


@pytest.mark.parametrize("gelu", [False, True])
def test_depthwise_convs_keep_the_autocast_dtype_with_the_kernel_gradient(cpu_kernels, gelu):
    torch.manual_seed(1)
    conv = nn.Conv2d(32, 32, 5, padding=2, groups=32)
    h = torch.randn(2, 32, 9, 11).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 32, 9, 11).bfloat16()

    def grads(fast: bool):
        conv.zero_grad()
        h.grad = None
        with torch.autocast("cpu", dtype=BF16):
            if fast:
                fn = ops.gelu_dwconv if gelu else ops.depthwise_conv
                out = fn(h, conv.weight, conv.bias, (2, 2))
            else:
                out = F.conv2d(F.gelu(h) if gelu else h, conv.weight, conv.bias, padding=2, groups=32)
        out.backward(grad.to(out.dtype))
        return out, h.grad, conv.weight.grad, conv.bias.grad

    fast, plain = grads(True), grads(False)
    assert fast[0].dtype == plain[0].dtype == BF16
    assert fast[2].dtype == fast[3].dtype == torch.float32
    for got, want in zip(fast, plain):  # bfloat16 rounding of different intermediate steps
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()


def test_attention_runs_cpu_training_passes_in_float32():
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 2, 20, 16).bfloat16().requires_grad_() for _ in range(3))
    bias = torch.randn(1, 2, 20, 20).bfloat16()
    log = _OpDtypes()
    with log, torch.autocast("cpu", dtype=BF16):
        out = ops.attention(q, k, v, bias, 0.25)
    assert out.dtype == BF16
    with log:
        out.backward(torch.ones_like(out))
    assert log.dtypes("_scaled_dot_product_flash_attention_for_cpu_backward") == {torch.float32}
    assert q.grad.dtype == BF16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=0.25)
    assert (out.float() - expected).abs().max() <= 1.6e-2


def test_compute_dtype():
    x = torch.randn(2)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=BF16):
        assert compute_dtype(x) == BF16
        assert compute_dtype(torch.randn(2, device="meta")) == torch.float32  # no autocast on meta


def test_training_pass_on_the_meta_device():
    """Shape-only training passes (FLOP and memory planning) go through the fast paths' autograd
    functions on the meta device, where autocast does not exist."""
    with torch.device("meta"):
        model = RMT(**TINY_ARGS).train()
        out = model(torch.randn(2, 3, 64, 64))
    assert out.device.type == "meta" and out.shape == (2, TINY_ARGS["num_classes"])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


# ------------------------------------------------------------------------------------- accuracy
# bfloat16 autocast logits against the official float32 logits of the golden cases, as a fraction of
# the largest logit: measured 0.6% (official_tiny) and 2.4% (official_tiny_tl; its token-labelling
# head adds the auxiliary logits); the plain PyTorch ops under autocast measure 0.7% and 2.1%.
GOLDEN_BF16_REL = 0.05


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_bf16_logits_stay_close_to_the_golden_float32(golden_checkpoint, name):
    path, data, args = golden_checkpoint(name)
    model = timm.create_model("rmt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **args).eval()
    for case in data["cases"]:
        golden = torch.tensor(case["logits"])
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            logits = model(case_input(case))
        assert logits.dtype == BF16
        error = (logits.float() - golden).abs().max()
        assert error <= GOLDEN_BF16_REL * golden.abs().max(), (name, error)


# ------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.cuda  # skipped without CUDA (conftest.py)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_cuda_training_step_keeps_the_autocast_dtype(dtype):
    torch.manual_seed(0)
    model = RMT(**TINY_CASES["official_tiny"]).cuda().train()
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    log = _OpDtypes()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def run():
        with log:
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()

    counts = _profile(run)
    assert _count(counts, "_GeluDWConv") == _blocks(model)  # the lean-memory FFN path runs on CUDA too
    assert log.dtypes("mm", "addmm", "convolution") == {dtype}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_cuda_autocast_logits_close_to_float32(dtype):
    torch.manual_seed(0)
    model = RMT(**TINY_CASES["official_tiny"]).cuda().eval()
    x = torch.randn(4, 3, 96, 112, device="cuda")
    with torch.inference_mode():
        expected = model(x)
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() <= GOLDEN_BF16_REL * expected.abs().max()


# ------------------------------------------------------------------- oneDNN's one-column bf16 bug
def test_strided_conv_with_one_output_column_in_bf16():
    """oneDNN's bfloat16 CPU convolution returns garbage (NaN, or 1e36) for a strided convolution with a
    single output column (PyTorch 2.14, output height >= 5): RMT's downsampling runs those in float32.
    A narrow image (33x8: stage 1 is 9x2 tokens, downsampled to 5x1) used to give NaN logits."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, 2, 1).bfloat16()
    x = torch.randn(2, 32, 9, 2).bfloat16()
    expected = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), 2, 1)
    with torch.no_grad():
        torch.full((1 << 17,), float("nan"), dtype=torch.bfloat16)  # freed memory the buggy kernel would read
        got = ops.strided_conv(conv, x)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() <= 0.02 * expected.abs().max()

    model = RMT(**TINY_ARGS).eval()
    images = torch.randn(8, 3, 33, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images)
        narrow = [model.to(torch.bfloat16)(images.bfloat16()).float()]
        model.float()
        with torch.autocast("cpu", torch.bfloat16):
            narrow.append(model(images).float())
    for logits in narrow:
        assert torch.isfinite(logits).all()
        assert (logits - reference).abs().max() <= 0.1 * reference.abs().max()
