"""Colour PSF grids on lens simulations: what one PSF per channel buys over the channel-mean grid.

    python bench/bench_colour.py                       # both parts, 128² photos (about 10 min on 2 CPU cores)
    python bench/bench_colour.py --part basis          # per-channel vs shared EigenPSF basis only

Part "basis": on the default lens (physics.lens in config.yaml, 8×8 grid of 21-px PSFs), the
EigenPSF model error of one decomposition per channel against one basis shared by the channels
(per-channel coefficient maps), at the same K, measured against the grid's own full-rank operator
on a photo; and the time of one forward + adjoint, colour against mono (min / median / max of 20).

Part "restore": scikit-image photos blurred by the lens's simulated truth (exact diffraction PSFs
on a 4× finer grid, Gaussian-blended; not the reconstruction model) plus Gaussian noise at σ =
0.01 and 0.003. Each is restored with the colour grid and with the channel-mean grid (the only
way in before colour grids): the operators' model error against the truth per channel, and PSNR
of Richardson–Lucy, Tikhonov and DiffPIR (analytic prior, 100 steps, mean of 2 samples).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines  # noqa: E402
import config  # noqa: E402
import dps  # noqa: E402
import physics  # noqa: E402
import priors  # noqa: E402
import utils  # noqa: E402

PHOTOS = {"astronaut": lambda d: d.astronaut(), "coffee": lambda d: d.coffee(), "chelsea": lambda d: d.chelsea()}
PC = {**config.defaults()["physics"], "blur_mode": "lens", "form": "scatter"}


def psnr(a, b):
    return float(-10 * torch.log10(((a.double().clamp(0, 1) - b.double()) ** 2).mean()))


def scene(photo, size, r):
    from skimage import data
    img = utils.center_crop_resize(utils.to_float_image(PHOTOS[photo](data), photo), size, margin=r)
    return utils.to_tensor(img, "cpu").double()


def shared_decomposition(grid, K, H, W):
    """One basis for every channel (PCA of all G²·C PSFs around their common mean) with per-channel
    coefficients (projections), as a colour EigenPSFDecomposition whose channels repeat the basis."""
    Gy, Gx, C, k, _ = grid.shape
    P = grid.double().permute(2, 0, 1, 3, 4).reshape(C, Gy * Gx, k * k)
    P = P / P.sum(-1, keepdim=True)
    mean = P.reshape(-1, k * k).mean(0)
    _, _, Vh = torch.linalg.svd(P.reshape(-1, k * k) - mean, full_matrices=False)
    basis = torch.cat([mean[None], Vh[:K - 1]])                                     # (K, k²)
    coeff = torch.cat([torch.ones(C, Gy * Gx, 1, dtype=P.dtype), (P - mean) @ Vh[:K - 1].T], -1)  # (C, N, K)
    coeff = coeff.permute(0, 2, 1).reshape(C, K, Gy, Gx)
    Wy = physics.interpolation_matrix(physics.grid_node_coords(Gy, H), H, "bilinear")
    Wx = physics.interpolation_matrix(physics.grid_node_coords(Gx, W), W, "bilinear")
    maps = torch.einsum("hi,ckij,wj->ckhw", Wy, coeff, Wx)
    return physics.EigenPSFDecomposition(basis.reshape(1, K, k, k).expand(C, -1, -1, -1).contiguous(), maps,
                                         torch.zeros(C, 1), torch.zeros(C, K - 1), coeff, "bilinear", True)


def timed(fn, n=20):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), max(times)


def part_basis(size):
    field = physics.SVBlurSimulator(size, size, PC["kernel_size"], 8, dtype=torch.float64).simulate_field("lens", **PC["lens"])
    grid = field.node_grid()
    x = scene("astronaut", size, 0)
    full = physics.GridSVBlurOperator(grid, size, size, "scatter")
    ref = full(x)
    print(f"## EigenPSF basis, default lens, {size}², 8×8 grid of 21-px PSFs: model error ‖A_K x − A_full x‖/‖A_full x‖ "
          f"per channel (R/G/B), against the grid's own full-rank operator")
    print("| K | one decomposition per channel | one basis shared by the channels |")
    print("|---|---|---|")
    for K in (3, 5, 10, 15, 20):
        errs = []
        for dec in (physics.compute_eigen_decomposition(grid, K, size, size),
                    shared_decomposition(grid, K, size, size)):
            d = physics.SVBlurOperator(dec, "scatter")(x) - ref
            errs.append("/".join(f"{float(d[:, c].norm() / ref[:, c].norm()):.2e}" for c in range(3)))
        print(f"| {K} | {errs[0]} | {errs[1]} |")
    xf = x.float()
    colour = physics.SVBlurOperator(physics.compute_eigen_decomposition(grid.float(), 10, size, size), "scatter")
    mono = physics.SVBlurOperator(physics.compute_eigen_decomposition(grid.float().mean(2), 10, size, size), "scatter")
    rows = [(name, timed(lambda op=op: op.adjoint(op(xf)))) for name, op in (("colour (per channel)", colour),
                                                                               ("mono (channel mean)", mono))]
    print(f"\nforward + adjoint, float32, K = 10, {size}² RGB, {torch.get_num_threads()} threads (min / median / max of 20):")
    for name, (lo, med, hi) in rows:
        print(f"  {name}: {1e3 * lo:.1f} / {1e3 * med:.1f} / {1e3 * hi:.1f} ms")
    print(f"  colour / mono median: {rows[0][1][1] / rows[1][1][1]:.2f}; a shared basis runs the same "
          f"C·K products and inverse FFTs as one basis per channel, so its time is the colour row's")


def restorations(op, y, x, sigma, pipe_parts):
    out = {}
    for name, (est, _) in baselines.restore_baselines(op, y, sigma).items():
        out[name] = psnr(est, x)
    pipe = dps.EigenPSFDPSPipeline(*pipe_parts, op)
    res, _ = pipe(y.float(), num_inference_steps=100, method="diffpir", sigma_y=sigma, num_samples=2,
                  generator=torch.Generator().manual_seed(1))
    out["diffpir"] = psnr(res["mean"], x)
    return out


def part_restore(size, photos):
    r = PC["kernel_size"] // 2
    field, truth = physics.create_ground_truth(size, size, PC, dtype=torch.float64)
    grid = field.node_grid()
    ops = {"colour": physics.build_eigen_operator(grid, size, size, PC)[0],
           "channel mean": physics.build_eigen_operator(grid.mean(2), size, size, PC)[0]}
    pipe_parts = priors.load_model("analytic")
    print(f"\n## Restoration on lens simulations, {size}², 8×8 grid of 21-px PSFs, K = 10: PSNR (dB) and model "
          f"error (R/G/B) against the simulated truth")
    print("| photo | σ | grid | model error R/G/B | blurred | Richardson–Lucy | Tikhonov | DiffPIR |")
    print("|---|---|---|---|---|---|---|---|")
    for photo in photos:
        x_ext = scene(photo, size, r)
        x = truth.crop(x_ext)
        for sigma in (0.01, 0.003):
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                y = truth(x_ext) + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            for name, op in ops.items():
                err = physics.operator_errors(op, truth, x, x_ext)[1]
                p = restorations(op, y, x, sigma, pipe_parts)
                print(f"| {photo} | {sigma} | {name} | {'/'.join(f'{e:.3f}' for e in err)} | {psnr(y, x):.2f} | "
                      f"{p['richardson_lucy']:.2f} | {p['tikhonov']:.2f} | {p['diffpir']:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("basis", "restore", "both"), default="both")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--photos", default=",".join(PHOTOS))
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.part in ("basis", "both"):
        part_basis(a.size)
    if a.part in ("restore", "both"):
        part_restore(a.size, a.photos.split(","))


if __name__ == "__main__":
    main()
