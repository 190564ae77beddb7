#!/usr/bin/env bash
# GPU readiness benchmark: a ViT-B/32-sized, randomly initialised DiffusionRet through training steps of
# both stages (fp32 vs bf16 autocast) and an MSR-VTT-scale evaluation (1,000 x 1,000, re-ranking included);
# prints throughput and peak GPU memory. See benchmarks/gpu_bench.py for what is measured. Then the
# stage-2 epoch time online vs from the feature cache at ViT-B/32 shapes (benchmarks/bench_stage2.py).
#
#   bash benchmarks/gpu.sh                      # defaults: batch 32, 10 timed steps per configuration
#   bash benchmarks/gpu.sh --batch 64           # any gpu_bench.py option
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# Finishes in under 10 minutes: gpu_bench.py skips parts that would start after 420 s, and this script
# stops it at 470 s and bench_stage2.py at 100 s whatever happens. Without a CUDA device it refuses
# (exit status 2).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"

if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu.sh: no CUDA device is available to torch ('$python': torch.cuda.is_available() is False)." >&2
    echo "gpu.sh: this benchmark measures GPU throughput and memory and refuses to run on CPU;" >&2
    echo "gpu.sh: for CPU numbers run benchmarks/bench_*.py (see BENCHMARKS.md)." >&2
    exit 2
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
fi

cd "$here"
start=$(date +%s)
status=0
timeout --kill-after=10 470 "$python" gpu_bench.py "$@" || status=$?
stage2_status=0
timeout --kill-after=10 100 "$python" bench_stage2.py --device cuda --online-batch 32 --threads-list 0 \
    --steps 3 --encode-videos 32 || stage2_status=$?
echo "gpu.sh: bench_stage2.py exit status $stage2_status"
echo "gpu.sh: finished in $(( $(date +%s) - start )) s (exit status $status)"
if [ "$status" -eq 124 ]; then
    echo "gpu.sh: stopped at the 470 s limit; rerun with fewer --steps or a smaller --eval-size" >&2
fi
exit "$status"
