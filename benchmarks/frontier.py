"""Accuracy against throughput: RMT-T/S/B/L and timm peers of the same sizes, each model's img/s measured
here in one interleaved run per (mode, precision), against its published ImageNet-1k top-1.

    python benchmarks/frontier.py --output benchmarks/results/frontier      # ~30 min on 2 CPU cores

Inference times all 14 models in one interleaved run per precision; training, one run per size tier
(``TRAIN_TIERS``: all 14 do not fit in memory together), each with rmt_s in it. Writes
``frontier.json`` (every measurement) and ``frontier.png`` (four panels: float32 and bf16
autocast, inference at batch 32 and a training step at batch 16, 224x224), and prints a Markdown
table. Top-1 is what each paper reports for ImageNet-1k training at 224x224 (no extra data, no
distillation, no token labelling); the throughput is this machine's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from rmt.runtime.memory import keep_freed_memory  # noqa: E402
from rmt.tools.benchmark import benchmark  # noqa: E402

# published ImageNet-1k top-1 at 224, trained on ImageNet-1k only
PUBLISHED = {
    "rmt_t": (82.4, "RMT", "Fan et al., CVPR 2024"),
    "rmt_s": (84.1, "RMT", "Fan et al., CVPR 2024"),
    "rmt_b": (85.0, "RMT", "Fan et al., CVPR 2024"),
    "rmt_l": (85.5, "RMT", "Fan et al., CVPR 2024"),
    "swin_tiny_patch4_window7_224": (81.3, "Swin", "Liu et al., ICCV 2021"),
    "swin_small_patch4_window7_224": (83.0, "Swin", "Liu et al., ICCV 2021"),
    "swin_base_patch4_window7_224": (83.5, "Swin", "Liu et al., ICCV 2021"),
    "convnext_tiny": (82.1, "ConvNeXt", "Liu et al., CVPR 2022"),
    "convnext_small": (83.1, "ConvNeXt", "Liu et al., CVPR 2022"),
    "convnext_base": (83.8, "ConvNeXt", "Liu et al., CVPR 2022"),
    "caformer_s18": (83.6, "CAFormer", "Yu et al., TPAMI 2023 (MetaFormer Baselines)"),
    "caformer_s36": (84.5, "CAFormer", "Yu et al., TPAMI 2023 (MetaFormer Baselines)"),
    "mambaout_tiny": (82.7, "MambaOut", "Yu & Wang, CVPR 2025"),
    "mambaout_small": (84.1, "MambaOut", "Yu & Wang, CVPR 2025"),
}
SETTINGS = [("infer", None, 32), ("infer", "bf16", 32), ("train", None, 16), ("train", "bf16", 16)]
STYLE = {"RMT": ("tab:red", "o"), "Swin": ("tab:blue", "s"), "ConvNeXt": ("tab:green", "^"),
         "CAFormer": ("tab:purple", "D"), "MambaOut": ("tab:orange", "v")}
# Training all 14 models in one process needs more than 24 GiB (weights, gradients and AdamW states of
# every model, and each one's activations kept in the heap), so training runs one interleaved run per
# size tier, each with rmt_s in it: rmt_s's row in each tier shows how much the tiers' runs differ.
TRAIN_TIERS = [
    ["rmt_t", "rmt_s", "swin_tiny_patch4_window7_224", "convnext_tiny", "caformer_s18", "mambaout_tiny"],
    ["rmt_s", "rmt_b", "swin_small_patch4_window7_224", "convnext_small", "caformer_s36", "mambaout_small"],
    ["rmt_s", "rmt_l", "swin_base_patch4_window7_224", "convnext_base"],
]


def setting_name(mode: str, amp) -> str:
    return f"{mode}-{amp or 'float32'}"


def measure(settings, iters: int, warmup: int):
    """Yields the rows of each interleaved run as it finishes."""
    for mode, amp, batch in settings:
        groups = [list(PUBLISHED)] if mode == "infer" else TRAIN_TIERS
        for tier, models in enumerate(groups):
            print(f"{mode}, {amp or 'float32'}, batch {batch}" + (f", tier {tier}" if len(groups) > 1 else ""),
                  flush=True)
            results = benchmark(models, batch_size=batch, mode=mode, amp=amp, iters=iters, warmup=warmup,
                                memory=False)
            for r in results:
                print(f"  {r.model:32s} {r.img_per_s:7.2f} img/s", flush=True)
            yield [dict(r.to_dict(), precision=amp or "float32", tier=tier) for r in results]


def first_rows(rows):
    """One row per (model, mode, precision): rmt_s, timed in every training tier, by its first tier."""
    seen, out = set(), []
    for r in rows:
        key = (r["model"], r["mode"], r["precision"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plot(rows, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (mode, amp, batch) in zip(axes.flat, SETTINGS):
        precision = amp or "float32"
        points = [r for r in rows if r["mode"] == mode and r["precision"] == precision]
        for family, (colour, marker) in STYLE.items():
            mine = sorted((r for r in points if PUBLISHED[r["model"]][1] == family), key=lambda r: r["img_per_s"])
            if mine:
                ax.plot([r["img_per_s"] for r in mine], [PUBLISHED[r["model"]][0] for r in mine], marker=marker,
                        color=colour, label=family, linewidth=2.5 if family == "RMT" else 1.2,
                        markersize=8 if family == "RMT" else 6)
                for r in mine:
                    ax.annotate(r["model"].split("_patch")[0].replace("_", "-"), (r["img_per_s"],
                                PUBLISHED[r["model"]][0]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 5, 10, 20: not 5x10^0
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2358" else ""))
        ax.set(xlabel=f"img/s ({'inference' if mode == 'infer' else 'training step'}, batch {batch}, 224 px)",
               ylabel="ImageNet-1k top-1 (%, published)", title=f"{'inference' if mode == 'infer' else 'training'}, "
                                                                  f"{precision}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Accuracy against throughput on this machine's CPU (up and to the right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows) -> str:
    lines = ["| model | top-1 | fp32 infer | bf16 infer | fp32 train | bf16 train |", "|---|---:|---:|---:|---:|---:|"]
    speed = {(r["model"], r["mode"], r["precision"]): r["img_per_s"] for r in rows}
    for model, (top1, _, _) in PUBLISHED.items():
        cells = [f"{speed.get((model, m, p), float('nan')):.2f}" for m, p in
                 (("infer", "float32"), ("infer", "bf16"), ("train", "float32"), ("train", "bf16"))]
        lines.append(f"| {model} | {top1:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/frontier", help="path prefix of the .json and .png")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    names = [setting_name(mode, amp) for mode, amp, _ in SETTINGS]
    parser.add_argument("--settings", nargs="+", choices=names, default=names,
                        help="which settings to measure; their rows replace those in an existing .json")
    parser.add_argument("--plot-only", action="store_true", help="redraw from an existing .json")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    rows = json.loads(json_path.read_text()) if json_path.is_file() else []
    if not args.plot_only:
        keep_freed_memory()
        chosen = [s for s in SETTINGS if setting_name(s[0], s[1]) in args.settings]
        rows = [r for r in rows if setting_name(r["mode"], None if r["precision"] == "float32" else r["precision"])
                not in args.settings]
        for new in measure(chosen, args.iters, args.warmup):
            rows.extend(new)
            json_path.write_text(json.dumps(rows, indent=1))  # after each run: a crash keeps what was measured
    rows = first_rows(rows)
    plot(rows, out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
