"""Building the problem (problem.py): defaults fitted to the data, operators built once per size."""

import os

import numpy as np
import pytest
from PIL import Image

import config
import physics
from helpers import cli, one_run, run_dirs


def test_default_k_fits_a_small_measured_grid_explicit_k_stays_an_error(tmp_path, capsys, monkeypatch, caplog):
    psfs = np.zeros((3, 3, 5, 5))
    psfs[..., 2, 2] = 1
    psfs[..., 2, 3] = np.linspace(0.1, 0.9, 9).reshape(3, 3)
    np.save(tmp_path / "g.npy", psfs)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "y.png")
    base = ["--model_id", "analytic", "--blurred", str(tmp_path / "y.png"), "--psf_grid", str(tmp_path / "g.npy"),
            "--num_inference_steps", "2"]
    r = cli(base + ["--save_dir", str(tmp_path / "a")], capsys, monkeypatch, caplog)
    # the PSFs differ along one direction: the mean and one component explain them all
    assert r.returncode == 0 and "n_eigen_psfs auto: K=2 explains 100.0% of the PSF variance" in r.stderr, \
        r.stderr[-2000:]
    r = cli(base + ["--n_eigen_psfs", "10", "--save_dir", str(tmp_path / "b")], capsys, monkeypatch, caplog)
    assert r.returncode == 2 and "n_eigen_psfs must be in 1..9" in r.stderr and run_dirs(tmp_path / "b") == []


def test_small_kernel_scales_default_sizes_but_not_explicit_ones(tmp_path, capsys, monkeypatch, caplog):
    base = ["--model_id", "analytic", "--img_size", "32", "--grid_size", "auto", "--n_eigen_psfs", "all",
            "--num_inference_steps", "2", "--kernel_size", "9"]
    r = cli(base + ["--save_dir", str(tmp_path / "a")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "scaled the default motion sizes to fit: min_length=1.6, max_length=8" in r.stderr
    saved = config.load_config(os.path.join(one_run(tmp_path / "a"), "config.yaml"))
    assert saved["physics"]["motion"]["max_length"] == 8 and saved["physics"]["n_eigen_psfs"] == "all"
    r = cli(base + ["--set", "physics.motion.max_length=12", "--save_dir", str(tmp_path / "b")], capsys, monkeypatch,
            caplog)
    assert r.returncode == 2 and "increase kernel_size" in r.stderr


@pytest.mark.parametrize("section", ["motion", "defocus", "correlated", "random_iid"])
@pytest.mark.parametrize("k", [3, 5, 9, 13])
def test_fitted_sizes_always_fit(section, k):
    given = {"edge_sigma": 0.84} if section == "defocus" else {}
    fitted = physics.fit_sizes_to_kernel(section, given, k)
    p = fitted or {**physics.MODE_DEFAULTS[section], **given}
    physics.SVBlurSimulator(32, 32, k, 2).simulate_sv_kernel_grid(section, seed=0, **p)  # raises if it does not fit


def test_a_measured_grid_is_built_once_per_image_size_and_equals_a_fresh_build(tmp_path):
    """A folder of measurements with one grid: the operators of the second image of a size are
    the first's (not rebuilt), and they equal what a fresh build gives, to the bit."""
    import torch

    import problem
    import utils
    rng = np.random.default_rng(1)
    psfs = rng.random((3, 3, 5, 5)) + 0.1
    np.save(tmp_path / "g.npy", psfs)
    for name, side in (("a", 24), ("b", 24), ("c", 32)):
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    cfg = config.with_defaults({"data": {"blurred_dir": str(tmp_path), "psf_grid": str(tmp_path / "g.npy")},
                                "physics": {"n_eigen_psfs": 4}}, config.defaults())
    config.resolve_late(cfg)
    measured = utils.load_psf_grid(str(tmp_path / "g.npy"))
    cpu, gen = torch.device("cpu"), torch.Generator()
    built = {}
    a, b, c = (problem.prepare(str(tmp_path / f"{n}.png"), cfg, cpu, gen, measured, built) for n in "abc")
    assert a.eig_op is b.eig_op and a.grid_op is b.grid_op and c.eig_op is not a.eig_op
    assert sorted(built) == [(24, 24, 3), (32, 32, 3)]   # keyed by size and channels
    fresh = problem.prepare(str(tmp_path / "b.png"), cfg, cpu, gen, measured)
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.eig_op(x), fresh.eig_op(x)) and torch.equal(b.grid_op(x), fresh.grid_op(x))
    assert torch.equal(b.eig_op.adjoint(x), fresh.eig_op.adjoint(x))
