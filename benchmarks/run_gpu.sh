#!/usr/bin/env bash
# The GPU tables of BENCHMARKS.md: float32 and bf16 autocast, inference and training, rmt_s
# against the straightforward oracle and swin_tiny. Run from the repo root on a CUDA machine.
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
peers="reference:rmt_s swin_tiny_patch4_window7_224"
for amp in "" "--amp bf16"; do
  tag=${amp:+_bf16}
  rmt benchmark rmt_s --device cuda $amp --peers $peers --mode infer --batch-size 128 --iters 10 --warmup 3 \
    --json > "$out/gpu_infer_b128${tag}.json"
  rmt benchmark rmt_s --device cuda $amp --peers $peers --mode train --batch-size 64 --iters 10 --warmup 3 \
    --json > "$out/gpu_train_b64${tag}.json"
done
python benchmarks/table.py "$out"/gpu_*.json
