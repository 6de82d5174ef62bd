"""Physics checks against independent computations (brute force, scipy, adjoint identities)."""

import numpy as np
import pytest
import scipy.ndimage
import torch

import config
import physics
from helpers import brute_force
from physics import (BLUR_MODES, BOUNDARIES, FORMS, INTERPOLATIONS, SVBlurOperator, SVBlurSimulator,
                     GridSVBlurOperator, build_operators, compute_eigen_decomposition, create_sv_blur_system,
                     operator_relative_error)

SMALL = {  # parameters that fit a 7×7 kernel
    "motion": dict(max_length=6), "defocus": dict(max_radius=3), "mixed": dict(max_length=6, max_radius=3),
    "correlated": dict(sigma_scale=0.6, mu_scale=0.3), "random_iid": dict(max_length=6, max_radius=3, sigma_scale=0.6),
    # a mono lens (one wavelength) with small aberrations: its colour grids are tested in test_colour.py
    "lens": dict(wavelengths_nm=[540.0], longitudinal_colour=[0.0], lateral_colour=[0.3], defocus=0.3, spherical=0.1,
                 coma=0.3, astigmatism=0.3, field_curvature=0.3, truth_grid_factor=2),
}


def small_grid(mode="motion", H=20, W=26, k=7, G=3, seed=1):
    sim = SVBlurSimulator(H, W, k, G, dtype=torch.float64)
    return sim.simulate_sv_kernel_grid(mode, seed=seed, **SMALL[mode])


def cfg(n, form="gather", boundary="reflect", interpolation="bilinear"):
    return dict(blur_mode="motion", n_eigen_psfs=n, form=form, boundary=boundary, interpolation=interpolation)


# --- adjointness and full rank -----------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_adjoint_identity_both_operators(form, boundary, interpolation):
    grid = small_grid("mixed")
    eig, true, _ = build_operators(grid, 20, 26, cfg(4, form, boundary, interpolation))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 26, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 20, 26, generator=g, dtype=torch.float64)
    for op in (eig, true):
        lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
        assert abs(lhs - rhs) <= 1e-10 * abs(lhs), (type(op).__name__, lhs.item(), rhs.item())


