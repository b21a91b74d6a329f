#!/usr/bin/env bash
# Reproduces the CPU tables of BENCHMARKS.md. Run from the repo root on an otherwise idle machine:
# every figure is a median of interleaved rounds in one process.
#   bash benchmarks/run_cpu.sh          float32 and bf16 autocast, inference and training (~15 min)
#   bash benchmarks/run_cpu.sh --all    also the default-allocator runs and the size scaling (~30 min)
# The rmt command keeps freed memory in glibc's heap (rmt.runtime); the *_glibc_default runs
# switch that off (RMT_KEEP_FREED_MEMORY=0) to show what the default allocator costs every model.
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
for precision in float32 bf16; do
  amp=""; suffix=""
  if [ "$precision" = bf16 ]; then amp="--amp bf16"; suffix="_bf16"; fi
  rmt benchmark rmt_s --mode infer --batch-size 32 --iters 5 --warmup 2 $amp --json > "$out/cpu_infer_b32$suffix.json"
  rmt benchmark rmt_s --mode train --batch-size 16 --iters 5 --warmup 2 $amp --json > "$out/cpu_train_b16$suffix.json"
done
python benchmarks/table.py "$out"/cpu_infer_b32.json "$out"/cpu_infer_b32_bf16.json \
  "$out"/cpu_train_b16.json "$out"/cpu_train_b16_bf16.json
if [ "${1:-}" = "--all" ]; then
  RMT_KEEP_FREED_MEMORY=0 rmt benchmark rmt_s --mode infer --batch-size 32 --iters 5 --warmup 2 --json \
    > "$out/cpu_infer_b32_glibc_default.json"
  RMT_KEEP_FREED_MEMORY=0 rmt benchmark rmt_s --mode train --batch-size 16 --iters 5 --warmup 2 --json \
    > "$out/cpu_train_b16_glibc_default.json"
  python benchmarks/scaling.py --sizes 256 384 512 768 1024 --output "$out/scaling_cpu"
  python benchmarks/table.py "$out"/cpu_*_glibc_default.json
fi
