"""Where the time of one step goes: torch.profiler over a training step (or an inference batch),
operators grouped into linear layers, convolutions, attention, elementwise, norms, layout copies
and the optimizer.

    python benchmarks/profile_step.py rmt_s --mode train --batch-size 16
    python benchmarks/profile_step.py reference:rmt_s --mode train --batch-size 16
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F

from rmt.runtime import keep_freed_memory
from rmt.tools.benchmark import build_model

GROUPS = [  # first match wins: (group, substrings of aten operator names)
    ("linear (matmul)", ("addmm", "aten::mm", "linear_pointwise", "aten::bmm", "baddbmm")),
    ("convolution", ("convolution", "conv2d", "_convolution_pointwise")),
    ("attention", ("scaled_dot_product", "softmax")),
    ("norms", ("layer_norm", "batch_norm")),
    ("layout copies", ("copy_", "aten::cat", "contiguous", "clone", "_to_copy")),
    ("optimizer", ("lerp_", "addcdiv_", "addcmul_", "sqrt", "_foreach")),
    ("elementwise", ("gelu", "aten::mul", "aten::add", "aten::sub", "aten::div", "sigmoid", "silu",
                     "aten::sum", "fill_", "aten::neg", "aten::where", "view_as_real", "view_as_complex")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--mode", choices=["infer", "train"], default="train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    keep_freed_memory()  # as the rmt command does (rmt.runtime)

    model = build_model(args.model, (args.img_size, args.img_size))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train(args.mode == "train")

    def step():
        if args.mode == "train":
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode():
                model(x)

    step(), step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    total = sum(e.self_cpu_time_total for e in events)
    groups = defaultdict(float)
    for e in events:
        name = next((g for g, keys in GROUPS if any(k in e.key for k in keys)), "other")
        groups[name] += e.self_cpu_time_total
    print(f"{args.model}, {args.mode}, batch {args.batch_size}, {args.img_size}px: "
          f"{total / 1e6:.2f} s of operator time ({torch.get_num_threads()} threads)\n")
    print("| group | s | share |\n|---|---:|---:|")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t / 1e6:.2f} | {t / total:.0%} |")
    print("\n| operator | calls | s | share |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} |")


if __name__ == "__main__":
    main()
