"""Calibration benchmark: error of the PSF grid measured from a simulated point-source image.

    python bench/bench_calibration.py

For correlated Gaussians and defocus disks, a regular array (one source per cell) and scattered
beads (3-8 per cell), prints the relative L2 error against the true node PSFs of the per-pixel
field at peak SNR 10, 20, 50, 100 and 1000, with the time of each estimate (256x256, 4x4 grid,
15x15 PSFs).
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import physics  # noqa: E402

FIELDS = {"correlated": dict(sigma_scale=1.2, mu_scale=0.0), "defocus": dict(max_radius=5.0)}


def main():
    snrs = (10, 20, 50, 100, 1000)
    print(f"{'PSFs':11s} {'layout':7s} " + " ".join(f"{'SNR ' + str(s):>9s}" for s in snrs) + "   time")
    for mode, params in FIELDS.items():
        field = physics.SVBlurSimulator(256, 256, 15, 4, dtype=torch.float64).simulate_field(mode, seed=0, **params)
        true = field.node_grid().numpy()
        for beads in (False, True):
            errs, t = [], 0.0
            for snr in snrs:
                img, _, _ = physics.calibration_target(field, snr, beads, np.random.default_rng(0))
                t0 = time.perf_counter()
                cal = physics.estimate_psf_grid(img, 4, 15)
                t = max(t, time.perf_counter() - t0)
                errs.append(np.linalg.norm(cal.psfs - true) / np.linalg.norm(true))
            print(f"{mode:11s} {'beads' if beads else 'array':7s} " + " ".join(f"{100 * e:8.1f}%" for e in errs)
                  + f"   {t:.2f} s")


if __name__ == "__main__":
    main()
