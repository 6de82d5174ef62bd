"""Before and after: the same runs of an older commit and of this checkout, on the same inputs, in one run.

    python bench/bench_speed.py                          # old = the commit before the overheads work
    python bench/bench_speed.py --old HEAD~3 --cases readme,folder

The older commit is checked out as a git worktree (a temporary folder; removed at the end). Each
case runs `python main.py ...` in both trees as a user would (a fresh process: imports, setup,
sampling, baselines and outputs all count), one after the other, never side by side (a 2-core
machine running two would time the contention). Cases (inputs made here, written to --work):

- readme: the README's real-data command at 256² RGB (`--blurred photo.tif --psf_grid psfs.npz
  --sigma_noise auto`, analytic prior, everything else at its defaults): an 8×8 grid of 21-px
  defocus PSFs measured from a per-pixel field, noise 0.01, a 16-bit TIFF.
- large: a 512² RGB measurement with a measured-size grid (12×12 PSFs of 25 px), the same sampler
  settings in both trees (DiffPIR, 2 samples, 20 steps), so the ratio is the overhead around the
  sampler (operator, data step, baselines, setup, outputs).
- unet: DiffPIR with the google/ddpm-celebahq-256 architecture (113.7 M parameters, random weights:
  speed does not depend on them) on the readme measurement, 1 sample, --unet_steps steps.
- folder: --blurred_dir with 8 measurements of 96² (different scenes and fields), analytic prior,
  defaults.

Prints, per case: wall seconds in each tree and their ratio, and the PSNR against the clean image
(the mean over the folder's images) in each; then the new tree's stage timings (metrics.json
`timings`) where it writes them. Numbers are for the machine it runs on; say which.
"""

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import physics  # noqa: E402
import utils  # noqa: E402

OLD_DEFAULT = "1e7fcfe"   # the last commit before the overheads work (issue: where a restoration's time goes)
SIGMA = 0.01


