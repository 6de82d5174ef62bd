"""Is a prior trained on your own images worth it? Train on fluorescence-like frames, restore
held-out ones under a spatially varying blur, and compare with the analytic prior.

    python bench/bench_training.py                    # about 30 min of training on a 2-core CPU, then restorations
    python bench/bench_training.py --quick            # a 2-minute smoke run of the whole protocol (numbers meaningless)
    python bench/bench_training.py --train_steps 3000 --train_minutes 60   # a fixed number of steps (a shared machine)
    python bench/bench_training.py --model bench_out/training/run/model --samplers dps \
        --dps_gradient_clip 1 --dps_clip_denoised false      # DPS as the README advises for dark backgrounds

1. Data: gray frames of cells (textured ellipses) and beads (small Gaussian spots) on a dark
   background, drawn here; `--n_train` for training, 4 held out.
2. Training: `training.py` with the tiny UNet at 64², for --train_minutes of wall time.
3. Restoration: each held-out frame blurred by the per-pixel ground truth (defocus that varies
   across the field, physics.create_ground_truth) plus noise σ = 0.02, restored with the EigenPSF
   model by DPS (1000 steps), DiffPIR (100 steps) and DAPS (200 annealing levels), 8 posterior samples each, with the trained
   prior and with the analytic prior; PSNR of the posterior mean and of the blurred input, and
   the trained prior's worst and best single sample.
4. Sweeps with the trained prior on two frames: DPS ζ and DiffPIR λ around the defaults.
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
import config  # noqa: E402
import dps  # noqa: E402
import physics  # noqa: E402
import priors  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

PHYSICS = dict(blur_mode="defocus", kernel_size=11, grid_size=4, n_eigen_psfs=6, form="gather", boundary="reflect",
               defocus=dict(min_radius=0.5, max_radius=2.5))


def frame(rng, size):
    """One fluorescence-like frame in [0, 1]: a few textured cells and bright beads."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    img = np.zeros((size, size))
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0, size, 2)
        a, b, th = rng.uniform(6, 14), rng.uniform(4, 9), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / a
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / b
        inside = 0.5 * (1 - np.tanh((u ** 2 + v ** 2 - 1) * 4))   # a soft-edged ellipse
        texture = 0.6 + 0.4 * np.sin(xx / rng.uniform(1.5, 3) + rng.uniform(0, 6)) * np.sin(yy / rng.uniform(1.5, 3))
        img += rng.uniform(0.3, 0.6) * inside * texture
    for _ in range(rng.integers(3, 10)):
        cy, cx, r = *rng.uniform(0, size, 2), rng.uniform(0.8, 1.6)
        img += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
    return np.clip(img + 0.02, 0, 1)


def make_data(folder, n, size, seed):
    import imageio.v3 as iio
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        iio.imwrite(os.path.join(folder, f"f{i:04d}.png"), (frame(rng, size) * 65535).astype(np.uint16))
    return [frame(rng, 64) for _ in range(4)]          # held out: never written to the training folder


def train(folder, out, minutes, quick, steps=None):
    schema = config.load_config(config.DEFAULT_CONFIG)
    cfg = config.validate_config(config.with_defaults({}, schema), schema)
    cfg["train"].update(dir=folder, crop=64 if not quick else 32, batch_size=16, steps=steps or 10 ** 6, lr=2e-4,
                        warmup_steps=100, eval_every=200, sample_every=10 ** 9, checkpoint_every=10 ** 9, rotate90=True)
    trainer, facts = training.prepare(cfg, torch.device("cpu"))
    deadline, t0 = time.time() + 60 * minutes, time.time()
    os.makedirs(out, exist_ok=True)
    training.train(trainer, out, should_stop=lambda: time.time() > deadline, progress=True)
    trainer.save_model(os.path.join(out, "model"))
    print(f"trained {trainer.step} steps in {(time.time() - t0) / 60:.1f} min; last train loss "
          f"{np.mean([h[1] for h in trainer.history[-50:]]):.4f}")
    return os.path.join(out, "model")


def measurement(clean, seed):
    """(the EigenPSF operator, y, the generator): a 64² frame blurred by the per-pixel defocus truth,
    noise σ = 0.02; the generator, past the noise, then drives the sampler."""
    field, truth = physics.create_ground_truth(64, 64, PHYSICS, "cpu", seed=seed)
    op = physics.build_operators(field.node_grid(), 64, 64, PHYSICS)[0]
    r = PHYSICS["kernel_size"] // 2
    x_ext = torch.from_numpy(np.pad(clean, r, mode="reflect")).float()[None, None]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = truth(x_ext) + 0.02 * torch.randn((1, 1, 64, 64), generator=g)
    return op, y, g


def restore(model_id, clean, method, options, steps, samples, seed, clip_denoised=None):
    """PSNR of the posterior mean, of the blurred frame and of each sample, on the fixed [0, 1] range,
    and the sampler's wall time in seconds."""
    op, y, g = measurement(clean, seed)
    unet, sched = priors.load_model(model_id, channels=1)
    pipe = dps.EigenPSFDPSPipeline(unet, sched, op)
    t0 = time.perf_counter()
    out, _ = pipe(y, num_inference_steps=steps, method=method, options=options, sigma_y=0.02, generator=g,
                  num_samples=samples, clip_denoised=clip_denoised)
    seconds = time.perf_counter() - t0
    each = out["samples"][0] if samples > 1 else out                    # (S, 1, 64, 64)
    mean = out["mean"] if samples > 1 else out
    c = clean[..., None]
    per_sample = [utils.psnr(c, utils.to_numpy(each[k:k + 1])) for k in range(each.shape[0])]
    return utils.psnr(c, utils.to_numpy(mean)), utils.psnr(c, utils.to_numpy(y)), per_sample, seconds


