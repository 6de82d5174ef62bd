"""EigenPSF-DPS command line: simulate a spatially varying blur and restore it with DPS.

    python main.py                                   # pretrained CelebA-HQ DDPM (GPU)
    python main.py --model_id analytic --device cpu  # offline, training-free prior
    python main.py --download_only                   # fetch weights on a login node

Precedence: config.yaml < --set section.key=value < explicit flags. Bad input stops the run with a
one-line error and exit code 2 before any results folder exists. Exit codes: 0 done, 2 bad input,
3 sampler diverged, 75 preempted (checkpoint saved; resume with --resume), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "config.yaml")
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 75, 130

log = logging.getLogger("eigenpsf_dps")

# flag -> config key. Each flag's help shows the config.yaml default.
FLAGS = {
    "image": ("data.image", str, "clean image: path (PNG/JPEG/TIFF), http(s) URL, or 'sample'"),
    "img_size": ("data.img_size", int, "side of the square working image"),
    "sigma_noise": ("data.sigma_noise", float, "measurement noise std on the [0, 1] scale"),
    "blur_mode": ("physics.blur_mode", str, "motion | defocus | mixed | correlated | random_iid"),
    "kernel_size": ("physics.kernel_size", int, "odd PSF size in pixels"),
    "grid_size": ("physics.grid_size", int, "PSFs per image side (default auto: 8, or 64 for random_iid)"),
    "n_eigen_psfs": ("physics.n_eigen_psfs", int, "number K of EigenPSFs (1..grid_size^2)"),
    "model_id": ("model.model_id", str, "hub id, local diffusers directory, or 'analytic'"),
    "model_cache": ("model.model_cache", str, "hub cache directory (share it between login and compute nodes)"),
    "max_retries": ("model.max_retries", int, "download attempts"),
    "num_inference_steps": ("sampler.num_inference_steps", int, "DDPM steps"),
    "step_size": ("sampler.step_size", float, "DPS step size zeta"),
    "gradient_clip": ("sampler.gradient_clip", float, "max per-image gradient norm (0 = off)"),
    "num_samples": ("sampler.num_samples", int, "posterior samples per measurement"),
    "seed": ("run.seed", int, "random seed (PSFs, noise, sampling)"),
    "device": ("run.device", str, "auto | cpu | cuda | cuda:N"),
    "dtype": ("run.dtype", str, "UNet autocast dtype: float32 | bfloat16 | float16"),
    "compile": ("run.compile", str, "torch.compile mode for the UNet: off | default | reduce-overhead | max-autotune"),
    "save_dir": ("run.save_dir", str, "parent folder of run folders"),
}


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    import utils
    flat = utils.flatten(defaults)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 done, 2 bad input, 3 diverged, 75 preempted, 130 interrupted.")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, repeatable (default: none)")
    for name, (key, typ, text) in FLAGS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{text} (default: {flat.get(key)!r}, {key})")
    p.add_argument("--no_intermediates", action="store_true",
                   help="do not write intermediates/step_XXXX.png (default: written, run.save_intermediates)")
    p.add_argument("--download_only", action="store_true",
                   help="download the model into --model_cache and exit (default: off)")
    return p


def resolve_config(args, argv_flags) -> dict:
    """config.yaml (schema and defaults) <- --config file <- --set <- explicit flags, validated."""
    import utils
    schema = utils.load_config(DEFAULT_CONFIG)
    cfg = utils.load_config(args.config) if os.path.abspath(args.config) != DEFAULT_CONFIG else schema
    utils.validate_config(cfg, schema)
    base = utils.flatten(schema)
    resolved = {}
    for key, value in {**base, **utils.flatten(cfg)}.items():
        utils.set_key(resolved, key, value, schema)
    for item in args.set:
        key, value = utils.parse_set(item)
        utils.set_key(resolved, key, value, schema)
    for name in argv_flags:
        key = FLAGS[name][0]
        utils.set_key(resolved, key, getattr(args, name), schema)
    if args.no_intermediates:
        resolved["run"]["save_intermediates"] = False
    return utils.validate_config(resolved, schema)


def resolve_device(name: str):
    """Device, once, here. 'auto' is CUDA when present, else CPU with a warning."""
    import torch
    import utils
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device found: running on the CPU. A 256x256 pretrained run takes hours there; "
                    "an estimate follows after the first steps. Use --model_id analytic for a quick offline run.")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise utils.UserError(f"run.device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise utils.UserError(f"run.device={name!r} but no CUDA device is available; use --device cpu or auto")
    return dev


def setup_accelerators(cfg, device, unet):
    """TF32, channels_last and torch.compile on CUDA; on CPU the flags fall back with a warning."""
    import torch
    r = cfg["run"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif r["compile"] != "off" or r["channels_last"]:
        log.warning("--compile and channels_last only pay off on CUDA; running eagerly on %s", device)
        return unet
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "conv_in"):
        return unet  # the analytic prior is a few FFTs
    if r["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    if r["compile"] != "off":
        log.info("compiling the UNet (mode=%s); the first step includes compile time (~100 s)", r["compile"])
        unet.forward = torch.compile(unet.forward, mode=r["compile"], dynamic=False)
    return unet


def versions(device) -> dict:
    import diffusers
    import numpy
    import torch
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "diffusers": str(diffusers.__version__),
           "numpy": str(numpy.__version__), "platform": platform.platform()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


class Preempted(Exception):
    pass


def run(argv=None) -> int:
    import numpy as np
    import torch

    import dps
    import physics
    import utils

    # ---- 1. Config, device, dtype, seed: resolved once, here. ------------------------------
    schema = utils.load_config(DEFAULT_CONFIG)
    parser = build_parser(schema)
    args = parser.parse_args(argv)
    given = [n for n in FLAGS if getattr(args, n) is not None]
    cfg = resolve_config(args, given)
    d, pc, mc, sc, rc = cfg["data"], cfg["physics"], cfg["model"], cfg["sampler"], cfg["run"]
    cache = mc["model_cache"] or None

    if args.download_only:
        if mc["model_id"] == "analytic" or os.path.isdir(mc["model_id"]):
            print(f"{mc['model_id']} needs no download")
            return 0
        path = dps.download_model(mc["model_id"], cache, max_retries=mc["max_retries"])
        print(f"model ready; compute nodes can load it offline with HF_HUB_OFFLINE=1 --model_id {mc['model_id']} "
              f"--model_cache {dps.hub_cache_dir(cache)}  (or --model_id {path})")
        return 0

    device = resolve_device(rc["device"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[rc["dtype"]]
    gen = torch.Generator(device=device).manual_seed(rc["seed"])
    utils.check_writable(rc["save_dir"])

    # ---- 2. Inputs: image, PSF field, operators, measurement. -------------------------------
    img = utils.center_crop_resize(utils.read_image(d["image"]), d["img_size"])
    x = utils.to_tensor(img, device)                                        # (1, 3, H, W) in [0, 1]
    H = W = d["img_size"]
    if pc["n_eigen_psfs"] != "all" and pc["n_eigen_psfs"] > physics.resolve_grid_size(pc) ** 2:
        raise utils.UserError(f"n_eigen_psfs must be in 1..{physics.resolve_grid_size(pc) ** 2} "
                              f"(grid_size² PSFs), got {pc['n_eigen_psfs']}")
    eig_op, true_op, decomp = physics.create_sv_blur_system(H, W, pc, device, generator=gen)
    op_err = physics.operator_relative_error(eig_op, true_op, x)
    log.info("EigenPSF K=%d: explained variance %.2f%%, operator error on this image %.3e",
             decomp.n_components, 100 * decomp.total_explained_variance, op_err)
    if d["sigma_noise"] == "auto":
        raise utils.UserError("sigma_noise=auto estimates noise from a real measurement; give a number when simulating")
    # Measurement from the exact operator; reconstruction uses the EigenPSF one (no inverse crime).
    with torch.no_grad():
        y = true_op(x) + d["sigma_noise"] * torch.randn(x.shape, generator=gen, device=device)

    # ---- 3. Prior. ---------------------------------------------------------------------------
    unet, scheduler = dps.load_model(mc["model_id"], cache, device)
    if not 1 <= sc["num_inference_steps"] <= scheduler.config.num_train_timesteps:
        raise utils.UserError(f"num_inference_steps must be in 1..{scheduler.config.num_train_timesteps}, "
                              f"got {sc['num_inference_steps']}")
    unet = setup_accelerators(cfg, device, unet)
    pipe = dps.EigenPSFDPSPipeline(unet, scheduler, eig_op)

    # ---- 4. Results folder (only now: bad input never leaves one behind). --------------------
    run_dir = utils.make_run_dir(rc["save_dir"])
    images_dir = os.path.join(run_dir, "images")
    inter_dir = os.path.join(run_dir, "intermediates")
    os.makedirs(images_dir)
    if rc["save_intermediates"] and sc["intermediate_freq"]:
        os.makedirs(inter_dir)
    log.info("results: %s", run_dir)
    utils.save_yaml(os.path.join(run_dir, "config.yaml"),
                    {**cfg, "resolved": {"device": str(device), "seed": rc["seed"], "argv": sys.argv[1:] if argv is None else list(argv),
                                         "versions": versions(device)}})
    utils.save_image(os.path.join(images_dir, "clean.png"), x)
    utils.save_image(os.path.join(images_dir, "blurred.png"), y)
    utils.plot_psf_grid(os.path.join(images_dir, "psf_grid.png"), true_op.kernel_grid)
    utils.plot_eigenpsfs(os.path.join(images_dir, "eigenpsfs.png"), decomp.basis_kernels, decomp.coefficient_maps,
                         decomp.explained_variance_ratio)

    metrics = {"status": "running", "model_id": mc["model_id"], "device": str(device),
               "psnr_blurred": utils.psnr(img, utils.to_numpy(y)), "ssim_blurred": utils.ssim(img, utils.to_numpy(y)),
               "explained_variance": decomp.total_explained_variance, "operator_relative_error": op_err,
               "n_eigen_psfs": decomp.n_components, "num_inference_steps": sc["num_inference_steps"],
               "step_size": sc["step_size"], "num_samples": sc["num_samples"], "seed": rc["seed"]}

    # ---- 5. DPS with a progress bar; intermediates and divergence checks every few steps. -----
    from tqdm.auto import tqdm
    bar = tqdm(total=sc["num_inference_steps"], desc="DPS", unit="step", dynamic_ncols=True)
    t0 = time.time()
    state = {"steps_done": 0}

    def callback(i, t, x_t, x0_hat, res):
        state["steps_done"] = i + 1
        bar.update(1)
        if (i + 1) % sc["log_every"] == 0:
            bar.set_postfix(residual=f"{float(res.mean()):.4g}")  # the only host sync, every log_every steps
            if device.type == "cpu" and i + 1 == sc["log_every"]:
                eta = (time.time() - t0) / (i + 1) * sc["num_inference_steps"]
                log.warning("CPU run: estimated %.1f min for %d steps", eta / 60, sc["num_inference_steps"])
        if rc["save_intermediates"] and sc["intermediate_freq"] and i % sc["intermediate_freq"] == 0:
            utils.save_image(os.path.join(inter_dir, f"step_{i:04d}.png"), ((x0_hat[:1] + 1) / 2))

    exit_code, error = 0, None
    restored = None
    try:
        out, inter = pipe(y, num_inference_steps=sc["num_inference_steps"], step_size=sc["step_size"], generator=gen,
                          gradient_clip=sc["gradient_clip"], callback=callback, num_samples=sc["num_samples"],
                          intermediate_freq=sc["intermediate_freq"] or 0,
                          clip_denoised=None if sc["clip_denoised"] == "auto" else sc["clip_denoised"], dtype=dtype,
                          gradient_checkpointing=rc["gradient_checkpointing"], check_every=sc["log_every"])
        metrics["status"] = "complete"
    except dps.DivergenceError as e:
        out, inter, exit_code, error = None, e.intermediates, EXIT_DIVERGED, str(e)
        restored = e.partial[:1] if e.partial is not None else None
        metrics["status"] = "diverged"
    except KeyboardInterrupt:
        out, inter, exit_code, error = None, None, EXIT_INTERRUPTED, "interrupted by the user (Ctrl-C)"
        metrics["status"] = "interrupted"
    finally:
        bar.close()
    runtime = time.time() - t0

    # ---- 6. Outputs and metrics. -------------------------------------------------------------
    if out is not None:
        if sc["num_samples"] > 1:
            restored = out["mean"]
            utils.save_image(os.path.join(images_dir, "mean.png"), out["mean"])
            std = out["std"][0]
            utils.save_image(os.path.join(images_dir, "std.png"), (std / std.max().clamp_min(1e-12))[None])
            for s in range(sc["num_samples"]):
                utils.save_image(os.path.join(images_dir, f"sample_{s:02d}.png"), out["samples"][:, s])
            metrics["mean_posterior_std"] = float(std.mean())
        else:
            restored = out
    if restored is not None:
        r = utils.to_numpy(restored)
        utils.save_image(os.path.join(images_dir, "restored.png"), restored)
        metrics.update(psnr_restored=utils.psnr(img, r), ssim_restored=utils.ssim(img, r))
        with torch.no_grad():
            res = torch.linalg.vector_norm(y - eig_op(restored[:1].to(device))) / torch.linalg.vector_norm(y)
        metrics["data_residual_relative"] = float(res)
        title = "restored" if sc["num_samples"] == 1 else f"posterior mean of {sc['num_samples']}"
        utils.plot_comparison(os.path.join(images_dir, "comparison.png"), [
            ("clean", img),
            (f"blurred  PSNR {metrics['psnr_blurred']:.2f} dB  SSIM {metrics['ssim_blurred']:.3f}", utils.to_numpy(y)),
            (f"{title}  PSNR {metrics['psnr_restored']:.2f} dB  SSIM {metrics['ssim_restored']:.3f}", r)])
    if inter and inter["steps"]:
        utils.plot_progress(os.path.join(images_dir, "progress.png"), inter["steps"], inter["x0_hat"], inter["residual"])
    metrics.update(runtime_s=runtime, steps_completed=state["steps_done"],
                   steps_per_s=state["steps_done"] / runtime if runtime > 0 else 0.0)
    if error:
        metrics["error"] = error
    utils.write_json(os.path.join(run_dir, "metrics.json"), metrics)
    utils.write_metrics_txt(os.path.join(run_dir, "metrics.txt"), metrics)
    if error:
        print(f"error: {error} (partial results in {run_dir})", file=sys.stderr)
        return exit_code
    log.info("PSNR blurred %.2f dB -> restored %.2f dB (SSIM %.3f -> %.3f); %s", metrics["psnr_blurred"],
             metrics["psnr_restored"], metrics["ssim_blurred"], metrics["ssim_restored"], run_dir)
    print(run_dir)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    import dps
    import utils
    try:
        return run(argv)
    except (utils.UserError, ValueError, dps.ModelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted before sampling started", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
