"""EigenPSF-DPS command line: simulate a spatially varying blur and restore it with DPS or DiffPIR.

    python main.py                                   # pretrained CelebA-HQ DDPM (GPU)
    python main.py --model_id analytic --device cpu  # offline, training-free prior
    python main.py --download_only                   # fetch weights on a login node

Precedence: config.yaml < --set section.key=value < explicit flags. Bad input stops the run with a
one-line error and exit code 2 before any results folder exists. Exit codes: 0 done, 2 bad input,
3 sampler diverged, 4 a batch finished but some images failed (see its summary.csv), 75 preempted
(checkpoint saved; resume with --resume), 130 interrupted (Ctrl-C; checkpoint saved).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import utils

# torch, diffusers and the modules built on them (physics, dps) are imported inside the functions
# that use them: flags are parsed, and --help or a bad flag answered, before that multi-second import.

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "config.yaml")
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_BATCH_INCOMPLETE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 4, 75, 130

log = logging.getLogger("eigenpsf_dps")

def float_or_auto(text):
    return "auto" if text == "auto" else float(text)


def int_or(keyword):
    """An argparse type that takes an int or `keyword` (e.g. --n_eigen_psfs all, --grid_size auto)."""
    def parse(text):
        return keyword if text == keyword else int(text)
    parse.__name__ = f"int or '{keyword}'"
    return parse


def tile_value(text):
    """--tile: a side in pixels, auto or off."""
    return text if text in ("auto", "off") else int(text)


tile_value.__name__ = "int, 'auto' or 'off'"


# flag -> config key. Each flag's help shows the config.yaml default.
FLAGS = {
    "image": ("data.image", str, "clean image: path (PNG/JPEG/TIFF), http(s) URL, or 'sample'"),
    "img_size": ("data.img_size", int, "side of the square working image"),
    "sigma_noise": ("data.sigma_noise", float_or_auto, "measurement noise std on the [0, 1] scale, or 'auto' (real data)"),
    "image_dir": ("data.image_dir", str, "simulate and restore every image in this folder"),
    "blurred": ("data.blurred", str, "real data: an already blurred image (needs --psf_grid)"),
    "blurred_dir": ("data.blurred_dir", str, "real data: restore every image in this folder (needs --psf_grid)"),
    "psf_grid": ("data.psf_grid", str, "measured PSFs: .npy (G,G,k,k) or .npz with psfs [+ positions (G,G,2)]"),
    "save_psf_grid": ("data.save_psf_grid", str, "export the PSF grid used (.npz/.npy)"),
    "calibration": ("data.calibration", str, "measure the PSF grid from this image of point sources, write it, exit"),
    "saturation": ("data.saturation", float_or_auto, "calibration: the camera's full scale in the file's units "
                   "(4095 for 12-bit data in 16-bit files), or auto"),
    "blur_mode": ("physics.blur_mode", str, "the blur family (see config.yaml's physics.blur_mode)"),
    "kernel_size": ("physics.kernel_size", int, "odd PSF size in pixels"),
    "grid_size": ("physics.grid_size", int_or("auto"), "PSFs per image side, or auto (8, or 64 for random_iid)"),
    "n_eigen_psfs": ("physics.n_eigen_psfs", int_or("all"), "number K of EigenPSFs (1..grid_size^2), or all"),
    "model_id": ("model.model_id", str, "hub id, diffusers folder, analytic, ADM name or .pt (README: Priors)"),
    "model_cache": ("model.model_cache", str, "hub cache directory (share it between login and compute nodes)"),
    "max_retries": ("model.max_retries", int, "download attempts"),
    "sampler": ("sampler.method", str, "dps | diffpir"),
    "num_inference_steps": ("sampler.num_inference_steps", int_or("auto"),
                            "sampler steps, or auto (1000 for dps, 100 for diffpir)"),
    "train_dir": ("train.dir", str, "train a prior on this folder of clean images instead of restoring (README: "
                  "\"Your own prior\")"),
    "init": ("train.init", str, "training: fine-tune this --model_id instead of starting from scratch"),
    "tile": ("sampler.tile", tile_value, "run the UNet on overlapping tiles of this side (pixels), auto, or off"),
    "tile_overlap": ("sampler.tile_overlap", int, "pixels shared by neighbouring tiles"),
    "step_size": ("sampler.dps.step_size", float, "DPS step size zeta"),
    "gradient_clip": ("sampler.dps.gradient_clip", float, "DPS: max per-image gradient norm (0 = off)"),
    "num_samples": ("sampler.num_samples", int, "posterior samples per measurement"),
    "seed": ("run.seed", int, "random seed (PSFs, noise, sampling)"),
    "batch_size": ("run.batch_size", int, "folder runs: measurements restored per sampler call"),
    "device": ("run.device", str, "auto | cpu | cuda | cuda:N"),
    "dtype": ("run.dtype", str, "UNet autocast dtype: float32 | bfloat16 | float16"),
    "compile": ("run.compile", str, "torch.compile mode for the UNet: off | default | reduce-overhead | max-autotune"),
    "save_dir": ("run.save_dir", str, "parent folder of run folders"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """Flag errors as one line with a hint, like every other bad input, not the usage block."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (python main.py --help lists every flag)\n")


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    flat = utils.flatten(defaults)
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 done, 2 bad input, 3 diverged, 4 batch with failed images, 75 preempted, "
                                       "130 interrupted.")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, repeatable (default: none)")
    for name, (key, typ, text) in FLAGS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{text} (default: {flat.get(key)!r}, {key})")
    p.add_argument("--no_intermediates", action="store_true",
                   help="do not write intermediates/step_XXXX.png (default: written, run.save_intermediates)")
    p.add_argument("--no_figures", action="store_true",
                   help="do not draw a restoration's per-image matplotlib figures in images/ (default: drawn, "
                        "run.save_figures; calibration pictures are always drawn)")
    p.add_argument("--no_baseline", action="store_true",
                   help="skip the classical baselines (Richardson-Lucy and Tikhonov) written beside each restoration "
                        "(default: run, run.baseline)")
    p.add_argument("--download_only", action="store_true",
                   help="download the model into --model_cache and exit (default: off)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a preempted run (or folder run, batch_...) from RUN_DIR/checkpoint.pt with its saved config (default: off)")
    return p


def resolve_config(args, argv_flags, schema) -> tuple:
    """config.yaml (schema and defaults) <- --config file <- --set <- explicit flags, validated once.

    Returns (config, explicit): the keys the user chose (in a --config file, by --set or a flag);
    the others are defaults, which fit_defaults may adapt to the data.
    """
    user = utils.load_config(args.config) if os.path.abspath(args.config) != DEFAULT_CONFIG else {}
    pairs = [utils.parse_set(item) for item in args.set]
    # The run's blur mode, which decides whether the first version's physics.random_iid.grid_size applies.
    mode = args.blur_mode or dict(pairs).get("physics.blur_mode") or utils.flatten(user).get(
        "physics.blur_mode", schema["physics"]["blur_mode"])
    user = utils.unflatten(utils.unalias(utils.flatten(user), os.path.basename(args.config), mode, log))
    # A config file's key counts as chosen where it differs from config.yaml: a full copy of
    # config.yaml chooses nothing (its image: sample and saturation: auto are the defaults).
    defaults = utils.flatten(schema)
    explicit = {k for k, v in utils.flatten(user).items() if k not in defaults or defaults[k] != v}
    resolved = utils.with_defaults(user, schema)
    utils.unalias(dict(pairs), "--set", mode)  # an old key beside its new one, with another value, is an error
    for key, value in pairs:  # in order: a later --set of a key overrides an earlier one
        key = utils.unalias_key(key, mode, "--set", log)
        if key is not None:
            utils.set_key(resolved, key, value, schema)
            explicit.add(key)
    for name in argv_flags:
        key = FLAGS[name][0]
        utils.set_key(resolved, key, getattr(args, name), schema)
        explicit.add(key)
    if args.no_intermediates:
        resolved["run"]["save_intermediates"] = False
    if args.no_figures:
        resolved["run"]["save_figures"] = False
    if args.no_baseline:
        resolved["run"]["baseline"] = False
    return utils.validate_config(resolved, schema), explicit


def fit_defaults(cfg, explicit, n_psfs, simulated: bool) -> None:
    """Adapts defaults the user did not choose to the data, with an info line each; explicit
    values are never changed (a value that does not fit stays an error).

    - n_eigen_psfs is capped at the number of PSFs in the grid (the rank cap is physics').
    - With an explicit kernel_size, the mode's PSF sizes are scaled down to fit it.
    """
    import physics
    pc = cfg["physics"]
    K = pc["n_eigen_psfs"]
    if "physics.n_eigen_psfs" not in explicit and K != "all" and K > n_psfs:
        log.info("n_eigen_psfs: the default K=%d exceeds the %d PSFs of the grid; using K=%d", K, n_psfs, n_psfs)
        pc["n_eigen_psfs"] = n_psfs
    if not simulated or "physics.kernel_size" not in explicit:
        return
    for section in physics.mode_sections(pc["blur_mode"]):
        keys = physics.SIZE_KEYS[section]
        if any(f"physics.{section}.{k}" in explicit for k in keys):
            continue
        fitted = physics.fit_sizes_to_kernel(section, pc[section], pc["kernel_size"])
        if fitted is not None:
            log.info("kernel_size %d: scaled the default %s sizes to fit: %s", pc["kernel_size"], section,
                     ", ".join(f"{k}={v:g}" for k, v in fitted.items() if k in keys))
            pc[section] = fitted


# Inputs that exclude each other: (keys, why). Each pair given together is refused with one line
# rather than one of them being dropped without a word.
SIMULATION_ONLY = ("data.img_size", "physics.blur_mode")
INPUT_KEYS = ("data.image", "data.image_dir", "data.blurred", "data.blurred_dir", "data.calibration")
FLAG_OF = {key: f"--{name}" for name, (key, _, _) in FLAGS.items()}


