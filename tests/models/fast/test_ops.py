"""The fast paths: fused CPU inference, attention kernel choice, torch.compile, and the CUDA path.

Every fast path must give the oracle's numbers; these tests pin each one to the plain computation
and check that the fast kernel is the one that actually runs.
"""
import pytest
import timm
import torch
import torch._dynamo
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from golden import TINY_ARGS, TINY_CASES, oracle_pair
from rmt.models import RMT
from rmt.models.fast import ONNX_OPERATORS_AVAILABLE, Route, kernel, onnx_operators, route
from rmt.models.fast import ops as fused
from rmt.models.reference import reference_rmt
from rmt.tools.benchmark import PeakMemory


@pytest.fixture
def onednn_switch():
    yield fused.use_onednn
    fused.use_onednn(True)


@pytest.mark.parametrize("gelu,scaled,with_residual", [(True, False, False), (False, True, True),
                                                        (False, False, True), (False, False, False)])
def test_fused_linear_matches_plain_ops(gelu, scaled, with_residual):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(2, 5, 7, 24)
    scale = torch.rand(1, 1, 1, 40) if scaled else None
    residual = torch.randn(2, 5, 7, 40) if with_residual else None
    expected = F.linear(x, layer.weight, layer.bias)
    expected = F.gelu(expected) if gelu else expected
    expected = expected * scale if scaled else expected
    expected = expected + residual if with_residual else expected
    with torch.inference_mode():
        out = fused.fused_linear(x, layer, gelu=gelu, scale=scale, residual=residual)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_fused_path_runs_in_inference_only():
    layer = nn.Linear(16, 32)
    x = torch.randn(3, 16)

    def ops(grad: bool):
        with torch.profiler.profile() as prof, torch.set_grad_enabled(grad):
            fused.fused_linear(x, layer, gelu=True)
        return {e.key for e in prof.key_averages()}

    if fused._ONEDNN:
        assert "mkldnn::_linear_pointwise" in ops(grad=False)
    assert "mkldnn::_linear_pointwise" not in ops(grad=True)  # autograd needs the plain ops


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_fused_model_matches_unfused_and_oracle(case, onednn_switch):
    args = dict(TINY_CASES[case])
    fast, oracle = oracle_pair(args, token_label=args.pop("token_label", False))
    with torch.no_grad():  # non-trivial layer scales, so that folding them into the weights is tested
        for name, p in fast.named_parameters():
            if "gamma" in name:
                p.uniform_(0.5, 1.5)
                dict(oracle.named_parameters())[name].copy_(p)
    fast.eval(), oracle.eval()
    x = torch.randn(2, 3, 72, 88)
    with torch.inference_mode():
        onednn_switch(True)
        out = fast(x)
        onednn_switch(False)
        plain = fast(x)
        expected = oracle(x)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    assert (out - expected).abs().max() <= 1e-4


def test_gelu_dwconv_matches_autograd_and_saves_only_its_input():
    torch.manual_seed(0)
    h = torch.randn(2, 12, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(12, 1, 3, 3, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    grad = torch.randn(2, 12, 9, 7)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused.gelu_dwconv(h, weight, bias, (1, 1))
    assert {t.data_ptr() for t in saved} == {h.data_ptr(), weight.data_ptr()}  # not gelu(h)
    expected = F.conv2d(F.gelu(h), weight, bias, padding=1, groups=12)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out, (h, weight, bias), grad)
    want = torch.autograd.grad(expected, (h, weight, bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_training_keeps_less_than_the_oracle():
    """What a training forward keeps for the backward pass (the activation memory) is <= 0.8x the oracle's."""
    x = torch.randn(1, 3, 224, 224)

    def kept(model):
        with PeakMemory() as tracker:
            out = model.train()(x)  # noqa: F841  (holds the graph and what it saved)
            return tracker.live

    ours, oracle = kept(timm.create_model("rmt_t")), kept(reference_rmt("rmt_t"))
    assert ours <= 0.8 * oracle, (ours, oracle)


def test_stochastic_depth_keeps_the_unfused_training_path():
    torch.manual_seed(0)
    model = RMT(**dict(TINY_ARGS, drop_path_rate=0.5)).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        outs = {model(x).sum().item() for _ in range(3)}
    assert len(outs) > 1  # blocks are dropped at random, so the outputs differ


def _sdpa_kernels(model, x):
    with torch.profiler.profile() as prof, torch.inference_mode():
        model(x)
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("decomposed", [(True, True, True, True), (False, False, False, False)])
def test_attention_takes_the_fused_cpu_kernel(decomposed, monkeypatch):
    """The CPU flash kernel runs only for 4-D inputs with a 4-D mask; otherwise torch silently uses math.
    (The compiled short-row kernel is switched off here: it would take these short rows instead.)"""
    monkeypatch.setattr(kernel, "_enabled", False)
    model = RMT(**dict(TINY_ARGS, decomposed=decomposed)).eval()
    kernels = _sdpa_kernels(model, torch.randn(2, 3, 64, 64))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert not any("math" in k for k in kernels), kernels


def test_compiles_without_graph_breaks():
    """torch.compile sees one graph (tables built in-graph, no data-dependent Python); aot_eager keeps
    the numbers."""
    torch._dynamo.reset()
    model = RMT(**TINY_CASES["official_tiny"]).eval()
    x = torch.randn(2, 3, 64, 80)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = RMT(**TINY_CASES["official_tiny"]).train()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.cuda  # skipped without CUDA (conftest.py)


@cuda
def test_cuda_matches_cpu_and_uses_fused_attention():
    torch.manual_seed(0)
    model = RMT(**TINY_CASES["official_tiny"]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        out = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x.cuda())
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert any("efficient" in k or "flash" in k or "cudnn" in k for k in kernels), kernels
    assert not any("math" in k for k in kernels), kernels


@cuda
def test_cuda_training_step_with_bf16_autocast():
    torch.manual_seed(0)
    model = RMT(**TINY_CASES["official_tiny"]).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    optimizer.step()


def test_route_of_each_mode():
    """One decision per call (rmt.models.fast.route): the fast paths on plain eager tensors only; plain
    forms in traces and on meta tensors; ATen ops in captured graphs, under FLOP counting and for
    tensor subclasses; ONNX's operators in graphs captured under onnx_operators()."""
    seen = []

    def record(x):
        seen.append(route(x))
        return x + 1

    class Record(nn.Module):
        def forward(self, x):
            return record(x)

    def routes(run) -> set:
        seen.clear()
        run()
        return set(seen)

    x = torch.randn(2, 3)
    assert routes(lambda: record(x)) == {Route.FAST}
    assert routes(lambda: record(torch.randn(2, 3, device="meta"))) == {Route.PLAIN}
    assert routes(lambda: torch.jit.trace(record, x, check_trace=False)) == {Route.PLAIN}
    assert routes(lambda: torch.fx.symbolic_trace(record)) == {Route.PLAIN}
    with FlopCounterMode(display=False):
        assert routes(lambda: record(x)) == {Route.ATEN}
    assert routes(lambda: record(nn.Parameter(x))) == {Route.ATEN}
    assert routes(lambda: torch.export.export(Record(), (x,))) == {Route.GRAPH}
    with onnx_operators():
        assert routes(lambda: record(x)) == {Route.FAST}  # eager calls are unaffected
        exported = routes(lambda: torch.export.export(Record(), (x,)))
    assert exported == {Route.ONNX if ONNX_OPERATORS_AVAILABLE else Route.GRAPH}
