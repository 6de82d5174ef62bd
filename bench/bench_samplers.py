"""DPS, DiffPIR and DAPS on problems with an exact answer.

    python bench/bench_samplers.py --sizes 64       # 8 problems at 64²: about 40 min on 2 idle CPU cores
    python bench/bench_samplers.py --device cuda    # the full table, 64² and 128²
    python bench/bench_samplers.py --sizes 64 --sigmas 0.05 --photos astronaut --modes motion   # one problem

With the analytic prior (priors.AnalyticPrior: a Gaussian fitted to other photographs) the
posterior under the reconstruction operator is Gaussian, so it is known exactly:
dps.gaussian_posterior gives exact posterior draws (perturbation-optimisation, each a CG solve to
1e-7). The measurement comes from the per-pixel ground truth (physics.GroundTruthBlur, with real
scene margin), not from the model. Like for like: the samplers clamp each sample to [0, 1], so the
reference is N_EXACT exact draws each clamped to [0, 1] (their mean and std).

For each photo × blur mode × size × σ it prints the exact row, the classical baselines
(baselines.py: Richardson-Lucy and Tikhonov, both stopped by the discrepancy principle) and each
sampler setting:
- PSNR of the mean of 8 samples against the truth and against the exact (clamped) posterior mean
  (and, on the exact row, the PSNR of the mean of 8 exact draws: what a perfect sampler's 8-sample
  mean scores);
- std ratio: RMS of the 8-sample std over RMS of the exact (clamped) posterior std (1 is right);
- NFE (network evaluations; DPS also runs a backward pass per step) and wall time;
- DiffPIR: mean CG iterations per step, the share of the time spent in the data step, and how the
  data steps stopped (tolerance / discrepancy / cap, counted over steps × samples).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import baselines  # noqa: E402
import dps  # noqa: E402
import physics  # noqa: E402
import priors  # noqa: E402
import utils  # noqa: E402
from bench_dps import data_step_timer  # noqa: E402

# Held out: the analytic prior was fitted on chelsea, coffee and rocket.
PHOTOS = {"astronaut": lambda d: d.astronaut(), "immunohistochemistry": lambda d: d.immunohistochemistry()}
# Not a photo: a scene drawn from the analytic prior itself (unclipped), where that prior is the
# images' true law and the exact posterior mean is the best estimate there is (--photos prior_draw).
PRIOR_DRAW = "prior_draw"
MODES = {"motion": dict(motion=dict(min_length=2.0, max_length=9.0)), "defocus": dict(defocus=dict(max_radius=3.0))}
SETTINGS = "dps:1000,dps:250,diffpir:100,diffpir:20,diffpir-solved:20,daps:200,daps:50"
# diffpir-solved: every data step solved to cg_tol (the discrepancy rule off), to show what the rule changes.
VARIANTS = {"diffpir-solved": ("diffpir", {"discrepancy": 0.0})}
N_SAMPLES = 8
N_EXACT = 32   # exact posterior draws for the reference mean and std


def problem(photo, mode, size, sigma, seed=0):
    """(x (1,3,H,W) truth (in [0, 1] for photos), y from the per-pixel ground truth + noise, EigenPSF operator)."""
    from skimage import data
    pc = dict(blur_mode=mode, kernel_size=11, grid_size=4, n_eigen_psfs=16, form="auto", boundary="reflect",
              **MODES[mode])
    pc["form"] = physics.resolve_form(pc)
    field, truth = physics.create_ground_truth(size, size, pc, seed=seed)
    r = pc["kernel_size"] // 2
    if photo == PRIOR_DRAW:
        prior = priors.load_model("analytic")[0]
        x_ext = (prior.sample_prior((1, 3, size + 2 * r, size + 2 * r), torch.Generator().manual_seed(seed + 7)) + 1) / 2
    else:
        scene = utils.center_crop_resize(utils.to_float_image(PHOTOS[photo](data), photo), size, margin=r)
        x_ext = utils.to_tensor(scene, "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = truth(x_ext) + sigma * torch.randn((1, 3, size, size), generator=gen)
    eig, _, _ = physics.build_operators(field.node_grid(), size, size, pc)
    return truth.crop(x_ext), y, eig


def psnr(a, b):
    return float(-10 * torch.log10(((a.double() - b.double()) ** 2).mean()))


def run_sampler(pipe, y, setting, steps, sigma, options_by_method, device):
    """(mean, std, seconds, mean CG iterations, data-step share, stop-rule counts) of N_SAMPLES samples.
    options_by_method: each sampler's settings over its defaults ({"dps": {...}, "diffpir": ..., "daps": ...})."""
    method, options = VARIANTS.get(setting, (setting, {}))
    options = {**options_by_method.get(method, {}), **options}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with data_step_timer(sync) as data_time:
        t0 = time.perf_counter()
        out, inter = pipe(y, num_inference_steps=steps, method=method, sigma_y=sigma, num_samples=N_SAMPLES,
                          options=options, generator=torch.Generator(device).manual_seed(1))
        sync()
        seconds = time.perf_counter() - t0
    cg = float(np.mean(inter["cg_iterations"])) if inter["cg_iterations"] else 0.0
    rules = inter["cg_stop_rule_per_image"]
    counts = "/".join(str(int((rules == k).sum())) for k in range(len(dps.STOP_RULES))) if rules is not None else "–"
    return out["mean"], out["std"], seconds, cg, data_time[0] / seconds, counts


