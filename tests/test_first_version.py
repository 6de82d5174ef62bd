"""The first version's config file and Python API (its README, shared as first-version-README.md),
copied as a user upgrading a two-year-old project would copy them."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

import config
import physics
import utils
from helpers import cli, run_dirs

# The first version's config.yaml, verbatim, comments included.
OLD_CONFIG = """\
# Data settings
data:
  img_size: 256              # Image resolution
  image_source: "sample"     # "sample", URL, or file path

# Diffusion model
model:
  model_id: "google/ddpm-celebahq-256"
  device: "cuda"
  dtype: "float32"

# Physics / Blur simulation
physics:
  blur_mode: "motion"        # "motion", "defocus", "mixed", "random_iid", or "correlated"
  kernel_size: 21            # PSF kernel size
  grid_size: 8               # PSF sampling grid (8 for smooth, 64 for random_iid)
  n_eigen_psfs: 5            # Number of PCA components (5 for smooth, 10+ for correlated/random_iid)
  sigma_noise: 0.01          # Measurement noise level
  random_iid:
    grid_size: 64            # Dense grid for near-pixel PSF variation
  correlated:
    sigma_scale: 1.0         # Gaussian width scale (larger = wider PSFs)
    mu_scale: 0.0            # Center offset scale (0 = centered)
    correlation_length: 7    # Spatial smoothness (larger = smoother)

# DPS parameters
dps:
  step_size: 0.5             # Gradient guidance scale (ζ)
  num_inference_steps: 1000  # Diffusion steps
  gradient_clip: 0.0         # Gradient clipping (0 = disabled)

# Output
output:
  save_dir: "./results"
  save_intermediate: true
  intermediate_freq: 100
