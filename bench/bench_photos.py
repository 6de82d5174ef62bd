"""Does a prior trained here on real photographs beat the classical baselines on real-lens blur?

    python bench/bench_photos.py                  # the data, 60 min of training per model size, restorations, tables
    python bench/bench_photos.py --quick          # a few-minute smoke run of the whole protocol (numbers meaningless)
    python bench/bench_photos.py --stage restore  # restore with the snapshots already trained (results.json resumes)

1. Data. 26 photographs (not the rendered artwork) from Debian's wallpaper packages
   plasma-workspace-wallpapers, lomiri-wallpapers-16.04 and lomiri-wallpapers-20.04 (installed with
   apt-get when missing and run as root; otherwise the command is printed), and four of
   scikit-image's colour photos. Every photo is downscaled (anti-aliased) so that its shorter side
   is --scale = 192 px: the wallpapers are 1600-4000 px high, sharpened and JPEG-compressed, and at
   1/8-1/20 of that their own blur, noise and artefacts are well under a pixel, so the clean truth
   is sharp against the lens blur added here (RMS radius 1.6-4.9 px); the restored 128² centre is
   then most of a scene, as a camera frame would be, not a patch of texture.
2. Held out, fixed before any training: the four scikit-image photos (other cameras and scenes)
   and every sixth wallpaper photo in sorted order from the third (four scenes). They are never
   written to the training folder; nothing was tuned on them (every setting below is a default).
3. Training: training.py on the other 22 photos (10% of them for the validation loss), random
   64² crops (train.crop's default: a 192-px photo gives ~26,000 distinct crops before flips),
   flips, no 90° turns (photographs have an up), batch 16, the tiny UNet for --minutes on both
   cores (--sizes tiny,small trains sizes side by side, the cores shared: the small UNet ran 0.13
   steps/s on one core, 470 steps an hour, short of its 200-step warm-up by 25 min); a snapshot
   at each mark.
4. Restoration of each held-out photo's 128² centre, blurred by the colour lens (physics.lens in
   config.yaml: the per-pixel diffraction truth on a 4× finer grid, not the reconstruction model)
   plus Gaussian noise at σ = 0.01 and 0.003, restored with the colour EigenPSF model by
   Richardson-Lucy and Tikhonov (their discrepancy-principle stopping and α), the analytic prior's
   exact posterior mean, and the trained prior with DiffPIR (100 steps), DAPS (200 levels) and DPS
   (1000 steps), the mean of --samples = 2 posterior samples; the learning curve is DiffPIR at every
   mark at σ = 0.01. --workers processes share the jobs, one thread each, the headline's jobs first
   (--deadline_min stops starting new ones; results*.json resume). PSNR and SSIM on the fixed
   [0, 1] range; LPIPS where the lpips package and its backbone weights are present (the reason is
   printed when not). The estimates at the first σ are saved under images/ and drawn in examples.png.
"""

import argparse
import functools
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import baselines  # noqa: E402
import config  # noqa: E402
import dps  # noqa: E402
import physics  # noqa: E402
import priors  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

WALLPAPERS = {   # package: photographs in it (file stems); the rest of each package is rendered artwork
    "plasma-workspace-wallpapers": ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                                    "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am"],
    "lomiri-wallpapers-16.04": ["Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
                                "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
                                "analogpattern_by_Peter_Nerlich", "free_by_Peter_Nerlich",
                                "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
                                "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
                                "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi"],
    "lomiri-wallpapers-20.04": ["Kleiber_by_Lukas_Baubkus"],
}
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
PHYSICS = {**config.defaults()["physics"], "blur_mode": "lens", "form": "scatter"}
BASELINES = ("richardson_lucy", "tikhonov", "richardson_lucy_oracle", "tikhonov_oracle")
SAMPLERS = {"diffpir": 100, "dps": 1000, "daps": 200}     # config.yaml's default steps (levels for DAPS)


# ----------------------------------------------------------------------------
# 1. The photographs
# ----------------------------------------------------------------------------

