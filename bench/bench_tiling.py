"""Large images with tiled denoising: memory and time against image size, and the seam check.

    python bench/bench_tiling.py                       # CPU: all three tables (about 20 min on 2 cores)
    python bench/bench_tiling.py --device cuda         # the same on a GPU
    python bench/bench_tiling.py --tables memory       # one table: memory | time | seams
    python bench/bench_tiling.py --tables memory --allocator late   # glibc tuned only just before sampling

memory  peak memory of one sampler call (1 step from the middle of the schedule, tile 256, overlap 64, 4 tiles per UNet call) at
        512², 1024², 2048² and 4096² RGB, DPS and DiffPIR, with a small UNet (so that the image-sized
        buffers show), each row in its own process (CPU: its peak resident set; GPU: the allocator's
        peak). Beside it the planned estimate main.py logs, and the slope in bytes per pixel.
time    seconds per step with the google/ddpm-celebahq-256 architecture (random weights) on 256²
        tiles: tiles per step, s/step and s/tile, at the sizes --time_sizes (CPU default 512, 1024).
seams   mean |neighbour difference| across the last step's tile edges over that away from them, on a
        96² restoration with tiles much smaller than the image: the tiny UNet and the analytic prior,
        with blending and random offsets (what the sampler does) and without each; a plot of the
        column profile with the tile edges marked goes to --out/seams.png.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import dps  # noqa: E402
import physics  # noqa: E402
import tiling  # noqa: E402
from bench_dps import CELEBAHQ_SCHEDULER, CELEBAHQ_UNET, peak_memory_gb, reset_peak_memory  # noqa: E402

SMALL_UNET = dict(sample_size=256, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
PHYSICS = dict(blur_mode="motion", kernel_size=21, grid_size=8, n_eigen_psfs=10)
PLAN = tiling.TilePlan(256, 64, 4)


def tiles_used(size, plan, steps, method):
    """Tile evaluations per step of the timed steps (the grid's offset changes the count)."""
    first = dps.DEFAULT_STEPS[method] // 2
    return sum(len(tiling.layout(size, size, plan, i, "cpu")[1]) for i in range(first, first + steps)) / steps


def resident_gb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2 ** 20


def sampler_call(unet, size, method, steps, device, plan=PLAN, tune_late=False):
    """(s/step, peak GB, GB in use before the call) of one sampler call on a size² RGB image under an
    EigenPSF motion blur."""
    torch.manual_seed(0)
    op = physics.create_sv_blur_system(size, size, PHYSICS, device, seed=0)[0]
    pipe = dps.EigenPSFDPSPipeline(unet, DDPMScheduler(**CELEBAHQ_SCHEDULER), op)
    # a measurement the operator can explain (a smooth scene, blurred, σ = 0.05), so that DiffPIR's CG
    # stops where it would on real data rather than fitting noise to its cap
    g = torch.Generator(device).manual_seed(0)
    scene = torch.nn.functional.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g, device=device),
                                            size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        y = op(scene) + 0.05 * torch.randn(1, 3, size, size, generator=g, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cpu" and tune_late:   # --allocator late
        import device as device_setup
        device_setup.tune_cpu_allocator()   # only now: what the setup freed has gone back to the OS
    before = torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else resident_gb()
    reset_peak_memory(device)
    t0 = time.perf_counter()
    total = dps.DEFAULT_STEPS[method]

    def stop(i, *_):
        if i == total // 2 + steps - 1:
            raise StopTiming

    try:   # `steps` steps from the middle of the schedule: the first ones (ρ_t ≈ 0) are DiffPIR's hardest CG solves
        pipe(y, num_inference_steps=total, method=method, sigma_y=0.05, generator=torch.Generator(device).manual_seed(0),
             tiles=plan, check_every=1000, x_T=torch.randn(1, 3, size, size, device=device), start_index=total // 2,
             callback=stop)
    except StopTiming:
        pass
    sync()
    return (time.perf_counter() - t0) / steps, peak_memory_gb(device), before


class StopTiming(Exception):
    pass


def memory_row(size, method, device, allocator):
    unet = UNet2DModel(**SMALL_UNET).to(device).eval().requires_grad_(False)
    s, peak, before = sampler_call(unet, size, method, 1, device, tune_late=allocator == "late")
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    planned = (tiling.estimate_peak_bytes(unet, PLAN, 1, size, size, method, torch.float32) - weights) / 2 ** 30
    return {"size": size, "method": method, "s_per_step": s, "peak_gb": peak, "before_gb": before,
            "planned_gb": planned, "tiles": tiles_used(size, PLAN, 1, method)}


def memory_table(args, device):
    print(f"\nmemory: one sampler call, 1 step, tile {PLAN.tile}, overlap {PLAN.overlap}, {PLAN.batch} tiles per "
          f"UNet call, small UNet ({sum(p.numel() for p in UNet2DModel(**SMALL_UNET).parameters()) / 1e6:.1f} M "
          f"params), EigenPSF K={PHYSICS['n_eigen_psfs']}, each row in its own process")
    print("peak: the process's (CPU: resident set; GPU: allocated); growth: peak − what the process held before "
          "the call (libraries, weights); planned: main.py's estimate less the weights")
    print(f"{'sampler':8s} {'size':>6s} {'tiles/step':>10s} {'peak GB':>8s} {'growth GB':>9s} {'planned GB':>10s} "
          f"{'s/step':>8s}")
    rows = []
    for method in args.samplers.split(","):
        for size in [int(s) for s in args.memory_sizes.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--row", f"{size},{method}", "--device", str(device),
                                  "--allocator", args.allocator],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{method:8s} {size:6d} failed: {out.stderr.strip().splitlines()[-1][:100]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{method:8s} {size:6d} {r['tiles']:10.1f} {r['peak_gb']:8.2f} {r['peak_gb'] - r['before_gb']:9.2f} "
                  f"{r['planned_gb']:10.2f} {r['s_per_step']:8.2f}")
    for method in args.samplers.split(","):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) >= 2:
            px = np.array([r["size"] ** 2 for r in mine], dtype=float)
            slope, icpt = np.polyfit(px, [(r["peak_gb"] - r["before_gb"]) * 2 ** 30 for r in mine], 1)
            print(f"{method}: growth = {icpt / 2 ** 30:.2f} GB + {slope:.0f} bytes per pixel (RGB), a least-squares "
                  f"line through the rows; s/step from {mine[0]['size']}² to {mine[-1]['size']}² grows "
                  f"{mine[-1]['s_per_step'] / mine[0]['s_per_step']:.1f}× for {px[-1] / px[0]:.0f}× the pixels")


