"""Markdown tables from `rmt benchmark --json` files: img/s, ms/batch, peak MB and the ratio of
the first model (rmt_*) to each peer.

    python benchmarks/table.py benchmarks/results/cpu_infer_b32.json benchmarks/results/cpu_train_b16.json
"""
import json
import sys


def main(paths) -> None:
    for path in paths:
        rows = json.load(open(path))
        first = rows[0]
        r0 = rows[0]
        h, w = r0["img_size"]
        print(f"\n{r0['mode']}, batch {r0['batch_size']}, {h}x{w}{', autocast ' + r0['amp'] if r0.get('amp') else ''}"
              f" ({path})\n")
        print(f"| model | img/s | ms/batch | peak MB | {first['model']} speed-up | {first['model']} memory |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["mode"] != first["mode"]:
                continue
            mem = r["peak_mb"] and first["peak_mb"] / r["peak_mb"]
            print(f"| {r['model']} | {r['img_per_s']:.1f} | {r['ms_per_batch']:.0f} | {r['peak_mb']:.0f} | "
                  f"{first['img_per_s'] / r['img_per_s']:.2f}x | {mem:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