def wallpaper_path(stem):
    """The largest file of a wallpaper: plasma's folders hold several sizes, lomiri's one file."""
    found = glob.glob(f"/usr/share/wallpapers/{stem}/contents/images/*") + glob.glob(f"/usr/share/backgrounds/{stem}.*")
    area = lambda p: np.prod([int(v) for v in os.path.basename(p).split(".")[0].split("x")]) if "x" in p[-14:] else 0  # noqa: E731
    return max(found, key=area) if found else None


def ensure_wallpapers(install):
    """{stem: path} of every listed photo; installs the packages with apt-get where allowed."""
    missing = [pkg for pkg, stems in WALLPAPERS.items() if any(wallpaper_path(s) is None for s in stems)]
    if missing and install and os.geteuid() == 0:
        print(f"installing {' '.join(missing)} (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    paths = {s: wallpaper_path(s) for stems in WALLPAPERS.values() for s in stems}
    if any(p is None for p in paths.values()):
        sys.exit(f"error: photos missing; install them with: sudo apt-get install {' '.join(WALLPAPERS)}")
    return paths


def downscale(img, short_side):
    """RGB (a gray photo repeated) with its shorter side short_side, anti-aliased."""
    from skimage.transform import resize
    img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]
    h, w = img.shape[:2]
    f = short_side / min(h, w)
    return np.clip(resize(img, (round(h * f), round(w * f)), anti_aliasing=f < 1, order=3), 0, 1)


def split():
    """(training stems, held-out wallpaper stems): every sixth in sorted order from the third is held out."""
    stems = sorted((s for v in WALLPAPERS.values() for s in v), key=str.lower)
    held = stems[2::6]
    return [s for s in stems if s not in held], held


def prepare_data(out, scale, install):
    """Writes the training photos (downscaled PNGs) to out/train; returns {name: held-out image}."""
    import imageio.v3 as iio
    from skimage import data
    paths = ensure_wallpapers(install)
    train_stems, held_stems = split()
    folder = os.path.join(out, "train")
    os.makedirs(folder, exist_ok=True)
    for s in train_stems:
        target = os.path.join(folder, f"{s}.png")
        if not os.path.exists(target):
            img = downscale(utils.read_image(paths[s]), scale)
            iio.imwrite(target, (img * 255 + 0.5).astype(np.uint8))
    held = {s: downscale(utils.read_image(paths[s]), scale) for s in held_stems}
    for name in SKIMAGE_PHOTOS:
        held[name] = downscale(utils.to_float_image(getattr(data, name)(), name), scale)
    return folder, held


# ----------------------------------------------------------------------------
# 2. Training, with snapshots at the marks
# ----------------------------------------------------------------------------

def train_size(folder, out, size, marks, quick, threads, mark_steps=None):
    """Trains one model size on `threads` threads; saves out/<size>/model_<m>min at each mark (minutes of
    training time, snapshots excluded) and out/<size>/snapshots.json (steps and losses at each).
    mark_steps: the step counts at which to take the marks' snapshots instead (a run's step counts,
    to retrain its snapshots on a machine busy with other work)."""
    torch.set_num_threads(threads)
    schema = config.load_config(config.DEFAULT_CONFIG)
    cfg = config.validate_config(config.with_defaults({}, schema), schema)
    cfg["train"].update(dir=folder, size=size, crop=32 if quick else 64, steps=10 ** 9, eval_every=200,
                        sample_every=10 ** 9, checkpoint_every=10 ** 9)
    trainer, facts = training.prepare(cfg, torch.device("cpu"))
    run = os.path.join(out, size)
    os.makedirs(run, exist_ok=True)
    spent, rows = 0.0, []
    for i, m in enumerate(marks):
        t0 = time.time()
        stop = ((lambda: spent + time.time() - t0 > 60 * m) if mark_steps is None
                else (lambda: trainer.step >= mark_steps[i]))   # noqa: B023 (called within this iteration)
        training.train(trainer, run, should_stop=stop, progress=False)
        spent += time.time() - t0
        trainer.save_model(os.path.join(run, f"model_{m:g}min"))
        recent = [h[1] for h in trainer.history[-100:]]
        vals = [h[2] for h in trainer.history if not np.isnan(h[2])]
        rows.append({"minutes": m, "steps": trainer.step, "train_loss": float(np.mean(recent)),
                     "validation_loss": vals[-1] if vals else None, "seconds": spent})
        print(f"{size}: {m:g} min, {trainer.step} steps, train loss {rows[-1]['train_loss']:.4f}, validation "
              f"{rows[-1]['validation_loss']}", flush=True)
        utils.write_json(os.path.join(run, "snapshots.json"), {"facts": facts, "snapshots": rows})