def time_table(args, device):
    torch.manual_seed(0)
    unet = UNet2DModel(**CELEBAHQ_UNET).to(device).eval().requires_grad_(False)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ntime: ddpm-celebahq-256 architecture (random weights), tile {PLAN.tile}, overlap {PLAN.overlap}, "
          f"{PLAN.batch} tiles per call, 1 step after a 1-step warm-up; {card}")
    print(f"{'sampler':8s} {'size':>6s} {'tiles':>6s} {'s/step':>8s} {'s/tile':>8s}")
    for method in args.samplers.split(","):
        for size in [int(s) for s in args.time_sizes.split(",")]:
            late = args.allocator == "late"
            sampler_call(unet, 256, method, 1, device, tune_late=late)        # warm-up
            s, _, _ = sampler_call(unet, size, method, 1, device, tune_late=late)
            n = tiles_used(size, PLAN, 1, method)
            print(f"{method:8s} {size:6d} {n:6.0f} {s:8.1f} {s / n:8.2f}", flush=True)


def seam_table(args):
    import priors
    from helpers import tiny_scheduler, tiny_unet
    from test_tiling import border_ratio, seam_problem
    op, y = seam_problem()
    print("\nseams: 96² restoration, 20 steps; mean |neighbour difference| across the last step's tile edges / "
          "elsewhere (1 = no seam)")
    print(f"{'prior':10s} {'sampler':8s} {'offsets':8s} {'overlap':>7s} {'ratio':>6s}")
    real_randint, profiles = torch.randint, {}
    for offsets in ("random", "fixed"):
        if offsets == "fixed":   # what a grid that never moves would do
            tiling.torch.randint = lambda lo, hi, size, generator=None: torch.zeros(size, dtype=torch.long)
        try:
            for prior in ("tiny UNet", "analytic"):
                unet, sched = (tiny_unet(), tiny_scheduler()) if prior == "tiny UNet" else priors.load_model("analytic")
                tile = 16 if prior == "tiny UNet" else 32
                for method in ("dps", "diffpir"):
                    for overlap in (8, 0):
                        plan = tiling.TilePlan(tile, overlap, 16)
                        out, _ = dps.EigenPSFDPSPipeline(unet, sched, op)(
                            y, num_inference_steps=20, method=method, sigma_y=0.02, tiles=plan,
                            generator=torch.Generator().manual_seed(2))
                        img = out[0].permute(1, 2, 0).numpy()
                        print(f"{prior:10s} {method:8s} {offsets:8s} {overlap:7d} "
                              f"{border_ratio(img, 96, 96, plan, 19):6.3f}")
                        if prior == "analytic" and method == "dps" and ((offsets, overlap) in (("random", 8), ("fixed", 0))):
                            profiles[(offsets, overlap)] = (img, plan)
        finally:
            tiling.torch.randint = real_randint
    plot_seams(os.path.join(args.out, "seams.png"), profiles)


