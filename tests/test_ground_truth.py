"""The simulated ground truth is not the reconstruction model: a per-pixel PSF field, blurred by
valid convolution over a real margin, checked against brute force; the EigenPSF model differs
from it even at full rank; and the metrics follow the field's definitions."""

import json
import logging

import numpy as np
import pytest
import scipy.ndimage
import torch

import physics
import utils
from physics import FORMS, GroundTruthBlur, SVBlurSimulator, build_operators, compute_eigen_decomposition
from helpers import cli, FAST, run_dirs

SMALL = {"motion": dict(max_length=4), "correlated": dict(sigma_scale=0.35, mu_scale=0.3),
         "mixed": dict(max_length=4, max_radius=2), "random_iid": dict(max_length=4, max_radius=2, sigma_scale=0.4)}


def brute_force_truth(field, x_ext, form):
    """y[p] = Σ_d h[d] x(p − d), with h the PSF of p (gather) or of the source p − d (scatter),
    one pixel and one offset at a time, every PSF drawn on its own from the field."""
    H, W, r = field.H, field.W, field.k // 2
    cache = {}

    def psf(py, px):
        if (py, px) not in cache:
            cache[py, px] = field.psfs_on_grid(torch.tensor([float(py)]), torch.tensor([float(px)]))[0, 0].numpy()
        return cache[py, px]
    x = x_ext.numpy()
    y = np.zeros((x.shape[0], H, W))
    for py in range(H):
        for px in range(W):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    qy, qx = py - dy, px - dx                       # source, in image coordinates
                    h = psf(py, px) if form == "gather" else psf(qy, qx)
                    y[:, py, px] += h[dy + r, dx + r] * x[:, qy + r, qx + r]
    return y


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["correlated", "mixed", "random_iid"])
def test_per_pixel_truth_matches_brute_force(form, mode):
    field = SVBlurSimulator(24, 24, 5, 3, dtype=torch.float64).simulate_field(mode, seed=2, **SMALL[mode])
    x_ext = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = GroundTruthBlur(field, form)(x_ext[None])[0].numpy()
    np.testing.assert_allclose(y, brute_force_truth(field, x_ext, form), atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_truth_adjoint_identity_and_chunking(form):
    field = SVBlurSimulator(20, 26, 7, 4, dtype=torch.float64).simulate_field("motion", seed=1, max_length=6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 26, 32, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 20, 26, generator=g, dtype=torch.float64)
    op = GroundTruthBlur(field, form)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    one_row = GroundTruthBlur(field, form, max_chunk_bytes=1)
    assert torch.allclose(one_row(x), op(x), atol=1e-13) and torch.allclose(one_row.adjoint(y), op.adjoint(y), atol=1e-13)


def test_light_from_outside_the_field_of_view_reaches_the_border():
    """No boundary rule: a scene dark inside the field of view but bright in its margin still
    lights the border of y (reflect/zeros/circular padding of the dark image could not)."""
    field = SVBlurSimulator(16, 16, 7, 2, dtype=torch.float64).simulate_field("defocus", seed=0, max_radius=3)
    x_ext = torch.ones(1, 1, 22, 22, dtype=torch.float64)
    x_ext[..., 3:19, 3:19] = 0
    for form in FORMS:
        y = GroundTruthBlur(field, form)(x_ext)[0, 0]
        assert y[0].min() > 0.05 and y[8, 8] == 0


def test_every_pixel_has_its_own_psf():
    """The defocus radius is evaluated at each pixel: PSFs between nodes are not a blend of the
    node PSFs (which bilinear interpolation would give)."""
    field = SVBlurSimulator(64, 64, 15, 4, dtype=torch.float64).simulate_field("defocus", seed=0, max_radius=7)
    ys, xs = field.node_coords()
    between = field.psfs_on_grid(torch.tensor([ys[0].item()]), torch.tensor([(xs[2] + xs[3]).item() / 2]))[0, 0]
    nodes = field.psfs_on_grid(ys[:1], xs[2:4])[0]
    assert (between - nodes.mean(0)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["motion", "defocus"])
def test_full_rank_model_still_differs_from_the_truth(mode):
    pc = dict(blur_mode=mode, kernel_size=21, grid_size=8, n_eigen_psfs="all", form=physics.resolve_form({"blur_mode": mode}),
              boundary="reflect", interpolation="bilinear")
    field, truth = physics.create_ground_truth(64, 64, pc, seed=0, dtype=torch.float64)
    x_ext = utils.to_tensor(utils.load_scene("sample", 64, 10)).double()
    x = truth.crop(x_ext)
    errors = {}
    for K in ("all", 1):
        eig, _, _ = build_operators(field.node_grid(), 64, 64, {**pc, "n_eigen_psfs": K})
        errors[K] = physics.operator_relative_error(eig, truth, x, x_ext)
    assert 1e-4 < errors["all"] < errors[1], errors


def test_k_capped_at_rank_plus_one(caplog):
    grid = SVBlurSimulator(32, 32, 3, 4, dtype=torch.float64).simulate_sv_kernel_grid("correlated", seed=0,
                                                                                     sigma_scale=0.2, mu_scale=0.1)
    with caplog.at_level(logging.INFO, logger="physics"):
        dec = compute_eigen_decomposition(grid, 11, 32, 32)       # 16 PSFs of 3x3: 9 components at most
    assert dec.n_components == 10 and "using K=10" in caplog.text
    eig, grid_op, _ = build_operators(grid, 32, 32, dict(blur_mode="correlated", n_eigen_psfs="all"))
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    assert physics.operator_relative_error(eig, grid_op, x) < 1e-12
    iid = SVBlurSimulator(256, 256, 21, 64).simulate_sv_kernel_grid("random_iid", seed=0)
    assert compute_eigen_decomposition(iid, 64 * 64, 32, 32).n_components == 21 * 21 + 1


def test_explained_variance_zero_at_k1_and_warns(caplog):
    grid = SVBlurSimulator(32, 32, 7, 4, dtype=torch.float64).simulate_sv_kernel_grid("motion", seed=0, max_length=6)
    with caplog.at_level(logging.WARNING, logger="physics"):
        dec = compute_eigen_decomposition(grid, 1, 32, 32)
    assert dec.total_explained_variance == 0.0 and "explains only 0.0%" in caplog.text
    same = grid[:1, :1].expand(4, 4, 7, 7).contiguous()
    assert compute_eigen_decomposition(same, 1, 32, 32).total_explained_variance == 1.0


def test_form_auto_resolves_by_physics():
    assert physics.resolve_form({"blur_mode": "motion", "form": "auto"}) == "gather"
    assert physics.resolve_form({"blur_mode": "motion", "form": "auto"}, measured=True) == "scatter"
    for mode in ("defocus", "correlated", "mixed", "random_iid"):
        assert physics.resolve_form({"blur_mode": mode, "form": "auto"}) == "scatter"
    assert physics.resolve_form({"blur_mode": "defocus", "form": "gather"}) == "gather"


def wang_ssim(a, b):
    """SSIM of Wang et al. 2004 written out: Gaussian window σ=1.5 (truncated at 3.5σ), population
    (co)variances, C1=(0.01)², C2=(0.03)², the mean over the valid interior and over channels."""
    vals = []
    for c in range(a.shape[-1]):
        x, y = a[..., c], b[..., c]
        f = lambda z: scipy.ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))
        vals.append(s[5:-5, 5:-5].mean())
    return float(np.mean(vals))