def train_all(folder, out, sizes, marks, quick, mark_steps=None):
    """The sizes side by side, one process each with an equal share of the cores."""
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--stage", "train_one", "--size", s,
                               "--out", out, "--minutes", ",".join(f"{m:g}" for m in marks),
                               "--threads", str(max(1, (os.cpu_count() or 1) // len(sizes)))] + (["--quick"] if quick else [])
                              + (["--mark_steps", ",".join(map(str, mark_steps))] if mark_steps else []))
             for s in sizes]
    if any(p.wait() for p in procs):
        sys.exit("error: a training process failed")


# ----------------------------------------------------------------------------
# 3. Restoration
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def lens(size):
    """(truth, op): the lens's per-pixel truth and its colour EigenPSF model on a size² field."""
    field, truth = physics.create_ground_truth(size, size, PHYSICS, dtype=torch.float64)
    return truth, physics.build_eigen_operator(field.node_grid(), size, size, PHYSICS)[0]


def problem(img, size, sigma, seed):
    """(x, y, op): the photo's size² centre, its lens-blurred noisy measurement, the EigenPSF model."""
    r = PHYSICS["kernel_size"] // 2
    H, W = img.shape[:2]
    top, left = (H - size) // 2 - r, (W - size) // 2 - r
    x_ext = utils.to_tensor(img[top:top + size + 2 * r, left:left + size + 2 * r], "cpu").double()
    truth, op = lens(size)
    x = truth.crop(x_ext)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = (truth(x_ext) + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)).float()
    return x.float(), y, op


def scores(x, est, lpips_ok):
    ref, e = utils.to_numpy(x), utils.to_numpy(est)
    out = {"psnr": utils.psnr(ref, e), "ssim": utils.ssim(ref, e)}
    if lpips_ok:
        out["lpips"] = utils.lpips_distance(x, est)[0]
    return out


def psnr_torch(x, est):
    return float(-10 * torch.log10(((est.clamp(0, 1) - x) ** 2).mean()))


def richardson_lucy_oracle(op, y, x, max_iter=baselines.RL_MAX_ITER, eps=1e-6):
    """Richardson-Lucy's iterates (baselines.richardson_lucy's update) stopped at the one closest to the
    truth x: an upper bound on any stopping rule, which no user has (the truth is unknown)."""
    y = y.clamp_min(0)
    norm = op.adjoint(torch.ones_like(y)).clamp_min(eps)
    est = y.mean((1, 2, 3), keepdim=True).expand_as(y).clone()
    best, best_psnr = est, -np.inf
    for _ in range(max_iter):
        est = est * op.adjoint(y / op(est).clamp_min(eps)) / norm
        if psnr_torch(x, est) > best_psnr:
            best, best_psnr = est, psnr_torch(x, est)
    return best


