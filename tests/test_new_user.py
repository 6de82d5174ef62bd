"""What a new user meets first: defaults that fit their data, gray and 16-bit images, a quiet
console, fast --help, and one source of truth for allowed values."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import main
import physics
import priors
import utils
from helpers import save_tiny_model
from test_main import FAST, ROOT, call_main as main_call, cli, run_cli, run_dirs


def one_run(save_dir):
    (run,) = run_dirs(save_dir)
    return os.path.join(save_dir, run)


@pytest.fixture(scope="module")
def gray16(tmp_path_factory):
    from skimage import data
    path = tmp_path_factory.mktemp("img") / "gray16.tif"
    tifffile.imwrite(path, data.camera()[::8, ::8].astype(np.uint16) * 257)
    return str(path)


def test_gray_16bit_input_gives_gray_16bit_output_with_a_gray_prior(tmp_path, gray16, capsys, monkeypatch, caplog):
    r = cli(["--model_id", "analytic", "--image", gray16, *FAST, "--num_samples", "2",
             "--set", "sampler.intermediate_freq=2", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    run = one_run(tmp_path)
    assert np.load(os.path.join(run, "restored.npy")).shape == (32, 32, 1)
    assert np.load(os.path.join(run, "measurement.npy")).shape == (32, 32, 1)
    assert Image.open(os.path.join(run, "images", "restored.png")).mode == "L"
    tif = tifffile.imread(os.path.join(run, "images", "restored.tif"))
    assert tif.dtype == np.uint16 and tif.shape == (32, 32)
    assert "luminance" not in r.stderr  # a 1-channel prior samples gray directly
    # the final step is written too (5 steps, every 2nd: 0, 2, 4)
    assert sorted(os.listdir(os.path.join(run, "intermediates"))) == ["step_0000.png", "step_0002.png", "step_0004.png"]


def test_gray_measurement_with_rgb_model_uses_luminance(tmp_path, gray16, capsys, monkeypatch, caplog):
    model = save_tiny_model(tmp_path / "m")
    r = cli(["--model_id", model, "--image", gray16, *FAST, "--save_dir", str(tmp_path / "out")], capsys, monkeypatch,
            caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "comparing y with the luminance of A(x)" in r.stderr
    run = one_run(tmp_path / "out")
    assert np.load(os.path.join(run, "restored.npy")).shape == (32, 32, 1)
    assert Image.open(os.path.join(run, "images", "restored.png")).mode == "L"


def test_luminance_operator_is_exact_adjoint_and_matches_gray_blur():
    grid = physics.SVBlurSimulator(20, 26, 5, 2, dtype=torch.float64).simulate_sv_kernel_grid("defocus", seed=0,
                                                                                             max_radius=2)
    eig, _, _ = physics.build_operators(grid, 20, 26, dict(blur_mode="defocus", n_eigen_psfs=3))
    op = physics.LuminanceOperator(eig)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 26, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, 20, 26, generator=g, dtype=torch.float64)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    w = torch.tensor(physics.LUMINANCE_WEIGHTS, dtype=torch.float64)
    assert torch.allclose(op(x), eig((x * w.view(1, 3, 1, 1)).sum(1, keepdim=True)), atol=1e-12)


def test_gray_analytic_prior_is_the_luminance_of_the_rgb_prior():
    import dps
    unet, sched = priors.load_model("analytic", channels=1)
    rgb, _ = priors.load_model("analytic")
    assert unet.config.in_channels == 1
    w = torch.tensor(physics.LUMINANCE_WEIGHTS, dtype=torch.float64)
    # Luminance of the RGB prior, per orthonormal Fourier coefficient: mean w·μ, variance Σ_c (wᵀQ)_c² λ_c s(f).
    lum_var = (((w @ rgb.Q) ** 2)[:, None, None] * rgb.prior_variance(24, 32)).sum(0)
    assert torch.allclose(unet.prior_variance(24, 32)[0], lum_var, rtol=1e-12)
    assert torch.allclose(unet.mu, (w @ rgb.mu).view(1), rtol=1e-12)


def test_default_k_capped_for_a_small_measured_grid_explicit_k_stays_an_error(tmp_path, capsys, monkeypatch, caplog):
    psfs = np.zeros((3, 3, 5, 5))
    psfs[..., 2, 2] = 1
    psfs[..., 2, 3] = np.linspace(0.1, 0.9, 9).reshape(3, 3)
    np.save(tmp_path / "g.npy", psfs)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "y.png")
    base = ["--model_id", "analytic", "--blurred", str(tmp_path / "y.png"), "--psf_grid", str(tmp_path / "g.npy"),
            "--num_inference_steps", "2"]
    r = cli(base + ["--save_dir", str(tmp_path / "a")], capsys, monkeypatch, caplog)
    assert r.returncode == 0 and "the default K=10 exceeds the 9 PSFs of the grid; using K=9" in r.stderr, r.stderr[-2000:]
    r = cli(base + ["--n_eigen_psfs", "10", "--save_dir", str(tmp_path / "b")], capsys, monkeypatch, caplog)
    assert r.returncode == 2 and "n_eigen_psfs must be in 1..9" in r.stderr and run_dirs(tmp_path / "b") == []


def test_small_kernel_scales_default_sizes_but_not_explicit_ones(tmp_path, capsys, monkeypatch, caplog):
    base = ["--model_id", "analytic", "--img_size", "32", "--grid_size", "auto", "--n_eigen_psfs", "all",
            "--num_inference_steps", "2", "--kernel_size", "9"]
    r = cli(base + ["--save_dir", str(tmp_path / "a")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "scaled the default motion sizes to fit: min_length=1.6, max_length=8" in r.stderr
    saved = utils.load_config(os.path.join(one_run(tmp_path / "a"), "config.yaml"))
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


def test_quiet_console_names_the_device_once(tmp_path):
    """No torch searchsorted warning (strided PSF positions), no diffusers 'install accelerate'
    notice, the device named once, and the CPU estimate on a line of its own."""
    model = save_tiny_model(tmp_path / "m")
    pos = np.stack(np.meshgrid([5.0, 20.0, 35.0], [5.0, 20.0, 35.0], indexing="ij"), -1)
    psfs = np.zeros((3, 3, 5, 5))
    psfs[..., 2, 2] = 1
    np.savez(tmp_path / "g.npz", psfs=psfs, positions=pos)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "y.png")
    r = run_cli(["--model_id", model, "--blurred", str(tmp_path / "y.png"), "--psf_grid", str(tmp_path / "g.npz"),
                 "--num_inference_steps", "12", "--set", "sampler.log_every=5", "--save_dir", str(tmp_path / "o")],
                timeout=300, env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "searchsorted" not in r.stderr and "accelerate" not in r.stderr and "Warning" not in r.stderr
    assert r.stderr.count("INFO device: CPU") == 1
    (estimate,) = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if "CPU run: about" in ln]
    assert estimate.startswith("INFO CPU run: about") and " 0.0 min" not in estimate


def test_help_does_not_import_torch():
    code = ("import sys; sys.argv = ['main.py', '--help']\n"
            "import main\n"
            "try:\n    main.main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().endswith("NO TORCH") and "--n_eigen_psfs" in out.stdout


def test_config_yaml_matches_physics():
    schema = utils.load_config(main.DEFAULT_CONFIG)
    for mode in physics.BLUR_MODES:
        if mode != "mixed":
            assert schema["physics"][mode] == physics.MODE_DEFAULTS[mode], mode
    allowed = utils.choices()
    assert allowed["physics.blur_mode"] == physics.BLUR_MODES
    assert set(allowed["physics.form"]) == {"auto", *physics.FORMS}
    assert allowed["physics.boundary"] == physics.BOUNDARIES
    assert allowed["physics.interpolation"] == physics.INTERPOLATIONS
    for key in ("blur_mode", "form", "boundary", "interpolation"):
        assert schema["physics"][key] in allowed[f"physics.{key}"]
    assert physics.resolve_grid_size({"blur_mode": "random_iid"}) == 64


def test_bit_depth_reads_headers(tmp_path, gray16):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "b.png")
    assert utils.bit_depth(gray16) == 16 and utils.bit_depth(str(tmp_path / "b.png")) == 16
    assert utils.bit_depth(str(tmp_path / "a.png")) == 8 and utils.bit_depth("sample") == 8


class _Bar:
    def __init__(self):
        self.lines = []

    def write(self, text, file=None):
        self.lines.append(text)


def test_cpu_estimate_uses_the_steady_rate_and_says_nothing_when_no_steps_are_left(monkeypatch):
    """90 s of warm-up before the first mark, then 1 s a step: 20 steps left are 20 s, not the
    (90 + 10) / 20 * 20 = 100 s that the time since the start gives."""
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(main.time, "time", lambda: next(clock))
    bar, marks = _Bar(), {}
    cpu = torch.device("cpu")
    main.cpu_estimate(marks, 10, 30, 10, cpu, bar, "dps")
    main.cpu_estimate(marks, 20, 20, 10, cpu, bar, "dps")
    assert bar.lines == ["INFO CPU run: about 20 s left for 20 more steps (dps)"]
    bar, marks, clock = _Bar(), {}, iter([100.0, 110.0])
    main.cpu_estimate(marks, 10, 10, 10, cpu, bar, "dps")
    main.cpu_estimate(marks, 20, 0, 10, cpu, bar, "dps")
    assert bar.lines == []


def test_progress_shows_one_named_relative_residual_every_log_every_steps(tmp_path, capsys, monkeypatch, caplog):
    r = cli(["--model_id", "analytic", *FAST, "--num_inference_steps", "50", "--set", "sampler.intermediate_freq=50",
             "--no_baseline", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "‖y−A(x̂₀)‖/‖y‖ " in r.stderr and "residual=" not in r.stderr
    assert "data residual ‖y − A(x)‖/‖y‖ = " in r.stderr
    m = json.loads(open(os.path.join(one_run(tmp_path), "metrics.json")).read())
    curve = m["residual_relative_curve"]
    assert curve["steps"] == [9, 19, 29, 39, 49] and all(0 < v < 2 for v in curve["values"])
    # the last point is the final x̂₀'s relative residual, which the run's last line reports too
    assert curve["values"][-1] == pytest.approx(m["data_residual_relative"], rel=0.05)


def test_a_second_ctrl_c_names_what_is_on_disk(tmp_path, capsys, monkeypatch):
    """A first Ctrl-C after step 3 checkpoints the run; a second one arriving while the outputs are
    written (50 ms later, say) used to print 'no checkpoint written' over an existing checkpoint."""
    import signal
    original = main.progress_callback

    def patched(views, cfg, device, bar, name, y_norms):
        inner = original(views, cfg, device, bar, name, y_norms)

        def callback(i, t, x_t, x0_hat, res):
            if i == 3:
                main.STOP["signal"] = signal.SIGINT
            return inner(i, t, x_t, x0_hat, res)
        return callback

    def second_ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "progress_callback", patched)
    monkeypatch.setattr(main, "write_outputs", second_ctrl_c)
    code, out = main_call(["--model_id", "analytic", *FAST, "--num_inference_steps", "8", "--save_dir", str(tmp_path)],
                          capsys, monkeypatch)
    run = one_run(tmp_path)
    assert code == 130 and os.path.isfile(os.path.join(run, "checkpoint.pt"))
    assert out.out.strip() == run
    assert f"the checkpoint in {run} was written before it: continue with --resume {run}" in out.err
    assert "no checkpoint" not in out.err


def test_numpy_nan_is_refused_in_api_options():
    import dps
    with pytest.raises(ValueError, match="finite"):
        dps.sampler_options("dps", {"step_size": np.float32("nan")})
