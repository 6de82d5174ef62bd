"""Colour PSF grids (Gy, Gx, C, k, k): each channel blurred by its own PSFs, checked against an
independent per-channel brute force, the mono operator, and dense adjoints."""

import numpy as np
import pytest
import torch

import physics
from helpers import brute_force_matrix


def colour_grid(H=11, W=13, k=5, G=3):
    """Three different grids stacked on axis 2: channel c is its own random_iid draw."""
    sim = physics.SVBlurSimulator(H, W, k, G, dtype=torch.float64)
    grids = [sim.simulate_sv_kernel_grid("random_iid", seed=s, max_length=4, max_radius=2, sigma_scale=0.4)
             for s in (4, 5, 6)]
    return torch.stack(grids, 2)


def pc(K, form, boundary="reflect"):
    return dict(blur_mode="motion", n_eigen_psfs=K, form=form, boundary=boundary, interpolation="bilinear")


@pytest.mark.parametrize("form", physics.FORMS)
@pytest.mark.parametrize("boundary", physics.BOUNDARIES)
def test_colour_forward_and_adjoint_against_per_channel_brute_force(form, boundary):
    H, W = 11, 13
    grid = colour_grid(H, W)
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eig, grid_op, dec = physics.build_operators(grid, H, W, pc(9, form, boundary))   # K = G²: full rank
    assert dec.colour and eig.colour and grid_op.channels == 3
    for c in range(3):
        M = brute_force_matrix(grid[:, :, c], H, W, form, boundary)
        ref, ref_t = M @ x[0, c].numpy().ravel(), M.T @ y[0, c].numpy().ravel()
        for op in (eig, grid_op):
            np.testing.assert_allclose(op(x)[0, c].numpy().ravel(), ref, atol=1e-12)
            np.testing.assert_allclose(op.adjoint(y)[0, c].numpy().ravel(), ref_t, atol=1e-12)


