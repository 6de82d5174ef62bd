"""Sampler speed (DPS and DiffPIR) for the google/ddpm-celebahq-256 architecture (113.7 M parameters,
random weights: speed does not depend on weight values).

    python bench/bench_dps.py                 # CUDA if present, else a reduced CPU case
    python bench/bench_dps.py --steps 20 --configs fp32,tf32,bf16,compile-bf16,graphs-bf16

Prints seconds per step and per image (at each sampler's default steps: 1000 for DPS, 100 for
DiffPIR) at batch 1 and batch 8 for each configuration, the ratio against the fp32 eager DPS
baseline measured in the same run, and the peak GPU memory. A DPS step is one UNet forward, one
input-gradient backward and the EigenPSF operator; a DiffPIR step is one UNet forward and the CG
data step (its share of the step time is printed).

Then folder runs as `main.py --image_dir --batch_size N` does them (--folder_batches, default
1,4,8): every image with its own PSF field (the stacked operator) and its own generator; s/image
and the speed-up over batch 1, and the peak memory of that row (GPU: allocated; CPU: the
process's peak resident set, UNet and Python included).

Then the priors' architectures side by side (--archs, default celebahq,adm-ffhq-256,adm-imagenet-256;
'' skips it): one DPS step's UNet work (forward + input-gradient backward) and one forward (DiffPIR's
UNet call) at --arch_size (default 256), batch 1, fp32 and bf16 autocast, random weights.

Last, whole DiffPIR (100 steps) and DAPS (200 levels) runs on the sample's measurement beside the classical baselines that
every main.py run adds, with their cost as a share of it (--no_end_to_end skips it).
"""

import argparse
import contextlib
import os
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dps  # noqa: E402
import physics  # noqa: E402
import priors  # noqa: E402

CELEBAHQ_UNET = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0)
CELEBAHQ_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=True, variance_type="fixed_small")


def build_unet(device):
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(CELEBAHQ_UNET).to(device).eval().requires_grad_(False)
    return unet