def measurement(path, size, grid, k, seed, scene="sample", mode="defocus"):
    """A measurement of `scene` through a per-pixel `mode` field (a real margin blurred in), noise
    SIGMA, as a 16-bit TIFF at `path`, its node grid beside it (psfs.npz) and the clean image (.npy)."""
    import tifffile
    pc = dict(blur_mode=mode, kernel_size=k, grid_size=grid, defocus=dict(min_radius=1.0, max_radius=4.0))
    field, truth = physics.create_ground_truth(size, size, pc, seed=seed, dtype=torch.float64)
    full = utils.load_scene(scene, size, k // 2)
    clean = full[k // 2:k // 2 + size, k // 2:k // 2 + size]
    with torch.no_grad():
        y = truth(utils.to_tensor(full).double())
        noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        y = (y + SIGMA * noise).clamp(0, 1)
    tifffile.imwrite(path, (utils.to_numpy(y) * 65535).round().astype(np.uint16), photometric="rgb")
    return field, clean


def make_inputs(work, unet_steps):
    """Every case's inputs in `work`: {case: (argv, clean images by name)}."""
    os.makedirs(work, exist_ok=True)
    field, clean = measurement(os.path.join(work, "photo.tif"), 256, 8, 21, seed=3)
    grid = os.path.join(work, "psfs.npz")
    utils.save_psf_grid(grid, field.node_grid(), tuple(c.numpy() for c in field.node_coords()))
    readme = ["--blurred", os.path.join(work, "photo.tif"), "--psf_grid", grid, "--sigma_noise", "auto",
              "--model_id", "analytic", "--device", "cpu"]
    cases = {"readme": (readme, {"photo": clean})}

    field, clean_l = measurement(os.path.join(work, "large.tif"), 512, 12, 25, seed=4)
    grid_l = os.path.join(work, "psfs_large.npz")
    utils.save_psf_grid(grid_l, field.node_grid(), tuple(c.numpy() for c in field.node_coords()))
    cases["large"] = (["--blurred", os.path.join(work, "large.tif"), "--psf_grid", grid_l, "--sigma_noise", "auto",
                       "--model_id", "analytic", "--device", "cpu", "--sampler", "diffpir", "--num_samples", "2",
                       "--num_inference_steps", "20"], {"large": clean_l})

    model = os.path.join(work, "celebahq-random")
    if not os.path.isdir(model):
        from diffusers import DDPMScheduler, UNet2DModel
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from bench_dps import CELEBAHQ_SCHEDULER, CELEBAHQ_UNET
        torch.manual_seed(0)
        UNet2DModel.from_config(CELEBAHQ_UNET).save_pretrained(os.path.join(model, "unet"))
        DDPMScheduler.from_config(CELEBAHQ_SCHEDULER).save_pretrained(os.path.join(model, "scheduler"))
    cases["unet"] = (readme[:-4] + ["--model_id", model, "--device", "cpu", "--sampler", "diffpir",
                                    "--num_inference_steps", str(unet_steps), "--num_samples", "1"], {"photo": clean})

    folder, cleans = os.path.join(work, "folder"), {}
    os.makedirs(folder, exist_ok=True)
    scenes = ["sample", "camera", "coffee", "chelsea", "rocket", "moon", "coins", "immunohistochemistry"]
    for i, scene in enumerate(scenes):
        name = f"m{i}_{scene}"
        _, cleans[name] = measurement(os.path.join(folder, name + ".tif"), 96, 4, 9, seed=10 + i,
                                      scene=skimage_path(work, scene))
    utils.save_psf_grid(os.path.join(work, "psfs_folder.npz"), *folder_grid())
    cases["folder"] = (["--blurred_dir", folder, "--psf_grid", os.path.join(work, "psfs_folder.npz"), "--sigma_noise",
                        "auto", "--model_id", "analytic", "--device", "cpu"], cleans)
    return cases


def skimage_path(work, name):
    """scikit-image's data image `name` as an RGB PNG in `work` ('sample' stays the CLI's sample)."""
    if name == "sample":
        return name
    from skimage import data
    from PIL import Image
    path = os.path.join(work, f"scene_{name}.png")
    if not os.path.isfile(path):
        img = getattr(data, name)()
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        Image.fromarray(img.astype(np.uint8)).save(path)
    return path


def folder_grid():
    """One grid for the whole folder (one camera): a 4×4 grid of 9-px defocus PSFs at 96²."""
    pc = dict(blur_mode="defocus", kernel_size=9, grid_size=4, defocus=dict(min_radius=1.0, max_radius=2.5))
    field, _ = physics.create_ground_truth(96, 96, pc, seed=1, dtype=torch.float64)
    return field.node_grid(), tuple(c.numpy() for c in field.node_coords())


def run_case(tree, argv, out):
    """(wall seconds, run folder) of `python main.py argv` in `tree`; raises on a failed run."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "main.py", *argv, "--save_dir", out], cwd=tree, capture_output=True,
                       text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: main.py {' '.join(argv)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return wall, r.stdout.strip().splitlines()[-1]


def psnr_of(run_dir, cleans):
    """Mean PSNR of the restorations in run_dir (one run, or a batch folder's sub-folders)."""
    if len(cleans) == 1:
        (clean,) = cleans.values()
        return utils.psnr(clean, np.load(os.path.join(run_dir, "restored.npy")).astype(np.float64))
    return float(np.mean([utils.psnr(c, np.load(image_file(run_dir, name, "restored.npy")).astype(np.float64))
                          for name, c in cleans.items()]))


def image_file(batch_dir, name, file):
    """`file` of image `name` in a batch folder (its sub-folder is the name and a time stamp)."""
    (folder,) = glob.glob(os.path.join(batch_dir, f"{name}_*"))
    return os.path.join(folder, file)


def timings_of(run_dir, cleans):
    """The new tree's metrics.json timings (a folder: its last image's, the process's whole run), or None."""
    path = os.path.join(run_dir, "metrics.json") if len(cleans) == 1 else \
        image_file(run_dir, sorted(cleans)[-1], "metrics.json")
    return json.load(open(path)).get("timings")


@contextlib.contextmanager
def worktree(rev):
    path = tempfile.mkdtemp(prefix="eigenpsf-old-")
    subprocess.run(["git", "worktree", "add", "--detach", path, rev], cwd=ROOT, check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", path], cwd=ROOT, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default=OLD_DEFAULT, help="the commit to compare against")
    ap.add_argument("--cases", default="readme,large,unet,folder")
    ap.add_argument("--unet_steps", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "eigenpsf-bench-speed"))
    args = ap.parse_args()
    cases = make_inputs(args.work, args.unet_steps)
    wanted = args.cases.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; old = {args.old}", flush=True)
    print(f"{'case':8s} {'old s':>8s} {'new s':>8s} {'old/new':>8s} {'PSNR old':>9s} {'PSNR new':>9s}", flush=True)
    new_timings = {}
    with worktree(args.old) as old_tree:
        for case in wanted:
            argv, cleans = cases[case]
            row = {}
            for name, tree in (("old", old_tree), ("new", ROOT)):
                out = os.path.join(args.work, f"out-{name}-{case}")
                shutil.rmtree(out, ignore_errors=True)
                wall, run_dir = run_case(tree, argv, out)
                row[name] = (wall, psnr_of(run_dir, cleans))
                if name == "new":
                    new_timings[case] = timings_of(run_dir, cleans)
            (wo, po), (wn, pn) = row["old"], row["new"]
            print(f"{case:8s} {wo:8.1f} {wn:8.1f} {wo / wn:7.1f}× {po:9.2f} {pn:9.2f}", flush=True)
    print("\nthe new tree's stage timings (s), metrics.json 'timings':")
    for case, t in new_timings.items():
        print(f"  {case}: " + (", ".join(f"{k} {v:.2f}" for k, v in t.items()) if t else "not written"))


if __name__ == "__main__":
    main()
