#!/usr/bin/env bash
# Reproduces the CPU tables of BENCHMARKS.md (about 10 minutes on 2 cores). Run from the repo root
# on an otherwise idle machine: every figure is a median of interleaved rounds in one process.
# The rmt command keeps freed memory in glibc's heap (rmt.runtime); the *_glibc_default runs
# switch that off (RMT_KEEP_FREED_MEMORY=0) to show what the default allocator costs every model.
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
rmt benchmark rmt_s --mode infer --batch-size 32 --iters 5 --warmup 2 --json > "$out/cpu_infer_b32.json"
rmt benchmark rmt_s --mode train --batch-size 16 --iters 5 --warmup 2 --json > "$out/cpu_train_b16.json"
RMT_KEEP_FREED_MEMORY=0 rmt benchmark rmt_s --mode infer --batch-size 32 --iters 5 --warmup 2 --json \
  > "$out/cpu_infer_b32_glibc_default.json"
RMT_KEEP_FREED_MEMORY=0 rmt benchmark rmt_s --mode train --batch-size 16 --iters 5 --warmup 2 --json \
  > "$out/cpu_train_b16_glibc_default.json"
python benchmarks/scaling.py --sizes 256 384 512 768 1024 --output "$out/scaling_cpu"
python benchmarks/table.py "$out"/cpu_infer_b32*.json "$out"/cpu_train_b16*.json