def tikhonov_oracle(op, y, x):
    """First-order Tikhonov at the α closest to the truth x: a half-decade grid over baselines' range
    (warm-started, largest α first), then bisected around the best to 1/16 decade (finer than the
    discrepancy rule's 1/8): an upper bound on any choice of α, which no user has (the truth is unknown)."""
    hi, lo = (float(np.log10(a)) for a in baselines.TIKHONOV_ALPHAS)
    est, found = op.adjoint(y), {}

    def score(e):
        nonlocal est
        if e not in found:
            est, _ = baselines._tikhonov_solve(op, y, 10 ** e, est)
            found[e] = (psnr_torch(x, est), est)
        return found[e][0]

    for e in np.arange(hi, lo - 1e-9, -0.5):
        score(round(float(e), 4))
    for step in (0.25, 0.125, 0.0625):
        e_best = max(found, key=lambda e: found[e][0])
        for e in (e_best + step, e_best - step):
            if lo - 1e-9 <= e <= hi + 1e-9:
                score(round(e, 4))
    return found[max(found, key=lambda e: found[e][0])][1]


ORACLES = {"richardson_lucy_oracle": richardson_lucy_oracle, "tikhonov_oracle": tikhonov_oracle}


def restore_one(method, model, x, y, op, sigma, samples, seed, steps):
    """The posterior mean (or a baseline's estimate) and its sampling time in seconds."""
    t0 = time.perf_counter()
    if method in ("richardson_lucy", "tikhonov"):
        est = baselines.restore_baselines(op, y, sigma)[method][0]
    elif method in ORACLES:
        with torch.no_grad():
            est = ORACLES[method](op, y, x)
    else:
        unet, sched = priors.load_model(model)
        pipe = dps.EigenPSFDPSPipeline(unet, sched, op)
        out, _ = pipe(y, num_inference_steps=1 if method == "exact" else steps[method], method=method, sigma_y=sigma, num_samples=samples,
                      generator=torch.Generator().manual_seed(seed))
        est = out["mean"] if samples > 1 else out
    return est.float().clamp(0, 1), time.perf_counter() - t0


def jobs(held, sizes, marks, sigmas, samplers, curve_sigmas):
    """(image, σ, method, model) to run, cheapest and most needed first (a run cut short by its deadline
    still has the headline): the baselines and the analytic prior's exact mean; the trained priors' DiffPIR
    at the last mark at the first σ; the learning curve (DiffPIR at the earlier marks) at curve_sigmas; the
    other samplers at the last mark; then the same at the other σ."""
    last = [f"{size}/model_{marks[-1]:g}min" for size in sizes]
    out = [(n, s, m, None) for s in sigmas for n in held for m in ("blurred",) + BASELINES]
    out += [(n, s, "exact", "analytic") for s in sigmas for n in held]
    for s in sigmas:
        out += [(n, s, "diffpir", model) for model in last for n in held]
        out += [(n, s, "diffpir", f"{size}/model_{m:g}min") for m in marks[:-1] for size in sizes for n in held
                if s in curve_sigmas]
        out += [(n, s, method, model) for method in samplers if method != "diffpir" for model in last for n in held]
    return out


def parse_marks(minutes, mark_steps):
    """'5,15' and '' -> ([5.0, 15.0], None); with step counts ('352,1263'), one per mark, increasing."""
    marks = [float(m) for m in minutes.split(",")]
    if not mark_steps:
        return marks, None
    steps = [int(v) for v in mark_steps.split(",") if v.isdigit()]
    if len(steps) != len(mark_steps.split(",")) or len(steps) != len(marks) or steps != sorted(set(steps)):
        sys.exit(f"error: --mark_steps wants one increasing step count per mark of --minutes ({len(marks)}), "
                 f"got {mark_steps!r}")
    return marks, steps


def parse_steps(text):
    """'diffpir=50,dps=200' -> {'diffpir': 50, ...} over SAMPLERS' defaults."""
    steps = dict(SAMPLERS)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in SAMPLERS or not value.isdigit():
            sys.exit(f"error: --steps wants sampler=N with sampler in {sorted(SAMPLERS)}, got {item!r}")
        steps[name] = int(value)
    return steps


