"""Parameter sweeps for Slurm job arrays.

    python scripts/sweep.py make sweep.yaml            # writes SWEEP_DIR/tasks.txt, prints the sbatch line
    sbatch --array=0-N%M scripts/slurm_array.sh SWEEP_DIR
    python scripts/sweep.py collect SWEEP_DIR         # summary.csv + PSNR/SSIM plots per swept key

A spec is a small YAML file:

    sweep_dir: sweeps/zeta            # where task folders go (default: sweeps/<spec name>)
    args: "--model_id google/ddpm-celebahq-256 --num_inference_steps 1000"   # common main.py args
    grid:                             # any config keys, every combination
      sampler.dps.step_size: [0.5, 1.0, 2.0]
      physics.n_eigen_psfs: [5, 10]
    seeds: [0, 1]                     # optional
    images: [sample, data/face2.png]  # optional
    image_dir: data/faces             # optional: every task restores this folder (instead of images) ...
    batch_size: 8                     # ... this many measurements per sampler call (see docs/hpc.md, per GPU)

Task i runs `python main.py <args> --set key=value ... --seed s --image img --save_dir SWEEP_DIR/task_000i`
(with image_dir: `--image_dir DIR --batch_size N`, and the task's results are a batch_* folder).
"""

import argparse
import csv
import glob
import itertools
import json
import os
import shlex
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import plots  # noqa: E402
import utils  # noqa: E402

SPEC_KEYS = {"sweep_dir", "args", "grid", "seeds", "images", "image_dir", "batch_size"}
METRIC_KEYS = ("psnr_blurred", "psnr_restored", "ssim_blurred", "ssim_restored", "lpips_blurred", "lpips_restored",
               "operator_relative_error", "data_residual_relative", "runtime_s")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def expand(spec: dict):
    """[(params dict, argv list)] for every combination of grid values, seeds and images."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        fail(f"unknown sweep spec key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    schema = config.flatten(config.load_config(os.path.join(ROOT, "config.yaml")))
    grid = spec.get("grid") or {}
    for key, values in grid.items():
        if key not in schema:
            fail(f"grid key {key!r} is not a config key (see config.yaml)")
        if not isinstance(values, list) or not values:
            fail(f"grid key {key!r} needs a non-empty list of values")
    base = spec.get("args", [])
    base = shlex.split(base) if isinstance(base, str) else [str(a) for a in base]
    if spec.get("image_dir") and spec.get("images"):
        fail("give images (one per task) or image_dir (a folder per task), not both")
    if spec.get("image_dir"):
        base += ["--image_dir", str(spec["image_dir"])]
    if "batch_size" in spec:
        n = spec["batch_size"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            fail(f"batch_size must be a whole number >= 1, got {n!r}")
        base += ["--batch_size", str(n)]
    axes = list(grid.items())
    if spec.get("seeds"):
        axes.append(("run.seed", spec["seeds"]))
    if spec.get("images"):
        axes.append(("data.image", spec["images"]))
    tasks = []
    for combo in itertools.product(*[v for _, v in axes]) if axes else [()]:
        params = {k: v for (k, _), v in zip(axes, combo)}
        argv = list(base)
        for k, v in params.items():
            argv += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        tasks.append((params, argv))
    return tasks


def make(spec_path, out=None):
    try:
        spec = yaml.safe_load(open(spec_path)) or {}
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read sweep spec {spec_path}: {e}")
    sweep_dir = os.path.abspath(out or spec.get("sweep_dir") or os.path.join(
        "sweeps", os.path.splitext(os.path.basename(spec_path))[0]))
    tasks = expand(spec)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "tasks.txt"), "w") as f:
        f.writelines(shlex.join(argv) + "\n" for _, argv in tasks)
    keys = list(tasks[0][0]) if tasks else []
    with open(os.path.join(sweep_dir, "tasks.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", *keys])
        for i, (params, _) in enumerate(tasks):
            w.writerow([i, *[params[k] for k in keys]])
    with open(os.path.join(sweep_dir, "sweep.yaml"), "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    n = len(tasks)
    print(f"{n} tasks in {sweep_dir}/tasks.txt")
    print(f"submit: sbatch --array=0-{n - 1}%{min(n, 8)} {os.path.join(ROOT, 'scripts', 'slurm_array.sh')} {sweep_dir}")
    return sweep_dir


def latest_metrics(task_dir):
    """(metrics, folder) of a task's latest run; a folder run (batch_*) gives the means of its
    complete images' metrics, and status complete only when every image is."""
    runs = sorted(glob.glob(os.path.join(task_dir, "run_*", "metrics.json")) +
                  glob.glob(os.path.join(task_dir, "batch_*", "summary.csv")), key=os.path.getmtime)
    if not runs:
        return None, None
    if runs[-1].endswith(".json"):
        with open(runs[-1]) as f:
            return json.load(f), os.path.dirname(runs[-1])
    with open(runs[-1]) as f:
        images = list(csv.DictReader(f))
    done = [r for r in images if r["status"] == "complete"]
    m = {k: sum(float(r[k]) for r in done) / len(done) for k in METRIC_KEYS if done and all(r.get(k) for r in done)}
    m["status"] = "complete" if len(done) == len(images) else f"{len(done)}/{len(images)} images complete"
    m["images"] = len(images)
    return m, os.path.dirname(runs[-1])


