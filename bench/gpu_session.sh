#!/usr/bin/env bash
# Every GPU check and benchmark, in stages, each with its own time limit, logs under ${OUT:-bench_out}/.
#   bash bench/gpu_session.sh            # all stages
#   STAGES="tests e2e" bash bench/gpu_session.sh
# With 15 minutes of GPU time in all (machine start included), run it in two calls:
#   STAGES="tests e2e"                 (at most 360 s)
#   STAGES="samplers dps tiling"       (at most 420 s)
# and, with time to spare, STAGES="folder physics" (at most 120 s).
# Stages, most important first:
#   tests    tests/test_cuda.py on the GPU (operators, resume with CUDA generators, bf16, compile,
#            batched images), then the physics and sampler unit tests (on that machine's CPU)
#   e2e      python main.py at 256x256, ddpm-celebahq-256 architecture with random weights: fp32, bf16,
#            CUDA graphs, DiffPIR; a folder of 8 images at --batch_size 1, 4, 8; then SIGTERM + --resume
#            against an uninterrupted run
#   samplers DPS vs DiffPIR against the exact Gaussian posterior (analytic prior), 64x64 and 128x128
#   dps      sampler s/step and s/image: fp32 / bf16 / CUDA graphs at batch 1 and 8, bf16 x0_hat error;
#            then one UNet call of each prior's architecture (celebahq, adm-ffhq-256, adm-imagenet-256) at 256²
#   tiling   tiled denoising (tile 256): peak memory at 512²…4096² (small UNet) and s/step, s/tile with the
#            ddpm-celebahq-256 architecture at 512²…2048²
#   folder   folder runs (per-image PSFs and generators), bf16: s/image and peak memory at batch 1, 4, 8, 16
#   physics  operator timings on the GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
STAGES=${STAGES:-"tests e2e samplers dps tiling folder physics"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

stage tests 150 bash -c "python -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs && \
  python -m pytest -q -p no:cacheprovider -n 8 -m 'not slow' tests/test_physics.py tests/test_dps.py"
stage e2e 210 python bench/cuda_e2e.py --steps 100 --timeout 120 --folder \
  --only "dps fp32,dps bf16,dps graphs-bf16,diffpir bf16"
stage samplers 150 python bench/bench_samplers.py --device cuda
stage dps 150 python bench/bench_dps.py --steps 20 --configs fp32,bf16,graphs-bf16 --batches 1,8 --folder_batches "" \
  --arch_repeats 5
stage tiling 120 python bench/bench_tiling.py --device cuda --tables memory,time --time_sizes 512,1024,2048 \
  --out "$OUT"
stage folder 60 python bench/bench_dps.py --steps 10 --configs bf16 --batches 1 --samplers dps,diffpir \
  --folder_batches 1,4,8,16 --archs "" --no_end_to_end
stage physics 60 python bench/bench_physics.py --device cuda