def test_ssim_is_wang_2004():
    rng = np.random.default_rng(0)
    a = utils.center_crop_resize(utils.read_image("sample"), 48)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    assert abs(utils.ssim(a, b) - wang_ssim(a, b)) < 1e-6
    from skimage.metrics import structural_similarity
    assert abs(structural_similarity(a, b, data_range=1.0, channel_axis=-1) - wang_ssim(a, b)) > 1e-3


@pytest.mark.slow
def test_measurement_independent_of_reconstruction_choices(tmp_path, capsys, monkeypatch, caplog):
    base = ["--model_id", "analytic", *FAST, "--num_inference_steps", "1", "--no_intermediates"]
    runs = {"default": [], "boundary": ["--set", "physics.boundary=zeros"], "K": ["--n_eigen_psfs", "all"],
            "seed": ["--seed", "1"]}
    out = {}
    for name, extra in runs.items():
        r = cli(base + extra + ["--save_dir", str(tmp_path / name)], capsys, monkeypatch, caplog)
        assert r.returncode == 0, r.stderr[-2000:]
        run = tmp_path / name / run_dirs(tmp_path / name)[0]
        out[name] = (np.load(run / "measurement.npy"), np.load(run / "clean.npy"),
                     json.loads((run / "metrics.json").read_text()))
    y0, clean0, m0 = out["default"]
    assert y0.dtype == np.float32 and y0.shape == clean0.shape == (32, 32, 3)
    assert np.array_equal(out["boundary"][0], y0) and np.array_equal(out["K"][0], y0)
    assert not np.array_equal(out["seed"][0], y0)             # the check can fail
    assert out["K"][2]["operator_relative_error"] > 1e-4       # full rank is not the truth
    assert "Wang" in m0["ssim_definition"] and m0["form"] == "gather"