def restore_all(out, held, args, marks):
    """Runs this shard's jobs not yet in any out/results*.json, saving after each one (a stopped run
    resumes); shard i of n takes every n-th job, so n processes on one thread each share the list."""
    i_shard, n_shards = (int(v) for v in args.shard.split("/"))
    path = os.path.join(out, "results.json" if n_shards == 1 else f"results.{i_shard}.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    why_not = utils.lpips_unavailable("vgg")
    if why_not:
        print(f"LPIPS: {why_not}", flush=True)
    todo = jobs(held, args.sizes.split(","), marks, [float(s) for s in args.sigmas.split(",")],
                args.samplers.split(","), [float(s) for s in args.curve_sigmas.split(",") if s])
    todo = [job for job in todo if not args.methods or job[2] in args.methods.split(",")][i_shard::n_shards]
    steps, deadline = parse_steps(args.steps), time.time() + 60 * args.deadline_min
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for i, (name, sigma, method, model) in enumerate(todo):
        key = f"{name}|{sigma:g}|{method}|{model or ''}"
        if key in load_results(out):    # read afresh: another process may have done it since
            continue
        if time.time() > deadline:
            print(f"deadline: {len(todo) - i} jobs left undone", flush=True)
            break
        x, y, op = problem(held[name], args.restore_size, sigma, seed=sorted(held).index(name))
        if method == "blurred":
            est, sec = y.clamp(0, 1), 0.0
        else:
            model_path = model if model in (None, "analytic") else os.path.join(out, model)
            samples = 1 if method == "exact" or method in BASELINES else args.samples
            est, sec = restore_one(method, model_path, x, y, op, sigma, samples, seed=1, steps=steps)
        results[key] = {**scores(x, est, why_not is None), "seconds": sec}
        if sigma == float(args.sigmas.split(",")[0]):   # the images behind the headline's numbers, to look at
            utils.save_image(os.path.join(out, "images", key.replace("|", "_").replace("/", "-") + ".png"), est)
            utils.save_image(os.path.join(out, "images", f"{name}_truth.png"), x)
        print(f"[{i + 1}/{len(todo)}] {key}: {results[key]['psnr']:.2f} dB, {sec:.1f} s", flush=True)
        utils.write_json(path, results)
    return results


def restore_workers(args):
    """The restoration jobs shared among --workers processes, one thread each (argparse keeps the last
    --stage and --shard given, so the command line passes through whole)."""
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--stage", "restore_shard",
                               "--shard", f"{i}/{args.workers}"]) for i in range(args.workers)]
    if any(p.wait() for p in procs):
        sys.exit("error: a restoration process failed")


def load_results(out):
    """Every shard's results, merged (their keys are disjoint)."""
    merged = {}
    for path in sorted(glob.glob(os.path.join(out, "results*.json"))):
        merged.update(json.load(open(path)))
    return merged


# ----------------------------------------------------------------------------
# 4. Report
# ----------------------------------------------------------------------------

def mean_of(results, names, sigma, method, model, metric="psnr"):
    vals = [results.get(f"{n}|{sigma:g}|{method}|{model or ''}", {}).get(metric) for n in names]
    return float(np.mean(vals)) if vals and None not in vals else None


