"""DPS against DiffPIR on problems with an exact answer.

    python bench/bench_samplers.py --sizes 64       # 8 problems at 64²: about 25 min on 2 idle CPU cores
    python bench/bench_samplers.py --device cuda    # the full table, 64² and 128²
    python bench/bench_samplers.py --sizes 64 --sigmas 0.05 --photos astronaut --modes motion   # one problem

With the analytic prior (dps.AnalyticPrior: a Gaussian fitted to other photographs) the
posterior under the reconstruction operator is Gaussian, so it is known exactly:
dps.gaussian_posterior gives its mean by one preconditioned CG solve (to 1e-7), and its per-pixel std from exact
posterior draws (perturbation-optimisation). The measurement comes from the per-pixel ground truth
(physics.GroundTruthBlur, with real scene margin), not from the model.

For each photo × blur mode × size × σ and each sampler setting it prints:
- PSNR of the mean of 8 samples against the truth and against the exact posterior mean (and, on the
  exact row, the PSNR of the mean of 8 exact posterior draws: a perfect sampler's 8-sample mean
  falls short of the exact mean by the posterior spread over 8);
- std ratio: RMS of the 8-sample std over RMS of the exact posterior std (1 is right);
- NFE (network evaluations; DPS also runs a backward pass per step) and wall time;
- DiffPIR: mean CG iterations per step and the share of the time spent in the data step.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dps  # noqa: E402
import physics  # noqa: E402
import utils  # noqa: E402
from bench_dps import data_step_timer  # noqa: E402

# Held out: the analytic prior was fitted on chelsea, coffee and rocket.
PHOTOS = {"astronaut": lambda d: d.astronaut(), "immunohistochemistry": lambda d: d.immunohistochemistry()}
MODES = {"motion": dict(motion=dict(min_length=2.0, max_length=9.0)), "defocus": dict(defocus=dict(max_radius=3.0))}
SETTINGS = "dps:1000,dps:250,diffpir:100,diffpir:20"
N_SAMPLES = 8


def problem(photo, mode, size, sigma, seed=0):
    """(x (1,3,H,W) truth in [0, 1], y from the per-pixel ground truth + noise, EigenPSF operator)."""
    from skimage import data
    pc = dict(blur_mode=mode, kernel_size=11, grid_size=4, n_eigen_psfs=16, form="auto", boundary="reflect",
              **MODES[mode])
    pc["form"] = physics.resolve_form(pc)
    field, truth = physics.create_ground_truth(size, size, pc, seed=seed)
    r = pc["kernel_size"] // 2
    scene = utils.center_crop_resize(utils.to_float_image(PHOTOS[photo](data), photo), size, margin=r)
    x_ext = utils.to_tensor(scene, "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = truth(x_ext) + sigma * torch.randn((1, 3, size, size), generator=gen)
    eig, _, _ = physics.build_operators(field.node_grid(), size, size, pc)
    return truth.crop(x_ext), y, eig


def psnr(a, b):
    return float(-10 * torch.log10(((a.double() - b.double()) ** 2).mean()))


def run_sampler(pipe, y, method, steps, sigma, step_size, device):
    """(mean, std, seconds, mean CG iterations, data-step share) of N_SAMPLES samples."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with data_step_timer(sync) as data_time:
        t0 = time.perf_counter()
        out, inter = pipe(y, num_inference_steps=steps, method=method, sigma_y=sigma, num_samples=N_SAMPLES,
                          options={"step_size": step_size} if method == "dps" else None,
                          generator=torch.Generator(device).manual_seed(1))
        sync()
        seconds = time.perf_counter() - t0
    cg = float(np.mean(inter["cg_iterations"])) if inter["cg_iterations"] else 0.0
    return out["mean"], out["std"], seconds, cg, data_time[0] / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default=",".join(PHOTOS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--sigmas", default="0.01,0.05")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", default=SETTINGS, help="sampler:steps, comma-separated ('' for the exact posterior alone)")
    ap.add_argument("--dps_step_size", type=float, default=1.0, help="DPS ζ (config.yaml's default)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = [(m, int(n)) for m, n in (item.split(":") for item in args.settings.split(",") if item)]
    device = torch.device(args.device)
    prior, sched = dps.load_model("analytic", device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU threads"
    print(f"torch {torch.__version__}, {where}; {N_SAMPLES} samples per setting; "
          f"DPS step_size {args.dps_step_size}; DiffPIR defaults {dps.SAMPLERS['diffpir'][1]}")
    print("| photo | blur | size | σ | sampler | steps | NFE | PSNR vs truth | PSNR vs exact mean | std ratio "
          "| wall s | CG it/step | data-step share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        for sigma in map(float, args.sigmas.split(",")):
            for photo in args.photos.split(","):
                for mode in args.modes.split(","):
                    x, y, eig = problem(photo, mode, size, sigma)
                    x, y, eig = x.to(device), y.to(device), eig.to(device)
                    t0 = time.perf_counter()
                    mean, draws = dps.gaussian_posterior(prior, eig.double(), y, sigma, n_samples=N_SAMPLES,
                                                         generator=torch.Generator(device).manual_seed(2), tol=1e-7)
                    exact_std = draws.std(1)
                    head = f"| {photo} | {mode} | {size} | {sigma} |"
                    # The mean of N_SAMPLES exact draws: what a perfect sampler's N-sample mean scores.
                    print(f"{head} exact posterior | – | – | {psnr(mean.clamp(0, 1), x):.2f} | – | "
                          f"(std RMS {float(exact_std.pow(2).mean().sqrt()):.4f}) | {time.perf_counter() - t0:.0f} "
                          f"| – | – |  blurred: {psnr(y.clamp(0, 1), x):.2f} dB; mean of {N_SAMPLES} exact draws: "
                          f"{psnr(draws.mean(1).clamp(0, 1), x):.2f} dB", flush=True)
                    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
                    for method, steps in settings:
                        m, s, sec, cg, share = run_sampler(pipe, y, method, steps, sigma, args.dps_step_size, device)
                        ratio = float(s.pow(2).mean().sqrt() / exact_std.pow(2).mean().sqrt())
                        nfe = f"{steps} + {steps} bwd" if method == "dps" else f"{steps}"
                        extra = f"{cg:.1f} | {100 * share:.0f}%" if method == "diffpir" else "– | –"
                        print(f"{head} {method} | {steps} | {nfe} | {psnr(m, x):.2f} | {psnr(m, mean.float()):.2f} | "
                              f"{ratio:.2f} | {sec:.0f} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
