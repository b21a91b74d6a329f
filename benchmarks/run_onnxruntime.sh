#!/usr/bin/env bash
# Deployed speed on the CPU: rmt_s, swin_tiny and convnext_tiny in PyTorch eager (float32, and int8 with
# dynamically quantized linear layers) and exported to ONNX Runtime (float32, and statically quantized
# int8), interleaved in one run, batch 8, 2 threads, with ONNX Runtime's per-operator profile of each export. Exporting and quantizing take several
# minutes on 2 cores (the timed rounds exclude it); --export-dir keeps the files for later runs.
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
rmt benchmark rmt_s --backend eager eager-int8 onnxruntime onnxruntime-int8 --batch-size 8 --threads 2 --iters 5 \
  --warmup 1 --no-memory --profile --export-dir "${EXPORT_DIR:-/tmp/rmt_onnx_exports}" --json \
  > "$out/onnxruntime_cpu_b8.json"