def table(results, names, sigma, columns):
    """Markdown: one row per held-out photo, PSNR / SSIM of each column, the mean at the bottom."""
    head = "| photo | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for n in list(names) + ["mean"]:
        cells = []
        for _, method, model in columns:
            p = mean_of(results, names if n == "mean" else [n], sigma, method, model)
            s = mean_of(results, names if n == "mean" else [n], sigma, method, model, "ssim")
            cells.append("–" if p is None else f"{p:.2f} / {s:.3f}")
        lines.append(f"| {'**mean**' if n == 'mean' else n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results, names, sigma, columns, last):
    """The target's check: the trained prior's best sampler (by mean) against the better baseline
    (discrepancy rules) and the better oracle, in mean PSNR and on the photo where it does worst."""
    trained = [c for c in columns if c[2] and c[2] != "analytic" and c[2].endswith(f"{last}min")]
    scored = [(mean_of(results, names, sigma, m, model), label, m, model) for label, m, model in trained]
    scored = [t for t in scored if t[0] is not None]
    if not scored:
        return
    _, label, method, model = max(scored)
    for what, pair in (("the better baseline", ("richardson_lucy", "tikhonov")),
                       ("the better oracle baseline", ("richardson_lucy_oracle", "tikhonov_oracle"))):
        gains = [mean_of(results, [n], sigma, method, model) - max(mean_of(results, [n], sigma, b, None) for b in pair)
                 for n in names if None not in [mean_of(results, [n], sigma, b, None) for b in pair]]
        base = max(mean_of(results, names, sigma, b, None) or -np.inf for b in pair)
        if len(gains) == len(names):
            print(f"{label} against {what} per photo: mean {mean_of(results, names, sigma, method, model) - base:+.2f} dB "
                  f"(means), worst photo {min(gains):+.2f} dB, best {max(gains):+.2f} dB")


def report(out, results, names, args, marks):
    sizes, last = args.sizes.split(","), f"{marks[-1]:g}"
    print(f"settings: steps {parse_steps(args.steps)}, the mean of {args.samples} samples, {args.restore_size}² centres, "
          f"{len(names)} held-out photos; results in {out}")
    columns = [("blurred", "blurred", None), ("Richardson–Lucy", "richardson_lucy", None),
               ("Tikhonov", "tikhonov", None), ("RL, oracle stop", "richardson_lucy_oracle", None),
               ("Tikhonov, oracle α", "tikhonov_oracle", None), ("analytic (exact mean)", "exact", "analytic")]
    columns += [(f"{size} {s} ({last} min)", s, f"{size}/model_{last}min") for size in sizes
                for s in args.samplers.split(",")]
    curve_sigmas = [float(s) for s in args.curve_sigmas.split(",") if s]
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        print(f"\n### σ = {sigma:g}: PSNR (dB) / SSIM of the posterior mean, {args.restore_size}² RGB centres\n")
        print(table(results, names, sigma, columns) + "\n")
        verdict(results, names, sigma, columns, last)
        if sigma in curve_sigmas:
            base = [mean_of(results, names, sigma, m, None) for m in ("richardson_lucy", "tikhonov")]
            best = "–" if None in base else f"{max(base):.2f} dB"
            print(f"learning curve (DiffPIR, mean PSNR; the better baseline {best}):")
            for size in sizes:
                row = [mean_of(results, names, sigma, "diffpir", f"{size}/model_{m:g}min") for m in marks]
                print(f"  {size}: " + ", ".join(f"{m:g} min {p:.2f}" for m, p in zip(marks, row) if p is not None))
    if curve_sigmas:
        plot_curve(os.path.join(out, "curve.png"), results, names, sizes, marks, curve_sigmas)
    plot_examples(os.path.join(out, "examples.png"), out, results, names, float(args.sigmas.split(",")[0]), columns)


def plot_curve(path, results, names, sizes, marks, sigmas):
    """Mean PSNR against training minutes per size and σ, with the baselines and the analytic prior as lines."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sigmas), figsize=(6 * len(sigmas), 4), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas):
        for size in sizes:
            ps = [mean_of(results, names, sigma, "diffpir", f"{size}/model_{m:g}min") for m in marks]
            ax.plot([m for m, p in zip(marks, ps) if p is not None], [p for p in ps if p is not None], "o-",
                    label=f"trained {size} UNet, DiffPIR")
        lines = (("Richardson–Lucy (discrepancy stop)", "richardson_lucy", "--"), ("Tikhonov (discrepancy α)",
                 "tikhonov", ":"), ("Tikhonov, oracle α", "tikhonov_oracle", (0, (1, 3))),
                 ("analytic prior, exact mean", "exact", "-."))
        for label, method, style in lines:
            p = mean_of(results, names, sigma, method, "analytic" if method == "exact" else None)
            if p is not None:
                ax.axhline(p, ls=style, color="gray", label=f"{label}: {p:.2f}")
        ax.set(xscale="log", xlabel="training minutes (2-core CPU)", ylabel="mean PSNR (dB)",
               title=f"{len(names)} held-out photos, 128² RGB, lens blur, σ = {sigma:g}")
        base = [mean_of(results, names, sigma, m, None) for m in ("richardson_lucy", "tikhonov")]
        if None not in base:
            ax.axhline(max(base) + 1, color="tab:red", lw=0.8, label="target: the better baseline + 1 dB")
        ax.set_xticks(marks, [f"{m:g}" for m in marks])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"curve: {path}")


def plot_examples(path, out, results, names, sigma, columns):
    """Truth, measurement and every method's estimate for each held-out photo at the first σ, PSNR in titles."""
    import matplotlib.pyplot as plt
    from utils import read_image
    columns = [("truth", "truth", None)] + [c for c in columns if "oracle" not in c[1]]   # what a user can get
    fig, axes = plt.subplots(len(names), len(columns), figsize=(1.5 * len(columns), 1.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, (label, method, model) in zip(row, columns):
            key = f"{name}|{sigma:g}|{method}|{model or ''}"
            file = f"{name}_truth.png" if method == "truth" else key.replace("|", "_").replace("/", "-") + ".png"
            ax.axis("off")
            if os.path.exists(os.path.join(out, "images", file)):
                ax.imshow(read_image(os.path.join(out, "images", file)))
                score = results.get(key, {}).get("psnr")
                ax.set_title(label if score is None else f"{label}\n{score:.2f} dB", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"examples: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("all", "train", "restore", "report", "train_one", "restore_shard"), default="all")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "photos"))
    ap.add_argument("--sizes", default="tiny", help="model sizes (train.size), trained side by side (the cores shared)")
    ap.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--minutes", default="5,15,30,60", help="snapshot marks, minutes of training")
    ap.add_argument("--mark_steps", default="", help="snapshot at these training steps, one per mark (a run's "
                    "step counts, to retrain its snapshots on a busy machine), instead of after --minutes")
    ap.add_argument("--scale", type=int, default=192, help="shorter side of every photo after downscaling")
    ap.add_argument("--restore_size", type=int, default=128, help="side of the restored centre")
    ap.add_argument("--sigmas", default="0.01,0.003")
    ap.add_argument("--samplers", default="diffpir,daps,dps", help="the trained prior's samplers at the last mark")
    ap.add_argument("--samples", type=int, default=2, help="posterior samples per restoration (their mean is scored)")
    ap.add_argument("--steps", default="", help="sampler=N overrides of the steps, e.g. diffpir=50,dps=200")
    ap.add_argument("--curve_sigmas", default="0.01", help="the σ at which the learning curve is restored (\"\": none)")
    ap.add_argument("--methods", default="", help="restore only these methods (e.g. richardson_lucy_oracle)")
    ap.add_argument("--workers", type=int, default=2, help="restoration processes, one thread each")
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    ap.add_argument("--deadline_min", type=float, default=1e9, help="start no restoration after this many minutes")
    ap.add_argument("--no_install", action="store_true", help="never run apt-get for the photos")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.samples, args.restore_size = "0.3,0.6", 2, 64
        args.steps = args.steps or ",".join(f"{k}={max(10, v // 20)}" for k, v in SAMPLERS.items())
    marks, mark_steps = parse_marks(args.minutes, args.mark_steps)
    folder, held = prepare_data(args.out, args.scale, not args.no_install)
    if args.quick:
        held = dict(list(held.items())[:2])
    if args.stage == "train_one":
        return train_size(folder, args.out, args.size, marks, args.quick, args.threads, mark_steps)
    if args.stage in ("all", "train"):
        train_all(folder, args.out, args.sizes.split(","), marks, args.quick, mark_steps)
    if args.stage == "restore_shard":
        torch.set_num_threads(1)
        return restore_all(args.out, held, args, marks)
    if args.stage in ("all", "restore"):
        restore_workers(args)
    if args.stage in ("all", "restore", "report"):
        report(args.out, load_results(args.out), sorted(held), args, marks)


if __name__ == "__main__":
    main()
