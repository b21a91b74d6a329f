#!/usr/bin/env bash
# Is rmt right on a GPU? A few minutes on a machine with CUDA (one GPU; two for the NCCL run). Run from
# the repo root after `pip install -e ".[dev]"`. Each step prints what it checked; the script stops at
# the first failure.
#   1. the CUDA tests (they are skipped on CPU-only machines)
#   2. which attention kernels MaSA's passes take on the GPU, per precision (profiler)
#   3. a 2-process NCCL training run of a few steps, resumed once (1 process when there is one GPU)
#   4. the benchmark in bf16 and float32 against the reference implementation and Swin-T
set -euo pipefail
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo "gpu_check: PyTorch sees no CUDA device" >&2; exit 1; fi
echo "== 1. CUDA tests ($gpus GPU(s))"
python -m pytest -q -rs -m cuda

echo "== 2. attention kernels on the GPU"
python - <<'PY'
import torch
import rmt  # noqa: F401
from rmt.models import create_model

model = create_model("rmt_s").cuda().eval()
x = torch.randn(8, 3, 224, 224, device="cuda")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x)
    kernels = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()})
    print(f"{str(dtype):15s}", ", ".join(kernels) or "no fused attention kernel (math path!)")
PY

echo "== 3. NCCL training run"
out=$(mktemp -d)
procs=$(( gpus >= 2 ? 2 : 1 ))
common="--epochs 1 --max-train-samples 512 --max-val-samples 64 --img-size 32 --batch-size 32 --device cuda \
  --checkpoint-interval 4 --output $out/run"
torchrun --standalone --nproc-per-node "$procs" -m rmt train $common
torchrun --standalone --nproc-per-node "$procs" -m rmt train $common --epochs 2 --resume auto
python -c "
from rmt.training import read_run_checkpoint
c = read_run_checkpoint('$out/run/last.pth')
print(f'nccl run: {c.world_size} process(es), {len(c.history)} epochs, {len(c.ranks)} per-process random states')
"

echo "== 4. benchmark"
for amp in "--amp bf16" ""; do
  rmt benchmark rmt_s --device cuda $amp --peers reference:rmt_s swin_tiny_patch4_window7_224 --mode both \
    --batch-size 64 --iters 10 --warmup 3
done