@pytest.mark.parametrize("mode", BLUR_MODES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_full_rank_eigen_equals_true(mode, form, boundary):
    grid = small_grid(mode)
    eig, true, dec = build_operators(grid, 20, 26, cfg(9, form, boundary))
    x = torch.rand(1, 2, 20, 26, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert operator_relative_error(eig, true, x) < 1e-12
    y = torch.rand_like(x)
    assert torch.allclose(eig.adjoint(y), true.adjoint(y), atol=1e-12, rtol=0)


def test_reconstructed_psfs_sum_to_one_for_every_k():
    grid = small_grid("random_iid", G=4)
    for K in (1, 2, 5, 16):
        dec = compute_eigen_decomposition(grid, K, 20, 26)
        psf_at_pixels = torch.einsum("khw,kij->hwij", dec.coefficient_maps, dec.basis_kernels)
        assert torch.allclose(psf_at_pixels.sum((-2, -1)), torch.ones(20, 26, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_grid_operator_matches_brute_force(form, boundary):
    grid = SVBlurSimulator(11, 13, 5, 3, dtype=torch.float64).simulate_sv_kernel_grid(
        "random_iid", seed=4, max_length=4, max_radius=2, sigma_scale=0.4)
    true = GridSVBlurOperator(grid, 11, 13, form, boundary)
    x = torch.rand(2, 11, 13, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    np.testing.assert_allclose(true(x[None])[0].numpy(), brute_force(grid, x, form, boundary), atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("boundary,mode", [("reflect", "mirror"), ("zeros", "constant"), ("circular", "wrap")])
def test_identical_psfs_match_scipy_convolve(form, boundary, mode):
    k, H, W = 7, 18, 21
    one = small_grid("motion", H, W, k, G=1)[0, 0]
    grid = one.expand(4, 4, k, k).contiguous()
    eig, true, _ = build_operators(grid, H, W, cfg(3, form, boundary))
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = np.stack([scipy.ndimage.convolve(c, one.numpy(), mode=mode) for c in x[0].numpy()])
    for op in (eig, true):
        np.testing.assert_allclose(op(x)[0].numpy(), ref, atol=1e-12)


# --- physical properties -------------------------------------------------------------------

@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gather_keeps_constant_image_constant(boundary):
    eig, true, _ = build_operators(small_grid("correlated"), 20, 26, cfg(4, "gather", boundary))
    x = torch.full((1, 3, 20, 26), 0.7, dtype=torch.float64)
    for op in (eig, true):
        out = op(x)
        if boundary == "zeros":  # only away from the zero padding
            out = out[..., 3:-3, 3:-3]
        assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-12)


def test_scatter_circular_conserves_flux():
    eig, true, _ = build_operators(small_grid("random_iid"), 20, 26, cfg(5, "scatter", "circular"))
    x = torch.rand(2, 3, 20, 26, dtype=torch.float64)
    for op in (eig, true):
        assert torch.allclose(op(x).sum((-2, -1)), x.sum((-2, -1)), rtol=1e-12)


def test_approximation_error_falls_with_k():
    H = W = 48
    sim = SVBlurSimulator(H, W, 11, 6, dtype=torch.float64)
    grid = sim.simulate_sv_kernel_grid("correlated", seed=0, sigma_scale=1.0, mu_scale=0.5, correlation_length=2.0)
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errs = []
    for K in (1, 3, 6, 12, 36):
        eig, true, _ = build_operators(grid, H, W, cfg(K))
        errs.append(operator_relative_error(eig, true, x))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-12


def test_defocus_radius_grows_outward():
    sim = SVBlurSimulator(128, 128, 15, 7, dtype=torch.float64)
    grid = sim.simulate_sv_kernel_grid("defocus", seed=0, min_radius=1, max_radius=6)
    support = (grid > 1e-12).sum((-2, -1)).double()
    assert support[3, 3] < support[3, 5] < support[3, 6]
    assert support[3, 3] < support[0, 0]


def test_blurred_disk_is_the_noncentral_chi2_cdf():
    """A disk convolved with a Gaussian is Pr(|X + d| <= R), X ~ N(0, s²I₂): scipy's non-central χ²."""
    from scipy.stats import ncx2
    d = torch.linspace(0, 14, 300, dtype=torch.float64)
    for R, s in ((6.0, 1.0), (1.0, 0.9), (0.3, 0.3), (10.0, 0.29), (2.0, 2.0)):
        ref = ncx2.cdf(R ** 2 / s ** 2, 2, d.numpy() ** 2 / s ** 2)
        assert np.abs(physics.blurred_disk(d, R, s).numpy() - ref).max() < 1e-7, (R, s)


@pytest.mark.parametrize("radius,edge_sigma", [(6.0, 1.0), (2.0, 0.84), (1.0, 0.84), (6.0, 0.3)])
def test_soft_defocus_disk_matches_supersampled_optics(radius, edge_sigma):
    """edge_sigma > 0: the disk through a Gaussian of that σ and then integrated over each pixel,
    computed by brute force on a 16x finer grid, to 0.5% (the box is taken as a Gaussian)."""
    k, ss = 31, 16
    field = SVBlurSimulator(64, 64, k, 1, dtype=torch.float64).simulate_field(
        "defocus", min_radius=radius, max_radius=radius, edge_sigma=edge_sigma)
    c = (np.arange(k * ss) + 0.5) / ss - k / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    fine = scipy.ndimage.gaussian_filter((yy ** 2 + xx ** 2 <= radius ** 2).astype(float), edge_sigma * ss,
                                         mode="constant")
    pix = fine.reshape(k, ss, k, ss).mean((1, 3))
    pix /= pix.sum()
    ours = field.node_grid()[0, 0].numpy()
    assert np.linalg.norm(ours - pix) / np.linalg.norm(pix) < 0.005
    hard = SVBlurSimulator(64, 64, k, 1, dtype=torch.float64).simulate_sv_kernel_grid(
        "defocus", min_radius=radius, max_radius=radius)[0, 0].numpy()
    assert np.linalg.norm(hard - pix) / np.linalg.norm(pix) > 0.02   # the 1-px rim is another PSF


def test_random_iid_neighbours_differ_and_default_grid():
    assert physics.resolve_grid_size({"blur_mode": "random_iid"}) == 64
    grid = SVBlurSimulator(64, 64, 21, 16).simulate_sv_kernel_grid("random_iid", seed=0)
    diff = (grid[1:] - grid[:-1]).abs().sum((-2, -1))
    assert (diff > 1e-3).float().mean() > 0.95


@pytest.mark.parametrize("mode", BLUR_MODES)
def test_psfs_nonnegative_normalised_deterministic(mode):
    sim = SVBlurSimulator(64, 64, 21, 8)
    a = sim.simulate_sv_kernel_grid(mode, seed=7)
    b = sim.simulate_sv_kernel_grid(mode, generator=torch.Generator().manual_seed(7))
    c = sim.simulate_sv_kernel_grid(mode, seed=8)
    assert a.shape == ((8, 8, 3, 21, 21) if mode == "lens" else (8, 8, 21, 21)) and (a >= 0).all()
    assert torch.allclose(a.sum((-2, -1)), torch.ones(a.shape[:-2]), atol=1e-5)
    assert torch.equal(a, b)
    if mode not in ("defocus", "lens"):  # deterministic by design (the PSF follows the field position)
        assert not torch.equal(a, c)


def test_motion_is_subpixel():
    sim = SVBlurSimulator(32, 32, 15, 1, dtype=torch.float64)
    a = sim.simulate_sv_kernel_grid("motion", seed=0, min_length=6.0, max_length=6.0)
    b = sim.simulate_sv_kernel_grid("motion", seed=0, min_length=6.3, max_length=6.3)
    assert not torch.equal(a, b)  # a fractional length changes the PSF


def test_create_system_is_deterministic():
    pc = dict(blur_mode="mixed", kernel_size=9, grid_size=4, n_eigen_psfs=5, form="gather", boundary="reflect",
              interpolation="bilinear", motion=dict(max_length=8), defocus=dict(max_radius=4))
    e1, t1, d1 = create_sv_blur_system(32, 32, pc, seed=3)
    e2, t2, d2 = create_sv_blur_system(32, 32, pc, seed=3)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(e1(x), e2(x)) and torch.equal(t1(x), t2(x))
    assert torch.equal(d1.basis_kernels, d2.basis_kernels)


def test_grid_operator_memory_bounded_chunks():
    grid = small_grid("motion", 40, 40, 7, 3)
    a = GridSVBlurOperator(grid, 40, 40)
    b = GridSVBlurOperator(grid, 40, 40, max_chunk_bytes=1)  # one row per chunk
    x = torch.rand(1, 3, 40, 40, dtype=torch.float64)
    assert torch.allclose(a(x), b(x), atol=1e-14) and torch.allclose(a.adjoint(x), b.adjoint(x), atol=1e-14)


def test_explained_variance_warning(caplog):
    grid = SVBlurSimulator(64, 64, 21, 8).simulate_sv_kernel_grid("random_iid", seed=0)
    with caplog.at_level("WARNING"):
        compute_eigen_decomposition(grid, 2, 64, 64)
    assert "explains only" in caplog.text


def test_float32_operator_stays_float32():
    eig, _, _ = build_operators(small_grid().float(), 20, 26, cfg(4))
    x = torch.rand(1, 3, 20, 26)
    assert eig(x).dtype == torch.float32 and eig.adjoint(x).dtype == torch.float32


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=8), "kernel_size"), (dict(kernel_size=-3), "kernel_size"),
    (dict(grid_size=0), "grid_size"), (dict(img_height=5), "smaller|at least"),
])
def test_simulator_bad_input(kwargs, match):
    args = {**dict(img_height=32, img_width=32, kernel_size=7, grid_size=2), **kwargs}
    with pytest.raises(ValueError, match=match):
        SVBlurSimulator(**args)


def test_bad_mode_and_psf_not_fitting():
    sim = SVBlurSimulator(32, 32, 7, 2)
    with pytest.raises(ValueError, match="blur_mode"):
        sim.simulate_sv_kernel_grid("swirl")
    with pytest.raises(ValueError, match="kernel_size"):
        sim.simulate_sv_kernel_grid("motion", max_length=15)
    with pytest.raises(ValueError, match="kernel_size"):
        sim.simulate_sv_kernel_grid("defocus", max_radius=5)
    with pytest.raises(ValueError, match="max_radius or edge_sigma"):
        sim.simulate_sv_kernel_grid("defocus", max_radius=2, edge_sigma=0.5)
    with pytest.raises(ValueError, match="edge_sigma must be >= 0"):
        sim.simulate_sv_kernel_grid("defocus", max_radius=2, edge_sigma=-0.1)
    with pytest.raises(ValueError, match="unknown parameter"):
        sim.simulate_sv_kernel_grid("defocus", max_length=5)


def test_decomposition_and_operator_bad_input():
    grid = small_grid()
    with pytest.raises(ValueError, match=r"n_eigen_psfs.*1\.\.9"):
        compute_eigen_decomposition(grid, 10, 20, 26)
    with pytest.raises(ValueError, match="n_eigen_psfs"):
        compute_eigen_decomposition(grid, 0, 20, 26)
    with pytest.raises(ValueError, match="interpolation"):
        compute_eigen_decomposition(grid, 2, 20, 26, "cubic")
    with pytest.raises(ValueError, match="smaller than the kernel"):
        compute_eigen_decomposition(grid, 2, 5, 26)
    dec = compute_eigen_decomposition(grid, 2, 20, 26)
    with pytest.raises(ValueError, match="form"):
        SVBlurOperator(dec, form="sideways")
    with pytest.raises(ValueError, match="boundary"):
        SVBlurOperator(dec, boundary="periodic")
    with pytest.raises(ValueError, match="shape"):
        compute_eigen_decomposition(grid[0], 2, 20, 26)
    bad = grid.clone()
    bad[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        GridSVBlurOperator(bad, 20, 26)
    bad = grid.clone()
    bad[1, 1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        compute_eigen_decomposition(bad, 2, 20, 26)
    bad[1, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_eigen_decomposition(bad, 2, 20, 26)


@pytest.mark.slow
def test_grid_operator_61px_psfs_stays_under_2gb():
    """256×256 RGB with 61×61 PSFs, forward + adjoint, in a fresh process: peak RSS growth < 2 GB."""
    import os
    import subprocess
    import sys
    code = ("import resource, torch, physics\n"
            "g = physics.SVBlurSimulator(256, 256, 61, 4).simulate_sv_kernel_grid('defocus', seed=0, max_radius=30)\n"
            "op = physics.GridSVBlurOperator(g, 256, 256)\n"
            "x = torch.rand(1, 3, 256, 256)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "y = op(x); z = op.adjoint(y)\n"
            "assert y.shape == z.shape == x.shape and torch.isfinite(y).all()\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 2048


# --- batches of images with their own PSF grids ----------------------------------------------------

@pytest.mark.parametrize("form", ["gather", "scatter"])
def test_stacked_operator_is_each_images_own_operator_and_exactly_adjoint(form):
    """Image b (and its S consecutive samples) through the stacked operator equals image b through
    its own operator, with K differing between images; the adjoint identity holds image by image."""
    H = W = 24
    decomps = []
    for seed, (mode, K) in enumerate([("motion", 3), ("defocus", 5), ("motion", 1)]):
        pc = dict(blur_mode=mode, kernel_size=7, grid_size=3, n_eigen_psfs=K, form=form, boundary="reflect",
                  motion=dict(max_length=6), defocus=dict(max_radius=3))
        decomps.append(physics.create_sv_blur_system(H, W, pc, seed=seed, dtype=torch.float64)[2])
    ops = [physics.SVBlurOperator(d, form, "reflect") for d in decomps]
    both = physics.SVBlurOperator.stacked(decomps, form, "reflect")
    S = 2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3 * S, 2, H, W, generator=g, dtype=torch.float64)
    y = torch.rand(3 * S, 2, H, W, generator=g, dtype=torch.float64)
    Ax, ATy = both(x), both.adjoint(y)
    for b, op in enumerate(ops):
        sl = slice(b * S, (b + 1) * S)
        torch.testing.assert_close(Ax[sl], op(x[sl]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ATy[sl], op.adjoint(y[sl]), rtol=1e-12, atol=1e-12)
        lhs, rhs = float((Ax[sl] * y[sl]).sum()), float((x[sl] * ATy[sl]).sum())
        assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    with pytest.raises(ValueError, match="holds 3 images"):
        both(x[:4])


@pytest.mark.parametrize("form", ["gather", "scatter"])
def test_component_chunks_change_nothing(form):
    """Chunking over K and over bands of rows (to bound a batch's peak memory) gives the unchunked
    result, forward and adjoint, batched or not; a budget below one component's spectra still
    makes progress."""
    H = W = 20
    pc = dict(blur_mode="motion", kernel_size=5, grid_size=3, n_eigen_psfs=6, form=form, boundary="reflect",
              motion=dict(max_length=4))
    decomps = [physics.create_sv_blur_system(H, W, pc, seed=s, dtype=torch.float64)[2] for s in range(2)]
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(4, 3, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    for make in (lambda **kw: physics.SVBlurOperator(decomps[0], form, "reflect", **kw),
                 lambda **kw: physics.SVBlurOperator.stacked(decomps, form, "reflect", **kw)):
        whole, chunked = make(), make(max_chunk_bytes=1)
        assert whole._bands(x) == (H, whole.fft_shape[0]) and chunked._bands(x)[0] < H   # 2 bands of rows
        assert len(chunked._k_chunks(x, chunked._bands(x)[1])) == 6 and len(whole._k_chunks(x, whole.fft_shape[0])) == 1
        torch.testing.assert_close(chunked(x), whole(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(chunked.adjoint(y), whole.adjoint(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["gather", "scatter"])
def test_bands_of_rows_are_exact_with_their_halos(form):
    """A large image's operator works in bands of rows, each with its 2r rows of halo (so that its
    FFT temporaries stay small): against the one-band result, forward, adjoint and the gradient
    through the forward, with a short last band and every halo crossing a band edge (k = 9, many
    bands); the banded pair is still an exact adjoint pair (<Ax, y> = <x, Aᵀy>)."""
    H, W = 83, 40
    pc = dict(blur_mode="motion", kernel_size=9, grid_size=3, n_eigen_psfs=4, form=form, boundary="reflect",
              motion=dict(max_length=8))
    decomp = physics.create_sv_blur_system(H, W, pc, seed=0, dtype=torch.float64)[2]
    whole, banded = (physics.SVBlurOperator(decomp, form, "reflect", max_chunk_bytes=m) for m in (None, 1))
    g = torch.Generator().manual_seed(2)
    x, y = (torch.rand(2, 3, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    nb, Fh = banded._bands(x)
    assert nb < H / 3 and H % nb and Fh == nb + 8        # several bands, the last one short, halo 2r = 8
    torch.testing.assert_close(banded(x), whole(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(banded.adjoint(y), whole.adjoint(y), rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_()
    (banded(xg) * y).sum().backward()
    torch.testing.assert_close(xg.grad, whole.adjoint(y), rtol=1e-12, atol=1e-12)
    lhs, rhs = (banded(x) * y).sum(), (x * banded.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


def test_stack_operators_keeps_wrappers_and_never_copies_a_shared_grid():
    """A batch with one shared operator gets that very object back (no B copies); per-image
    operators inside crop and luminance wrappers stack inside the same wrappers."""
    H = W = 20
    pc = dict(blur_mode="motion", kernel_size=5, grid_size=3, n_eigen_psfs=3, form="gather", boundary="reflect",
              motion=dict(max_length=4))
    ops = [physics.SVBlurOperator(physics.create_sv_blur_system(H, W, pc, seed=s, dtype=torch.float64)[2])
           for s in range(2)]
    assert physics.stack_operators([ops[0], ops[0], ops[0]]) is ops[0]
    wrap = lambda op: physics.LuminanceOperator(physics.CroppedOperator(op, 1, 2, 17, 15))  # noqa: E731
    both = physics.stack_operators([wrap(op) for op in ops])
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = both(x)
    assert out.shape == (2, 1, 17, 15)
    for b, op in enumerate(ops):
        torch.testing.assert_close(out[b:b + 1], wrap(op)(x[b:b + 1]), rtol=1e-12, atol=1e-12)


# --- adjoint identities on asymmetric PSFs, for every operator ----------------------------

def asymmetric_grid(G=3, k=7, seed=0):
    """Random, peaked PSFs with most of their mass right of and below the centre: no PSF equals its
    180° rotation, so a missing kernel flip in an adjoint cannot hide (centred lines and disks do)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(G, G, k, k, generator=g, dtype=torch.float64) ** 3
    grid[..., : k // 2, :] *= 0.2
    grid[..., :, : k // 2] *= 0.2
    return grid / grid.sum((-2, -1), keepdim=True)


def _field(grid, H, W):
    coords = [physics.grid_node_coords(n, s) for n, s in zip(grid.shape[:2], (H, W))]
    return physics.BlendedGridField(grid, *coords, H, W)


# name -> (grid, form) -> (operator, shape of its input). A new operator belongs here.
ADJOINT_OPERATORS = {
    "eigen": lambda g, f: (build_operators(g, 20, 26, cfg(4, f))[0], (2, 3, 20, 26)),
    "grid": lambda g, f: (build_operators(g, 20, 26, cfg(4, f))[1], (2, 3, 20, 26)),
    "ground_truth": lambda g, f: (physics.GroundTruthBlur(_field(g, 20, 26), f), (2, 3, 26, 32)),
    "true_sv": lambda g, f: (physics.TrueSVBlurOperator(_field(g, 20, 26), f), (2, 3, 20, 26)),
    "luminance": lambda g, f: (physics.LuminanceOperator(build_operators(g, 20, 26, cfg(4, f))[0]), (2, 3, 20, 26)),
    "cropped": lambda g, f: (physics.CroppedOperator(build_operators(g, 20, 26, cfg(4, f))[0], 1, 2, 15, 21),
                             (2, 3, 20, 26)),
    "stacked": lambda g, f: (SVBlurOperator.stacked([compute_eigen_decomposition(g, 4, 20, 26),
                                                     compute_eigen_decomposition(g.flip(0), 3, 20, 26)], f),
                             (4, 3, 20, 26)),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(ADJOINT_OPERATORS))
def test_adjoint_identity_on_asymmetric_psfs(name, form):
    op, shape = ADJOINT_OPERATORS[name](asymmetric_grid(), form)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(op(x).shape, generator=g, dtype=torch.float64)
    lhs, rhs = float((op(x) * y).sum()), float((x * op.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs), (name, form, lhs, rhs)


@pytest.mark.parametrize("mode, channels", [("defocus", 1), ("motion", 1), ("lens", 3)])
def test_auto_rank_is_the_fewest_eigenpsfs_for_the_share(mode, channels):
    """n_eigen_psfs auto: the decomposition at K reaches 99% of the variance in every channel, at
    K − 1 it does not (checked on compute_eigen_decomposition's own explained variance)."""
    pc = {**config.defaults()["physics"], "blur_mode": mode, "grid_size": 6}
    field = physics.SVBlurSimulator(48, 48, 21, 6, dtype=torch.float64).simulate_field(mode, **pc.get(mode, {}))
    grid = field.node_grid()
    assert (grid.ndim == 5) is (channels == 3)
    K, explained = physics.rank_for_share(grid)
    at = lambda n: physics.compute_eigen_decomposition(grid, n, 48, 48).total_explained_variance  # noqa: E731
    assert 1 < K <= physics.RANK_CAP and at(K) >= physics.RANK_SHARE > at(K - 1)
    assert explained == pytest.approx(at(K), abs=1e-12)
    op, dec = physics.build_eigen_operator(grid, 48, 48, {**pc, "n_eigen_psfs": "auto", "form": "scatter"})
    assert dec.n_components == K


def test_auto_rank_caps_and_needs_one_for_equal_psfs():
    g = torch.rand(5, 5, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    K, _ = physics.rank_for_share(g, cap=7)
    assert K == 7                                   # random PSFs need nearly all 25: the cap holds
    assert physics.rank_for_share(g, share=1.0)[0] == 25
    same = g[:1, :1].expand(5, 5, 9, 9)
    assert physics.rank_for_share(same) == (1, 1.0)  # nothing to explain beyond the mean