@contextlib.contextmanager
def data_step_timer(sync):
    """Times the samplers' data steps for the duration of the block: DiffPIR's proximal step
    (dps.data_proximal_step) and DAPS's conditional draw (dps.daps_conditional_cg / _langevin);
    yields a one-element list holding the seconds. sync() brackets each call, so the figure is
    right on a GPU (at the cost of a sync per step)."""
    names = ("data_proximal_step", "daps_conditional_cg", "daps_conditional_langevin")
    seconds, originals = [0.0], {name: getattr(dps, name) for name in names}

    def timed(original):
        def run(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = original(*args, **kwargs)
            sync()
            seconds[0] += time.perf_counter() - t
            return out
        return run

    for name, original in originals.items():
        setattr(dps, name, timed(original))
    try:
        yield seconds
    finally:
        for name, original in originals.items():
            setattr(dps, name, original)


def time_config(name, unet, sched, op, batch, size, steps, device, method="dps"):
    """Seconds per step (after warm-up) for one configuration; returns (s_per_step, warmup_s, peak_GB,
    share of the time in DiffPIR's data step)."""
    use_tf32 = name != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = use_tf32
    torch.backends.cudnn.allow_tf32 = use_tf32
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    model = unet
    if name.startswith("compile") or name.startswith("graphs"):
        mode = "reduce-overhead" if name.startswith("graphs") else "default"
        model = UNet2DModel.from_config(CELEBAHQ_UNET).to(device).eval().requires_grad_(False)
        model.load_state_dict(unet.state_dict())
        model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
    pipe = dps.EigenPSFDPSPipeline(model, sched, op)
    y = torch.rand(batch, 3, size, size, device=device)
    gen = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kw = dict(method=method, sigma_y=0.01, generator=gen, dtype=dtype, check_every=1000)
    t0 = time.perf_counter()
    pipe(y, num_inference_steps=3, **kw)  # warm-up/compile
    sync()
    warm = time.perf_counter() - t0
    with data_step_timer(sync) as data_time:
        t0 = time.perf_counter()
        pipe(y, num_inference_steps=steps, **kw)
        sync()
        elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return elapsed / steps, warm, peak, data_time[0] / elapsed


def reset_peak_memory(device):
    """GPU: the allocator's peak; CPU (Linux): the process's peak resident set (VmHWM), which
    writing 5 to /proc/self/clear_refs resets to the current resident set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the CPU figure is the peak so far


def peak_memory_gb(device):
    """GPU: peak allocated since reset_peak_memory; CPU: peak resident set of the process since then."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2 ** 20  # kB
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def time_folder(unet, sched, batch, size, steps, device, method, dtype=torch.float32):
    """(s/step, peak GB) of one sampler call on `batch` images, each with its own PSF field and
    generator, as a folder run's batch is."""
    pc = dict(blur_mode="motion", kernel_size=21 if size >= 64 else 7, grid_size=8, n_eigen_psfs=10)
    ops = [physics.create_sv_blur_system(size, size, pc, device, seed=b)[0] for b in range(batch)]
    pipe = dps.EigenPSFDPSPipeline(unet, sched, physics.stack_operators(ops))
    y = torch.rand(batch, 3, size, size, device=device)
    gens = [torch.Generator(device).manual_seed(b) for b in range(batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reset_peak_memory(device)
    kw = dict(method=method, sigma_y=0.01, generator=gens, dtype=dtype, check_every=1000)
    pipe(y, num_inference_steps=2, **kw)  # warm-up
    sync()
    t0 = time.perf_counter()
    pipe(y, num_inference_steps=steps, **kw)
    sync()
    return (time.perf_counter() - t0) / steps, peak_memory_gb(device)


def folder_table(unet, sched, batches, size, steps, device, samplers, dtype):
    print(f"\nfolder runs (per-image PSF fields and generators), {dtype}; s/image at each sampler's default steps")
    print(f"{'sampler':8s} {'batch':>5s} {'s/step':>8s} {'s/image':>8s} {'vs batch 1':>10s} {'peak GB':>8s}")
    for method in samplers:
        base = None
        for batch in batches:
            try:
                s, peak = time_folder(unet, sched, batch, size, steps, device, method, dtype)
            except torch.OutOfMemoryError:
                print(f"{method:8s} {batch:5d} out of memory")
                break
            per_image = s * dps.DEFAULT_STEPS[method] / batch
            base = base or per_image
            print(f"{method:8s} {batch:5d} {s:8.3f} {per_image:8.1f} {base / per_image:9.2f}x {peak:8.2f}")


def arch_unet(name, device):
    torch.manual_seed(0)
    config = CELEBAHQ_UNET if name == "celebahq" else priors.adm_unet_config(priors.ADM_MODELS[name][2])
    return UNet2DModel.from_config(config).to(device).eval().requires_grad_(False)


def time_unet(unet, size, device, dtype, backward, repeats):
    """Seconds per UNet call at batch 1 (after one warm-up call): forward, or forward + backward to x_t."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x_t = torch.randn(1, 3, size, size, device=device)
    t = torch.tensor(500, device=device)

    def call():
        x = x_t.clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            eps = unet(x, t).sample[:, :3].float()
        if backward:
            torch.autograd.grad(eps.square().sum(), x)

    call()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - t0) / repeats


def arch_table(archs, size, device, repeats):
    print(f"\npriors' architectures, {size}x{size}, batch 1, random weights; s per UNet call "
          f"(DPS step: forward + backward to x_t; DiffPIR step: forward)")
    print(f"{'architecture':18s} {'params M':>8s} {'dtype':>8s} {'DPS s':>8s} {'DiffPIR s':>9s} {'DPS vs celebahq':>15s} "
          f"{'peak GB':>8s}")
    base = {}
    for name in archs:
        unet = arch_unet(name, device)
        n = sum(p.numel() for p in unet.parameters()) / 1e6
        for dtype in (torch.float32, torch.bfloat16):
            reset_peak_memory(device)
            try:
                dps_s = time_unet(unet, size, device, dtype, True, repeats)
                fwd_s = time_unet(unet, size, device, dtype, False, repeats)
            except torch.OutOfMemoryError:
                print(f"{name:18s} {n:8.1f} {str(dtype)[6:]:>8s} out of memory")
                continue
            base.setdefault(dtype, dps_s if name == "celebahq" else None)
            ratio = f"{dps_s / base[dtype]:14.2f}x" if base.get(dtype) else "              -"
            print(f"{name:18s} {n:8.1f} {str(dtype)[6:]:>8s} {dps_s:8.2f} {fwd_s:9.2f} {ratio} "
                  f"{peak_memory_gb(device):8.2f}")
        del unet


def sample_problem(size, device, sigma=0.01):
    """The sample face under a simulated motion blur (per-pixel truth + noise) and its EigenPSF operator."""
    import utils
    pc = dict(blur_mode="motion", kernel_size=21 if size >= 64 else 7, grid_size=8, n_eigen_psfs=10, form="gather")
    field, truth = physics.create_ground_truth(size, size, pc, device, seed=0)
    op = physics.build_operators(field.node_grid(), size, size, pc)[0].to(device)
    x_ext = utils.to_tensor(utils.load_scene("sample", size, pc["kernel_size"] // 2), device)
    with torch.no_grad():
        y = truth(x_ext) + sigma * torch.randn((1, 3, size, size), generator=torch.Generator(device).manual_seed(0),
                                               device=device)
    return y, op


def whole_runs_and_baselines(unet, sched, size, device, sigma=0.01, methods=("diffpir", "daps")):
    """Whole runs at each sampler's default steps (DiffPIR 100, DAPS 200 annealing levels) on the
    sample's measurement with this UNet, against the classical baselines that every main.py run
    adds (baselines.restore_baselines)."""
    import baselines
    y, op = sample_problem(size, device, sigma)
    pipe = dps.EigenPSFDPSPipeline(unet, sched, op)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = None
    for method in methods:
        steps = dps.DEFAULT_STEPS[method]
        with data_step_timer(sync) as data_time:
            t0 = time.perf_counter()
            _, inter = pipe(y, num_inference_steps=steps, method=method, sigma_y=sigma,
                            generator=torch.Generator(device).manual_seed(1))
            sync()
            seconds = time.perf_counter() - t0
        first = first or seconds
        its = inter["cg_iterations"]
        print(f"\n{method}, {steps} steps, the sample under motion blur (σ = {sigma}), {size}x{size}: {seconds:.1f} s "
              f"({seconds / first:.2f}× the first row), data step {100 * data_time[0] / seconds:.0f}% "
              f"({sum(its) / len(its):.1f} CG iterations per step, at most {max(its)})")
    t0 = time.perf_counter()
    baselines.restore_baselines(op, y, sigma)
    sync()
    t_base = time.perf_counter() - t0
    print(f"classical baselines (Richardson-Lucy + Tikhonov) on the same measurement: {t_base:.2f} s = "
          f"{100 * t_base / first:.2f}% of the {methods[0]} run")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--configs", default=None, help="comma list of fp32,tf32,bf16,compile-bf16,graphs-bf16")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,8)")
    ap.add_argument("--samplers", default="dps,diffpir", help="comma list of samplers")
    ap.add_argument("--size", type=int, default=None, help="image side (CPU default 64, CUDA 256)")
    ap.add_argument("--folder_batches", default="1,4,8", help="batch sizes of the folder-run table ('' skips it)")
    ap.add_argument("--folder_dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA)")
    ap.add_argument("--no_end_to_end", action="store_true", help="skip the whole DiffPIR and DAPS runs against the baselines")
    ap.add_argument("--archs", default="celebahq,adm-ffhq-256,adm-imagenet-256",
                    help="architectures to time side by side ('' skips the table)")
    ap.add_argument("--arch_size", type=int, default=256, help="image side of the architecture table")
    ap.add_argument("--arch_repeats", type=int, default=None, help="timed calls per row (CPU default 2, CUDA 10)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (256 if cuda else 64)
    steps = args.steps or (20 if cuda else 2)
    configs = (args.configs or ("fp32,tf32,bf16,compile-bf16,graphs-bf16" if cuda else "fp32,bf16")).split(",")
    batches = [int(b) for b in (args.batches or "1,8").split(",")]
    unet = build_unet(device)
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    sched = DDPMScheduler(**CELEBAHQ_SCHEDULER)
    pc = dict(blur_mode="motion", kernel_size=21 if size >= 64 else 7, grid_size=8, n_eigen_psfs=10)
    op, _, _ = physics.create_sv_blur_system(size, size, pc, device, seed=0)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {card}; torch {torch.__version__}; UNet {n_params:.1f} M params; {size}x{size}; "
          f"EigenPSF K=10; {steps} timed steps per row")
    if not cuda:
        print("no CUDA: reduced CPU case (smaller image, fewer steps); compile/graph rows need CUDA")
    # Accuracy of the half-precision path: x̂₀ from one UNet call at t=500, bf16 autocast vs fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x_t = torch.randn(2, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(1))
    t = torch.tensor(500)
    a = sched.alphas_cumprod[500]
    with torch.no_grad():
        x0_32 = dps.tweedie_estimate(x_t, unet(x_t, t).sample, a)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            eps16 = unet(x_t, t).sample
        x0_16 = dps.tweedie_estimate(x_t, eps16.float(), a)
    rel = float((x0_16 - x0_32).norm() / x0_32.norm())
    print(f"bf16 autocast x0_hat relative difference vs fp32 (t=500): {100 * rel:.3f}% (limit 2%)")
    print(f"\n{'sampler':8s} {'config':14s} {'batch':>5s} {'s/step':>8s} {'s/image':>8s} {'vs fp32 DPS':>11s} "
          f"{'warm-up s':>10s} {'peak GB':>8s} {'data step':>9s}")
    for batch in batches:
        base = None  # s/image of fp32 DPS at this batch size
        for method in args.samplers.split(","):
            for name in configs:
                try:
                    s, warm, peak, share = time_config(name, unet, sched, op, batch, size, steps, device, method)
                except Exception as e:  # report and go on: one broken config must not hide the rest
                    print(f"{method:8s} {name:14s} {batch:5d} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                per_image = s * dps.DEFAULT_STEPS[method] / batch
                base = base or (per_image if (method, name) == ("dps", "fp32") else None)
                ratio = f"{base / per_image:10.2f}x" if base else "          -"
                data = f"{100 * share:8.0f}%" if method == "diffpir" else "        -"
                print(f"{method:8s} {name:14s} {batch:5d} {s:8.3f} {per_image:8.1f} {ratio} {warm:10.1f} {peak:8.2f} {data}")
    if args.folder_batches:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda
        dtype = getattr(torch, args.folder_dtype or ("bfloat16" if cuda else "float32"))
        folder_table(unet, sched, [int(b) for b in args.folder_batches.split(",")], size, steps, device,
                     args.samplers.split(","), dtype)
    if args.archs:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        arch_table(args.archs.split(","), args.arch_size, device, args.arch_repeats or (10 if cuda else 2))
    if not args.no_end_to_end:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        whole_runs_and_baselines(unet, sched, size, device)


if __name__ == "__main__":
    main()
