"""End to end on CUDA: `python main.py` at 256×256 with the ddpm-celebahq-256 architecture (random
weights saved locally with save_pretrained: speed does not depend on weight values), then a
SIGTERM mid-run and `--resume` against an uninterrupted run.

    python bench/cuda_e2e.py --steps 100 --folder

Prints, per configuration: status, wall time of the whole process, the warm-up (compile, CUDA
graphs) and the steady seconds per step (metrics.json's s_per_step_after_warmup), and the
projected seconds per image at the sampler's default steps (1000 for DPS, 100 for DiffPIR).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

CONFIGS = {
    "dps fp32": [],
    "dps bf16": ["--dtype", "bfloat16"],
    "dps compile-bf16": ["--dtype", "bfloat16", "--compile", "default"],
    "dps graphs-bf16": ["--dtype", "bfloat16", "--compile", "reduce-overhead"],
    "diffpir bf16": ["--sampler", "diffpir", "--dtype", "bfloat16"],
    "diffpir graphs-bf16": ["--sampler", "diffpir", "--dtype", "bfloat16", "--compile", "reduce-overhead"],
}
DEFAULT_STEPS = {"dps": 1000, "diffpir": 100}


def save_model(path):
    """The ddpm-celebahq-256 UNet and scheduler, random weights, as a local diffusers directory."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from bench_dps import CELEBAHQ_SCHEDULER, CELEBAHQ_UNET
    torch.manual_seed(0)
    UNet2DModel.from_config(CELEBAHQ_UNET).save_pretrained(path)
    DDPMScheduler(**CELEBAHQ_SCHEDULER).save_pretrained(path)
    return path


def main_py(args, save_dir, timeout):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args, "--save_dir", save_dir]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


def main_py_row(label, args, save_dir, timeout, n_cols):
    """main_py, or None after printing the table row (label, what went wrong, n_cols − 2 blanks)
    of a run that timed out or failed."""
    blanks = " |" * (n_cols - 2)
    try:
        r, wall = main_py(args, save_dir, timeout)
    except subprocess.TimeoutExpired:
        print(f"| {label} | timed out after {timeout} s |{blanks}", flush=True)
        return None
    if r.returncode != 0:
        print(f"| {label} | exit {r.returncode}: {r.stderr.strip().splitlines()[-1][:150]} |{blanks}", flush=True)
        return None
    return r, wall


def metrics_of(save_dir):
    (run,) = [d for d in os.listdir(save_dir) if d.startswith("run_")]
    with open(os.path.join(save_dir, run, "metrics.json")) as f:
        return os.path.join(save_dir, run), json.load(f)


def timings(common, work, steps, timeout):
    print("| config | status | wall s | warm-up s | s/step steady | s/image at default steps |\n|---|---|---|---|---|---|")
    for name, extra in CONFIGS.items():
        save_dir = os.path.join(work, name.replace(" ", "_"))
        ran = main_py_row(name, common + ["--num_inference_steps", str(steps), *extra], save_dir, timeout, 6)
        if ran is None:
            continue
        _, wall = ran
        _, m = metrics_of(save_dir)
        steady = m.get("s_per_step_after_warmup", float("nan"))
        warm = m["runtime_s"] - steady * m["steps_completed"]
        method = name.split()[0]
        print(f"| {name} | {m['status']} | {wall:.1f} | {warm:.1f} | {steady:.4f} | "
              f"{steady * DEFAULT_STEPS[method] + warm:.1f} |", flush=True)


def sigterm_resume(common, work, timeout):
    """SIGTERM after the first completed steps, --resume, and an uninterrupted run with the same seed."""
    args = common + ["--num_inference_steps", "60", "--set", "sampler.intermediate_freq=5"]
    a, b = os.path.join(work, "stopped"), os.path.join(work, "straight")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args, "--save_dir", a],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not any(
            os.path.exists(os.path.join(a, d, "intermediates", "step_0005.png"))
            for d in (os.listdir(a) if os.path.isdir(a) else [])):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    run, m = metrics_of(a)
    print(f"SIGTERM: exit {proc.returncode}, status {m['status']}, steps {m['steps_completed']}/60")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--resume", run], capture_output=True,
                       text=True, timeout=timeout)
    r2, _ = main_py(args, b, timeout)
    if r.returncode or r2.returncode:
        print(f"resume exit {r.returncode}, straight run exit {r2.returncode}: {(r.stderr + r2.stderr)[-500:]}")
        return
    x, y = np.load(os.path.join(run, "restored.npy")), np.load(os.path.join(metrics_of(b)[0], "restored.npy"))
    print(f"resumed vs uninterrupted: bit-identical {np.array_equal(x, y)}, max |diff| {np.abs(x - y).max():.3g}")


def folder_runs(common, work, steps, timeout, n_images=8):
    """main.py --image_dir on n_images images at --batch_size 1 and 4 and 8 (bf16): s/image from the
    batches' runtimes, and the largest difference of any restoration from its batch-1 result."""
    from PIL import Image
    src = os.path.join(work, "folder_in")
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(os.path.join(src, f"im{i}.png"))
    print("| folder run, bf16 | status | wall s | s/image (sampling) | max diff vs batch 1 |\n|---|---|---|---|---|")
    first = None
    for bs in (1, 4, 8):
        save_dir = os.path.join(work, f"folder_b{bs}")
        ran = main_py_row(f"batch {bs}", common + ["--image_dir", src, "--batch_size", str(bs), "--dtype", "bfloat16",
                                                   "--num_inference_steps", str(steps)], save_dir, timeout, 5)
        if ran is None:
            continue
        _, wall = ran
        (batch,) = [d for d in os.listdir(save_dir) if d.startswith("batch_")]
        out = {}
        for d in sorted(os.listdir(os.path.join(save_dir, batch))):
            if os.path.isfile(os.path.join(save_dir, batch, d, "metrics.json")):
                with open(os.path.join(save_dir, batch, d, "metrics.json")) as f:
                    out[d.split("_")[0]] = (json.load(f)["runtime_s"], np.load(os.path.join(save_dir, batch, d, "restored.npy")))
        first = first or out
        diff = max(float(np.abs(out[k][1] - first[k][1]).max()) for k in out)
        print(f"| batch {bs} | {len(out)}/{n_images} done | {wall:.1f} | {sum(v[0] for v in out.values()) / len(out):.2f} "
              f"| {diff:.3g} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per main.py run")
    ap.add_argument("--only", default="", help="comma list of configs (default: all)")
    ap.add_argument("--folder", action="store_true", help="also folder runs of 8 images at --batch_size 1, 4, 8")
    args = ap.parse_args()
    if args.only:
        for name in set(CONFIGS) - set(args.only.split(",")):
            del CONFIGS[name]
    work = tempfile.mkdtemp(prefix="cuda_e2e_")
    model = save_model(os.path.join(work, "celebahq_random"))
    common = ["--model_id", model, "--img_size", str(args.size), "--device", args.device, "--no_intermediates"]
    timings(common, work, args.steps, args.timeout)
    if args.folder:
        folder_runs(common, work, args.steps, args.timeout)
    sigterm_resume(["--model_id", model, "--img_size", str(args.size), "--device", args.device], work, args.timeout)


if __name__ == "__main__":
    main()