def check_conflicts(cfg, explicit) -> None:
    """Refuses combinations of inputs that would silently ignore one of them."""
    flat = utils.flatten(cfg)
    given = [k for k in INPUT_KEYS if flat[k] and (k != "data.image" or k in explicit)]
    name = lambda k: FLAG_OF.get(k, k)  # noqa: E731
    if len(given) > 1:
        a, b = given[:2]
        raise utils.UserError(f"{name(a)} and {name(b)} are different inputs (one run restores one of: a clean image "
                              f"to simulate from, a folder of them, a real measurement, a folder of them, or a "
                              f"calibration image); give one")
    if "data.saturation" in explicit and not (given and given[0] == "data.calibration"):
        raise utils.UserError("--saturation applies to --calibration (the camera's full scale in a calibration image)")
    if given and given[0] == "data.calibration" and flat["data.psf_grid"]:
        raise utils.UserError("--calibration measures a PSF grid; it does not take --psf_grid (restore with the grid it "
                              "writes in a second run)")
    if given and given[0] in ("data.blurred", "data.blurred_dir"):
        ignored = [name(k) for k in SIMULATION_ONLY if k in explicit]
        if ignored:
            raise utils.UserError(f"{' and '.join(ignored)} appl{'y' if len(ignored) > 1 else 'ies'} to simulations; a "
                                  f"real measurement ({name(given[0])}) is restored at its own size with its --psf_grid")


REAL_DATA_SAMPLES = 16


def real_data_defaults(cfg, explicit) -> None:
    """On a real measurement, the sampler settings the user did not choose follow the README's
    sampler tables (bench/bench_samplers.py), with an info line each: DiffPIR (above DPS at 1000
    steps in all 8 problems, at a tenth of the steps), unless a DPS setting was given; and with the
    analytic prior the mean of REAL_DATA_SAMPLES posterior samples (one sample of a Gaussian prior
    is grainy: it scored 5 dB below the blurred input on the README's real-data command; the mean
    of 8 exact posterior draws falls 0.9 dB short of the exact mean there, of 16 0.5 dB)."""
    d, sc = cfg["data"], cfg["sampler"]
    if not (d["blurred"] or d["blurred_dir"]):
        return
    if "sampler.method" not in explicit and not any(k.startswith("sampler.dps.") for k in explicit) \
            and sc["method"] != "diffpir":
        log.info("real data: sampler diffpir (the default for real measurements; --sampler dps for DPS)")
        sc["method"] = "diffpir"
    if cfg["model"]["model_id"] == "analytic" and "sampler.num_samples" not in explicit and sc["num_samples"] == 1:
        log.info("real data with the analytic prior: restoring the mean of %d posterior samples (--num_samples 1 "
                 "for one)", REAL_DATA_SAMPLES)
        sc["num_samples"] = REAL_DATA_SAMPLES


