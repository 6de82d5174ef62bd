"""Tiled denoising: blending weights, exactness with one tile, the tile-by-tile DPS gradient
against autograd through the whole tiled ε, resume, seams, and the CLI."""

import json

import numpy as np
import pytest
import torch

import dps
import physics
import priors
import tiling
from helpers import cli, full_and_resumed, run_dirs, save_tiny_model, tiny_scheduler, tiny_unet


def system(H, W, seed=0):
    pc = dict(blur_mode="motion", kernel_size=7, grid_size=3, n_eigen_psfs=4, form="gather", boundary="reflect",
              motion=dict(max_length=6))
    return physics.create_sv_blur_system(H, W, pc, "cpu", seed=seed)[0]


def scatter_weights(H, W, plan, step):
    padding, corners, (th, tw), weights = tiling.layout(H, W, plan, step, "cpu", torch.float64)
    left, right, top, bottom = padding
    total = torch.zeros(H + top + bottom, W + left + right, dtype=torch.float64)
    for (y0, x0), w in zip(corners, weights):
        total[y0:y0 + th, x0:x0 + tw] += w
    return total, weights


@pytest.mark.parametrize("H, W, tile, overlap", [(100, 70, 32, 8), (64, 200, 16, 0), (48, 48, 16, 12), (20, 90, 32, 16)])
def test_blending_weights_sum_to_one_everywhere(H, W, tile, overlap):
    plan = tiling.TilePlan(tile, overlap)
    for step in range(5):
        total, weights = scatter_weights(H, W, plan, step)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12)
        assert bool((weights > 0).all())


def test_offsets_move_the_grid_between_steps_and_repeat_across_runs():
    plan = tiling.TilePlan(32, 8)

    def grid(step):   # tile corners in image coordinates
        (left, _, top, _), corners = tiling.layout(100, 100, plan, step, "cpu")[:2]
        return tuple((y0 - top, x0 - left) for y0, x0 in corners)

    grids = [grid(s) for s in range(6)]
    assert len(set(grids)) == 6
    assert grids == [grid(s) for s in range(6)]


def test_one_tile_covering_the_image_is_the_untiled_eps_exactly():
    unet = tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    call = lambda z: unet(z, torch.tensor(300)).sample  # noqa: E731
    with torch.no_grad():
        assert torch.equal(tiling.tiled_eps(call, x, tiling.TilePlan(16, 4), 0), call(x))
        assert torch.equal(tiling.tiled_eps(call, x, tiling.TilePlan(32, 4), 3), call(x))


def test_one_tile_covering_the_image_runs_the_untiled_pipeline_exactly():
    op = system(16, 16)
    pipe = dps.EigenPSFDPSPipeline(tiny_unet(), tiny_scheduler(), op)
    y = torch.rand(1, 3, 16, 16)
    for method in ("dps", "diffpir"):
        kw = dict(num_inference_steps=4, method=method, sigma_y=0.05)
        a, _ = pipe(y, generator=torch.Generator().manual_seed(0), **kw)
        b, _ = pipe(y, generator=torch.Generator().manual_seed(0), tiles=tiling.TilePlan(16, 4), **kw)
        assert torch.equal(a, b)


def test_tiled_vjp_equals_autograd_through_the_whole_tiled_eps():
    unet = tiny_unet().double()
    call = lambda z: unet(z, torch.tensor(500)).sample  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 56, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 40, 56, generator=g, dtype=torch.float64)
    plan = tiling.TilePlan(16, 6, batch=3)
    x_leaf = x.clone().requires_grad_(True)
    (tiling.tiled_eps(call, x_leaf, plan, 7) * v).sum().backward()
    got = tiling.tiled_eps_vjp(call, x, plan, 7, v)
    assert torch.allclose(got, x_leaf.grad, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(tiling.tiled_eps_vjp(call, x, plan, 8, v), got)   # another step, another grid


def test_tiled_dps_step_equals_autograd_through_the_tiled_eps():
    """The same function two ways: dps_step's one backward through the tiled ε (eps_vjp unset),
    and the tile-by-tile chain rule. Same generator, same x_{t−1} to float precision."""
    op = system(40, 48, seed=1)
    unet, sched = tiny_unet(), tiny_scheduler()
    sched.set_timesteps(50)
    plan = tiling.TilePlan(16, 4, batch=2)
    call = lambda z: unet(z, torch.tensor(400)).sample  # noqa: E731
    x_t, y = torch.randn(2, 3, 40, 48), torch.rand(2, 3, 40, 48)
    opt = dps.sampler_options("dps", {"step_size": 2.0})
    outs = []
    for vjp in (None, lambda x, i, v: tiling.tiled_eps_vjp(call, x, plan, i, v)):
        ctx = dps.StepContext(lambda x, i: tiling.tiled_eps(call, x, plan, i), sched, op, y,
                              torch.Generator().manual_seed(3), opt, 0.0, eps_vjp=vjp)
        outs.append(dps.dps_step(ctx, 5, torch.tensor(400), x_t))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    plain = dps.StepContext(lambda x, i: call(x), sched, op, y, torch.Generator().manual_seed(3), opt, 0.0)
    assert not torch.allclose(dps.dps_step(plain, 5, torch.tensor(400), x_t)[0], outs[1][0], atol=1e-3)


@pytest.mark.parametrize("method", ["dps", "diffpir", "daps"])
def test_resume_with_tiles_is_bit_identical(method):
    op = system(48, 40)
    pipe = dps.EigenPSFDPSPipeline(tiny_unet(), tiny_scheduler(), op)
    full, resumed = full_and_resumed(pipe, torch.rand(1, 3, 48, 40), num_inference_steps=10, method=method,
                                     sigma_y=0.05, tiles=tiling.TilePlan(16, 8, batch=3), stop_after=4)
    assert torch.equal(full, resumed)


def border_ratio(img, H, W, plan, step):
    """Mean |neighbour difference| across the step's tile edges over that away from them."""
    padding, corners, (th, tw), _ = tiling.layout(H, W, plan, step, "cpu")
    left, _, top, _ = padding
    cols = sorted({c for _, x0 in corners for c in (x0 - left, x0 - left + tw) if 0 < c < W})
    rows = sorted({r for y0, _ in corners for r in (y0 - top, y0 - top + th) if 0 < r < H})
    dx, dy = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2)), np.abs(np.diff(img, axis=0)).mean(axis=(1, 2))
    at = np.concatenate([dx[[c - 1 for c in cols]], dy[[r - 1 for r in rows]]])
    away = np.concatenate([np.delete(dx, [c - 1 for c in cols]), np.delete(dy, [r - 1 for r in rows])])
    return at.mean() / away.mean()