def baseline_rows(head, eig, y, sigma, x, ref_mean):
    """One row per classical baseline (baselines.restore_baselines), with its own wall time."""
    t0 = time.perf_counter()
    results = baselines.restore_baselines(eig, y, sigma)
    seconds = time.perf_counter() - t0
    for name, (est, facts) in results.items():
        what = f"{facts['iterations']} it, {facts['stopped_by']}" if name == "richardson_lucy" else \
            f"α = {facts['alpha']:.2g}, {facts['cg_iterations_total']} CG it"
        print(f"{head} {name} (baseline) | – | – | {psnr(est, x):.2f} | {psnr(est, ref_mean):.2f} | – | "
              f"{seconds:.1f} | {what} | – | – |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default=",".join(PHOTOS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--sigmas", default="0.01,0.05")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", default=SETTINGS, help="sampler:steps, comma-separated ('' for the exact posterior alone)")
    ap.add_argument("--dps_step_size", type=float, default=1.0, help="DPS ζ (config.yaml's default)")
    ap.add_argument("--diffpir_options", default="{}", help='DiffPIR settings over its defaults, as JSON, e.g. \'{"lambda": 4}\'')
    ap.add_argument("--daps_options", default="{}", help='DAPS settings over its defaults, as JSON, e.g. \'{"conditional": "langevin"}\'')
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = [(m, int(n)) for m, n in (item.split(":") for item in args.settings.split(",") if item)]
    options_by_method = {"dps": {"step_size": args.dps_step_size}, "diffpir": json.loads(args.diffpir_options),
                         "daps": json.loads(args.daps_options)}
    device = torch.device(args.device)
    daps_ode_steps = dps.sampler_options("daps", options_by_method["daps"])["ode_steps"]
    prior, sched = priors.load_model("analytic", device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU threads"
    print(f"torch {torch.__version__}, {where}; {N_SAMPLES} samples per setting; "
          f"DPS step_size {args.dps_step_size}; DiffPIR {dps.sampler_options('diffpir', options_by_method['diffpir'])}; "
          f"DAPS {dps.sampler_options('daps', options_by_method['daps'])}")
    print(f"Like for like: the samplers clamp each sample to [0, 1], so the exact reference is {N_EXACT} exact "
          f"posterior draws, each clamped to [0, 1]; 'exact mean' is their mean, the std ratio is over their std.")
    print("| photo | blur | size | σ | method | steps | NFE | PSNR vs truth | PSNR vs exact mean | std ratio "
          "| wall s | CG it/step | data-step share | stops tol/disc/cap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        for sigma in map(float, args.sigmas.split(",")):
            for photo in args.photos.split(","):
                for mode in args.modes.split(","):
                    x, y, eig = problem(photo, mode, size, sigma)
                    x, y, eig = x.to(device), y.to(device), eig.to(device)
                    t0 = time.perf_counter()
                    _, draws = dps.gaussian_posterior(prior, eig.double(), y, sigma, n_samples=N_EXACT,
                                                      generator=torch.Generator(device).manual_seed(2), tol=1e-7)
                    draws = draws.clamp(0, 1)
                    ref_mean, ref_std = draws.mean(1).float(), draws.std(1)
                    head = f"| {photo} | {mode} | {size} | {sigma} |"
                    # The mean of N_SAMPLES exact draws: what a perfect sampler's N-sample mean scores.
                    print(f"{head} exact posterior | – | – | {psnr(ref_mean, x):.2f} | – | "
                          f"(std RMS {float(ref_std.pow(2).mean().sqrt()):.4f}) | {time.perf_counter() - t0:.0f} "
                          f"| – | – | – |  blurred: {psnr(y.clamp(0, 1), x):.2f} dB; mean of {N_SAMPLES} exact draws: "
                          f"{psnr(draws[:, :N_SAMPLES].mean(1), x):.2f} dB", flush=True)
                    baseline_rows(head, eig, y, sigma, x, ref_mean)
                    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
                    for setting, steps in settings:
                        m, s, sec, cg, share, rules = run_sampler(pipe, y, setting, steps, sigma, options_by_method,
                                                                  device)
                        ratio = float(s.pow(2).mean().sqrt() / ref_std.pow(2).mean().sqrt())
                        nfe = {"dps": f"{steps} + {steps} bwd", "daps": f"{steps * daps_ode_steps}"}.get(setting, f"{steps}")
                        extra = f"{cg:.1f} | {100 * share:.0f}% | {rules}" if setting != "dps" else "– | – | –"
                        print(f"{head} {setting} | {steps} | {nfe} | {psnr(m, x):.2f} | {psnr(m, ref_mean):.2f} | "
                              f"{ratio:.2f} | {sec:.0f} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
