"""DiffPIR's data step: the discrepancy rule's τ and the preconditioner, measured.

    python bench/bench_data_step.py                 # both parts: about 30 min on 2 idle CPU cores
    python bench/bench_data_step.py --part one      # one data step only (seconds)
    python bench/bench_data_step.py --part cost     # what the preconditioner costs and saves (about 2 min)

Part one, one data step x = argmin ‖y − Ax‖² + ρ‖x − z‖² from z = y (a 32² photo, defocus up to
3 px, σ = 0.05): CG plain and preconditioned, under the discrepancy rule (τ = 1 and 1.1) and
without it. It prints the iterations, how far apart the two answers are (relative to the plain
correction ‖x_plain − z‖), and each answer's distance to the truth. Without the rule both solve
to the same argmin; with it, where CG stops depends on its path.

Part two, whole DiffPIR runs (analytic prior, 100 steps, 8 samples, 64², two photos' held-out
crops, two blurs, σ = 0.01 and 0.05), against the exact Gaussian posterior (bench_samplers'
reference: 32 exact draws, each clamped to [0, 1]): for τ in --taus, the data step as it is
(plain CG under the rule, preconditioned to cg_tol) and, at --alt_taus, preconditioned under the
rule too (the data step before the cost part below was measured).

Part cost, at the defaults on a camera-size measurement (bench_speed's 512² RGB one: 12×12 grid of
25-px defocus PSFs, σ = 0.01, K auto; analytic prior, DiffPIR 20 steps, 2 samples): the data step
as it is and with plain CG under the rule, each timed by the run's stage stopwatch (data step,
preconditioner), with the CG iterations and the PSNR of the mean against the clean image.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dps  # noqa: E402
import priors  # noqa: E402
from bench_samplers import N_EXACT, problem, psnr, run_sampler  # noqa: E402

def preconditioned_under_the_rule(operator, y, x0_hat, rho, opt, noise_norm, gains=None, watch=None):
    """The alternative (the data step before the overheads work): the region preconditioner under the
    discrepancy rule too, not only on the solves to cg_tol."""
    pcg = gains is not None and (noise_norm is not None or opt["precondition"])
    precondition = dps.region_preconditioner(gains, rho, watch) if pcg else None
    x, iters, rule = dps.proximal_cg(operator, y, (x0_hat + 1) / 2, rho, opt["cg_tol"], noise_norm,
                                     opt["cg_max_iter"], precondition)
    return 2 * x - 1, iters, rule


def norm(v):
    return float(v.double().norm())


def part_one():
    x, y, eig = problem("astronaut", "defocus", 32, 0.05)
    sigma, m = 0.05, y.numel()
    gains = dps.region_psf_gains(eig, y.shape, y.device, y.dtype)
    print("| ρ | rule | plain CG it | preconditioned it | ‖x_pre − x_plain‖ / ‖x_plain − z‖ "
          "| ‖x_plain − truth‖ | ‖x_pre − truth‖ |")
    print("|---|---|---|---|---|---|---|")
    for rho in (2e-4, 3e-3):
        for tau in (1.0, 1.1, None):
            bound = tau * sigma * m ** 0.5 if tau else None
            runs = [dps.proximal_cg(eig, y, y, rho, 1e-2, bound, 2000, p)
                    for p in (None, dps.region_preconditioner(gains, rho))]
            (xa, ia, _), (xb, ib, _) = runs
            rule = f"discrepancy τ = {tau}" if tau else "off (cg_tol 1e-2)"
            print(f"| {rho:g} | {rule} | {int(ia)} | {int(ib)} | {norm(xb - xa) / norm(xa - y):.0%} | "
                  f"{norm(xa - x):.2f} | {norm(xb - x):.2f} |", flush=True)


def part_two(taus, alt_taus):
    torch.set_num_threads(os.cpu_count() or 1)
    prior, sched = priors.load_model("analytic")
    print("| photo | blur | σ | τ | preconditioner | PSNR vs truth | PSNR vs exact mean | std ratio | wall s "
          "| CG it/step | stops tol/disc/cap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    current = dps.data_proximal_step
    for sigma in (0.01, 0.05):
        for photo in ("astronaut", "immunohistochemistry"):
            for mode in ("defocus", "motion"):
                x, y, eig = problem(photo, mode, 64, sigma)
                _, draws = dps.gaussian_posterior(prior, eig.double(), y, sigma, n_samples=N_EXACT,
                                                  generator=torch.Generator().manual_seed(2), tol=1e-7)
                draws = draws.clamp(0, 1)
                ref_mean, ref_std = draws.mean(1).float(), draws.std(1)
                print(f"| {photo} | {mode} | {sigma} | exact | – | {psnr(ref_mean, x):.2f} | – | – | – | – | – |")
                pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
                for tau in sorted(set(taus) | set(alt_taus)):
                    for label, step in (("plain under the rule (as run)", current),
                                        ("preconditioned under the rule", preconditioned_under_the_rule)):
                        if (step is current and tau not in taus) or (step is not current and tau not in alt_taus):
                            continue
                        dps.data_proximal_step = step
                        try:
                            mean, std, sec, cg, _, rules = run_sampler(pipe, y, "diffpir", 100, sigma, 1.0,
                                                                       torch.device("cpu"), {"discrepancy": tau})
                        finally:
                            dps.data_proximal_step = current
                        ratio = float(std.pow(2).mean().sqrt() / ref_std.pow(2).mean().sqrt())
                        print(f"| {photo} | {mode} | {sigma} | {tau} | {label} | {psnr(mean, x):.2f} | "
                              f"{psnr(mean, ref_mean):.2f} | {ratio:.2f} | {sec:.0f} | {cg:.1f} | {rules} |", flush=True)


def part_cost():
    import tempfile

    import numpy as np
    import tifffile

    import config
    import physics
    import timing
    import utils
    from bench_speed import make_inputs
    work = os.path.join(tempfile.gettempdir(), "eigenpsf-bench-speed")
    argv, cleans = make_inputs(work, 3)["large"]
    y = torch.from_numpy(tifffile.imread(argv[1]).astype(np.float64) / 65535).permute(2, 0, 1)[None].float()
    psfs, coords, _ = utils.load_psf_grid(argv[3])
    pc = {**config.defaults()["physics"], "form": "scatter"}
    eig, _, dec = physics.build_operators(torch.as_tensor(psfs).float(), *y.shape[-2:], pc,
                                          tuple(torch.as_tensor(c) for c in coords))
    prior, sched = priors.load_model("analytic")
    (clean,) = cleans.values()
    print(f"512² RGB, K = {dec.n_components}, DiffPIR 20 steps, 2 samples, σ = 0.01")
    print("| data step under the rule | data step s | of it preconditioner s | CG it/step | PSNR of the mean |")
    print("|---|---|---|---|---|")
    current = dps.data_proximal_step
    for label, step in (("plain (as run)", current), ("preconditioned", preconditioned_under_the_rule)):
        dps.data_proximal_step = step
        watch = timing.Stopwatch()
        try:
            out, inter = dps.EigenPSFDPSPipeline(prior, sched, eig)(
                y, num_inference_steps=20, method="diffpir", sigma_y=0.01, num_samples=2,
                generator=torch.Generator().manual_seed(0), stopwatch=watch)
        finally:
            dps.data_proximal_step = current
        t = watch.report()
        its = np.mean(inter["cg_iterations"])
        print(f"| {label} | {t['data_step'] + t.get('preconditioner', 0):.1f} | {t.get('preconditioner', 0):.1f} | "
              f"{its:.1f} | {utils.psnr(clean, utils.to_numpy(out['mean'])):.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("one", "two", "both", "cost"), default="both")
    ap.add_argument("--taus", default="1,1.01,1.1,1.2", help="τ values for the data step as it is")
    ap.add_argument("--alt_taus", default="1,1.01,1.1,1.2", help="τ values for preconditioned CG under the rule ('' for none)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU threads; {time.strftime('%Y-%m-%d')}")
    if args.part == "cost":
        part_cost()
    if args.part in ("one", "both"):
        part_one()
    if args.part in ("two", "both"):
        floats = lambda v: [float(u) for u in v.split(",") if u]  # noqa: E731
        part_two(floats(args.taus), floats(args.alt_taus))


if __name__ == "__main__":
    main()