def plot_seams(path, profiles):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, axes = plt.subplots(1, len(profiles) + 1, figsize=(5 * (len(profiles) + 1), 4))
    for ax, ((offsets, overlap), (img, plan)) in zip(axes[1:], profiles.items()):
        padding, corners, (th, tw), _ = tiling.layout(96, 96, plan, 19, "cpu")
        dx = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2))
        ax.plot(np.arange(1, 96), dx, lw=1)
        for c in sorted({x0 - padding[0] + d for _, x0 in corners for d in (0, tw)}):
            if 0 < c < 96:
                ax.axvline(c - 0.5, color="r", lw=0.6, alpha=0.6)
        ax.set_title(f"analytic prior, DPS: {offsets} grid, overlap {overlap}\n|x[:, c] − x[:, c−1]| (red: tile edges)")
        ax.set_xlabel("column c")
    axes[0].imshow(profiles[("fixed", 0)][0].clip(0, 1))
    axes[0].set_title("fixed grid, hard tiles: the seams")
    axes[0].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tables", default="memory,time,seams")
    ap.add_argument("--samplers", default="dps,diffpir")
    ap.add_argument("--memory_sizes", default="512,1024,2048,4096")
    ap.add_argument("--time_sizes", default=None, help="CPU default 512,1024; CUDA 512,1024,2048,4096")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out"))
    ap.add_argument("--allocator", default="default", choices=("default", "tuned", "late"),
                    help="CPU: glibc's default, device.tune_cpu_allocator from the start, as a run does (faster, more "
                         "resident memory), or that tuning applied only just before the sampler call")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)   # internal: one memory row
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and args.allocator == "tuned":
        import device as device_setup
        device_setup.tune_cpu_allocator()   # as main.py does on the CPU: large temporaries are not unmapped after each call
    if args.row:
        size, method = args.row.split(",")
        print(json.dumps(memory_row(int(size), method, device, args.allocator)))
        return
    args.time_sizes = args.time_sizes or ("512,1024,2048,4096" if device.type == "cuda" else "512,1024")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}")
    tables = args.tables.split(",")
    if "memory" in tables:
        memory_table(args, device)
    if "time" in tables:
        time_table(args, device)
    if "seams" in tables:
        seam_table(args)


if __name__ == "__main__":
    main()