def seam_problem(H=96, W=96):
    """A smooth scene under motion blur: any step in the output at a tile edge would show."""
    op = system(H, W)
    clean = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0)),
                                            size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        y = op(clean) + 0.02 * torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    return op, y


@pytest.mark.parametrize("prior", ["tiny UNet", "analytic"])
@pytest.mark.parametrize("method", ["dps", "diffpir"])
def test_no_seams_at_the_tile_borders(method, prior):
    """A 96² restoration with tiles much smaller than the image (16 px for the tiny UNet, 32 for
    the analytic prior, whose FFT denoiser takes each tile as periodic and so marks its edges
    hardest): neighbouring pixels differ across the last step's tile edges by within 10% of
    what they differ elsewhere. Hard tiles on a fixed grid fail this (2.6× for DPS, 1.7× for
    DiffPIR with the analytic prior; bench/bench_tiling.py prints the table)."""
    op, y = seam_problem()
    unet, sched = (tiny_unet(), tiny_scheduler()) if prior == "tiny UNet" else priors.load_model("analytic")
    plan = tiling.TilePlan(16 if prior == "tiny UNet" else 32, 8, batch=16)
    steps = 20
    out, _ = dps.EigenPSFDPSPipeline(unet, sched, op)(y, num_inference_steps=steps, method=method, sigma_y=0.02,
                                                      tiles=plan, generator=torch.Generator().manual_seed(2))
    assert abs(border_ratio(out[0].permute(1, 2, 0).numpy(), 96, 96, plan, steps - 1) - 1) < 0.10


def test_resolve_auto_and_bad_tiles():
    assert tiling.resolve("off", 64, 4, 4096, 4096, 256, 32) is None
    assert tiling.resolve("auto", 64, 4, 512, 512, 256, 32) is None            # within 2× the training size
    assert tiling.resolve("auto", 64, 4, 520, 300, 256, 32) == tiling.TilePlan(256, 64, 4)
    assert tiling.resolve("auto", 64, 4, 4096, 4096, None, 1) is None           # the analytic prior: never
    with pytest.raises(ValueError, match="tile 200 is not a multiple of 32, which the UNet needs; try 192"):
        tiling.resolve(200, 64, 4, 1024, 1024, 256, 32)
    with pytest.raises(ValueError, match="tile_overlap must be smaller than the tile"):
        tiling.resolve(64, 64, 4, 1024, 1024, 256, 32)


def test_cli_tiles_and_says_so(tmp_path, capsys, monkeypatch, caplog):
    model = save_tiny_model(tmp_path / "tiny")
    r = cli(["--model_id", model, "--img_size", "48", "--num_inference_steps", "3", "--tile", "16",
             "--tile_overlap", "4", "--save_dir", str(tmp_path / "out"), "--no_baseline"], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiles of 16" in r.stderr and "estimated peak memory" in r.stderr
    m = json.loads((tmp_path / "out" / run_dirs(tmp_path / "out")[0] / "metrics.json").read_text())
    assert m["tiles"]["tile"] == 16 and m["tiles"]["tiles_per_step"] >= 9
    r = cli(["--model_id", model, "--img_size", "48", "--num_inference_steps", "3", "--tile", "16", "--tile_overlap",
             "4", "--sampler", "diffpir", "--dtype", "bfloat16", "--num_samples", "2", "--save_dir",
             str(tmp_path / "bf16"), "--no_baseline"], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    restored = np.load(tmp_path / "bf16" / run_dirs(tmp_path / "bf16")[0] / "restored.npy")
    assert restored.shape == (48, 48, 3) and np.isfinite(restored).all()
    for tile, why in (("17", "tile 17 is not a multiple of 2, which the UNet needs; try 16"),
                      ("16", "tile_overlap must be smaller than the tile (16), got 64")):
        r = cli(["--model_id", model, "--img_size", "48", "--tile", tile, "--save_dir", str(tmp_path / "bad")],
                capsys, monkeypatch, caplog)
        assert r.returncode == 2 and why in r.stderr and not (tmp_path / "bad").exists()


def test_auto_tiles_a_large_image_with_an_info_line(tmp_path, capsys, monkeypatch, caplog):
    model = save_tiny_model(tmp_path / "tiny", sample_size=16)
    r = cli(["--model_id", model, "--img_size", "40", "--num_inference_steps", "2", "--tile", "auto",
             "--save_dir", str(tmp_path / "out"), "--no_baseline"], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exceeds 2× the model's training size 16" in r.stderr
    unet, _ = priors.load_model("analytic")
    assert tiling.resolve("auto", 64, 4, 4096, 4096, unet.config.sample_size, 1) is None
