"""Real measurements: --blurred with a measured --psf_grid, odd sizes, folder batches."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dps
import priors
import physics
import utils
from helpers import FAST, ROOT, SMALL, cli, only_run, run_cli, run_dirs, run_in_process, save_tiny_model

def png_psnr(a, b):
    a = np.asarray(Image.open(a), dtype=np.float64) / 255
    b = np.asarray(Image.open(b), dtype=np.float64) / 255
    return utils.psnr(a, b)


# DiffPIR at its defaults (λ = 7, ζ = 0.3); both samplers must beat the blurred image
# (measured: DiffPIR 23.55 dB against 22.61 dB blurred).
SAMPLER_ARGS = {"dps": ["--num_inference_steps", "200", "--step_size", "8"], "diffpir": ["--sampler", "diffpir"]}


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["dps", "diffpir"])
def test_round_trip_simulate_save_grid_then_restore_real(tmp_path, sampler, capsys, monkeypatch, caplog):
    """Simulate, export the grid, then restore the saved blurred.png as a real measurement."""
    grid_file = tmp_path / "grid.npz"
    common = ["--model_id", "analytic", "--num_samples", "8", *SAMPLER_ARGS[sampler], "--no_intermediates", *SMALL]
    # The simulation run is only needed for its measurement and grid, so it samples briefly. Its
    # size and blur mode are simulation settings, which a real run refuses.
    r = cli(common + ["--img_size", "64", "--blur_mode", "defocus", "--sigma_noise", "0.05", "--save_psf_grid",
                      str(grid_file), "--save_dir", str(tmp_path / "sim"), "--num_samples", "1",
                      "--num_inference_steps", "5"], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    sim = only_run(tmp_path / "sim")
    z = np.load(grid_file)
    assert z["psfs"].shape == (4, 4, 7, 7) and z["positions"].shape == (4, 4, 2)
    assert np.allclose(np.load(sim / "psf_grid.npz")["psfs"], z["psfs"])  # the run folder has it too
    r = cli(common + ["--blurred", str(sim / "images/blurred.png"), "--psf_grid", str(grid_file),
                      "--sigma_noise", "auto", "--save_dir", str(tmp_path / "real")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    real = only_run(tmp_path / "real")
    clean = sim / "images/clean.png"
    p_restored, p_blurred = png_psnr(clean, real / "images/restored.png"), png_psnr(clean, sim / "images/blurred.png")
    assert p_restored > p_blurred, (p_restored, p_blurred)
    m = json.loads((real / "metrics.json").read_text())
    assert m["sampler"] == sampler and (real / "images/std.png").is_file()
    assert 0 < m["s_per_step_after_warmup"] < m["runtime_s"]  # the steady rate, past the first log_every steps
    if sampler == "diffpir":
        assert 1 <= m["cg_iterations_mean"] <= m["diffpir.cg_max_iter"]
        steps = m["num_inference_steps"]
        assert sum(m["cg_stop_rules"].values()) == steps * 8 and len(m["cg_iterations_per_step"]) == steps
        assert m["cg_stop_rule_per_step"][-1] == "tolerance" and m["cg_iterations_per_step"][-1] >= 1
    assert "psnr_restored" not in m and "no clean image" in m["note"]
    assert 0 < m["data_residual_relative"] < 0.5 and m["pca_truncation_error_on_restoration"] < 0.05
    assert 0.03 < m["sigma_noise_estimated"] < 0.08  # simulated with sigma 0.05
    assert not (real / "images/clean.png").exists()


def write_grid(path, psfs, positions=None):
    if str(path).endswith(".npy"):
        np.save(path, psfs)
    else:
        np.savez(path, psfs=psfs, **({"positions": positions} if positions is not None else {}))
    return str(path)


@pytest.fixture
def blurred_png(tmp_path):
    path = tmp_path / "y.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def good_psfs(G=3, k=5):
    p = np.zeros((G, G, k, k))
    p[..., k // 2, k // 2] = 1
    p[..., k // 2, k // 2 + 1] = 0.5
    return p


BAD_GRIDS = {
    "wrong shape": (lambda: good_psfs()[0], "shape \\(Gy, Gx, k, k\\), or \\(Gy, Gx, C, k, k\\)"),
    "nan": (lambda: np.where(np.arange(5) == 0, np.nan, good_psfs()), "NaN"),
    "all zeros": (lambda: good_psfs() * np.array([0, 1, 1])[:, None, None, None], "no mass"),
    "negative": (lambda: good_psfs() - 0.2, "negative"),
    "kernel larger than image": (lambda: good_psfs(3, 61), "larger than the image"),
    "even kernel": (lambda: good_psfs(3, 4), "odd"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_psf_files(case, tmp_path, blurred_png, capsys, monkeypatch):
    """In-process (main.main, the code the CLI runs); test_main's matrix covers the process itself."""
    make, pattern = BAD_GRIDS[case]
    grid = write_grid(tmp_path / "g.npy", make())
    code, err = run_in_process(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid", grid,
                                "--num_inference_steps", "2", "--save_dir", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 2, err[-1500:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and __import__("re").search(pattern, lines[0]), err[-1500:]
    assert "Traceback" not in err and run_dirs(tmp_path / "out") == []


def test_positions_must_be_rectilinear_and_used(tmp_path, blurred_png, capsys, monkeypatch):
    pos = np.stack(np.meshgrid([5.0, 20.0, 35.0], [5.0, 25.0, 45.0], indexing="ij"), -1)
    bad = pos.copy()
    bad[1, 1, 0] += 3
    code, err = run_in_process(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid",
                                write_grid(tmp_path / "b.npz", good_psfs(), bad), "--save_dir", str(tmp_path / "o")],
                               capsys, monkeypatch)
    assert code == 2 and "rectilinear" in err
    psfs, coords, sums = utils.load_psf_grid(write_grid(tmp_path / "g.npz", good_psfs() * 3, pos))
    assert np.allclose(coords[0], [5, 20, 35]) and np.allclose(coords[1], [5, 25, 45])
    assert np.allclose(psfs.sum((-2, -1)), 1) and np.allclose(sums, 4.5)


@pytest.mark.parametrize("model", ["tiny", "analytic"])
def test_odd_size_measurement_restores_to_same_size(tmp_path, blurred_png, model, capsys, monkeypatch, caplog):
    grid = write_grid(tmp_path / "g.npy", good_psfs())
    model_id = save_tiny_model(tmp_path / "m") if model == "tiny" else "analytic"
    Image.open(blurred_png).crop((0, 0, 47, 37)).save(tmp_path / "odd.png")  # 37 x 47, odd on both sides
    r = cli(["--model_id", model_id, "--blurred", str(tmp_path / "odd.png"), "--psf_grid", grid,
             "--num_inference_steps", "4", "--set", "physics.n_eigen_psfs=all", "--save_dir", str(tmp_path / "out")],
            capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    d = only_run(tmp_path / "out")
    for name in ("restored.png", "blurred.png"):
        assert Image.open(d / "images" / name).size == (47, 37)
    if model == "tiny":
        assert "sampling on 38x48 and cropping back" in r.stderr


def test_cropped_operator_adjoint():
    grid = physics.SVBlurSimulator(24, 32, 5, 3, dtype=torch.float64).simulate_sv_kernel_grid("motion", seed=0, max_length=4)
    op, _, _ = physics.build_operators(grid, 24, 32, dict(blur_mode="motion", n_eigen_psfs=4))
    c = physics.CroppedOperator(op, 2, 3, 19, 27)
    x, y = torch.randn(2, 3, 24, 32, dtype=torch.float64), torch.randn(2, 3, 19, 27, dtype=torch.float64)
    assert c(x).shape == y.shape
    lhs, rhs = (c(x) * y).sum(), (x * c.adjoint(y)).sum()
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_folder_batch_skips_corrupt_and_reports_it(tmp_path, capsys, monkeypatch, caplog):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.jpg"):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(src / name)
    (src / "c_corrupt.png").write_bytes(b"not an image at all")
    r = cli(["--model_id", "analytic", "--image_dir", str(src), "--img_size", "32", *SMALL,
             "--num_inference_steps", "3", "--save_dir", str(tmp_path / "out")], capsys, monkeypatch, caplog)
    assert r.returncode == 4 and "1 of 3 images failed" in r.stderr, r.stderr[-2000:]
    (batch,) = [d for d in os.listdir(tmp_path / "out") if d.startswith("batch_")]
    rows = list(csv.DictReader(open(tmp_path / "out" / batch / "summary.csv")))
    by_file = {row["file"]: row for row in rows}
    assert set(by_file) == {"a.png", "b.jpg", "c_corrupt.png"}
    assert by_file["c_corrupt.png"]["status"] == "error" and "cannot decode" in by_file["c_corrupt.png"]["error"]
    for f in ("a.png", "b.jpg"):
        assert by_file[f]["status"] == "complete"
        assert (tmp_path / "out" / batch / by_file[f]["folder"] / "images" / "restored.png").is_file()
        assert float(by_file[f]["psnr_blurred"]) > 0


def test_blurred_dir_batch(tmp_path, blurred_png, capsys, monkeypatch, caplog):
    src = tmp_path / "ys"
    src.mkdir()
    Image.open(blurred_png).save(src / "one.png")
    Image.open(blurred_png).crop((0, 0, 45, 33)).save(src / "two.tif")
    grid = write_grid(tmp_path / "g.npy", good_psfs())
    r = cli(["--model_id", "analytic", "--blurred_dir", str(src), "--psf_grid", grid, "--num_inference_steps", "3",
             "--n_eigen_psfs", "4", "--save_dir", str(tmp_path / "out")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    (batch,) = os.listdir(tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / batch / "summary.csv")))
    assert [row["status"] for row in rows] == ["complete", "complete"]
    assert all(float(row["data_residual_relative"]) > 0 for row in rows)
    # each image's restoration beside its baselines: in summary.csv and in the log
    assert all(float(row["data_residual_richardson_lucy"]) > 0 and float(row["data_residual_tikhonov"]) > 0
               and float(row["residual_over_noise"]) > 0 for row in rows)
    for name in ("one.png", "two.tif"):
        assert re.search(name + r": data residual ‖y − A\(x\)‖/‖y‖: restored [\d.]+; Richardson-Lucy [\d.]+; Tikhonov",
                         r.stderr), r.stderr[-2000:]


def test_corrupt_npz_is_a_one_line_error(tmp_path, blurred_png, capsys, monkeypatch):
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
    code, err = run_in_process(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid",
                                str(tmp_path / "g.npz"), "--save_dir", str(tmp_path / "out")], capsys, monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "not a valid .npz" in lines[0], err[-1500:]
    assert "Traceback" not in err and run_dirs(tmp_path / "out") == []


@pytest.mark.parametrize("rows,cols,swapped", [([500.0, 2000.0, 3500.0], [5.0, 25.0, 45.0], False),
                                               ([45.0, 50.0, 55.0], [5.0, 20.0, 35.0], True)])
def test_positions_outside_the_image_are_refused(tmp_path, blurred_png, rows, cols, swapped, capsys, monkeypatch):
    pos = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1)          # blurred_png is 40 rows x 50 cols
    code, err = run_in_process(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid",
                                write_grid(tmp_path / "g.npz", good_psfs(), pos), "--save_dir", str(tmp_path / "o")],
                               capsys, monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "outside the 40x50 image" in lines[0], err[-1500:]
    assert ("swapped" in lines[0]) and (("would fit with x and y swapped" in lines[0]) == swapped)
    assert run_dirs(tmp_path / "o") == []


@pytest.mark.parametrize("scale, outcome", [(2.0, "warn"), (0.4, "refuse"), (1.0, "quiet")])
def test_a_grid_that_does_not_span_the_image_is_named(tmp_path, blurred_png, scale, outcome, capsys, monkeypatch,
                                                      caplog):
    """The 40x50 measurement with a 3x3 grid laid out for an image `scale` times its size: twice
    (8 of its 9 nodes outside) is a warning, 0.4 times (the grid covers 16%: the top-left corner) is
    refused, and the grid made for it passes without a word."""
    pos = np.stack(np.meshgrid(np.array([40 / 6, 20, 40 * 5 / 6]) * scale - 0.5,
                               np.array([50 / 6, 25, 50 * 5 / 6]) * scale - 0.5, indexing="ij"), -1)
    r = cli(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid", write_grid(tmp_path / "g.npz", good_psfs(),
             pos), "--num_inference_steps", "2", "--no_figures", "--no_baseline", "--save_dir", str(tmp_path / "o")],
            capsys, monkeypatch, caplog)
    if outcome == "refuse":
        assert r.returncode == 2 and "the PSF grid covers only 16% of the image" in r.stderr
        assert run_dirs(tmp_path / "o") == []
        return
    assert r.returncode == 0, r.stderr[-2000:]
    if outcome == "warn":
        assert re.search(r"the PSF grid covers 100% of the image and 89% of its nodes lie outside it", r.stderr)
    else:
        assert "the PSF grid covers" not in r.stderr, r.stderr[-2000:]