def collect(sweep_dir):
    tasks_csv = os.path.join(sweep_dir, "tasks.csv")
    if not os.path.isfile(tasks_csv):
        fail(f"{sweep_dir} has no tasks.csv; make it with `sweep.py make`")
    with open(tasks_csv) as f:
        tasks = list(csv.DictReader(f))
    keys = [k for k in (tasks[0].keys() if tasks else []) if k != "task"]
    rows = []
    for t in tasks:
        m, run_dir = latest_metrics(os.path.join(sweep_dir, f"task_{int(t['task']):04d}"))
        status = m.get("status", "unknown") if m else "missing"
        row = {**t, "status": status, **{k: (m or {}).get(k, "") for k in METRIC_KEYS},
               "run_dir": os.path.relpath(run_dir, sweep_dir) if run_dir else ""}
        if m and "images" in m:  # a folder run: the metrics are means over its complete images
            row["images"] = m["images"]
        if m and m.get("error"):
            row["error"] = m["error"]
        rows.append(row)
    utils.write_summary_csv(os.path.join(sweep_dir, "summary.csv"), rows)
    done = [r for r in rows if r["status"] == "complete"]
    print(f"{len(done)}/{len(rows)} tasks complete; summary in {os.path.join(sweep_dir, 'summary.csv')}")
    for r in rows:
        if r["status"] != "complete":
            print(f"  task {r['task']}: {r['status']}{' - ' + r['error'] if r.get('error') else ''}")
    for key in keys:
        plot_against(sweep_dir, key, done)
    return rows


def plot_against(sweep_dir, key, rows):
    """Mean PSNR and SSIM (over the other axes) against one swept key."""
    values = sorted({r[key] for r in rows}, key=_sort_key)
    if len(values) < 2:
        return
    plt = plots._plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("psnr_restored", "ssim_restored")):
        means = []
        for v in values:
            vals = [float(r[metric]) for r in rows if r[key] == v and r[metric] != ""]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        ax.plot(range(len(values)), means, "o-")
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(f"mean over {len(rows)} complete runs", fontsize=9)
    plots._save(fig, os.path.join(sweep_dir, f"plot_{key.replace('.', '_')}.png"), tight=True)


def _sort_key(v):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="expand a sweep spec into SWEEP_DIR/tasks.txt")
    m.add_argument("spec")
    m.add_argument("--out", help="sweep folder (default: the spec's sweep_dir)")
    c = sub.add_parser("collect", help="gather metrics.json of every task into summary.csv and plots")
    c.add_argument("sweep_dir")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.spec, args.out)
    else:
        collect(args.sweep_dir)


if __name__ == "__main__":
    main()
