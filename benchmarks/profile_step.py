"""Where the time of one step goes: every ATen operator of a training step (or an inference batch)
timed by wall clock, grouped into linear layers, convolutions, attention, elementwise, norms,
layout copies and the optimizer.

The operators are timed from a ``TorchDispatchMode`` (the clock read around each kernel call) rather
than with ``torch.profiler``: on this machine the profiler's instrumentation inflated the oneDNN
depthwise-convolution backward 3-6x, which misplaces where the time goes. The compiled
short-attention kernel (``rmt.models.fast.kernel``) is not an ATen operator: its time is in the row
"(compiled kernels, Python)", the step's wall time minus all operator times.

    python benchmarks/profile_step.py rmt_s --mode train --batch-size 16
    python benchmarks/profile_step.py reference:rmt_s --mode train --batch-size 16
    python benchmarks/profile_step.py rmt_s --mode infer --batch-size 32 --amp bf16

On a machine shared with other jobs, ``--threads 1`` measures CPU time (the thread's own clock)
instead of wall time: other processes then hardly move the figures, which wall time under load does.

With ``--amp bf16`` the forward runs under CPU autocast, as ``rmt benchmark --amp bf16`` does; the
operator table then also gives each operator's input dtype, so that a pass left in float32 (or a
kernel that stepped aside) shows.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rmt.runtime.memory import keep_freed_memory
from rmt.tools.benchmark import build_model

GROUPS = [  # first match wins: (group, substrings of ATen operator names)
    ("compiled kernels, Python", ("(compiled",)),
    ("linear (matmul)", ("addmm", "mm", "linear", "matmul", "bmm", "baddbmm")),
    ("convolution", ("convolution", "conv2d", "_convolution_pointwise")),
    ("attention", ("scaled_dot_product", "softmax")),
    ("norms", ("layer_norm", "batch_norm")),
    ("layout copies", ("copy_", "cat", "contiguous", "clone", "_to_copy")),
    ("optimizer", ("lerp_", "addcdiv_", "addcmul_", "sqrt", "_foreach")),
    ("elementwise", ("gelu", "mul", "add", "sub", "div", "sigmoid", "silu", "sum", "fill_", "neg", "where",
                     "view_as_real", "view_as_complex", "erf", "exp")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--mode", choices=["infer", "train"], default="train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--amp", choices=["bf16"], default=None, help="CPU autocast of the forward")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 times by the thread's CPU clock (robust on a busy machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    keep_freed_memory()  # as the rmt command does (rmt.runtime)

    model = build_model(args.model, (args.img_size, args.img_size))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train(args.mode == "train")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step():
        if args.mode == "train":
            with autocast:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), autocast:
                model(x)

    step(), step()
    timer = _OperatorTimer(clock, by_dtype=args.amp is not None)
    start = clock()
    with timer:
        step()
    total = clock() - start
    # what no ATen operator accounts for: the compiled short-attention kernel, Python, the timer itself
    timer.ops["(compiled kernels, Python)"] = [1, total - sum(t for _, t in timer.ops.values())]
    groups = defaultdict(float)
    for op, (_, t) in timer.ops.items():
        name = next((g for g, keys in GROUPS if any(k in op for k in keys)), "other")
        groups[name] += t
    print(f"{args.model}, {args.mode}, batch {args.batch_size}, {args.img_size}px"
          f"{', autocast ' + args.amp if args.amp else ''}: "
          f"{total:.2f} s ({torch.get_num_threads()} threads, {'CPU' if clock is time.thread_time else 'wall'} time)\n")
    print("| group | s | share |\n|---|---:|---:|")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t:.2f} | {t / total:.0%} |")
    print("\n| operator | calls | s | share |\n|---|---:|---:|---:|")
    for op, (calls, t) in sorted(timer.ops.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"| `{op}` | {calls} | {t:.2f} | {t / total:.0%} |")


class _OperatorTimer(TorchDispatchMode):
    """Wall time and call count of every ATen operator run while active (nested calls are not
    double-counted: the mode is off inside its own handler)."""

    def __init__(self, clock=time.perf_counter, by_dtype: bool = False):
        super().__init__()
        self.clock = clock
        self.ops = defaultdict(lambda: [0, 0.0])
        self.by_dtype = by_dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = self.clock()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.by_dtype:  # the first tensor argument's dtype: bf16 or a pass left in float32
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            name += "" if first is None else f" ({str(first.dtype).removeprefix('torch.')})"
        entry = self.ops[name]
        entry[0] += 1
        entry[1] += self.clock() - start
        return out


if __name__ == "__main__":
    main()
