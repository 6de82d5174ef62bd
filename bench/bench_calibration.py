"""Calibration benchmark: error of the PSF grid measured from a simulated point-source image.

    python bench/bench_calibration.py          # every section
    python bench/bench_calibration.py 1 7      # sections 1 and 7

1. For correlated Gaussians, defocus disks with a 1-px rim, and defocus disks whose rim is blurred
   by the Airy core of a Nyquist-sampled lens (edge_sigma 0.84 px), a regular array (one source per
   cell) and scattered beads (3-8 per cell): the relative L2 error against the true node PSFs of the
   per-pixel field at peak SNR 10, 20, 50, 100 and 1000, with the time of each estimate (256x256,
   4x4 grid, 15x15 PSFs).
2. How much L2 error a tiny change of the PSF is (a 0.05 px shift; a 0.05 px larger disk): the
   scale against which the 5% bound should be read.
3. Six random fields of Nyquist-sampled Gaussians (widths 1-3 px, 384x384, 21x21): the error at
   SNR 100 and 20 per field, with how much the field curves within a cell (the PSF's second
   difference over a quarter cell, relative to the PSF: what a few spots per cell cannot follow), and
   the operator error against the per-pixel truth of the true node grid and of the estimated grids.
4. End to end: a scene through the same optics restored with the estimated grid and with the true
   node grid (analytic prior, same seed, 128x128): the PSNR difference.
5. The registration floor: one noise-free spot with its true sub-pixel offset, shifted back by
   spline interpolation (order 1, 3, 5), against the PSF drawn at offset 0: round Gaussians of
   several widths, and defocus disks with rims from 1 px (edge_sigma 0) to Nyquist-sampled
   (edge_sigma 0.84). RMS over 30 random offsets. Beside it, the registration error that
   estimate_psf_grid estimates from a spot's spectrum: on the same noise-free Gaussians, and for the
   disks from a bead image at SNR 100.
6. An oracle: section 1's disks at SNR 100 with every spot's cut-out replaced by the true PSF at
   its position (perfect registration). What is left is the cost of the grid's spatial sampling.
7. Background: section 1's correlated Gaussians and soft-rim disks at peak SNR 20 and 100 with 10,
   100 and 1000 photons of background (widefield fluorescence sits near the last): the L2 error,
   the centroid's pixel-locking slope (the fitted slope of the estimated against the true
   sub-pixel position; 1 is unbiased, below 1 pulled towards pixel centres) and its RMS error
   against the true source positions. Mean of three targets (seeds 0-2).
"""

import contextlib
import io
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calibration  # noqa: E402
import physics  # noqa: E402

FIELDS = {"correlated": ("correlated", dict(sigma_scale=1.2, mu_scale=0.0)),     # name: (mode, parameters)
          "defocus": ("defocus", dict(max_radius=5.0)),
          "soft rim": ("defocus", dict(max_radius=4.4, edge_sigma=0.84))}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def field_of(mode, H, k, seed, **params):
    return physics.SVBlurSimulator(H, H, k, 4, dtype=torch.float64).simulate_field(mode, seed=seed, **params)


def error_vs_snr():
    snrs = (10, 20, 50, 100, 1000)
    print("1. relative L2 error against the true node PSFs (256x256, 4x4, 15x15)")
    print(f"{'PSFs':11s} {'layout':7s} " + " ".join(f"{'SNR ' + str(s):>9s}" for s in snrs) + "   time")
    for name, (mode, params) in FIELDS.items():
        field = field_of(mode, 256, 15, 0, **params)
        true = field.node_grid().numpy()
        for beads in (False, True):
            errs, t = [], 0.0
            for snr in snrs:
                img, _, _ = calibration.calibration_target(field, snr, beads, np.random.default_rng(0))
                t0 = time.perf_counter()
                cal = calibration.estimate_psf_grid(img, 4, 15)
                t = max(t, time.perf_counter() - t0)
                errs.append(rel(cal.psfs, true))
            print(f"{name:11s} {'beads' if beads else 'array':7s} " + " ".join(f"{100 * e:8.1f}%" for e in errs)
                  + f"   {t:.2f} s")


def sensitivity():
    print("\n2. L2 size of a tiny change of the true node PSFs")
    for name, (mode, params) in FIELDS.items():
        field = field_of(mode, 256, 15, 0, **params)
        true = field.node_grid().numpy()
        line = f"{name:11s} shifted 0.05 px: {100 * rel(field.shifted(0.05, 0).node_grid().numpy(), true):.1f}%"
        if mode == "defocus":
            wider = {**params, "min_radius": 1.05, "max_radius": params["max_radius"] + 0.05}
            wider = field_of(mode, 256, 15, 0, **wider).node_grid().numpy()
            line += f"; radius 0.05 px larger: {100 * rel(wider, true):.1f}%"
        print(line)