"""


@pytest.mark.slow
def test_the_old_config_file_runs_unchanged(tmp_path, capsys, monkeypatch, caplog):
    (tmp_path / "old.yaml").write_text(OLD_CONFIG)
    monkeypatch.chdir(tmp_path)  # its save_dir is ./results
    r = cli(["--config", "old.yaml", "--model_id", "analytic", "--device", "cpu", "--img_size", "32"],
            capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "config key dps.step_size is now sampler.dps.step_size" in r.stderr
    assert "config key output.save_intermediate is now run.save_intermediates" in r.stderr
    assert "physics.random_iid.grid_size is the grid size for blur_mode random_iid; unused" in r.stderr
    (run,) = run_dirs(tmp_path / "results")
    d = tmp_path / "results" / run
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert "dps" not in saved and "output" not in saved and "image_source" not in saved["data"]  # today's keys
    assert saved["sampler"]["dps"]["step_size"] == 0.5 and saved["sampler"]["num_inference_steps"] == 1000
    assert saved["data"]["sigma_noise"] == 0.01 and saved["data"]["image"] == "sample"
    assert saved["physics"]["grid_size"] == 8 and saved["run"]["device"] == "cpu"
    assert sorted(os.listdir(d / "intermediates")) == [f"step_{i:04d}.png" for i in (*range(0, 1000, 100), 999)]
    assert json.loads((d / "metrics.json").read_text())["status"] == "complete"


def test_an_old_key_beside_its_new_one_with_another_value_is_an_error(tmp_path, capsys, monkeypatch, caplog):
    (tmp_path / "both.yaml").write_text("dps:\n  step_size: 0.5\nsampler:\n  dps:\n    step_size: 2.0\n")
    r = cli(["--config", str(tmp_path / "both.yaml"), "--model_id", "analytic", "--save_dir", str(tmp_path)],
            capsys, monkeypatch, caplog)
    assert r.returncode == 2 and run_dirs(tmp_path) == []
    assert "dps.step_size (the old name of sampler.dps.step_size) is 0.5 but sampler.dps.step_size is 2.0" in r.stderr
    r = cli(["--set", "output.intermediate_freq=5", "--set", "sampler.intermediate_freq=7", "--model_id", "analytic"],
            capsys, monkeypatch, caplog)
    assert r.returncode == 2 and "output.intermediate_freq (the old name of sampler.intermediate_freq)" in r.stderr
    # The same value under both names is no conflict.
    assert config.unalias({"dps.step_size": 1.0, "sampler.dps.step_size": 1.0}, "x", "motion") == \
        {"sampler.dps.step_size": 1.0}


def test_an_old_key_in_set_is_saved_under_its_new_name(tmp_path, capsys, monkeypatch, caplog):
    r = cli(["--model_id", "analytic", "--img_size", "32", "--kernel_size", "7", "--set", "physics.motion.max_length=6",
             "--set", "dps.num_inference_steps=4", "--set", "output.save_intermediate=false", "--no_figures",
             "--no_baseline", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--set: config key dps.num_inference_steps is now sampler.num_inference_steps" in r.stderr
    saved = yaml.safe_load((tmp_path / run_dirs(tmp_path)[0] / "config.yaml").read_text())
    assert saved["sampler"]["num_inference_steps"] == 4 and saved["run"]["save_intermediates"] is False
    assert not (tmp_path / run_dirs(tmp_path)[0] / "intermediates").exists()


def test_unknown_key_hint_knows_the_old_names(tmp_path, capsys, monkeypatch, caplog):
    r = cli(["--set", "output.save_dirr=x"], capsys, monkeypatch, caplog)
    assert r.returncode == 2
    assert "unknown config key 'output.save_dirr'; did you mean run.save_dir (formerly output.save_dir)?" in r.stderr


@pytest.mark.parametrize("mode, expected", [("random_iid", 16), ("motion", "auto")])
def test_old_random_iid_grid_size_applies_to_random_iid_only(mode, expected):
    flat = {"physics.blur_mode": mode, "physics.random_iid.grid_size": 16}
    out = config.unalias(flat, "old.yaml", mode)
    assert out.get("physics.grid_size", "auto") == expected and "physics.random_iid.grid_size" not in out


def test_every_alias_names_a_current_key():
    schema = config.flatten(config.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "config.yaml")))
    assert all(new in schema and old not in schema for old, new in config.ALIASES.items())


def test_load_sample_image_as_the_first_version_documented(tmp_path):
    img = utils.load_sample_image("sample", size=48, device=torch.device("cpu"))
    assert img.shape == (1, 3, 48, 48) and img.dtype == torch.float32 and 0 <= float(img.min()) < float(img.max()) <= 1
    gray = (np.linspace(0, 255, 40 * 30).reshape(30, 40)).astype(np.uint8)
    utils.save_image(str(tmp_path / "gray.png"), gray[..., None] / 255.0)
    g = utils.load_sample_image(str(tmp_path / "gray.png"), size=16)
    assert g.shape == (1, 3, 16, 16) and torch.equal(g[:, 0], g[:, 2])
    with pytest.raises(utils.UserError, match="image not found"):
        utils.load_sample_image(str(tmp_path / "missing.png"))


def old_api_snippet(step_size):
    """The first version's API snippet, verbatim but for the model (the offline analytic prior), a
    32-pixel image, and max_length 19 (its 25 does not fit a 21-pixel kernel)."""
    from physics import create_sv_blur_system
    from dps import create_dps_pipeline
    device = torch.device("cpu")
    physics_config = {"kernel_size": 21, "grid_size": 8, "blur_mode": "motion", "n_eigen_psfs": 5,
                      "motion": {"min_length": 5, "max_length": 19, "angle_variation": 180}}
    eigenpsf_op, true_op, decomposition = create_sv_blur_system(32, 32, physics_config, device)
    x = utils.load_sample_image("sample", size=32, device=device)
    measurement = true_op(x) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    pipeline = create_dps_pipeline(eigenpsf_op, model_id="analytic", device=device)
    restored, intermediates = pipeline(y=measurement, num_inference_steps=1000, step_size=step_size,
                                       generator=torch.Generator().manual_seed(1))
    return x, measurement, restored, intermediates, eigenpsf_op


@pytest.mark.slow
def test_the_old_api_snippet_runs():
    """Every call of the snippet is accepted. Its step_size = 100 is 50 times the top of the first
    README's own recommended range (0.1-2.0) and diverges, as DivergenceError says with its hint;
    at 1.0 it restores."""
    import dps
    with pytest.raises(dps.DivergenceError, match="try a smaller step_size"):
        old_api_snippet(100.0)
    x, y, restored, intermediates, eig = old_api_snippet(1.0)
    assert restored.shape == (1, 3, 32, 32) and isinstance(intermediates, dict)
    # The keyword reached the sampler: the result explains y (a prior draw misses it by 30% or more).
    fit = float((y - eig(restored)).norm() / y.norm())
    assert fit < 0.1, fit


def test_true_op_is_the_per_pixel_truth_not_the_model():
    pc = {"kernel_size": 9, "grid_size": 4, "blur_mode": "defocus", "n_eigen_psfs": "all",
          "defocus": {"max_radius": 4}}
    eig, true_op, _ = physics.create_sv_blur_system(24, 24, pc, "cpu", seed=0, dtype=torch.float64)
    assert isinstance(true_op, physics.TrueSVBlurOperator)
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert physics.operator_relative_error(eig.double(), true_op, x) > 1e-4      # not the model at full rank
    # It is the ground truth on the reflection-padded scene, with its exact adjoint.
    field, truth = physics.create_ground_truth(24, 24, pc, seed=0, dtype=torch.float64)
    x_ext = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    torch.testing.assert_close(true_op(x), truth(x_ext))
    y = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    assert abs(float((true_op(x) * y).sum() - (x * true_op.adjoint(y)).sum())) < 1e-10


def test_create_dps_pipeline_takes_either_order_and_keyword_settings():
    import dps
    eig, _, _ = physics.create_sv_blur_system(16, 16, {"kernel_size": 5, "grid_size": 2, "blur_mode": "motion",
                                                       "n_eigen_psfs": 2, "motion": {"max_length": 4}}, seed=0)
    new, old = dps.create_dps_pipeline(eig, model_id="analytic"), dps.create_dps_pipeline("analytic", eig)
    assert new.operator is old.operator is eig
    y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda **kw: new(y, num_inference_steps=6, generator=torch.Generator().manual_seed(2), **kw)[0]  # noqa: E731
    torch.testing.assert_close(run(step_size=0.3, gradient_clip=1.0),
                               run(options={"step_size": 0.3, "gradient_clip": 1.0}))
    assert not torch.allclose(run(step_size=0.3), run(step_size=3.0))
    torch.testing.assert_close(run(method="diffpir", lambda_=3.0, zeta=0.5, sigma_y=0.05),
                               run(method="diffpir", options={"lambda": 3.0, "zeta": 0.5}, sigma_y=0.05))
    with pytest.raises(TypeError, match="unknown keyword argument.*zeta.*'dps'.*step_size, gradient_clip"):
        run(zeta=0.3)
    with pytest.raises(TypeError, match="keep one"):
        run(step_size=0.3, options={"step_size": 0.5})
