"""Building the problem: one input's measurement, PSF grid and operators.

Simulation: a continuous PSF field (physics.SVBlurSimulator) blurs a scene with real margins by
its per-pixel truth (physics.GroundTruthBlur), and noise is added; the reconstruction is given
only the field's node grid. Real data: the measurement file at its native size, and a measured
grid (made continuous by physics.BlendedGridField for the checks). Either way the EigenPSF
operator and the grid's full-rank operator are built here, and every failure is a UserError.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

import physics
import timing
import utils

log = logging.getLogger("eigenpsf_dps")


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


def fit_defaults(cfg, explicit, simulated: bool) -> None:
    """Adapts defaults the user did not choose to the data, with an info line each; explicit
    values are never changed (a value that does not fit stays an error).

    - With an explicit kernel_size, the mode's PSF sizes are scaled down to fit it.
    (n_eigen_psfs' default, auto, fits itself to the grid: physics.rank_for_share, capped at its PSFs.)
    """
    pc = cfg["physics"]
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


def load_measured(cfg, explicit):
    """The measured PSF grid of --psf_grid (see utils.load_psf_grid), or None when simulating, said
    in one info line; then the defaults fitted to the grid (fit_defaults)."""
    d = cfg["data"]
    measured = utils.load_psf_grid(d["psf_grid"]) if d["psf_grid"] else None
    if measured is not None:
        lo, hi = float(measured[2].min()), float(measured[2].max())
        sums = "each PSF sums to 1" if max(abs(lo - 1), abs(hi - 1)) < 1e-6 else \
            f"normalised to sum 1 (sums were {lo:.6g}..{hi:.6g})"
        log.info("PSF grid %s: %s, %s", d["psf_grid"], "x".join(map(str, measured[0].shape)), sums)
    fit_defaults(cfg, explicit, simulated=measured is None)
    return measured


def fit_grid_channels(grid, channels: int, what: str):
    """A PSF grid for an image of `channels` channels: a mono grid (or a colour grid whose channels
    are equal) as it is; a colour grid of the image's channel count as it is; a 3-channel grid for
    a gray image as its Rec. 709 luminance-weighted PSFs, said in an info line. Else one line."""
    grid = physics.mono_if_equal(grid)
    C = physics.grid_channels(grid)
    if C in (0, channels):
        return grid
    if channels == 1 and C == 3:
        log.info("%s: gray image, colour PSF grid: using its Rec. 709 luminance-weighted PSFs (what a gray "
                 "sensor sees of a white scene)", what)
        return physics.luminance_grid(grid)
    raise utils.UserError(f"{what}: the PSF grid has {C} colour channels but the image has {channels}; the grid's "
                          f"channel axis (axis 2 of (Gy, Gx, C, k, k)) must be 1 or the image's channel count")


def psf_field(H, W, cfg, device, gen, measured, channels=3):
    """(field, node grid, node coords): the PSF field a simulation draws (or a measured grid made
    continuous by physics.BlendedGridField) and the node grid the reconstruction is given, for an
    image of `channels` channels (fit_grid_channels)."""
    pc = cfg["physics"]
    if measured is None:
        sim = physics.SVBlurSimulator(H, W, pc["kernel_size"], physics.resolve_grid_size(pc), device)
        f = sim.simulate_field(pc["blur_mode"], generator=gen, **physics.mode_params(pc))
        return f, f.node_grid(), tuple(c.numpy() for c in f.node_coords())
    psfs, coords, _ = measured
    if psfs.shape[-1] > min(H, W):
        raise utils.UserError(f"PSF size {psfs.shape[-1]} is larger than the image ({H}x{W})")
    grid = fit_grid_channels(torch.tensor(psfs, dtype=torch.float32, device=device), channels, cfg["data"]["psf_grid"])
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
    truth = physics.GroundTruthBlur(f, cfg["physics"]["form"])
    x_ext = utils.to_tensor(scene, device)
    with torch.no_grad():
        y = truth(x_ext)
        y = y + cfg["data"]["sigma_noise"] * torch.randn(y.shape, generator=gen, device=device)
    return truth.crop(x_ext), x_ext, y, truth


def operators(H, W, cfg, device, gen, measured, built=None, channels=3) -> tuple:
    """(field, node grid, node coords, EigenPSF operator, grid operator, decomposition) for an
    H x W measurement of `channels` channels; a measured grid's are kept in `built` (keyed by
    size and channels) and reused."""
    if measured is not None and built is not None and (H, W, channels) in built:
        return built[(H, W, channels)]
    f, grid, coords = psf_field(H, W, cfg, device, gen, measured, channels)
    with timing.RUN("operator"):
        eig_op, grid_op, decomp = physics.build_operators(grid, H, W, cfg["physics"],
                                                          tuple(torch.as_tensor(c) for c in coords))
        out = f, grid, coords, eig_op.to(device), grid_op.to(device), decomp
    if measured is not None and built is not None:
        built[(H, W, channels)] = out
    return out


def prepare(path, cfg, device, gen, measured, built=None) -> Problem:
    """Loads one input and builds its operators; every failure here is a UserError (exit 2).

    Simulation: the measurement comes from the per-pixel ground truth (physics.GroundTruthBlur)
    of a continuous PSF field, on a scene with k // 2 pixels of real margin; the reconstruction is
    given only the node grid sampled from that field, and its own boundary rule.
    built: a dict that keeps a measured grid's field and operators per image size, so that a
    folder run builds them once per size rather than once per image.
    """
    d, pc = cfg["data"], cfg["physics"]
    real = bool(d["blurred"] or d["blurred_dir"])
    info = {}
    if real:
        y_np = utils.read_image(path)                           # native size: resizing would change the blur
        (H, W), channels = y_np.shape[:2], y_np.shape[2]
    else:
        if d["sigma_noise"] == "auto":
            raise utils.UserError("sigma_noise=auto estimates the noise of a real measurement (--blurred); "
                                  "give a number when simulating")
        H = W = d["img_size"]
        channels = 3                                            # simulations blur an RGB scene
    # 1. PSF field, node grid and operators (measured from a file, or simulated from the seeded generator).
    f, grid, coords, eig_op, grid_op, decomp = operators(H, W, cfg, device, gen, measured, built, channels)
    if measured is not None:
        info["psf_sums_before_normalisation"] = [float(measured[2].min()), float(measured[2].max())]
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
        info["operator_relative_error"], info["operator_relative_error_per_channel"] = \
            physics.operator_errors(eig_op, truth, x, x_ext)
        info["ground_truth"] = (f"per-pixel {pc['form']} blur of the continuous PSF field"
                                f"{' (measured grid, Gaussian-blended)' if measured is not None else ''}, "
                                f"valid convolution over {r} px of real margin")
    info["form"] = pc["form"]
    info["input_bit_depth"] = utils.bit_depth(path)
    info["explained_variance"] = decomp.total_explained_variance
    if decomp.colour:
        info["explained_variance_per_channel"] = decomp.explained_variance_per_channel
    info["psf_channels"] = physics.grid_channels(grid) or "one PSF for every channel"
    log.info("%s: %dx%d, EigenPSF K=%d explains %.2f%% of the PSF variance%s", os.path.basename(path), H, W,
             decomp.n_components, 100 * decomp.total_explained_variance,
             f", operator error against the ground truth {info['operator_relative_error']:.3e}"
             if "operator_relative_error" in info else "")
    return Problem(os.path.splitext(os.path.basename(path))[0], y, clean, grid, coords, eig_op, grid_op, decomp, info)


def reconstruction_operator(p: Problem, cfg, multiple: int, device):
    """EigenPSF operator for DPS. When y's size is not a multiple the UNet accepts, x lives on a
    centred, larger domain and the operator crops to the measured window (CroppedOperator)."""
    H, W = p.y.shape[-2:]
    Hx, Wx = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    if (Hx, Wx) == (H, W):
        return p.eig_op, (H, W), (0, 0)
    top, left = (Hx - H) // 2, (Wx - W) // 2
    coords = (torch.as_tensor(p.coords[0]) + top, torch.as_tensor(p.coords[1]) + left)
    with timing.RUN("operator"):
        op, _ = physics.build_eigen_operator(p.grid, Hx, Wx, cfg["physics"], coords)
    log.info("%s: %dx%d is not a multiple of %d; sampling on %dx%d and cropping back (%.0f%% more compute)",
             p.name, H, W, multiple, Hx, Wx, 100 * (Hx * Wx / (H * W) - 1))
    return physics.CroppedOperator(op.to(device), top, left, H, W), (Hx, Wx), (top, left)


def problem_from_entry(entry, cfg, device) -> tuple:
    """(Problem, generator) rebuilt from a checkpoint entry (see checkpoint._image_entry)."""
    gen = torch.Generator(device=device)
    gen.set_state(entry["generator_state"])
    q = entry["problem"]
    grid = q["grid"].to(device)
    H, W = q["y"].shape[-2:]
    with timing.RUN("operator"):
        eig_op, grid_op, decomp = physics.build_operators(grid, H, W, cfg["physics"], tuple(q["coords"]))
    clean = None if q["clean"] is None else q["clean"].numpy()
    p = Problem(q["name"], q["y"].to(device), clean, grid, tuple(q["coords"]), eig_op.to(device), grid_op.to(device),
                decomp, q["info"])
    return p, gen


def sigma_y(p: Problem, cfg) -> float:
    """The measurement noise std the sampler assumes: given, or estimated from a real measurement."""
    s = cfg["data"]["sigma_noise"]
    return float(p.info["sigma_noise_estimated"] if s == "auto" else s)


def batch_sigma_y(ps, cfg):
    """One σ_y for the sampler, or one per image where they differ (estimated per measurement)."""
    sigmas = [sigma_y(p, cfg) for p in ps]
    return sigmas[0] if len(set(sigmas)) == 1 else sigmas
