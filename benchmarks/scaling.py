"""Feature-extraction cost against input size: rmt_s, the straightforward oracle and swin_tiny.

For each side length the models are timed interleaved (``rmt.tools.benchmark``) in ``features``
mode (image -> last feature map, batch 1, inference). Writes ``OUT.json``, ``OUT.png`` (ms per
image against size, log-log, and the cost relative to 512) and prints a markdown table.

    python benchmarks/scaling.py --sizes 256 384 512 768 1024 --output benchmarks/results/scaling_cpu
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rmt.runtime.memory import keep_freed_memory
from rmt.tools.benchmark import benchmark

DEFAULT_MODELS = ["rmt_s", "reference:rmt_s", "swin_tiny_patch4_window7_224"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512, 768, 1024])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="benchmarks/results/scaling_cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the rmt command does (rmt.runtime)

    rows = []
    for size in args.sizes:
        for r in benchmark(args.models, batch_size=args.batch_size, img_size=(size, size), mode="features",
                           warmup=args.warmup, iters=args.iters, device=args.device, memory=True):
            rows.append(dict(r.to_dict(), size=size, ms_per_image=r.ms_per_batch / args.batch_size))
            print(f"{size:5d}  {r.model:30s} {r.ms_per_batch / args.batch_size:9.1f} ms/img  "
                  f"{r.peak_mb:8.1f} MB", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
                batch_size=args.batch_size, iters=args.iters)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    by_model = {m: {r["size"]: r for r in rows if r["model"] == m} for m in args.models}
    print("\n| model | " + " | ".join(f"{s}px ms" for s in args.sizes) + " | 1024/512 |")
    print("|---|" + "---:|" * (len(args.sizes) + 1))
    for model, per_size in by_model.items():
        ratio = (per_size[1024]["ms_per_image"] / per_size[512]["ms_per_image"]
                 if 1024 in per_size and 512 in per_size else float("nan"))
        cells = " | ".join(f"{per_size[s]['ms_per_image']:.0f}" for s in args.sizes)
        print(f"| {model} | {cells} | {ratio:.2f}x |")
    _plot(by_model, args.sizes, out.with_suffix(".png"))


def _plot(by_model, sizes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax, rel) = plt.subplots(1, 2, figsize=(10, 4))
    for model, per_size in by_model.items():
        xs = [s for s in sizes if s in per_size]
        ax.plot(xs, [per_size[s]["ms_per_image"] for s in xs], marker="o", label=model)
        if 512 in per_size:
            rel.plot(xs, [per_size[s]["ms_per_image"] / per_size[512]["ms_per_image"] for s in xs], marker="o",
                     label=model)
    xs = [s for s in sizes]
    rel.plot(xs, [(s / 512) ** 2 for s in xs], "k--", lw=1, label="pixels (linear cost)")
    ax.set(xscale="log", yscale="log", xlabel="input side (px)", ylabel="ms per image",
           title="features, batch 1")
    rel.set(xscale="log", yscale="log", xlabel="input side (px)", ylabel="cost / cost at 512",
            title="scaling relative to 512x512")
    for a in (ax, rel):
        a.set_xticks(xs, [str(s) for s in xs])
        a.xaxis.set_minor_formatter(NullFormatter())
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
