"""What a new user meets first: defaults that fit their data, gray and 16-bit images, a quiet
console, fast --help, and one source of truth for allowed values."""

import os
import re

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import physics
import priors
import utils
from helpers import cli, FAST, one_run, run_cli, save_tiny_model


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
    for name in ("richardson_lucy", "tikhonov"):  # the baselines losslessly too, and at the input's depth
        assert np.load(os.path.join(run, f"baseline_{name}.npy")).shape == (32, 32, 1)
        assert tifffile.imread(os.path.join(run, "images", f"baseline_{name}.tif")).dtype == np.uint16
    # The console's last words put the restoration beside the baselines.
    assert re.search(r"PSNR blurred [\d.]+ dB -> restored [\d.]+ dB \(SSIM [\d.]+ -> [\d.]+\); Richardson-Lucy "
                     r"[\d.]+ dB; Tikhonov [\d.]+ dB", r.stderr), r.stderr[-1500:]
    assert re.search(r"data residual ‖y − A\(x\)‖/‖y‖: restored [\d.]+; Richardson-Lucy [\d.]+; Tikhonov [\d.]+ "
                     r"\(the noise's level σ_y√m/‖y‖: [\d.]+\)", r.stderr), r.stderr[-1500:]
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
    unet, sched = priors.load_model("analytic", channels=1)
    rgb, _ = priors.load_model("analytic")
    assert unet.config.in_channels == 1
    w = torch.tensor(physics.LUMINANCE_WEIGHTS, dtype=torch.float64)
    # Luminance of the RGB prior, per orthonormal Fourier coefficient: mean w·μ, variance Σ_c (wᵀQ)_c² λ_c s(f).
    lum_var = (((w @ rgb.Q) ** 2)[:, None, None] * rgb.prior_variance(24, 32)).sum(0)
    assert torch.allclose(unet.prior_variance(24, 32)[0], lum_var, rtol=1e-12)
    assert torch.allclose(unet.mu, (w @ rgb.mu).view(1), rtol=1e-12)


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


def test_bit_depth_reads_headers(tmp_path, gray16):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "b.png")
    assert utils.bit_depth(gray16) == 16 and utils.bit_depth(str(tmp_path / "b.png")) == 16
    assert utils.bit_depth(str(tmp_path / "a.png")) == 8 and utils.bit_depth("sample") == 8


def test_numpy_nan_is_refused_in_api_options():
    import dps
    with pytest.raises(ValueError, match="finite"):
        dps.sampler_options("dps", {"step_size": np.float32("nan")})


def test_threads_follow_the_allocation_or_the_flag(monkeypatch):
    """auto: OMP_NUM_THREADS when set, else the CPUs this process may run on (a Slurm allocation's
    affinity, not the machine's cores); a number is taken as it is."""
    import device
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert device.resolve_threads("auto") == (3, "the CPUs this process may use")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert device.resolve_threads("auto") == (5, "OMP_NUM_THREADS")
    assert device.resolve_threads(2) == (2, "--threads")
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(device.os, "getloadavg", lambda: (7.0, 7.0, 7.0), raising=False)
        assert device.set_threads(2) == "2 threads (--threads); the machine is busy (1-min load 7.0): --threads 1 may run faster"
        assert torch.get_num_threads() == 2
        assert device.set_threads(1) == "1 thread (--threads)" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_flag_reaches_the_run(tmp_path, capsys, monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        r = cli(["--model_id", "analytic", *FAST, "--threads", "1", "--no_baseline", "--save_dir", str(tmp_path)],
                capsys, monkeypatch, caplog)
    finally:
        torch.set_num_threads(before)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "device: CPU, 1 thread (--threads)" in r.stderr
    import yaml
    saved = yaml.safe_load(open(os.path.join(one_run(tmp_path), "config.yaml")))
    assert saved["run"]["threads"] == 1 and saved["resolved"]["versions"]["cpu_threads"] == 1


def test_dtype_auto_is_bf16_only_for_a_learned_prior_on_a_native_bf16_cpu(monkeypatch):
    import device
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, model, dev, want in [(True, "some/model", cpu, "bfloat16"), (False, "some/model", cpu, "float32"),
                                     (True, "analytic", cpu, "float32"), (True, "some/model", cuda, "float32")]:
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
        assert device.resolve_dtype("auto", dev, model) == want, (native, model, dev)
    assert device.resolve_dtype("float16", cpu, "some/model") == "float16"     # asked for: kept


def test_dtype_auto_is_saved_resolved(tmp_path, capsys, monkeypatch, caplog):
    """A run with a learned prior writes the dtype it ran in (bf16 here, as on a native-bf16 CPU)."""
    import yaml

    import device
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    model = save_tiny_model(tmp_path / "tiny")
    r = cli(["--model_id", str(model), *FAST, "--no_baseline", "--save_dir", str(tmp_path / "o")], capsys,
            monkeypatch, caplog)
    assert r.returncode == 0 and "dtype auto: bfloat16" in r.stderr, r.stderr[-2000:]
    saved = yaml.safe_load(open(os.path.join(one_run(tmp_path / "o"), "config.yaml")))
    assert saved["run"]["dtype"] == "bfloat16"