def resolve_device(name: str):
    """Device, once, here. 'auto' is CUDA when present, else CPU with a warning. On the CPU the
    allocator is tuned for the operator's large temporaries (utils.tune_cpu_allocator)."""
    import torch
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cpu":
            log.warning("no CUDA device found: running on the CPU. A 256x256 pretrained run takes hours there; "
                        "an estimate follows after the first steps (the analytic prior is quick anywhere)")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise utils.UserError(f"run.device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise utils.UserError(f"run.device={name!r} but no CUDA device is available; use --device cpu or auto")
    if dev.type == "cpu":
        utils.tune_cpu_allocator()
        log.info("device: CPU, %d threads", torch.get_num_threads())
    else:
        log.info("device: %s (%s)", dev, torch.cuda.get_device_name(dev))
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
    import torch
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "diffusers": str(diffusers.__version__),
           "numpy": str(np.__version__), "platform": platform.platform()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


@dataclass
class Problem:
    """One image to restore: the measurement, its operators and what is known about it."""
    name: str
    y: object                      # (1, 3, H, W) measurement in [0, 1]
    clean: object                  # (H, W, 3) numpy clean image, or None for real data
    grid: object                   # (G, G, k, k) PSFs
    coords: tuple                  # PSF positions (ys, xs) in pixels of y
    eig_op: object                 # EigenPSF operator at y's size
    grid_op: object                # the grid's full-rank operator at y's size (the model without PCA)
    decomp: object
    info: dict = field(default_factory=dict)  # logged facts that go into metrics.json


def psf_field(H, W, cfg, device, gen, measured):
    """(field, node grid, node coords): the PSF field a simulation draws (or a measured grid made
    continuous by physics.BlendedGridField) and the node grid the reconstruction is given."""
    import torch

    import physics
    pc = cfg["physics"]
    if measured is None:
        sim = physics.SVBlurSimulator(H, W, pc["kernel_size"], physics.resolve_grid_size(pc), device)
        f = sim.simulate_field(pc["blur_mode"], generator=gen, **physics.mode_params(pc))
        return f, f.node_grid(), tuple(c.numpy() for c in f.node_coords())
    psfs, coords, _ = measured
    if psfs.shape[-1] > min(H, W):
        raise utils.UserError(f"PSF size {psfs.shape[-1]} is larger than the image ({H}x{W})")
    grid = torch.tensor(psfs, dtype=torch.float32, device=device)
    if coords is not None:
        check_positions_overlap(coords, H, W)
    coords = coords or tuple(physics.grid_node_coords(n, s).numpy() for n, s in zip(grid.shape[:2], (H, W)))
    return physics.BlendedGridField(grid, *(np.asarray(c) for c in coords), H, W), grid, coords


MIN_GRID_COVER = 0.5  # below this share of the image inside the PSF grid's span, the grid is refused


def grid_cover(coords, H, W):
    """(share of the H×W image inside the grid's span, share of the nodes outside the image). The
    span reaches half a node spacing beyond the outer nodes, as the cells of a calibration do."""
    shares, inside = [], []
    for c, n in zip(coords, (H, W)):
        c = np.sort(np.asarray(c, dtype=np.float64).ravel())
        if len(c) == 1:                 # one PSF along this axis applies to all of it
            shares.append(1.0)
        else:
            half = (c[-1] - c[0]) / (len(c) - 1) / 2
            lo, hi = max(c[0] - half, -0.5), min(c[-1] + half, n - 0.5)
            shares.append(max(hi - lo, 0.0) / n)
        inside.append(float(((c >= 0) & (c <= n - 1)).mean()))
    return shares[0] * shares[1], 1 - inside[0] * inside[1]


def check_positions_overlap(coords, H, W):
    """PSF positions must reach into the H×W image; positions wholly outside it are almost always
    swapped (x, y) columns or coordinates of another frame (e.g. the full sensor). A grid that
    covers less than MIN_GRID_COVER of the image is refused, and one that leaves part of it
    uncovered or has nodes outside it is a warning with the shares."""
    ys, xs = coords
    outside = [f"{name} {c.min():.0f}..{c.max():.0f} lie outside 0..{n - 1}"
               for name, c, n in (("rows", ys, H), ("columns", xs, W)) if c.max() < 0 or c.min() > n - 1]
    if outside:
        fits_swapped = ys.max() >= 0 and ys.min() <= W - 1 and xs.max() >= 0 and xs.min() <= H - 1
        hint = " (they would fit with x and y swapped)" if fits_swapped else ""
        raise utils.UserError(f"PSF positions are outside the {H}x{W} image: {'; '.join(outside)}. "
                              f"positions must be [row, col] pixel coordinates of this measurement{hint}; "
                              f"check for swapped x/y or coordinates of another frame")
    cover, nodes_out = grid_cover(coords, H, W)
    where = (f"rows {ys.min():.0f}..{ys.max():.0f}, columns {xs.min():.0f}..{xs.max():.0f} on a {H}x{W} image; "
             f"positions must be [row, col] pixel coordinates of this measurement")
    if cover < MIN_GRID_COVER:
        raise utils.UserError(f"the PSF grid covers only {100 * cover:.0f}% of the image ({where}); beyond it "
                              f"every pixel would get the nearest edge PSF")
    if cover < 0.95 or nodes_out > 0:
        log.warning("the PSF grid covers %.0f%% of the image and %.0f%% of its nodes lie outside it (%s)",
                    100 * cover, 100 * nodes_out, where)


def simulate_measurement(f, scene, cfg, device, gen):
    """(x, x_ext, y, truth): the ground truth blurs the scene with margin (valid convolution),
    then Gaussian noise; x is the field of view."""
    import torch

    import physics
    truth = physics.GroundTruthBlur(f, cfg["physics"]["form"])
    x_ext = utils.to_tensor(scene, device)
    with torch.no_grad():
        y = truth(x_ext)
        y = y + cfg["data"]["sigma_noise"] * torch.randn(y.shape, generator=gen, device=device)
    return truth.crop(x_ext), x_ext, y, truth


def prepare(path, cfg, device, gen, measured) -> Problem:
    """Loads one input and builds its operators; every failure here is a UserError (exit 2).

    Simulation: the measurement comes from the per-pixel ground truth (physics.GroundTruthBlur)
    of a continuous PSF field, on a scene with k // 2 pixels of real margin; the reconstruction is
    given only the node grid sampled from that field, and its own boundary rule.
    """
    import torch

    import physics
    d, pc = cfg["data"], cfg["physics"]
    real = bool(d["blurred"] or d["blurred_dir"])
    info = {}
    if real:
        y_np = utils.read_image(path)                           # native size: resizing would change the blur
        H, W = y_np.shape[:2]
    else:
        if d["sigma_noise"] == "auto":
            raise utils.UserError("sigma_noise=auto estimates the noise of a real measurement (--blurred); "
                                  "give a number when simulating")
        H = W = d["img_size"]
    # 1. PSF field and the node grid (measured from a file, or simulated from the seeded generator).
    f, grid, coords = psf_field(H, W, cfg, device, gen, measured)
    if measured is not None:
        info["psf_sums_before_normalisation"] = [float(measured[2].min()), float(measured[2].max())]
    eig_op, grid_op, decomp = physics.build_operators(grid, H, W, pc, tuple(torch.as_tensor(c) for c in coords))
    eig_op, grid_op = eig_op.to(device), grid_op.to(device)
    # 2. Measurement: the file (real data), or the ground truth + noise (simulation).
    if real:
        y, clean = utils.to_tensor(y_np, device), None
        if d["sigma_noise"] == "auto":
            info["sigma_noise_estimated"] = utils.estimate_noise_sigma(y_np)
            log.info("%s: estimated noise sigma %.4f (wavelet MAD)", os.path.basename(path), info["sigma_noise_estimated"])
    else:
        r = grid.shape[-1] // 2
        scene = utils.load_scene(path, H, r)                       # (H + 2r, W + 2r, 3)
        clean = scene[r:r + H, r:r + W]
        x, x_ext, y, truth = simulate_measurement(f, scene, cfg, device, gen)
        info["operator_relative_error"] = physics.operator_relative_error(eig_op, truth, x, x_ext)
        info["ground_truth"] = (f"per-pixel {pc['form']} blur of the continuous PSF field"
                                f"{' (measured grid, Gaussian-blended)' if measured is not None else ''}, "
                                f"valid convolution over {r} px of real margin")
    info["form"] = pc["form"]
    info["input_bit_depth"] = utils.bit_depth(path)
    info["explained_variance"] = decomp.total_explained_variance
    log.info("%s: %dx%d, EigenPSF K=%d explains %.2f%% of the PSF variance%s", os.path.basename(path), H, W,
             decomp.n_components, 100 * decomp.total_explained_variance,
             f", operator error against the ground truth {info['operator_relative_error']:.3e}"
             if "operator_relative_error" in info else "")
    return Problem(os.path.splitext(os.path.basename(path))[0], y, clean, grid, coords, eig_op, grid_op, decomp, info)


def reconstruction_operator(p: Problem, cfg, multiple: int, device):
    """EigenPSF operator for DPS. When y's size is not a multiple the UNet accepts, x lives on a
    centred, larger domain and the operator crops to the measured window (CroppedOperator)."""
    import torch

    import physics
    H, W = p.y.shape[-2:]
    Hx, Wx = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    if (Hx, Wx) == (H, W):
        return p.eig_op, (H, W), (0, 0)
    top, left = (Hx - H) // 2, (Wx - W) // 2
    coords = (torch.as_tensor(p.coords[0]) + top, torch.as_tensor(p.coords[1]) + left)
    op, _, _ = physics.build_operators(p.grid, Hx, Wx, cfg["physics"], coords)
    log.info("%s: %dx%d is not a multiple of %d; sampling on %dx%d and cropping back (%.0f%% more compute)",
             p.name, H, W, multiple, Hx, Wx, 100 * (Hx * Wx / (H * W) - 1))
    return physics.CroppedOperator(op.to(device), top, left, H, W), (Hx, Wx), (top, left)


class Preempted(Exception):
    """SIGTERM/SIGUSR1 or a first Ctrl-C arrived; raised from the sampler callback after a
    completed step, so that the checkpoint holds a consistent state."""

    def __init__(self, step, x_t):
        super().__init__(f"preempted after step {step}")
        self.step, self.x_t = step, x_t


STOP = {"signal": None}  # set by the signal handler, read by the sampler callback
RUN_DIR = {"path": None}  # the run (or batch) folder in use, for what an interrupt leaves on disk


def _request_stop(signum, frame):
    """The first Ctrl-C stops like SIGTERM, at the end of the step with a checkpoint (one stray
    key press must not lose hours of CPU sampling); a second one quits at once."""
    if signum == signal.SIGINT and STOP["signal"] == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["signal"] = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_requests():
    """Within the block SIGTERM, SIGUSR1 and a first Ctrl-C only set STOP (see _request_stop);
    the previous handlers come back after it."""
    old = {sig: signal.signal(sig, _request_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def stop_outcome() -> tuple:
    """(exit code, status, why) for the stop request in STOP."""
    if STOP["signal"] == signal.SIGINT:
        return EXIT_INTERRUPTED, "interrupted", "interrupted by the user (Ctrl-C)"
    return EXIT_PREEMPTED, "preempted", f"stopped by signal {STOP['signal']}"


CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "eigenpsf-dps checkpoint", 2


def _image_entry(p: Problem, gen, state) -> dict:
    """One image's part of a checkpoint: its generator state, problem and progress so far."""
    import torch

    clean = None if p.clean is None else torch.from_numpy(p.clean)
    return {"generator_state": gen.get_state(),
            "problem": {"name": p.name, "y": p.y.cpu(), "clean": clean, "grid": p.grid.cpu(),
                        "coords": [torch.as_tensor(c).cpu() for c in p.coords], "info": utils.jsonable(p.info)},
            "progress": {"steps_done": int(state["steps_done"]), "runtime": float(state["runtime"]),
                         "steps": [int(s) for s in state["steps"]], "x0_hat": list(state["x0_hat"]),
                         "residual": list(state["residual"]),
                         "curve_steps": [int(s) for s in state.get("curve_steps", [])],
                         "curve": [float(v) for v in state.get("curve", [])]}}


def _write_checkpoint(path, body: dict) -> None:
    """Written atomically. Only tensors and plain containers (dict, list, str, int, float, bool,
    None) go in, so that load_checkpoint can read it with torch.load(weights_only=True): no
    pickled object can run code."""
    import torch

    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **body}, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(path, p: Problem, x_t, next_index, gen, state):
    """Everything needed to continue a single run bit-identically: x_t, the step, the generator
    state, the measurement and PSFs, and the progress so far."""
    _write_checkpoint(path, {"x_t": x_t.detach().cpu(), "next_index": int(next_index), **_image_entry(p, gen, state)})


def save_folder_checkpoint(path, items, x_t, next_index, inputs, rows):
    """A folder run's checkpoint: the batch in flight (x_t of all its samples, each image's entry
    and run folder), the input list, and the summary rows of the images already finished."""
    _write_checkpoint(path, {"kind": "folder", "x_t": x_t.detach().cpu(), "next_index": int(next_index),
                             "inputs": list(inputs), "rows": {str(i): utils.jsonable(r) for i, r in rows.items()},
                             "images": [{**_image_entry(it.p, it.gen, it.view.state), "index": it.index,
                                         "folder": os.path.basename(it.folder)} for it in items]})


# key -> required type of a checkpoint entry (dotted keys reach into "problem" and "progress")
IMAGE_SCHEMA = {"generator_state": "tensor", "problem.name": str, "problem.y": "tensor", "problem.grid": "tensor",
                "problem.coords": list, "problem.info": dict, "progress.steps_done": int, "progress.runtime": float,
                "progress.steps": list, "progress.x0_hat": list, "progress.residual": list}
CHECKPOINT_SCHEMA = {"x_t": "tensor", "next_index": int, **IMAGE_SCHEMA}
FOLDER_SCHEMA = {"x_t": "tensor", "next_index": int, "inputs": list, "rows": dict, "images": list}
FOLDER_IMAGE_SCHEMA = {**IMAGE_SCHEMA, "index": int, "folder": str}


def _check_schema(path, ckpt, schema, where="") -> None:
    import torch

    for key, typ in schema.items():
        node = ckpt
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        ok = torch.is_tensor(node) if typ == "tensor" else isinstance(node, typ) and not isinstance(node, bool)
        if not ok:
            want = "a tensor" if typ == "tensor" else typ.__name__
            raise utils.UserError(f"checkpoint {path} is damaged: {where}{key} should be {want}, "
                                  f"got {type(node).__name__}")


def load_checkpoint(path) -> dict:
    """Reads a checkpoint written by save_checkpoint, refusing anything else with a UserError.

    torch.load(weights_only=True) unpickles tensors and plain containers only: a planted file
    with code in it is refused before any of that code can run.
    """
    import pickle
    import torch

    not_ours = f"{path} is not a checkpoint this tool wrote"
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":  # torch.save writes a zip archive; a cut-off one still starts so
            raise utils.UserError(f"{not_ours}: it is not a torch checkpoint archive (a text or other file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise utils.UserError(f"{not_ours}: it holds Python objects other than tensors and plain containers; "
                                  f"refusing to load it") from None
        raise utils.UserError(f"{not_ours}, or it is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # the restricted unpickler and the zip reader raise many types on junk
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise utils.UserError(f"{not_ours}, or it is truncated or corrupt ({detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise utils.UserError(f"{not_ours} (no {CHECKPOINT_FORMAT!r} marker; checkpoints of versions before "
                              f"format {CHECKPOINT_VERSION} cannot be resumed: start the run again)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise utils.UserError(f"{path} has checkpoint format {ckpt.get('version')!r}; this version of the tool "
                              f"resumes format {CHECKPOINT_VERSION} only: start the run again")
    if ckpt.get("kind") != "folder":
        _check_schema(path, ckpt, CHECKPOINT_SCHEMA)
        return ckpt
    _check_schema(path, ckpt, FOLDER_SCHEMA)
    for n, entry in enumerate(ckpt["images"]):
        _check_schema(path, entry if isinstance(entry, dict) else {}, FOLDER_IMAGE_SCHEMA, f"images[{n}].")
    return ckpt


@dataclass
class RunView:
    """What the three parts of restore share: the reconstruction operator, the window of x that
    y measures, the output folders, and the metrics and progress so far."""
    op: object
    x_size: tuple
    crop: object                   # x-space (…, C_x, Hx, Wx) -> y's channels and window
    images_dir: str
    inter_dir: str
    metrics: dict
    state: dict                    # steps_done, runtime, and the intermediates kept for progress.png
    timing: dict = field(default_factory=dict)  # when this session's first log_every steps ended


def sigma_y(p: Problem, cfg) -> float:
    """The measurement noise std the sampler assumes: given, or estimated from a real measurement."""
    s = cfg["data"]["sigma_noise"]
    return float(p.info["sigma_noise_estimated"] if s == "auto" else s)


def batch_sigma_y(ps, cfg):
    """One σ_y for the sampler, or one per image where they differ (estimated per measurement)."""
    sigmas = [sigma_y(p, cfg) for p in ps]
    return sigmas[0] if len(set(sigmas)) == 1 else sigmas


def restore(p: Problem, run_dir, cfg, device, dtype, gen, pipe, multiple, extra_config, resume=None) -> tuple:
    """The configured sampler on one problem, writing the documented run folder, in three parts:
    inputs (restore_inputs), sampling (sample) and outputs (write_outputs).
    Returns (exit_code, metrics). resume: a checkpoint dict (see save_checkpoint) to continue from.
    """
    view = restore_inputs(p, run_dir, cfg, device, pipe, multiple, extra_config, resume and resume["progress"])
    pipe.operator = view.op
    ckpt = lambda x_t, nxt: save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), p, x_t, nxt, gen,  # noqa: E731
                                            view.state)
    start = (resume["x_t"], resume["next_index"]) if resume else None
    out, exit_code, error, partial = sample([p], [view], cfg, device, dtype, gen, pipe, start, ckpt, run_dir)
    write_outputs(p, view, run_dir, cfg, device, out, None if partial is None else partial[:1])
    if view.metrics["status"] == "complete" and resume:
        os.remove(os.path.join(run_dir, "checkpoint.pt"))
    finish(view, run_dir, error)
    return exit_code, view.metrics


def finish(view: RunView, run_dir, error) -> None:
    """metrics.json and metrics.txt, last, so that their presence means the folder is whole."""
    if error:
        view.metrics["error"] = error
    utils.write_json(os.path.join(run_dir, "metrics.json"), view.metrics)
    utils.write_metrics_txt(os.path.join(run_dir, "metrics.txt"), view.metrics)


def restore_inputs(p: Problem, run_dir, cfg, device, pipe, multiple, extra_config, progress) -> RunView:
    """1. Inputs: the operator the sampler sees, the run folder's config, problem files and
    pictures of the input, and the metrics known before sampling. progress: a checkpoint's
    progress to continue from (the folder exists then), or None."""
    import physics
    sc, rc = cfg["sampler"], cfg["run"]
    op, x_size, (top, left) = reconstruction_operator(p, cfg, multiple, device)
    # A gray y with an RGB prior: sample RGB, compare y with the luminance of A(x), write luminance.
    gray_from_rgb = p.y.shape[1] == 1 and pipe.unet.config.in_channels == 3
    if gray_from_rgb:
        op = physics.LuminanceOperator(op)
    to_y = physics.luminance if gray_from_rgb else (lambda z: z)
    H, W = p.y.shape[-2:]
    crop = lambda z: to_y(z)[..., top:top + H, left:left + W]  # noqa: E731
    images_dir, inter_dir = os.path.join(run_dir, "images"), os.path.join(run_dir, "intermediates")
    os.makedirs(images_dir, exist_ok=progress is not None)
    if rc["save_intermediates"] and sc["intermediate_freq"]:
        os.makedirs(inter_dir, exist_ok=progress is not None)
    utils.save_yaml(os.path.join(run_dir, "config.yaml"), {**cfg, "resolved": extra_config})
    utils.save_psf_grid(os.path.join(run_dir, "psf_grid.npz"), p.grid, p.coords)
    # The exact problem, for others to reuse: y as the sampler sees it (unclipped) and the clean image.
    np.save(os.path.join(run_dir, "measurement.npy"), p.y[0].permute(1, 2, 0).cpu().numpy().astype(np.float32))
    if p.clean is not None:
        np.save(os.path.join(run_dir, "clean.npy"), p.clean.astype(np.float32))
        utils.save_image(os.path.join(images_dir, "clean.png"), p.clean)
    utils.save_image(os.path.join(images_dir, "blurred.png"), p.y)
    if rc["save_figures"]:
        utils.plot_psf_grid(os.path.join(images_dir, "psf_grid.png"), p.grid)
        utils.plot_eigenpsfs(os.path.join(images_dir, "eigenpsfs.png"), p.decomp.basis_kernels,
                             p.decomp.coefficient_maps, p.decomp.explained_variance_ratio)
    method = sc["method"]
    metrics = {"status": "running", "image": p.name, "model_id": cfg["model"]["model_id"], "device": str(device),
               **p.info, "n_eigen_psfs": p.decomp.n_components, "sampler": method,
               "num_inference_steps": sc["num_inference_steps"], **{f"{method}.{k}": v for k, v in sc[method].items()},
               "sigma_y": sigma_y(p, cfg), "num_samples": sc["num_samples"], "seed": rc["seed"]}
    if p.clean is not None:
        y_np = utils.to_numpy(p.y)
        metrics.update(psnr_blurred=utils.psnr(p.clean, y_np), ssim_blurred=utils.ssim(p.clean, y_np),
                       ssim_definition=utils.SSIM_DEFINITION)
    else:
        metrics["note"] = "real measurement: no clean image, so PSNR/SSIM are omitted"
    state = progress or {"steps_done": 0, "runtime": 0.0, "steps": [], "x0_hat": [], "residual": []}
    state.setdefault("curve_steps", []), state.setdefault("curve", [])  # older checkpoints have no curve
    return RunView(op, x_size, crop, images_dir, inter_dir, metrics, state)


def progress_callback(views, cfg, device, bar, name, y_norms):
    """The sampler's callback for a batch of images (one view each, num_samples rows each):
    progress bar, each image's intermediates and residual curve, the CPU time estimate, and stop
    requests (raised as Preempted after a completed step, so the checkpoint is consistent).
    y_norms: ‖y‖ of each row (B·S,), so that the residual shown is ‖y − A(x̂₀)‖/‖y‖ everywhere."""
    sc, S = cfg["sampler"], cfg["sampler"]["num_samples"]
    n, first_step = sc["num_inference_steps"], views[0].state["steps_done"]
    marks = {}   # step -> time, at the first two log_every marks of this session

    def callback(i, t, x_t, x0_hat, res):
        bar.update(1)
        record_intermediates(views, cfg, i, x0_hat, res)
        if (i + 1) % sc["log_every"] == 0 or i + 1 == n:
            rel = (res / y_norms).cpu()                       # the only host sync, every log_every steps
            bar.set_postfix_str(f"‖y−A(x̂₀)‖/‖y‖ {float(rel.mean()):.4g}")
            for b, view in enumerate(views):
                view.state["curve_steps"].append(i)
                view.state["curve"].append(float(rel[b * S]))
                if i + 1 - first_step == sc["log_every"]:  # warm-up (compile, CUDA graphs, allocator) is behind us
                    view.timing.update(t=time.time(), step=i + 1)
            cpu_estimate(marks, i + 1 - first_step, n - i - 1, sc["log_every"], device, bar, name)
        if STOP["signal"] is not None:  # checked after a finished step, its curve point kept: the state is consistent
            raise Preempted(i, x_t)
    return callback


def record_intermediates(views, cfg, i, x0_hat, res) -> None:
    """Every intermediate_freq-th step and the last: each image's x̂₀ (and its PNG) and residual."""
    sc, S = cfg["sampler"], cfg["sampler"]["num_samples"]
    freq, n = sc["intermediate_freq"], sc["num_inference_steps"]
    for b, view in enumerate(views):   # x0_hat (B·S, C, H, W), res (B·S,): image b holds rows b·S … b·S+S−1
        view.state["steps_done"] = i + 1
        if freq and (i % freq == 0 or i + 1 == n):
            x0_img = view.crop((x0_hat[b * S:b * S + 1] + 1) / 2).clamp(0, 1)   # (1, C_y, H, W) in [0, 1]
            view.state["steps"].append(i)
            view.state["x0_hat"].append(x0_img.cpu())
            view.state["residual"].append(res[b * S:(b + 1) * S].cpu())
            if cfg["run"]["save_intermediates"]:  # every freq-th step and the final one
                utils.save_image(os.path.join(view.inter_dir, f"step_{i:04d}.png"), x0_img)


def cpu_estimate(marks, done_here, left, every, device, bar, name) -> None:
    """On the CPU, once: the time left, from the steady rate between the first two log_every marks
    of this session (the first steps pay for warm-up: allocator, caches), when steps are left."""
    if device.type != "cpu" or done_here not in (every, 2 * every):
        return
    marks[done_here] = time.time()
    if done_here == 2 * every and left > 0:
        rate = (marks[2 * every] - marks[every]) / every
        bar.write(f"INFO CPU run: about {utils.format_duration(rate * left)} left for {left} more steps ({name})",
                  file=sys.stderr)


def y_norms(ps, sc):
    """‖y‖ of each sampler row (B·S,): each measurement's, once per sample."""
    import torch
    norms = torch.stack([torch.linalg.vector_norm(p.y) for p in ps]).clamp_min(1e-12)
    return norms.repeat_interleave(sc["num_samples"])


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def out_of_memory_hint(ps, cfg, device, tiles=None) -> str:
    """The one-line error for a batch that does not fit, with the settings that would shrink it."""
    B, S = len(ps), cfg["sampler"]["num_samples"]
    H, W = ps[0].y.shape[-2:]
    if B > 1:
        fix = f"try --batch_size {max(1, B // 2)}"
    elif tiles is not None and tiles.batch > 1:
        fix = f"try --set sampler.tile_batch={tiles.batch // 2} (tiles per UNet call)"
    elif tiles is not None:
        fix = f"try a smaller --tile (now {tiles.tile}) or --set run.gradient_checkpointing=true"
    elif max(H, W) > 256:
        fix = "try --tile 256 (the UNet on overlapping tiles, in memory that does not grow with the image)"
    else:
        fix = "try a smaller --num_samples or --img_size, or --set run.gradient_checkpointing=true"
    return (f"out of {device.type.upper()} memory sampling {B} image(s) x {S} sample(s) of {H}x{W} "
            f"({B * S} in one call); {fix}")


def sample(ps, views, cfg, device, dtype, generator, pipe, start, checkpoint, run_dir) -> tuple:
    """2. The sampler over a batch (one problem and view per image; pipe.operator set for them all),
    with a progress bar, under signal handlers that turn SIGTERM/SIGUSR1 and a first Ctrl-C into a
    checkpoint. generator: a torch.Generator, or one per sample (B·S). start: (x_t, next index) to
    continue from, or None. checkpoint(x_t, next_index) saves the stopped state; run_dir is the
    folder --resume continues. Returns (output or None, exit code, error or None, partial x̂₀ of a
    diverged run or None), the metrics of every view updated."""
    import torch
    from tqdm.auto import tqdm

    import dps
    sc, rc, state = cfg["sampler"], cfg["run"], views[0].state
    name = ps[0].name if len(ps) == 1 else f"{len(ps)} images: {ps[0].name}…{ps[-1].name}"
    tiles = tile_plan(cfg, pipe, views, len(ps), dtype)
    bar = tqdm(total=sc["num_inference_steps"], desc=f"{sc['method']} {name}", unit="step", dynamic_ncols=True)
    bar.update(state["steps_done"])
    t0 = time.time() - state["runtime"]
    exit_code, error, out, partial, status, cg = 0, None, None, None, None, None
    with stop_requests():  # also while the checkpoint is written
        try:
            out, inter = pipe(torch.cat([p.y for p in ps]), num_inference_steps=sc["num_inference_steps"],
                              method=sc["method"], options=sc[sc["method"]], sigma_y=batch_sigma_y(ps, cfg),
                              generator=generator,
                              callback=progress_callback(views, cfg, device, bar, sc["method"], y_norms(ps, sc)),
                              num_samples=sc["num_samples"],
                              clip_denoised=None if sc["clip_denoised"] == "auto" else sc["clip_denoised"],
                              dtype=dtype, gradient_checkpointing=rc["gradient_checkpointing"],
                              check_every=sc["log_every"], x_size=views[0].x_size,
                              x_T=start[0].to(device) if start else None, start_index=start[1] if start else 0,
                              tiles=tiles)
            status, cg = "complete", (inter.get("cg_iterations_per_image"), inter.get("cg_stop_rule_per_image"))
        except dps.DivergenceError as e:
            exit_code, error, status, partial = EXIT_DIVERGED, str(e), "diverged", e.partial
        except Preempted as e:
            for view in views:
                view.state["runtime"] = time.time() - t0
            checkpoint(e.x_t, e.step + 1)
            exit_code, status, why = stop_outcome()
            error = (f"{why} after step {e.step + 1}/{sc['num_inference_steps']}; "
                     f"checkpoint saved, continue with --resume {run_dir}")
        except KeyboardInterrupt:
            exit_code, error, status = EXIT_INTERRUPTED, "interrupted by the user (second Ctrl-C: no checkpoint)", "interrupted"
        except (RuntimeError, MemoryError) as e:
            if not (is_out_of_memory(e) or isinstance(e, MemoryError)):
                raise
            exit_code, error, status = EXIT_BAD_INPUT, out_of_memory_hint(ps, cfg, device, tiles), "error"
        finally:
            bar.close()
    record_sampling(views, cfg, status, time.time() - t0, cg)
    return out, exit_code, error, partial


def tile_plan(cfg, pipe, views, n_images, dtype):
    """The tiling.TilePlan for this sampler call (None: the UNet sees whole images), said in the log
    with the planned peak memory, and recorded in each image's metrics."""
    import tiling
    sc = cfg["sampler"]
    H, W = views[0].x_size
    sample_size = getattr(pipe.unet.config, "sample_size", None)
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    plan = tiling.resolve(sc["tile"], sc["tile_overlap"], sc["tile_batch"], H, W, sample_size, 1)
    if plan is not None and tiling.n_tiles(H, W, plan) == 1:
        plan = None
    if sc["tile"] == "auto" and plan is not None:
        log.info("%dx%d exceeds 2× the model's training size %d: running the UNet on tiles (--tile off to "
                 "run it on the whole image)", H, W, sample_size)
    images = n_images * sc["num_samples"]
    peak = tiling.estimate_peak_bytes(pipe.unet, plan, images, H, W, sc["method"], dtype)
    said = ("peak memory not estimated for this model" if not peak else
            f"estimated peak memory {peak / 2 ** 30:.1f} GB" if peak >= 2 ** 28 else
            f"estimated peak memory {peak / 2 ** 20:.0f} MB")
    if plan is not None:
        n = tiling.n_tiles(H, W, plan)
        log.info("tiles of %d px, overlap %d: up to %d per step, %d per UNet call; %s", plan.tile, plan.overlap, n,
                 plan.batch, said)
    elif peak:
        log.info("UNet on the whole %dx%d image; %s", H, W, said)
    for view in views:
        view.metrics["tiles"] = None if plan is None else {
            "tile": plan.tile, "overlap": plan.overlap, "tiles_per_call": plan.batch,
            "tiles_per_step": tiling.n_tiles(H, W, plan)}
        view.metrics["estimated_peak_memory_gb"] = None if peak is None else round(peak / 2 ** 30, 3)
    return plan


def record_sampling(views, cfg, status, runtime, cg) -> None:
    """Each image's metrics after a sampler call: status, time (its share of the batch), speed,
    and its own CG iterations (DiffPIR: cg (steps, B·S), per sample)."""
    S = cfg["sampler"]["num_samples"]
    for b, view in enumerate(views):
        m, state = view.metrics, view.state
        m.update(status=status, runtime_s=runtime / len(views), batch_size=len(views), batch_runtime_s=runtime,
                 steps_completed=state["steps_done"], steps_per_s=state["steps_done"] / runtime if runtime > 0 else 0.0)
        if view.timing and state["steps_done"] > view.timing["step"]:  # steady state, without the first steps
            m["s_per_step_after_warmup"] = (time.time() - view.timing["t"]) / (state["steps_done"] - view.timing["step"])
        if cg is not None and cg[0] is not None:
            record_data_steps(m, cg[0][:, b * S:(b + 1) * S], cg[1][:, b * S:(b + 1) * S])


def record_data_steps(m, iters, rules) -> None:
    """DiffPIR's data steps for one image, (steps, S) each: the iterations and stopping rule of each
    step (of its sample that took the most iterations), and how often each rule stopped a solve."""
    import dps
    worst = iters.argmax(1, keepdim=True)
    per_step = iters.gather(1, worst)[:, 0]
    m.update(cg_iterations_mean=float(per_step.double().mean()), cg_iterations_max=int(per_step.max()),
             cg_stop_rules={name: int((rules == k).sum()) for k, name in enumerate(dps.STOP_RULES)},
             cg_iterations_per_step=per_step.tolist(),
             cg_stop_rule_per_step=[dps.STOP_RULES[k] for k in rules.gather(1, worst)[:, 0].tolist()])


# A sample that fits y this many times worse than the median of the other samples is a misfit.
SAMPLE_MISFIT_FACTOR = 2.0


def sample_misfits(y, op, samples, factor=SAMPLE_MISFIT_FACTOR):
    """Each posterior sample's ‖y − A(x_s)‖/‖y‖ (samples: (S, C, H, W) in [0, 1]) and the indices of
    those more than `factor` times the median of the *other* samples' fits (so that two samples
    compare too). A DPS sample caught in a wrong mode (on a dark background, where the clamp of x̂₀
    to [−1, 1] zeroes the data gradient of most pixels) ends far off the data and drags the mean;
    the others' median is the yardstick because σ_y may be unknown."""
    import torch

    with torch.no_grad():
        fits = torch.linalg.vector_norm((y - op(samples)).flatten(1), dim=1) / torch.linalg.vector_norm(y)
    fits = fits.tolist()
    others = [float(np.median(fits[:s] + fits[s + 1:])) if len(fits) > 1 else f for s, f in enumerate(fits)]
    return fits, [s for s, (f, o) in enumerate(zip(fits, others)) if f > factor * o]


def report_misfits(m, y, op, samples, device, where) -> None:
    """The per-sample data fit into the metrics, and a warning naming the samples that miss y."""
    fits, bad = sample_misfits(y, op, samples.to(device))
    m.update(sample_residual_relative=fits, samples_misfit=bad)
    if bad:
        log.warning("%s: %d of %d samples fit y more than %g times worse than the other samples' median "
                    "(‖y − A(x)‖/‖y‖ %s; median of all %.4f): they pull the posterior mean toward them (see "
                    "images/sample_*.png). With DPS on a dark background try --gradient_clip 1 --set "
                    "sampler.clip_denoised=false (README, Troubleshooting)", where, len(bad), len(fits),
                    SAMPLE_MISFIT_FACTOR, ", ".join(f"{fits[s]:.4f}" for s in bad), float(np.median(fits)))


def write_outputs(p: Problem, view: RunView, run_dir, cfg, device, out, partial) -> None:
    """3. Outputs: the restoration cropped back to the measured window (or a diverged run's last
    good x̂₀), posterior mean/std/samples, the data residual, metrics and plots."""
    import torch

    import physics
    sc, m, images_dir, crop = cfg["sampler"], view.metrics, view.images_dir, view.crop
    figures = cfg["run"]["save_figures"]
    full = partial
    if out is not None and sc["num_samples"] > 1:
        full = out["mean"]
        samples = crop(out["samples"])                           # (1, S, C_y, H, W): std in y's channels
        std = samples.std(1)[0]
        utils.save_image(os.path.join(images_dir, "mean.png"), crop(out["mean"]))
        if figures:
            utils.plot_std(os.path.join(images_dir, "std.png"), utils.to_numpy(std[None]))
        for s in range(sc["num_samples"]):
            utils.save_image(os.path.join(images_dir, f"sample_{s:02d}.png"), samples[:, s])
        m["mean_posterior_std"] = float(std.mean())
        report_misfits(m, p.y, view.op, out["samples"][0], device, os.path.basename(run_dir))
    elif out is not None:
        full = out
    if full is not None:
        restored = crop(full)
        r = utils.to_numpy(restored)
        utils.save_image(os.path.join(images_dir, "restored.png"), restored)
        np.save(os.path.join(run_dir, "restored.npy"), r.astype(np.float32))  # lossless, for analysis
        if p.info.get("input_bit_depth") == 16:
            utils.save_tiff16(os.path.join(images_dir, "restored.tif"), r)
        with torch.no_grad():
            fit = torch.linalg.vector_norm(p.y - view.op(full[:1].to(device))) / torch.linalg.vector_norm(p.y)
        m["data_residual_relative"] = float(fit)
        title = "restored" if sc["num_samples"] == 1 else f"posterior mean of {sc['num_samples']}"
        y_np = utils.to_numpy(p.y)
        panels = [("blurred (measurement)", y_np), (f"{title} ({sc['method']})", r)]
        if p.clean is not None:
            m.update(psnr_restored=utils.psnr(p.clean, r), ssim_restored=utils.ssim(p.clean, r))
            panels = [("clean", p.clean),
                      (f"blurred  PSNR {m['psnr_blurred']:.2f} dB  SSIM {m['ssim_blurred']:.3f}", y_np),
                      (f"{title} ({sc['method']})  PSNR {m['psnr_restored']:.2f} dB  SSIM {m['ssim_restored']:.3f}", r)]
        baseline_images = classical_baselines(p, images_dir, cfg, m) if cfg["run"]["baseline"] else {}
        panels += [(title, img) for title, img in baseline_images.values()]
        if p.clean is not None:
            add_lpips(m, p.clean, {"blurred": y_np, "restored": r, **{k: v[1] for k, v in baseline_images.items()}},
                      cfg, device)
        if p.clean is None:
            m["operator_relative_error_on_restoration"] = physics.operator_relative_error(
                p.eig_op, p.grid_op, restored.to(device))
        if figures:
            utils.plot_comparison(os.path.join(images_dir, "comparison.png"), panels)
    if view.state["curve"]:
        m["residual_relative_curve"] = {"steps": view.state["curve_steps"], "values": view.state["curve"]}
    if figures and view.state["steps"]:
        utils.plot_progress(os.path.join(images_dir, "progress.png"), view.state["steps"], view.state["x0_hat"],
                            view.state["curve_steps"], view.state["curve"])


BASELINE_TITLES = {"richardson_lucy": "Richardson-Lucy", "tikhonov": "Tikhonov"}


def classical_baselines(p: Problem, images_dir, cfg, m) -> dict:
    """Richardson-Lucy and Tikhonov (baselines.py) on y with the same EigenPSF operator and σ_y as
    the sampler: their images and metrics beside the diffusion result's. Returns
    {name: (comparison panel title, (H, W, C) image)}."""
    import baselines
    t0 = time.time()
    results = baselines.restore_baselines(p.eig_op, p.y, sigma_y(p, cfg))
    m["baseline_runtime_s"] = time.time() - t0
    out = {}
    for name, (x, facts) in results.items():
        img = utils.to_numpy(x)
        utils.save_image(os.path.join(images_dir, f"baseline_{name}.png"), x)
        m[name] = facts
        title = BASELINE_TITLES[name]
        if p.clean is not None:
            m[f"psnr_{name}"], m[f"ssim_{name}"] = utils.psnr(p.clean, img), utils.ssim(p.clean, img)
            title += f"  PSNR {m[f'psnr_{name}']:.2f} dB  SSIM {m[f'ssim_{name}']:.3f}"
        out[name] = (f"{title} (baseline)", img)
    return out


def add_lpips(m, clean, images: dict, cfg, device) -> None:
    """m[lpips_<name>] for each (H, W, C) image against the clean one (run.lpips backbone), or
    m[lpips_note] saying why LPIPS was not computed: never a made-up value."""
    import torch
    net = cfg["run"]["lpips"]
    why = utils.lpips_unavailable(net)
    if why:
        m["lpips_note"] = why
        return
    as_batch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # noqa: E731
    for name, img in images.items():
        m[f"lpips_{name}"] = utils.lpips_distance(as_batch(clean), as_batch(img), net, device)[0]
    m["lpips_definition"] = utils.LPIPS_DEFINITION.format(net=net)


def load_pipeline(cfg, device, channels=3, cache=None):
    """(pipeline without operator, size multiple the UNet needs) for measurements with `channels`
    channels. The analytic prior is built with that many; a diffusers model keeps its own, and a
    gray y is then compared with the luminance of A(x) (see restore). `cache`: a dict that keeps
    what was loaded across calls (a batch may hold gray and RGB images)."""
    import dps
    import priors
    mc, sc = cfg["model"], cfg["sampler"]
    key = channels if mc["model_id"] == "analytic" else "model"
    if cache is not None and key in cache:
        return cache[key]
    unet, scheduler = priors.load_model(mc["model_id"], mc["model_cache"] or None, device, channels=channels)
    dps.check_num_inference_steps(sc["num_inference_steps"], scheduler, sc["method"])  # before any run folder
    blocks = getattr(unet.config, "block_out_channels", None)
    multiple = 2 ** (len(blocks) - 1) if blocks else 1  # the UNet downsamples len-1 times
    if isinstance(sc["tile"], int):  # before any run folder too
        import tiling
        tiling.resolve(sc["tile"], sc["tile_overlap"], sc["tile_batch"], sc["tile"] + 1, sc["tile"] + 1, None,
                       multiple)
    unet = setup_accelerators(cfg, device, unet)
    loaded = dps.EigenPSFDPSPipeline(unet, scheduler, None), multiple
    if cache is not None:
        cache[key] = loaded
    return loaded


def check_channels(pipe, p: Problem) -> None:
    """A prior samples its own channels: equal to y's, or RGB for a gray y (compared by luminance)."""
    C_x, C_y = pipe.unet.config.in_channels, p.y.shape[1]
    if C_x != C_y and not (C_y == 1 and C_x == 3):
        raise utils.UserError(f"{p.name}: the model has {C_x} channel(s) but the measurement has {C_y}")
    if C_x != C_y:
        log.info("%s: gray measurement, RGB prior: sampling RGB and comparing y with the luminance of A(x) "
                 "(Rec. 709 weights); the outputs are that luminance", p.name)


def problem_from_entry(entry, cfg, device) -> tuple:
    """(Problem, generator) rebuilt from a checkpoint entry (see _image_entry)."""
    import torch

    import physics
    gen = torch.Generator(device=device)
    gen.set_state(entry["generator_state"])
    q = entry["problem"]
    grid = q["grid"].to(device)
    H, W = q["y"].shape[-2:]
    eig_op, grid_op, decomp = physics.build_operators(grid, H, W, cfg["physics"], tuple(q["coords"]))
    clean = None if q["clean"] is None else q["clean"].numpy()
    p = Problem(q["name"], q["y"].to(device), clean, grid, tuple(q["coords"]), eig_op.to(device), grid_op.to(device),
                decomp, q["info"])
    return p, gen


def resume_run(run_dir, schema, given) -> int:
    """Continues RUN_DIR (a run or a folder run) from its checkpoint with its own saved config;
    bit-identical on CPU."""
    import torch

    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(ckpt_path):
        raise utils.UserError(f"no checkpoint.pt in {run_dir}: nothing to resume")
    RUN_DIR["path"] = run_dir
    if given:
        log.warning("--resume uses the run's saved config; ignoring %s", ", ".join(f"--{g}" for g in given))
    saved = utils.load_config(os.path.join(run_dir, "config.yaml"))
    extra = saved.pop("resolved", {})
    # Keys added since the run was written take their defaults: what that version did.
    cfg = utils.validate_config(utils.with_defaults(saved, schema), schema)
    if cfg["train"]["dir"]:
        return train_prior(cfg, run_dir)
    ckpt = load_checkpoint(ckpt_path)
    device = resolve_device(cfg["run"]["device"])
    dtype = getattr(torch, cfg["run"]["dtype"])  # validated: float32 | bfloat16 | float16
    log.info("resuming %s at step %d/%d", run_dir, ckpt["next_index"], cfg["sampler"]["num_inference_steps"])
    if ckpt.get("kind") == "folder":
        return run_folder(ckpt["inputs"], run_dir, cfg, device, dtype, extra, resume=ckpt)
    p, gen = problem_from_entry(ckpt, cfg, device)
    pipe, multiple = load_pipeline(cfg, device, p.y.shape[1])
    code, m = restore(p, run_dir, cfg, device, dtype, gen, pipe, multiple, extra, resume=ckpt)
    print(run_dir)
    if code:
        print(f"error: {m['error']}", file=sys.stderr)
        return code
    return 0


# ----------------------------------------------------------------------------
# Folder runs: --image_dir / --blurred_dir, up to run.batch_size measurements per sampler call
# ----------------------------------------------------------------------------

SUMMARY_KEYS = ("status", "psnr_blurred", "psnr_restored", "ssim_blurred", "ssim_restored", "lpips_blurred",
                "lpips_restored", "psnr_richardson_lucy", "psnr_tikhonov", "lpips_richardson_lucy", "lpips_tikhonov",
                "data_residual_relative",
                "operator_relative_error", "sigma_noise_estimated", "runtime_s", "batch_size", "error")


@dataclass
class Item:
    """One measurement of a folder run on its way through a batch."""
    index: int                     # its place in the sorted input list (and in summary.csv)
    p: Problem
    gen: object                    # its own generator: PSFs, noise and sampling
    folder: str = ""               # its run folder, once made
    progress: dict = None          # a checkpoint's progress to continue from
    view: RunView = None


def image_generator(seed: int, name: str, device):
    """Each image of a folder run draws from its own generator, seeded from (seed, file name), so
    that its result is the same at any batch size, beside any neighbours, and in any shard of the
    folder (a Slurm array task, a re-run of the failures)."""
    import hashlib

    import torch
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def folder_groups(inputs, todo, cfg, device, measured, pipes, rows):
    """Yields lists of up to run.batch_size prepared Items of one measurement shape (y's channels
    and size, hence one sampling size after the UNet padding rule), as they fill, then the
    partial ones. Only one partial list per shape is held. A file that cannot be prepared becomes
    an error row."""
    n, pending = cfg["run"]["batch_size"], {}
    for i in todo:
        path = inputs[i]
        gen = image_generator(cfg["run"]["seed"], os.path.basename(path), device)
        try:
            p = prepare(path, cfg, device, gen, measured)
            pipe, _ = load_pipeline(cfg, device, p.y.shape[1], pipes)
            check_channels(pipe, p)
        except (utils.UserError, ValueError) as e:  # a bad file is reported, not fatal
            log.warning("skipping %s: %s", path, e)
            rows[i] = {"file": os.path.basename(path), "status": "error", "error": str(e)}
            continue
        group = pending.setdefault(tuple(p.y.shape), [])
        group.append(Item(i, p, gen))
        if len(group) == n:
            yield pending.pop(tuple(p.y.shape))
    yield from pending.values()


def restore_group(items, batch_dir, cfg, device, dtype, pipes, extra, shared, save, start=None) -> int:
    """Restores a batch of Items in one sampler call and writes each image's folder and summary
    row (save.rows). shared: one PSF grid for all (the operator is used as it is, not stacked).
    start: (x_t, next index) of a resumed batch. If any image diverges, the batch is re-run one
    image at a time from where it started, so that the others get their batch-of-one result."""
    import copy

    import physics
    S = cfg["sampler"]["num_samples"]
    pipe, multiple = load_pipeline(cfg, device, items[0].p.y.shape[1], pipes)
    for it in items:
        it.folder = it.folder or utils.make_run_dir(batch_dir, prefix=it.p.name)
        it.view = restore_inputs(it.p, it.folder, cfg, device, pipe, multiple, extra, it.progress)
    pipe.operator = items[0].view.op if shared else physics.stack_operators([it.view.op for it in items])
    before = [(it.gen.get_state(), copy.deepcopy(it.view.state)) for it in items]
    checkpoint = lambda x_t, nxt: save_folder_checkpoint(save.path, items, x_t, nxt, save.inputs, save.rows)  # noqa: E731
    out, code, error, partial = sample([it.p for it in items], [it.view for it in items], cfg, device, dtype,
                                       [it.gen for it in items for _ in range(S)], pipe, start, checkpoint, batch_dir)
    if code == EXIT_DIVERGED and len(items) > 1:
        log.warning("%s; restoring these %d images one at a time so that the others are unaffected",
                    error, len(items))
        for b, (it, (gen_state, progress)) in enumerate(zip(items, before)):
            it.gen.set_state(gen_state)
            it.progress = progress
            one = None if start is None else (start[0][b * S:(b + 1) * S], start[1])
            code_b = restore_group([it], batch_dir, cfg, device, dtype, pipes, extra, shared, save, one)
            code = code_b if code_b in (EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_BAD_INPUT) or code == EXIT_DIVERGED \
                else code
            if code_b in (EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_BAD_INPUT):
                break
        return code
    for b, it in enumerate(items):
        write_outputs(it.p, it.view, it.folder, cfg, device, image_output(out, b, S),
                      None if partial is None else partial[b * S:b * S + 1])
        finish(it.view, it.folder, error)
        m = it.view.metrics
        save.rows[it.index] = {"file": os.path.basename(save.inputs[it.index]), "folder": os.path.basename(it.folder),
                               **{k: m[k] for k in SUMMARY_KEYS if k in m}}
    return code


def image_output(out, b: int, S: int):
    """Image b's share of a batch's output (see EigenPSFDPSPipeline), or None."""
    if out is None:
        return None
    if isinstance(out, dict):
        return {k: v[b:b + 1] for k, v in out.items()}
    return out[b:b + 1]


@dataclass
class FolderSave:
    """Where a folder run keeps its state: the checkpoint path, the input list and the rows so far."""
    path: str
    inputs: list
    rows: dict


def run_folder(inputs, batch_dir, cfg, device, dtype, extra, resume=None, pipes=None) -> int:
    """4b. A folder run: one sub-folder per image and summary.csv in input order (kept current),
    up to run.batch_size images per sampler call. A stop request checkpoints the batch in flight
    (or, between batches, the images done) into BATCH_DIR/checkpoint.pt; resume (that checkpoint)
    finishes its batch first, then the rest."""
    d = cfg["data"]
    measured = utils.load_psf_grid(d["psf_grid"]) if d["psf_grid"] else None
    save = FolderSave(os.path.join(batch_dir, "checkpoint.pt"), list(inputs), {})
    first, start = [], None
    if resume is not None:
        save.rows = {int(i): r for i, r in resume["rows"].items()}
        for entry in resume["images"]:
            p, gen = problem_from_entry(entry, cfg, device)
            first.append(Item(entry["index"], p, gen, os.path.join(batch_dir, entry["folder"]), entry["progress"]))
        start = (resume["x_t"], resume["next_index"]) if first else None
    # Between batches too, a signal only asks for a stop: the batch's outputs are finished first.
    with stop_requests():
        code, stopped = folder_loop(first, start, batch_dir, cfg, device, dtype, extra, measured,
                                    {} if pipes is None else pipes, save)
    if stopped:
        print(batch_dir)
        return code
    if os.path.exists(save.path):
        os.remove(save.path)
    n_err = sum(r["status"] != "complete" for r in save.rows.values())
    log.info("batch done: %d/%d complete; summary in %s", len(save.rows) - n_err, len(inputs), batch_dir)
    print(batch_dir)
    if n_err and not code:
        print(f"error: {n_err} of {len(inputs)} images failed; see {os.path.join(batch_dir, 'summary.csv')}",
              file=sys.stderr)
        return EXIT_BATCH_INCOMPLETE
    return code


def folder_loop(first, start, batch_dir, cfg, device, dtype, extra, measured, pipes, save) -> tuple:
    """The batches of a folder run, the resumed one (first, from start) before the others.
    Returns (exit code, whether the run stopped early)."""
    import torch
    summary = lambda: utils.write_summary_csv(os.path.join(batch_dir, "summary.csv"),  # noqa: E731
                                              [save.rows[i] for i in sorted(save.rows)])
    busy = set(save.rows) | {it.index for it in first}
    groups = folder_groups(save.inputs, [i for i in range(len(save.inputs)) if i not in busy], cfg, device,
                           measured, pipes, save.rows)
    worst = 0
    for n, items in enumerate(itertools.chain([first] if first else [], groups)):
        if STOP["signal"] is not None:  # asked between batches: nothing in flight
            summary()
            save_folder_checkpoint(save.path, [], torch.zeros(0), 0, save.inputs, save.rows)
            code, _, why = stop_outcome()
            print(f"error: {why} between batches, {len(save.rows)}/{len(save.inputs)} images done; checkpoint "
                  f"saved, continue with --resume {batch_dir}", file=sys.stderr)
            return code, True
        code = restore_group(items, batch_dir, cfg, device, dtype, pipes, extra, measured is not None, save,
                             start if (first and n == 0) else None)
        worst = worst or code
        summary()
        if code in (EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_BAD_INPUT):  # a stop ends the run, not just this batch
            error = next(r["error"] for r in (save.rows.get(it.index, {}) for it in items) if r.get("error"))
            print(f"error: {error}", file=sys.stderr)
            return code, True
    summary()
    return worst, False


def run(argv=None) -> int:
    # 1. Config, device, dtype, seed: resolved once, here; flags before the torch import.
    STOP["signal"], RUN_DIR["path"] = None, None
    schema = utils.load_config(DEFAULT_CONFIG)
    parser = build_parser(schema)
    args = parser.parse_args(argv)
    given = [n for n in FLAGS if getattr(args, n) is not None]
    cfg, explicit = resolve_config(args, given, schema)
    check_conflicts(cfg, explicit)
    real_data_defaults(cfg, explicit)
    import torch

    import dps
    import physics
    import priors  # noqa: F401 - imported first here, so that its errors count as bad input (exit 2)
    d, rc = cfg["data"], cfg["run"]
    cfg["physics"]["form"] = physics.resolve_form(cfg["physics"], measured=bool(d["psf_grid"]))  # saved resolved
    if cfg["sampler"]["num_inference_steps"] == "auto":
        cfg["sampler"]["num_inference_steps"] = dps.DEFAULT_STEPS[cfg["sampler"]["method"]]

    if args.download_only:
        return download_only(cfg)
    if cfg["train"]["dir"] and not args.resume:
        return train_prior(cfg)

    if args.resume:
        return resume_run(args.resume, schema, given)
    if d["calibration"]:
        return calibrate(cfg)
    device = resolve_device(rc["device"])
    dtype = getattr(torch, rc["dtype"])  # validated: float32 | bfloat16 | float16
    gen = torch.Generator(device=device).manual_seed(rc["seed"])
    utils.check_writable(rc["save_dir"])

    # 2. Inputs: validated before the model loads and before any folder exists.
    real = bool(d["blurred"] or d["blurred_dir"])
    batch = bool(d["image_dir"] or d["blurred_dir"])
    if real and not d["psf_grid"]:
        raise utils.UserError("real measurements (--blurred/--blurred_dir) need the PSFs: pass --psf_grid FILE")
    measured = utils.load_psf_grid(d["psf_grid"]) if d["psf_grid"] else None
    if measured is not None:
        lo, hi = float(measured[2].min()), float(measured[2].max())
        sums = "each PSF sums to 1" if max(abs(lo - 1), abs(hi - 1)) < 1e-6 else \
            f"normalised to sum 1 (sums were {lo:.6g}..{hi:.6g})"
        log.info("PSF grid %s: %s, %s", d["psf_grid"], "x".join(map(str, measured[0].shape)), sums)
    n_psfs = measured[0].shape[0] * measured[0].shape[1] if measured is not None \
        else physics.resolve_grid_size(cfg["physics"]) ** 2
    fit_defaults(cfg, explicit, n_psfs, simulated=measured is None)
    inputs = utils.list_images(d["image_dir"] or d["blurred_dir"]) if batch else [d["blurred"] if real else d["image"]]
    first = None if batch else prepare(inputs[0], cfg, device, gen, measured)
    if first is not None and d["save_psf_grid"]:
        utils.save_psf_grid(d["save_psf_grid"], first.grid, first.coords)
        log.info("PSF grid saved to %s", d["save_psf_grid"])

    # 3. Prior (a batch loads it here too, so that a model error comes before any folder).
    pipes = {}
    pipe, multiple = load_pipeline(cfg, device, first.y.shape[1] if first else 3, pipes)
    if first is not None:
        check_channels(pipe, first)
    extra = {"device": str(device), "seed": rc["seed"], "argv": sys.argv[1:] if argv is None else list(argv),
             "versions": versions(device)}

    # 4. One run folder, or a batch folder with one sub-folder per image and summary.csv.
    if not batch:
        if rc["batch_size"] > 1:
            log.warning("batch_size %d applies to folder runs (--image_dir, --blurred_dir); this run restores one "
                        "image (use --num_samples for several samples of it)", rc["batch_size"])
        run_dir = RUN_DIR["path"] = utils.make_run_dir(rc["save_dir"])
        log.info("results: %s", run_dir)
        code, m = restore(first, run_dir, cfg, device, dtype, gen, pipe, multiple, extra)
        if code:
            print(run_dir)  # stdout names the run folder, as on success
            print(f"error: {m['error']} (partial results in {run_dir})", file=sys.stderr)
            return code
        if "psnr_restored" in m:
            log.info("PSNR blurred %.2f dB -> restored %.2f dB (SSIM %.3f -> %.3f)", m["psnr_blurred"],
                     m["psnr_restored"], m["ssim_blurred"], m["ssim_restored"])
        log.info("data residual ‖y − A(x)‖/‖y‖ = %.4f", m["data_residual_relative"])
        print(run_dir)
        return 0
    batch_dir = RUN_DIR["path"] = utils.make_run_dir(rc["save_dir"], prefix="batch")
    log.info("folder of %d images, up to %d per sampler call: %s", len(inputs), rc["batch_size"], batch_dir)
    utils.save_yaml(os.path.join(batch_dir, "config.yaml"), {**cfg, "resolved": extra})
    return run_folder(inputs, batch_dir, cfg, device, dtype, extra, pipes=pipes)


def calibrate(cfg) -> int:
    """--calibration: measures the PSF grid from an image of point sources (calibration.estimate_psf_grid),
    writes it (--save_psf_grid, else RUN_DIR/psf_grid.npz) with pictures and calibration.json, and
    exits. Nothing is written when the image cannot give a grid."""
    import calibration
    import physics
    d, pc, rc = cfg["data"], cfg["physics"], cfg["run"]
    img = utils.read_image(d["calibration"])                       # (H, W, C) in [0, 1]
    if img.shape[-1] == 3:
        log.info("RGB calibration image: PSFs are measured on its luminance (Rec. 709); for one grid per "
                 "channel, calibrate each channel's image on its own")
        img = img @ np.array(physics.LUMINANCE_WEIGHTS)[:, None]
    G, k = physics.resolve_grid_size(pc), pc["kernel_size"]
    saturation = saturation_level(d["calibration"], d["saturation"], img[..., 0])
    try:  # spots with clipped pixels are rejected as saturated
        cal = calibration.estimate_psf_grid(img[..., 0], G, k, saturation=saturation)
    except ValueError as e:
        raise utils.UserError(f"{d['calibration']}: {e}") from None
    utils.check_writable(rc["save_dir"])
    if d["save_psf_grid"]:
        utils.check_writable(os.path.dirname(os.path.abspath(d["save_psf_grid"])))
    run_dir = utils.make_run_dir(rc["save_dir"], prefix="calibration")
    os.makedirs(os.path.join(run_dir, "images"))
    coords = (cal.positions[:, 0, 0], cal.positions[0, :, 1])
    for path in {os.path.join(run_dir, "psf_grid.npz"), d["save_psf_grid"] or os.path.join(run_dir, "psf_grid.npz")}:
        utils.save_psf_grid(path, cal.psfs, coords)
    report = {"image": d["calibration"], "grid_size": G, "kernel_size": k, "noise": cal.noise,
              "spots_accepted": int(cal.counts.sum()), "spots_rejected": cal.rejected(),
              "cells_filled_from_neighbours": [list(c) for c in cal.filled],
              "spots_per_cell": cal.counts.tolist(), "median_peak_snr_per_cell": cal.snr.round(2).tolist(),
              "saturation": round(saturation * utils.full_scale(d["calibration"]), 3),
              "median_narrow_axis_sigma_px": round(cal.narrow_sigma, 3),
              "registration_error_estimate": round(cal.registration_error, 4),
              "flux_outside_kernel": round(cal.flux_outside, 4)}
    utils.write_json(os.path.join(run_dir, "calibration.json"), report)
    utils.save_yaml(os.path.join(run_dir, "config.yaml"), cfg)
    utils.plot_calibration_spots(os.path.join(run_dir, "images", "spots.png"), img[..., 0], cal.spots)
    utils.plot_psf_grid(os.path.join(run_dir, "images", "psf_grid.png"), cal.psfs)
    utils.plot_cell_map(os.path.join(run_dir, "images", "cells.png"), cal.counts, cal.snr)
    log.info("%d spots accepted; rejected: %s", cal.counts.sum(),
             ", ".join(f"{n} {r}" for r, n in cal.rejected().items() if n) or "none")
    if cal.registration_error > calibration.REGISTRATION_WARN:
        log.warning("the spots look undersampled: %.0f%% of their amplitude lies near the Nyquist frequency, so "
                    "registering one spot sub-pixel errs by about as much (median sigma %.2f px along the narrow "
                    "axis; a Gaussian needs 0.8 px, a disk's rim a blur of 0.5 px or more). More magnification "
                    "(smaller pixels) would help; but faint spots (peak SNR 10 or less) read 5-8%% from their "
                    "shot noise alone (README, Calibration)", 100 * cal.registration_error, cal.narrow_sigma)
    if cal.flux_outside > calibration.OUTSIDE_WARN:
        log.warning("a median %.0f%% of the spots' flux lies outside the %dx%d kernel: the grid's PSFs are cut off "
                    "there; increase kernel_size", 100 * cal.flux_outside, k, k)
    if cal.filled:
        log.warning("%d cell(s) had no usable spot and were filled from their neighbours: %s", len(cal.filled),
                    ", ".join(map(str, cal.filled)))
    log.info("PSF grid %dx%d of %dx%d written to %s", G, G, k, k, d["save_psf_grid"] or os.path.join(run_dir, "psf_grid.npz"))
    print(run_dir)
    return 0


PLATEAU_PIXELS = 4   # this many pixels exactly at the image's maximum: a clipped plateau, not a peak


def saturation_level(path, given, img):
    """The saturation threshold on read_image's [0, 1] scale, with an info line saying where it came
    from: --saturation (file units); the TIFF's declared maximum sample; a plateau (PLATEAU_PIXELS
    or more pixels exactly at the image's maximum: what a 12- or 14-bit camera clipping inside a
    16-bit file leaves); else 0.999 of the file's range."""
    scale, name = utils.full_scale(path), os.path.basename(path)
    if given != "auto":
        if not 0 < given <= scale:
            raise utils.UserError(f"--saturation must be in (0, {scale:g}] for {name} (its full scale), got {given:g}")
        log.info("%s: saturation at %g (--saturation, of %g full scale)", name, given, scale)
        return given / scale
    declared = utils.declared_max_sample(path)
    if declared is not None:
        log.info("%s: saturation at %g, the maximum sample value the file declares", name, declared)
        return declared / scale
    top = float(img.max())
    at_top = int((img == top).sum())
    if at_top >= PLATEAU_PIXELS and top < 0.999:
        log.info("%s: %d pixels sit exactly at the image's maximum %g (of %g full scale): treated as the camera's "
                 "saturation; set --saturation if that is wrong", name, at_top, round(top * scale, 3), scale)
        return top
    return 0.999


def train_prior(cfg, run_dir=None) -> int:
    """--train_dir: train (or fine-tune) a prior into a new train_* folder, or continue run_dir from
    its checkpoint. SIGTERM, SIGUSR1 and Ctrl-C save a checkpoint and exit 75 or 130."""
    import torch

    import training
    rank, world, device = training.init_distributed(cfg["run"]["device"])
    device = device or resolve_device(cfg["run"]["device"])
    trainer, facts = training.prepare(cfg, device, rank, world)   # bad input: before any folder
    if run_dir is None:
        run_dir = [utils.make_run_dir(cfg["run"]["save_dir"], prefix="train") if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(run_dir)
        run_dir = run_dir[0]
        if rank == 0:
            utils.save_yaml(os.path.join(run_dir, "config.yaml"), cfg)
    else:
        trainer.load_state_dict(training.load_checkpoint(os.path.join(run_dir, "checkpoint.pt")))
        log.info("resuming training in %s at step %d/%d", run_dir, trainer.step, cfg["train"]["steps"])
    RUN_DIR["path"] = run_dir
    n_params = sum(p.numel() for p in trainer.unet.parameters()) / 1e6
    log.info("training a %s UNet (%.2f M parameters, %d channel(s)) on %d images (%d held out), %d skipped; %s",
             cfg["train"]["init"] or cfg["train"]["size"], n_params, facts["channels"], facts["train_images"],
             facts["validation_images"], len(facts["skipped"]), run_dir)
    t0 = time.time()
    with stop_requests():
        status = training.train(trainer, run_dir, lambda: STOP["signal"] is not None)
    if rank == 0:
        utils.write_json(os.path.join(run_dir, "metrics.json"), {
            "status": "complete" if status == "complete" else stop_outcome()[1], "steps_completed": trainer.step,
            "steps": cfg["train"]["steps"], "parameters_millions": n_params, "runtime_s": time.time() - t0,
            "final_train_loss": trainer.history[-1][1] if trainer.history else None, **facts,
            "model": os.path.join(run_dir, "model") if status == "complete" else None})
    if status != "complete":
        code, _, why = stop_outcome()
        print(f"{why} at step {trainer.step}; checkpoint saved, continue with --resume {run_dir}", file=sys.stderr)
        return code
    print(os.path.join(run_dir, "model"))
    return 0


def download_only(cfg) -> int:
    """--download_only: the model (converted, for an ADM checkpoint) and LPIPS's backbone weights,
    so that compute nodes without internet need nothing more."""
    import priors
    mc = cfg["model"]
    cache = mc["model_cache"] or None
    lpips_weights(cfg["run"]["lpips"])
    if mc["model_id"] == "analytic" or os.path.isdir(mc["model_id"]):
        print(f"{mc['model_id']} needs no download")
    elif mc["model_id"].endswith(".pt") and os.path.isfile(mc["model_id"]):
        print(f"converted once; later runs load {priors.convert_adm_checkpoint(mc['model_id'])}")
    else:
        path = priors.download_model(mc["model_id"], cache, max_retries=mc["max_retries"])
        print(f"model ready; compute nodes can load it offline with HF_HUB_OFFLINE=1 --model_id {mc['model_id']} "
              f"--model_cache {priors.hub_cache_dir(cache)}  (or --model_id {path})")
    return 0


def lpips_weights(net: str) -> None:
    """LPIPS's backbone file, when the lpips package can use it here; otherwise one line on why not."""
    if net == "off":
        return
    why = utils.lpips_unavailable(net)
    if why is None or "backbone weights" in why:
        try:
            print(f"LPIPS ({net}) backbone weights in {utils.download_lpips_weights(net)}")
        except (OSError, RuntimeError) as e:  # no network, or a hash mismatch: the model may still be wanted
            print(f"warning: LPIPS's {net} backbone weights could not be fetched ({e}); runs will say LPIPS was "
                  f"not computed", file=sys.stderr)
    else:
        print(f"LPIPS: {why.replace('not computed: ', '')}; its weights are skipped (metrics.json will say so)")


def _bad_input_errors() -> tuple:
    """Exception types reported as bad input (exit 2). priors is only consulted once imported, so
    that --help never waits for torch; an except clause evaluates this only when needed."""
    priors = sys.modules.get("priors")
    return (utils.UserError, ValueError) + ((priors.ModelUnavailableError,) if priors else ())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        return run(argv)
    except _bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(interrupted_message(RUN_DIR["path"]), file=sys.stderr)
        return EXIT_INTERRUPTED


def interrupted_message(run_dir) -> str:
    """What a Ctrl-C outside the sampler's own stop (a second one, or one between its steps and the
    outputs) leaves on disk; the run folder goes to stdout, as on every other exit."""
    if run_dir is None:
        return "error: interrupted before any results folder was made"
    print(run_dir)
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        return f"error: interrupted; the checkpoint in {run_dir} was written before it: continue with --resume {run_dir}"
    return f"error: interrupted before a checkpoint was written; {run_dir} holds what was written so far"


if __name__ == "__main__":
    sys.exit(main())