def curvature(field):
    """Largest second difference of the PSF over a quarter cell around any node, relative to it."""
    ys, xs = field.node_coords()
    q = field.H / field.G / 4
    worst = 0.0
    for y in ys:
        for x in xs:
            P = field.psfs_on_grid(torch.stack([y - q, y, y + q]), torch.stack([x - q, x, x + q])).numpy()
            c = P[1, 1]
            for a, b in ((P[0, 1], P[2, 1]), (P[1, 0], P[1, 2])):
                worst = max(worst, np.linalg.norm((a + b) / 2 - c) / np.linalg.norm(c))
    return worst


def operator_error(grid, truth, x_ext):
    """‖A_grid x − A_true x‖ / ‖A_true x‖: the grid's full-rank operator (bilinear between nodes)
    against the per-pixel truth, on the scene x_ext (with its margin)."""
    H, r = truth.field.H, truth.field.k // 2
    op = physics.GridSVBlurOperator(torch.as_tensor(grid), H, H, "scatter", "reflect", "bilinear")
    return physics.operator_relative_error(op, truth, x_ext[..., r:r + H, r:r + H], x_ext)


def six_fields():
    print("\n3. six fields of Nyquist-sampled Gaussians (sigma_scale 2: widths 1-3 px; 384x384, 4x4, 21x21)")
    print("   L2 error of the node PSFs; the fewest beads in a cell; how much the field curves within a cell;")
    print("   and the operator error against the per-pixel truth (random scene) of the true node grid and of")
    print("   the grids estimated at SNR 100: what a restoration sees")
    print("seed  array SNR 100  SNR 20   beads SNR 100  SNR 20   fewest beads/cell  curvature   operator: "
          "node grid  array  beads")
    gen = torch.Generator().manual_seed(0)
    for seed in range(6):
        field = field_of("correlated", 384, 21, seed, sigma_scale=2.0, mu_scale=0.0)
        true = field.node_grid().numpy()
        truth = physics.GroundTruthBlur(field, "scatter")
        x_ext = torch.rand(1, 1, 384 + 20, 384 + 20, generator=gen, dtype=torch.float64)
        row, ops, fewest = [], [operator_error(true, truth, x_ext)], 0
        for beads in (False, True):
            for snr in (100, 20):
                img, _, _ = calibration.calibration_target(field, snr, beads, np.random.default_rng(seed))
                cal = calibration.estimate_psf_grid(img, 4, 21)
                row.append(rel(cal.psfs, true))
                fewest = int(cal.counts.min()) if beads else fewest
                if snr == 100:
                    ops.append(operator_error(cal.psfs, truth, x_ext))
        print(f"{seed:4d}  {100 * row[0]:12.1f}% {100 * row[1]:6.1f}%  {100 * row[2]:13.1f}% {100 * row[3]:6.1f}%"
              f"   {fewest:17d}  {100 * curvature(field):8.1f}%   " + "  ".join(f"{100 * e:5.2f}%" for e in ops))


def restore(y_path, grid_path, out):
    """restored.npy of main.py on y with the grid (analytic prior, fixed seed)."""
    import main
    with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(io.StringIO()):
        code = main.main(["--model_id", "analytic", "--blurred", y_path, "--psf_grid", grid_path, "--num_samples", "2",
                          "--num_inference_steps", "30", "--step_size", "8", "--seed", "0", "--no_intermediates",
                          "--save_dir", out])
    assert code == 0, f"main.py failed on {grid_path}"
    return np.load(os.path.join(printed.getvalue().strip().splitlines()[-1], "restored.npy")).astype(np.float64)


