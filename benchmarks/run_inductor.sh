#!/usr/bin/env bash
# torch.compile (inductor) on the CPU: rmt_s and swin_tiny, both compiled, inference batch 32.
# Compilation takes several minutes on 2 cores; the timed rounds exclude it.
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
rmt benchmark rmt_s --compile --peers swin_tiny_patch4_window7_224 --mode infer --batch-size 32 --iters 5 \
  --warmup 2 --json > "$out/cpu_inductor_infer_b32.json"
python benchmarks/table.py "$out/cpu_inductor_infer_b32.json"