def test_equal_channels_give_exactly_the_mono_result():
    H, W = 20, 22
    mono = colour_grid(H, W)[:, :, 0].contiguous()
    same = mono[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for form in physics.FORMS:
        a = physics.build_operators(mono, H, W, pc(4, form))
        b = physics.build_operators(same, H, W, pc(4, form))
        assert not b[2].colour
        for op_a, op_b in zip(a[:2], b[:2]):
            assert torch.equal(op_a(x), op_b(x)) and torch.equal(op_a.adjoint(x), op_b.adjoint(x))


def test_colour_truncated_operator_is_exactly_adjoint_and_per_channel():
    """At K < G² the colour operator is, channel by channel, the mono operator of that channel's
    grid (one decomposition per channel), and its adjoint identity holds to float64 precision."""
    H, W = 24, 20
    grid = colour_grid(H, W, k=5, G=3)
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for form in physics.FORMS:
        op, _ = physics.build_eigen_operator(grid, H, W, pc(3, form))
        lhs, rhs = float((op(x) * y).sum()), float((x * op.adjoint(y)).sum())
        assert abs(lhs - rhs) < 1e-12 * abs(lhs)
        for c in range(3):
            mono, _ = physics.build_eigen_operator(grid[:, :, c], H, W, pc(3, form))
            torch.testing.assert_close(op(x)[:, c], mono(x[:, c:c + 1])[:, 0], rtol=1e-12, atol=1e-13)


def test_colour_stacked_operator_is_each_images_own():
    H = W = 16
    decomps = [physics.compute_eigen_decomposition(colour_grid(H, W, G=3) ** p, 4, H, W) for p in (1, 2)]
    both = physics.SVBlurOperator.stacked(decomps)
    x = torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    Ax, ATx = both(x), both.adjoint(x)
    for b, d in enumerate(decomps):
        op = physics.SVBlurOperator(d)
        torch.testing.assert_close(Ax[2 * b:2 * b + 2], op(x[2 * b:2 * b + 2]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ATx[2 * b:2 * b + 2], op.adjoint(x[2 * b:2 * b + 2]), rtol=1e-12, atol=1e-12)


def test_colour_grid_refuses_other_channel_counts_and_layouts():
    H, W = 11, 13
    grid = colour_grid(H, W)
    eig, grid_op, _ = physics.build_operators(grid, H, W, pc(3, "gather"))
    for op in (eig, grid_op):
        with pytest.raises(ValueError, match="3 colour channels; the image has 1"):
            op(torch.rand(1, 1, H, W, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(Gy, Gx, C, k, k\)"):
        physics.validate_kernel_grid(grid.permute(0, 1, 3, 4, 2))


def test_explained_variance_is_per_channel():
    H = W = 16
    grid = colour_grid(H, W)
    grid[:, :, 1] = grid[1, 1, 1]            # green: one PSF everywhere, nothing to explain
    dec = physics.compute_eigen_decomposition(grid, 2, H, W)
    ev = dec.explained_variance_per_channel
    assert len(ev) == 3 and ev[1] == 1.0 and 0 < ev[0] < 1 and 0 < ev[2] < 1
    assert dec.total_explained_variance == min(ev)


def test_data_step_preconditioner_sees_each_channels_psf():
    """DiffPIR's region preconditioner probes the operator: a colour operator gives each channel its
    own gains, those of that channel's mono operator; a mono operator one set for all channels."""
    import dps
    H = W = 16
    grid = colour_grid(H, W)
    op, _ = physics.build_eigen_operator(grid, H, W, pc(4, "scatter"))
    gains, _ = dps.region_psf_gains(op, (1, 3, H, W), "cpu", torch.float64)
    assert gains.shape[2] == 3
    for c in range(3):
        mono, _ = physics.build_eigen_operator(grid[:, :, c], H, W, pc(4, "scatter"))
        g_mono, _ = dps.region_psf_gains(mono, (1, 3, H, W), "cpu", torch.float64)
        assert g_mono.shape[2] == 1
        torch.testing.assert_close(gains[:, :, c], g_mono[:, :, 0], rtol=1e-10, atol=1e-12)


# --- the command line -------------------------------------------------------------------------

import json  # noqa: E402

from PIL import Image  # noqa: E402

from helpers import cli, only_run, sigterm_then_resume  # noqa: E402

FAST = ["--model_id", "analytic", "--sampler", "diffpir", "--num_inference_steps", "6", "--num_samples", "1",
        "--no_intermediates"]


def blurred_with(grid, tmp_path, H=40, W=48, gray=False):
    """A smooth RGB scene blurred by the colour grid's full-rank operator, as an 8-bit PNG."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, H + 4, W + 4, generator=g, dtype=torch.float64), 5, 1)
    y = physics.GridSVBlurOperator(grid, H, W, "scatter")(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    if gray:
        y = y @ np.array(physics.LUMINANCE_WEIGHTS)
    path = tmp_path / "y.png"
    Image.fromarray(np.round(y * 255).astype(np.uint8)).save(path)
    return str(path)


def test_cli_restores_real_data_with_a_colour_grid(tmp_path, capsys, monkeypatch, caplog):
    grid = colour_grid(40, 48, k=7, G=3)
    np.savez(tmp_path / "g.npz", psfs=grid.numpy())
    args = FAST + ["--blurred", blurred_with(grid, tmp_path), "--psf_grid", str(tmp_path / "g.npz"),
                   "--sigma_noise", "0.01", "--save_dir", str(tmp_path / "out"), "--save_psf_grid", str(tmp_path / "s.npz")]
    r = cli(args, capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    run = only_run(tmp_path / "out")
    m = json.loads((run / "metrics.json").read_text())
    assert m["psf_channels"] == 3 and len(m["explained_variance_per_channel"]) == 3
    assert np.allclose(np.load(run / "psf_grid.npz")["psfs"], grid.numpy(), atol=1e-6)
    assert np.load(tmp_path / "s.npz")["psfs"].shape == (3, 3, 3, 7, 7)
    assert all((run / f"images/eigenpsfs_{c}.png").is_file() for c in "RGB")
    assert (run / "images/psf_grid.png").is_file() and m["pca_truncation_error_on_restoration"] < 0.05


def test_cli_gray_image_with_a_colour_grid_uses_its_luminance_psfs(tmp_path, capsys, monkeypatch, caplog):
    grid = colour_grid(40, 48, k=7, G=3)
    np.savez(tmp_path / "g.npz", psfs=grid.numpy())
    args = FAST + ["--blurred", blurred_with(grid, tmp_path, gray=True), "--psf_grid", str(tmp_path / "g.npz"),
                   "--sigma_noise", "0.01", "--save_dir", str(tmp_path / "out")]
    r = cli(args, capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "luminance-weighted PSFs" in r.stderr
    saved = np.load(only_run(tmp_path / "out") / "psf_grid.npz")["psfs"]
    assert np.allclose(saved, physics.luminance_grid(grid).numpy(), atol=1e-6)


@pytest.mark.parametrize("shape,message", [((3, 3, 7, 7, 3), "np.moveaxis"), ((3, 3, 2, 7, 7), "has 2 colour channels")])
def test_cli_refuses_other_layouts_and_channel_counts(tmp_path, capsys, monkeypatch, caplog, shape, message):
    grid = colour_grid(40, 48, k=7, G=3)
    np.save(tmp_path / "g.npy", np.random.default_rng(0).random(shape))  # channels differ
    r = cli(FAST + ["--blurred", blurred_with(grid, tmp_path), "--psf_grid", str(tmp_path / "g.npy"),
                    "--sigma_noise", "0.01", "--save_dir", str(tmp_path / "out")], capsys, monkeypatch, caplog)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


LENS_RUN = ["--blur_mode", "lens", "--img_size", "32", "--grid_size", "2", "--n_eigen_psfs", "3",
            "--sigma_noise", "0.01", "--model_id", "analytic", "--num_samples", "1"]


@pytest.mark.slow
def test_cli_lens_simulation_resumes_bit_identically(tmp_path, capsys, monkeypatch, caplog):
    args = LENS_RUN + ["--sampler", "diffpir", "--num_inference_steps", "30"]
    run, full = sigterm_then_resume(args, 30, tmp_path, capsys, monkeypatch, caplog)
    assert np.array_equal(np.load(run / "restored.npy"), np.load(full / "restored.npy"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["psf_channels"] == 3 and len(m["operator_relative_error_per_channel"]) == 3
    assert np.load(run / "psf_grid.npz")["psfs"].shape == (2, 2, 3, 21, 21)


@pytest.mark.slow
def test_colour_grid_restores_a_lens_simulation_better_than_the_channel_mean_grid():
    """A photo blurred by the lens's simulated truth (fine-grid exact PSFs, not the reconstruction
    model), σ = 0.01: both classical baselines restore it better with the colour grid than with the
    channel-mean grid, and the colour operator is nearer the truth in every channel."""
    from skimage import data

    import baselines
    import config
    import utils
    size, pcfg = 64, {**config.defaults()["physics"], "blur_mode": "lens", "form": "scatter", "grid_size": 4}
    field, truth = physics.create_ground_truth(size, size, pcfg, dtype=torch.float64)
    r = pcfg["kernel_size"] // 2
    x_ext = utils.to_tensor(utils.center_crop_resize(utils.to_float_image(data.astronaut(), "a"), size, margin=r),
                            "cpu").double()
    x = truth.crop(x_ext)
    y = truth(x_ext) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    grid = field.node_grid()
    colour = physics.build_eigen_operator(grid, size, size, pcfg)[0]
    mean = physics.build_eigen_operator(grid.mean(2), size, size, pcfg)[0]
    err_c, err_m = (physics.operator_errors(op, truth, x, x_ext)[1] for op in (colour, mean))
    assert all(c < m for c, m in zip(err_c, err_m)), (err_c, err_m)
    psnr = lambda a: float(-10 * torch.log10(((a - x) ** 2).mean()))  # noqa: E731
    res_c, res_m = (baselines.restore_baselines(op, y, 0.01) for op in (colour, mean))
    for name in res_c:
        assert psnr(res_c[name][0]) > psnr(res_m[name][0]) + 0.5, name


@pytest.mark.slow
def test_cli_lens_folder_in_batches_with_dps_and_tiles(tmp_path, capsys, monkeypatch, caplog):
    """A simulated folder, two images per sampler call (their colour operators stacked), DPS with
    tiled denoising: both images restored, each folder with its colour grid."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        img = (np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i}.png")
    r = cli(LENS_RUN + ["--image_dir", str(folder), "--batch_size", "2", "--sampler", "dps", "--num_inference_steps",
                        "4", "--tile", "16", "--tile_overlap", "4", "--save_dir", str(tmp_path / "out")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((tmp_path / "out").glob("*/*/metrics.json"))
    assert len(runs) == 2
    for m in runs:
        d = json.loads(m.read_text())
        assert d["status"] == "complete" and d["psf_channels"] == 3