def end_to_end():
    import tifffile

    import utils
    print("\n4. restoring with the estimated grid vs the true node grid (128x128, 4x4, 15x15, y with noise 0.02)")
    logging.disable(logging.WARNING)
    H, k, tmp = 128, 15, tempfile.mkdtemp()
    for name, (mode, params) in FIELDS.items():
        field = field_of(mode, H, k, 3, **params)
        coords = tuple(c.numpy() for c in field.node_coords())
        scene = utils.load_scene("sample", H, k // 2)
        y = physics.GroundTruthBlur(field, "scatter")(utils.to_tensor(scene).double())
        y = (y + 0.02 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)).clamp(0, 1)
        y_path = os.path.join(tmp, f"y_{mode}.tif")
        tifffile.imwrite(y_path, utils.to_numpy(y).astype(np.float32), photometric="rgb")
        clean = scene[k // 2:k // 2 + H, k // 2:k // 2 + H]
        utils.save_psf_grid(os.path.join(tmp, "true.npz"), field.node_grid(), coords)
        p_true = utils.psnr(clean, restore(y_path, os.path.join(tmp, "true.npz"), tmp))
        for beads in (False, True):
            for snr in (100, 20):
                img, _, _ = calibration.calibration_target(field, snr, beads, np.random.default_rng(3))
                cal = calibration.estimate_psf_grid(img, 4, k)
                utils.save_psf_grid(os.path.join(tmp, "est.npz"), cal.psfs, coords)
                p_est = utils.psnr(clean, restore(y_path, os.path.join(tmp, "est.npz"), tmp))
                err = rel(cal.psfs, field.node_grid().numpy())
                print(f"{name:11s} {'beads' if beads else 'array':5s} SNR {snr:3d}: L2 {100 * err:5.1f}%"
                      f"   PSNR {p_est:.2f} dB vs {p_true:.2f} dB with the true grid ({p_est - p_true:+.2f} dB)")


def registration_floor():
    from scipy.ndimage import shift
    print("\n5. registering one noise-free spot with its true offset (RMS relative L2 over 30 offsets)")
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-0.5, 0.5, (30, 2))
    v = np.arange(-10, 11)                                     # 21x21 drawn, the central 15x15 compared

    def gaussian(sigma, dy, dx):
        yy, xx = np.meshgrid(v - dy, v - dx, indexing="ij")
        return np.exp(-0.5 * (yy ** 2 + xx ** 2) / sigma ** 2)

    def floor(draw, true):
        errs = {order: [] for order in (1, 3, 5)}
        for dy, dx in offsets:
            observed = draw(dy, dx)
            for order in errs:
                back = shift(observed, (0, 0)[:observed.ndim - 2] + (-dy, -dx), order=order, mode="constant")
                back = back[..., 3:-3, 3:-3]
                back = back / back.sum((-2, -1), keepdims=True)
                errs[order].append(rel(back, true))
        return "  ".join(f"order {o}: {100 * np.sqrt(np.mean(np.square(e))):5.1f}%" for o, e in errs.items())

    for sigma in (0.6, 0.7, 0.8, 1.0, 1.5):
        true = gaussian(sigma, 0, 0)[3:-3, 3:-3]
        estimate = np.sqrt(np.mean([calibration._near_nyquist(gaussian(sigma, dy, dx), 10, 10, 15, 0.0) ** 2
                                    for dy, dx in offsets]))
        print(f"Gaussian sigma {sigma:.1f} px   " + floor(lambda dy, dx: gaussian(sigma, dy, dx), true / true.sum())
              + f"   spectral estimate (noise-free): {100 * estimate:4.1f}%")
    for edge_sigma in (0.0, 0.3, 0.5, 0.84):
        params = dict(max_radius=4.4, edge_sigma=edge_sigma)
        disks = field_of("defocus", 256, 21, 0, **params)
        field = field_of("defocus", 256, 15, 0, **params)
        img, _, _ = calibration.calibration_target(field, 100, True, np.random.default_rng(0))
        estimate = calibration.estimate_psf_grid(img, 4, 15).registration_error
        print(f"disks, edge_sigma {edge_sigma:.2f} " + floor(lambda dy, dx: disks.shifted(dy, dx).node_grid().numpy(),
                                                             field.node_grid().numpy())
              + f"   calibration's estimate (beads, SNR 100): {100 * estimate:4.1f}%")


def perfect_registration():
    print("\n6. defocus disks at SNR 100 with perfect registration (each cut-out = the true PSF at its spot)")
    mode, params = FIELDS["defocus"]
    field = field_of(mode, 256, 15, 0, **params)
    true = field.node_grid().numpy()
    actual = calibration._registered_cutout
    try:
        calibration._registered_cutout = lambda img, cy, cx, k: (field.psfs_on_grid(
            torch.tensor([cy]), torch.tensor([cx]))[0, 0].numpy(), float("inf"))   # noise-free: flux ∞
        for beads in (False, True):
            img, _, _ = calibration.calibration_target(field, 100, beads, np.random.default_rng(0))
            print(f"{'beads' if beads else 'array'}: {100 * rel(calibration.estimate_psf_grid(img, 4, 15).psfs, true):.1f}%")
    finally:
        calibration._registered_cutout = actual


def error_vs_background():
    print("\n7. background: L2 error, centroid slope (1 = unbiased) and RMS (px); 256x256, 4x4, 15x15, 3 targets each")
    print(f"{'PSFs':11s} {'layout':7s} {'SNR':>4s}  " + "   ".join(f"{'background ' + str(b):>24s}" for b in (10, 100, 1000)))
    for name in ("correlated", "soft rim"):
        mode, params = FIELDS[name]
        field = field_of(mode, 256, 15, 0, **params)
        true = field.node_grid().numpy()
        for beads in (False, True):
            for snr in (20, 100):
                cols = []
                for background in (10, 100, 1000):
                    runs = []
                    for seed in range(3):
                        img, r, c = calibration.calibration_target(field, snr, beads, np.random.default_rng(seed),
                                                                   background=background)
                        cal = calibration.estimate_psf_grid(img, 4, 15)
                        runs.append((rel(cal.psfs, true), *calibration.centroid_errors(cal, r, c)))
                    e, slope, rms = np.mean(runs, 0)
                    cols.append(f"{100 * e:5.1f}%  {slope:4.2f}  {rms:.3f} px")
                print(f"{name:11s} {'beads' if beads else 'array':7s} {snr:4d}  " + "   ".join(f"{c:>24s}" for c in cols),
                      flush=True)


SECTIONS = {"1": error_vs_snr, "2": sensitivity, "3": six_fields, "4": end_to_end, "5": registration_floor,
            "6": perfect_registration, "7": error_vs_background}

if __name__ == "__main__":
    for section in sys.argv[1:] or SECTIONS:   # e.g. `python bench/bench_calibration.py 1 7`
        SECTIONS[section]()
