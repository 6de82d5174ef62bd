#!/usr/bin/env bash
# Every GPU check and benchmark in one short run (about 5-8 minutes on an H100, most of it
# torch.compile). Writes its logs under ${OUT:-bench_out}/.
#   bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. the physics and sampler unit tests in that environment (they run on its CPU)
python -m pytest -q tests/test_physics.py tests/test_dps.py -x 2>&1 | tail -3 | tee "$OUT/tests.txt"
# 2. operator speed on the GPU
python bench/bench_physics.py --device cuda 2>&1 | tee "$OUT/bench_physics.txt"
# 3. DPS speed: fp32 / tf32 / bf16 / compiled / CUDA graphs at batch 1 and 8, with the bf16 accuracy check
python bench/bench_dps.py --steps 20 2>&1 | tee "$OUT/bench_dps.txt"