def test_one_psf_applies_to_the_whole_image(tmp_path, blurred_png, capsys, monkeypatch, caplog):
    r = cli(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid",
             write_grid(tmp_path / "one.npz", good_psfs(1), np.array([[[10.0, 10.0]]])), "--num_inference_steps", "2",
             "--no_figures", "--no_baseline", "--save_dir", str(tmp_path / "o")], capsys, monkeypatch, caplog)
    assert r.returncode == 0 and "the PSF grid covers" not in r.stderr, r.stderr[-2000:]


def test_a_full_copy_of_config_yaml_chooses_nothing(tmp_path, blurred_png, capsys, monkeypatch, caplog):
    """Every key of a copied config.yaml is present, at its default: no input conflict, no
    'saturation applies to --calibration', and defaults still adapt to the data."""
    import shutil
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.yaml"),
                tmp_path / "mine.yaml")
    r = cli(["--config", str(tmp_path / "mine.yaml"), "--model_id", "analytic", "--blurred", blurred_png, "--psf_grid",
             write_grid(tmp_path / "g.npy", good_psfs()), "--num_inference_steps", "2", "--no_figures", "--no_baseline",
             "--save_dir", str(tmp_path / "o")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "real data: sampler diffpir" in r.stderr and "n_eigen_psfs auto: K=" in r.stderr


def readme_real_data_command():
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = re.search(r"## Real data: your blurred image and your measured PSFs\s*```bash\n(.*?)\n", text).group(1)
    assert block.startswith("python main.py --blurred photo.tif --psf_grid psfs.npz")
    return block.split()[2:]


@pytest.mark.slow
def test_readme_real_data_command_restores_the_exact_posterior_mean(tmp_path, capsys, monkeypatch, caplog):
    """The README's real-data command on a measurement of a photo the analytic prior was not fitted
    to (the astronaut), blurred by a per-pixel defocus field with real margins, noise 0.03, saved as
    a 16-bit TIFF, with a measured-style grid (node PSFs and their positions). With the analytic
    prior and no sampler setting its result is that prior's exact posterior mean (one CG solve) at
    the prior's scale and noise level the evidence chose, both recorded in metrics.json with the
    solve's residual, equal to an independent solve of that model to 0.01 dB, and no worse than the
    blurred input minus 0.5 dB (one DPS sample, an old default, scored 5 dB below the blurred input
    on such a measurement). Measured: blurred 23.32, exact mean 24.49 (γ 1.18, σ_e 1.22 σ_y; at the
    prior and σ_y as given 24.27), DiffPIR's mean of 16 samples (the previous default) 24.19 dB."""
    import tifffile
    H, k, sigma = 64, 9, 0.03
    pc = dict(blur_mode="defocus", kernel_size=k, grid_size=4, n_eigen_psfs=10, defocus=dict(min_radius=1.0,
              max_radius=3.5))
    field, truth = physics.create_ground_truth(H, H, pc, seed=3, dtype=torch.float64)
    scene = utils.load_scene("sample", H, k // 2)
    clean = scene[k // 2:k // 2 + H, k // 2:k // 2 + H]
    with torch.no_grad():
        y = truth(utils.to_tensor(scene).double())
        y = (y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)).clamp(0, 1)
    tifffile.imwrite(tmp_path / "photo.tif", (utils.to_numpy(y) * 65535).round().astype(np.uint16), photometric="rgb")
    utils.save_psf_grid(str(tmp_path / "psfs.npz"), field.node_grid(), tuple(c.numpy() for c in field.node_coords()))
    args = [a.replace("photo.tif", str(tmp_path / "photo.tif")).replace("psfs.npz", str(tmp_path / "psfs.npz"))
            for a in readme_real_data_command()]
    r = cli(args + ["--model_id", "analytic", "--device", "cpu", "--kernel_size", str(k), "--no_intermediates",
                    "--save_dir", str(tmp_path / "out")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "its exact posterior mean, one CG solve" in r.stderr and "real data: sampler diffpir" not in r.stderr
    run = only_run(tmp_path / "out")
    m = json.loads((run / "metrics.json").read_text())
    assert m["sampler"] == "exact" and m["num_samples"] == 1
    assert m["exact_posterior"]["converged"] and m["exact_posterior"]["relative_residual"] <= 1e-8
    restored = np.load(run / "restored.npy").astype(np.float64)
    # The exact posterior mean of the same model: the run's own grid, K and σ.
    psfs, coords, _ = utils.load_psf_grid(str(run / "psf_grid.npz"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    eig, _, _ = physics.build_operators(torch.tensor(psfs), H, H, saved["physics"],
                                        tuple(torch.as_tensor(c) for c in coords))
    y_run = torch.from_numpy(np.load(run / "measurement.npy")).permute(2, 0, 1)[None].double()
    prior, _ = priors.load_model("analytic")
    ex = m["exact_posterior"]   # the prior's scale and the noise level the evidence chose, recorded
    assert ex["evidence"] and ex["sigma_effective"] >= m["sigma_y"] / 2 and 1e-3 <= ex["prior_scale"] <= 1e2
    mean, _ = dps.gaussian_posterior(prior, eig.double(), y_run, ex["sigma_effective"], tol=1e-7,
                                     prior_scale=ex["prior_scale"])
    p_restored, p_exact = utils.psnr(clean, restored), utils.psnr(clean, utils.to_numpy(mean))
    p_blurred = utils.psnr(clean, utils.to_numpy(y_run))
    print(f"blurred {p_blurred:.2f}, exact mean {p_restored:.2f} dB (γ {ex['prior_scale']:.3g}, σ_e/σ_y "
          f"{ex['sigma_effective'] / m['sigma_y']:.2f})")
    assert abs(p_restored - p_exact) <= 0.01 and p_restored >= p_blurred - 0.5, (p_restored, p_exact, p_blurred)


def test_psf_grid_messages_name_the_file_once_and_the_sums_plainly(tmp_path, blurred_png, capsys, monkeypatch, caplog):
    import zipfile
    np.savez(tmp_path / "whole.npz", psfs=good_psfs())
    member = zipfile.ZipFile(tmp_path / "whole.npz").read("psfs.npy")
    bad = tmp_path / "g.npz"
    with zipfile.ZipFile(bad, "w") as z:   # a valid archive whose array is cut short
        z.writestr("psfs.npy", member[:-40])
    r = cli(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid", str(bad)], capsys, monkeypatch, caplog)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and line.startswith(f"error: cannot read PSF grid {bad}: ") and line.count(str(bad)) == 1
    np.savez(tmp_path / "other.npz", other=good_psfs())      # the error that used to name the file twice
    r = cli(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid", str(tmp_path / "other.npz")], capsys,
            monkeypatch, caplog)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "must contain an array 'psfs'" in line and line.count("other.npz") == 1, line
    for scale, said in ((1.0, "3x3x5x5, each PSF sums to 1"), (3.0, "normalised to sum 1 (sums were 3..3)")):
        grid = write_grid(tmp_path / f"s{scale}.npy", good_psfs() / 1.5 * scale)
        r = cli(["--model_id", "analytic", "--blurred", blurred_png, "--psf_grid", grid, "--num_inference_steps", "2",
                 "--num_samples", "1", "--no_figures", "--no_baseline", "--save_dir", str(tmp_path / str(scale))],
                capsys, monkeypatch, caplog)
        assert r.returncode == 0 and said in r.stderr, r.stderr[-1500:]


@pytest.fixture(scope="module")
def noisy_measurement(tmp_path_factory):
    """A 32² simulation at σ = 0.05 and its PSF grid, to restore as a real measurement."""
    tmp = tmp_path_factory.mktemp("noisy")
    grid = tmp / "grid.npz"
    r = run_cli(["--model_id", "analytic", *FAST, "--blur_mode", "defocus", "--sigma_noise", "0.05", "--save_psf_grid",
                 str(grid), "--save_dir", str(tmp / "sim"), "--no_baseline", "--no_intermediates"])
    assert r.returncode == 0, r.stderr[-2000:]
    return str(only_run(tmp / "sim") / "images/blurred.png"), str(grid)


@pytest.mark.parametrize("sigma, passed", [("0.05", True), ("0.005", False)])
def test_fit_check_names_a_result_that_misses_the_data(sigma, passed, tmp_path, noisy_measurement, capsys,
                                                       monkeypatch, caplog):
    """‖y − A(x)‖ against σ_y√m: near 1 when σ_y is the true noise level, far above when σ_y is ten
    times too small (the residual cannot fall to a noise level the data do not have)."""
    blurred, grid = noisy_measurement
    r = cli(["--model_id", "analytic", "--blurred", blurred, "--psf_grid", grid, "--sigma_noise", sigma,
             "--sampler", "diffpir", "--num_inference_steps", "10", "--num_samples", "1", "--no_intermediates",
             "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((only_run(tmp_path) / "metrics.json").read_text())
    fit = m["fit_check"]
    # What real data lets us measure of the model error, each under its own name.
    assert 0 <= m["pca_truncation_error_on_restoration"] < 0.05 and "operator_relative_error_on_restoration" not in m
    assert m["frame_band_pixel_share"] == pytest.approx(1 - 26 ** 2 / 32 ** 2)   # 7×7 PSFs: a 3-pixel band
    assert 0 < m["residual_share_near_frame"] < 1
    assert fit["passed"] is passed and fit["sigma_y"] == float(sigma), fit
    assert (fit["residual_over_noise"] < 2) is passed, fit
    warned = [line for line in r.stderr.splitlines() if "fits y worse than the noise explains" in line]
    assert len(warned) == (0 if passed else 1), r.stderr[-2000:]
    if not passed:
        assert "--sigma_noise auto" in warned[0]


def test_the_exact_posterior_mean_runs_without_diffusers(tmp_path, blurred_png):
    """The analytic prior's exact posterior needs no scheduler: a real-data run at its defaults
    never imports diffusers (1.2 s of start-up here), and still records diffusers' version."""
    grid = write_grid(tmp_path / "g.npy", good_psfs())
    code = ("import sys\nimport main\n"
            f"rc = main.main(['--model_id', 'analytic', '--blurred', {blurred_png!r}, '--psf_grid', {grid!r}, "
            f"'--no_figures', '--save_dir', {str(tmp_path / 'o')!r}])\n"
            "print('DIFFUSERS' if any(m.startswith('diffusers') for m in sys.modules) else 'NO DIFFUSERS', rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "NO DIFFUSERS 0", out.stdout + out.stderr[-2000:]
    saved = yaml.safe_load(open(only_run(tmp_path / "o") / "config.yaml"))
    assert saved["resolved"]["versions"]["diffusers"][0].isdigit()
