"""bfloat16 against float32 on this CPU: what `--dtype bfloat16` does to a learned prior's
restoration, and to the UNet's time.

    python bench/bench_dtype.py                      # the prior bench/bench_training.py trained
    python bench/bench_dtype.py --model DIR --sizes 64,256

1. Quality: the trained prior of bench/bench_training.py (its default output folder) restores that
   bench's 4 held-out fluorescence frames (64², per-pixel defocus, σ = 0.02) with DiffPIR at 100
   steps, one sample, the same seed in both dtypes: PSNR of each against the clean frame, and the
   difference. The UNet runs under autocast, as main.py runs it; the data step stays float32.
2. Speed: one UNet forward of the google/ddpm-celebahq-256 architecture (random weights) per
   size, batch 1, in each dtype (median of --repeats), and the ratio.

Prints whether the CPU has native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import device as device_setup  # noqa: E402
import dps  # noqa: E402
import priors  # noqa: E402
import utils  # noqa: E402
from bench_training import frame, measurement  # noqa: E402


def held_out_frames(n_train=400):
    """bench_training.make_data's 4 held-out frames, drawn from the same generator without writing
    the training set again."""
    rng = np.random.default_rng(0)
    for _ in range(n_train):
        frame(rng, 96)
    return [frame(rng, 64) for _ in range(4)]


def restore(unet, sched, clean, seed, dtype):
    op, y, g = measurement(clean, seed)
    t0 = time.perf_counter()
    out, _ = dps.EigenPSFDPSPipeline(unet, sched, op)(y, num_inference_steps=100, method="diffpir", sigma_y=0.02,
                                                      generator=g, dtype=dtype)
    return utils.psnr(clean[..., None], utils.to_numpy(out)), time.perf_counter() - t0


def quality(model):
    unet, sched = priors.load_model(model, channels=1)
    print(f"1. {model}: DiffPIR 100 steps, 4 held-out frames, σ = 0.02")
    print(f"{'frame':>5s} {'fp32 dB':>8s} {'bf16 dB':>8s} {'bf16 − fp32':>11s} {'fp32 s':>7s} {'bf16 s':>7s}")
    diffs = []
    for i, clean in enumerate(held_out_frames()):
        (p32, s32), (p16, s16) = (restore(unet, sched, clean, i, dt) for dt in (torch.float32, torch.bfloat16))
        diffs.append(p16 - p32)
        print(f"{i:5d} {p32:8.2f} {p16:8.2f} {p16 - p32:+11.3f} {s32:7.1f} {s16:7.1f}", flush=True)
    print(f"mean bf16 − fp32: {np.mean(diffs):+.3f} dB, worst {min(diffs):+.3f} dB")


def speed(sizes, repeats):
    from bench_dps import CELEBAHQ_UNET
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(CELEBAHQ_UNET).eval().requires_grad_(False)
    print(f"\n2. celebahq architecture (113.7 M, random weights), one forward, batch 1, median of {repeats}")
    print(f"{'size':>5s} {'fp32 s':>8s} {'bf16 s':>8s} {'fp32/bf16':>9s}")
    for size in sizes:
        x, t = torch.randn(1, 3, size, size), torch.tensor(500)
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            runs = []
            for k in range(repeats + 1):          # the first call warms up
                t0 = time.perf_counter()
                with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    unet(x, t)
                if k:
                    runs.append(time.perf_counter() - t0)
            times[dtype] = statistics.median(runs)
        print(f"{size:5d} {times[torch.float32]:8.2f} {times[torch.bfloat16]:8.2f} "
              f"{times[torch.float32] / times[torch.bfloat16]:8.2f}×", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "bench_out", "training", "run", "model"))
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; native bf16: "
          f"{device_setup.cpu_has_native_bf16()}")
    if os.path.isdir(args.model):
        quality(args.model)
    else:
        print(f"1. skipped: no trained prior in {args.model} (python bench/bench_training.py trains one)")
    speed([int(s) for s in args.sizes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