def main_():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train_minutes", type=float, default=30)
    ap.add_argument("--n_train", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "training"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", type=int, default=4, help="held-out frames to restore")
    ap.add_argument("--sweep_frames", type=int, default=2, help="frames of the ζ and λ sweeps")
    ap.add_argument("--model", default=None, help="a trained model folder: skip the training")
    ap.add_argument("--zetas", default="0.25,0.5,1,2,4", help="DPS step sizes of the sweep")
    ap.add_argument("--lambdas", default="1,3,7,16,40", help="DiffPIR lambdas of the sweep")
    ap.add_argument("--train_steps", type=int, default=None,
                    help="train this many steps (within --train_minutes), so that a shared machine changes the time only")
    ap.add_argument("--samplers", default="dps,diffpir,daps", help="the samplers of the table and the sweeps")
    ap.add_argument("--daps_steps", type=int, default=200, help="DAPS's annealing levels (config.yaml's default: 200)")
    ap.add_argument("--daps_options", default="{}", help='DAPS settings over its defaults, as JSON, e.g. \'{"final": "mean"}\'')
    ap.add_argument("--dps_gradient_clip", type=float, default=0.0, help="DPS's gradient_clip (0 = off, the default)")
    ap.add_argument("--dps_clip_denoised", choices=("auto", "true", "false"), default="auto",
                    help="DPS's sampler.clip_denoised (auto: the scheduler's clip_sample, which clamps)")
    args = ap.parse_args()
    torch.manual_seed(0)
    minutes, n, dps_steps, diffpir_steps, daps_steps, samples = ((1, 32, 50, 20, 20, 2) if args.quick else
                                                                 (args.train_minutes, args.n_train, 1000, 100,
                                                                  args.daps_steps, 8))
    held_out = make_data(os.path.join(args.out, "clean"), n, 96, seed=0)
    model = args.model or train(os.path.join(args.out, "clean"), os.path.join(args.out, "run"), minutes, args.quick,
                                args.train_steps)
    dps_clip = {"auto": None, "true": True, "false": False}[args.dps_clip_denoised]
    settings = {"dps": ({"step_size": 1.0, "gradient_clip": args.dps_gradient_clip}, dps_clip, dps_steps),
                "diffpir": (None, None, diffpir_steps), "daps": (json.loads(args.daps_options) or None, None, daps_steps)}
    settings = {m: v for m, v in settings.items() if m in args.samplers.split(",")}
    print(f"\nrestoration, 64² gray, defocus varying across the field, σ = 0.02, {samples} samples, posterior mean; "
          f"DPS gradient_clip {args.dps_gradient_clip:g}, clip_denoised {args.dps_clip_denoised}")
    table(model, held_out[:args.frames], settings, samples)   # --frames 0 with --model: the sweeps only
    print(f"\nsweeps with the trained prior (the first {args.sweep_frames} frame(s), mean PSNR of the posterior mean)")
    values = {"dps": ("step_size", args.zetas), "diffpir": ("lambda", args.lambdas)}
    for method, (options, clip, steps) in settings.items():
        if method not in values or not args.sweep_frames:
            continue
        key, vs = values[method]
        for v in [float(v) for v in vs.split(",") if v]:
            try:
                ps = [restore(model, held_out[i], method, {**(options or {}), key: v}, steps, samples, seed=i,
                              clip_denoised=clip)[0] for i in range(args.sweep_frames)]
                print(f"{method:8s} {key}={v:<6g} {np.mean(ps):6.2f} dB", flush=True)
            except dps.DivergenceError as e:
                print(f"{method:8s} {key}={v:<6g} diverged: {e}", flush=True)


def table(model, frames, settings, samples):
    """Blurred, analytic and trained PSNR of each frame, with the trained prior's worst and best sample."""
    print(f"{'frame':5s} {'sampler':8s} {'steps':>5s} {'blurred':>8s} {'analytic':>9s} {'trained':>8s} {'trained s':>9s}"
          f"  trained samples: worst, best")
    rows = []
    for i, clean in enumerate(frames):
        for method, (options, clip, steps) in settings.items():
            p_a, p_y, _, _ = restore("analytic", clean, method, options, steps, samples, seed=i, clip_denoised=clip)
            p_t, _, each, sec = restore(model, clean, method, options, steps, samples, seed=i, clip_denoised=clip)
            rows.append((method, p_a, p_t, sec))
            print(f"{i:5d} {method:8s} {steps:5d} {p_y:8.2f} {p_a:9.2f} {p_t:8.2f} {sec:9.1f}  {min(each):6.2f} "
                  f"{max(each):6.2f}", flush=True)
    print("mean over the frames (PSNR of the posterior mean; the trained prior's sampling time, this machine):")
    for method in settings:
        a, t, sec = (np.mean([r[k] for r in rows if r[0] == method]) for k in (1, 2, 3))
        print(f"      {method:8s} analytic {a:6.2f} dB  trained {t:6.2f} dB  {sec:7.1f} s", flush=True)


if __name__ == "__main__":
    main_()
