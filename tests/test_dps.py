"""Sampler checks: against diffusers' own DDPM loop, an exact Gaussian posterior, and a fake hub."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

import dps
import physics
from fakehub import FakeHub, files_from_dir
from helpers import save_tiny_model, tiny_scheduler, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_system(H=16, W=16, n=2, mode="motion", **params):
    pc = dict(blur_mode=mode, kernel_size=5, grid_size=2, n_eigen_psfs=n, form="gather", boundary="reflect",
              motion=dict(max_length=4), defocus=dict(max_radius=2), **params)
    return physics.create_sv_blur_system(H, W, pc, seed=0)


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


# --- 1. equals diffusers' DDPMPipeline with ζ = 0 ------------------------------------------

@pytest.mark.parametrize("steps", [1, 13, 50])
def test_zero_step_size_matches_diffusers_ddpm_pipeline(steps):
    unet, sched = tiny_unet(), tiny_scheduler()
    eig, _, _ = small_system()
    y = torch.rand(2, 3, 16, 16)
    ours, _ = dps.EigenPSFDPSPipeline(unet, sched, eig)(
        y, num_inference_steps=steps, step_size=0.0, generator=torch.Generator().manual_seed(1))
    ref = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(sched.config))(
        batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=steps, output_type="pt").images
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()


def test_tweedie_estimate_equals_scheduler_x0():
    sched = tiny_scheduler(clip_sample=False)
    x_t, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    t = 500
    out = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dps.tweedie_estimate(x_t, eps, sched.alphas_cumprod[t]), out.pred_original_sample, atol=1e-6)


# --- 2. exact Gaussian posterior ---------------------------------------------------------------

def conjugate_gradient(apply, b, iters=400, tol=1e-7):
    x = torch.zeros_like(b)
    r = b - apply(x)
    p, rs = r.clone(), (r * r).sum()
    for _ in range(iters):
        Ap = apply(p)
        a = rs / (p * Ap).sum()
        x, r = x + a * p, r - a * Ap
        rn = (r * r).sum()
        if rn.sqrt() < tol * b.norm():
            break
        p, rs = r + rn / rs * p, rn
    return x


@pytest.mark.slow
def test_dps_lands_near_exact_posterior_mean():
    """y = A x + n with the analytic prior x₀ = 2x − 1 ~ N(μ, Σ). The posterior mean solves
    (Σ⁻¹ + AᵀA/(4σ²)) m = Σ⁻¹μ + Aᵀ(y − A1/2)/(2σ²); we solve it in the whitened variable
    m = μ + Σ^{1/2} w by CG, using the operator's adjoint."""
    from skimage import data
    from skimage.transform import resize
    H = W = 64
    img = resize(data.astronaut()[10:250, 120:360] / 255.0, (H, W), anti_aliasing=True)
    x = torch.tensor(img, dtype=torch.float64).permute(2, 0, 1)[None]
    pc = dict(blur_mode="defocus", kernel_size=9, grid_size=3, n_eigen_psfs=9, form="gather", boundary="circular",
              defocus=dict(min_radius=1, max_radius=4))
    eig, true, _ = physics.create_sv_blur_system(H, W, pc, seed=0, dtype=torch.float64)
    sigma = 0.02
    y = true(x) + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior, sched = dps.load_model("analytic")
    mu = prior.mu.view(1, -1, 1, 1).expand_as(x)
    half = lambda v: prior.apply_covariance(v, 0.5)                       # Σ^{1/2}
    normal = lambda w: w + half(eig.adjoint(eig(half(w)))) / (4 * sigma ** 2)
    rhs = half(eig.adjoint(y - eig(torch.ones_like(x)) / 2 - eig(mu) / 2)) / (2 * sigma ** 2)
    x_pm = ((mu + half(conjugate_gradient(normal, rhs))) + 1) / 2
    # DPS over the same prior and operator, mean of 8 posterior samples.
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig.float())
    out, _ = pipe(y.float(), num_inference_steps=1000, step_size=4.0, num_samples=8,
                  generator=torch.Generator().manual_seed(1))
    x = x.float()
    p_blur, p_pm, p_dps = psnr(y.float().clamp(0, 1), x), psnr(x_pm.float().clamp(0, 1), x), psnr(out["mean"][0], x)
    # measured: blurred 20.7 dB, posterior mean 24.2 dB, DPS mean 23.3 dB
    assert p_dps > p_blur + 1.0, (p_blur, p_pm, p_dps)
    assert p_dps > p_pm - 1.5, (p_blur, p_pm, p_dps)
    assert psnr(out["mean"][0], x_pm.float()) > 26.0  # DPS mean is close to the exact mean itself


# --- 3. the analytic prior's denoiser is the exact MMSE ------------------------------------------

def test_analytic_eps_equals_dense_mmse():
    prior, sched = dps.load_model("analytic")
    C, H, W = 3, 4, 6
    # Dense prior covariance Σ = Σ_c ⊗ R, with R the circulant autocovariance from the spectrum.
    s = torch.fft.irfft2(dps._spectrum_shape(H, W, prior.f0, "cpu", torch.float64), s=(H, W), norm="ortho")
    s = s * (H * W) ** -0.5  # autocovariance c(Δ) of a stationary field with ortho-DFT variances S
    idx = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2)
    d = (idx[:, None, :] - idx[None, :, :])
    R = s[d[..., 0] % H, d[..., 1] % W]
    cov_c = prior.Q @ torch.diag(prior.lam) @ prior.Q.T
    Sigma = torch.kron(cov_c, R)
    t = 300
    a = sched.alphas_cumprod[t].double()
    x_t = torch.randn(1, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = (x_t - a.sqrt() * prior.mu.view(1, -1, 1, 1)).reshape(-1)
    eps_dense = (1 - a).sqrt() * torch.linalg.solve(a * Sigma + (1 - a) * torch.eye(C * H * W, dtype=torch.float64), z)
    eps = prior(x_t, torch.tensor(t)).sample.reshape(-1)
    assert torch.allclose(eps, eps_dense, atol=1e-10), (eps - eps_dense).abs().max()


def test_analytic_prior_constants_match_their_fit():
    fit = dps.fit_analytic_prior()
    np.testing.assert_allclose(fit["mean"], dps.ANALYTIC_PRIOR["mean"], atol=1e-3)
    np.testing.assert_allclose(fit["channel_cov"], dps.ANALYTIC_PRIOR["channel_cov"], atol=1e-4)
    assert abs(fit["f0"] - dps.ANALYTIC_PRIOR["f0"]) < 1e-4


# --- 4. guidance, batching, divergence, knobs -----------------------------------------------------

def test_guidance_lowers_residual():
    prior, sched = dps.load_model("analytic")
    eig, true, _ = small_system(32, 32, n=4)
    x = torch.rand(1, 3, 32, 32)
    y = true(x)
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
    res = {}
    for zeta in (0.0, 2.0):
        _, inter = pipe(y, num_inference_steps=100, step_size=zeta, generator=torch.Generator().manual_seed(0),
                        intermediate_freq=99)
        res[zeta] = float(inter["residual"][-1][0])
    assert res[2.0] < 0.5 * res[0.0], res


@pytest.mark.parametrize("prior_kind", ["tiny_unet", "analytic"])
def test_batch_independence_with_per_image_generators(prior_kind):
    """Per-image generators (diffusers' list form) and the per-image norm make images independent.
    Equality is to float tolerance, not bitwise: batched convolutions may sum in another order."""
    unet, sched = (tiny_unet(), tiny_scheduler()) if prior_kind == "tiny_unet" else dps.load_model("analytic")
    eig, _, _ = small_system()
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    y = torch.rand(2, 3, 16, 16)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both, _ = pipe(y, num_inference_steps=20, step_size=1.0, generator=gens([5, 6]))
    one, _ = pipe(y[:1], num_inference_steps=20, step_size=1.0, generator=gens([5]))
    assert torch.allclose(both[:1], one, atol=1e-4), (both[:1] - one).abs().max()
    other, _ = pipe(y[1:], num_inference_steps=20, step_size=1.0, generator=gens([6]))
    assert torch.allclose(both[1:], other, atol=1e-4)


def test_huge_step_size_diverges_with_clear_error():
    unet, sched = tiny_unet(), tiny_scheduler(clip_sample=False)
    eig, _, _ = small_system()
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    with pytest.raises(dps.DivergenceError, match=r"diverged at step \d+/50.*smaller step_size.*gradient_clip") as ei:
        pipe(torch.rand(1, 3, 16, 16), num_inference_steps=50, step_size=1e38, check_every=5,
             generator=torch.Generator().manual_seed(0), intermediate_freq=1)
    assert 1 <= ei.value.step <= 50
    assert ei.value.intermediates["steps"]  # what existed is handed back


def test_runaway_residual_is_divergence_not_success():
    """A step size far too large keeps x_t finite but drives ‖y − A(x̂₀)‖ to many times ‖y‖: that
    must stop as a divergence, not end 'complete' (while a sane step size finishes)."""
    unet, sched = dps.load_model("analytic")
    eig, true, _ = small_system()
    y = true(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    with pytest.raises(dps.DivergenceError, match=r"ran away to .*‖y‖.*smaller step_size") as ei:
        pipe(y, num_inference_steps=60, step_size=1e9, check_every=5, generator=torch.Generator().manual_seed(0))
    assert ei.value.step < 60
    out, _ = pipe(y, num_inference_steps=60, step_size=1.0, check_every=5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_gradient_clip_bounds_each_image():
    g = torch.randn(3, 3, 8, 8) * torch.tensor([0.01, 10.0, 100.0]).view(3, 1, 1, 1)
    clipped = dps.clip_per_image(g, 1.0)
    norms = torch.linalg.vector_norm(clipped.flatten(1), dim=1)
    assert torch.allclose(clipped[0], g[0]) and torch.allclose(norms[1:], torch.ones(2))


def test_likelihood_gradient_matches_finite_difference():
    eig, _, _ = small_system(n=3)
    y = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    eig = eig.double()
    x_t = torch.randn(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    x0 = 0.7 * x_t  # any differentiable map
    g, norms = dps.compute_likelihood_gradient(x_t, x0, y, eig)
    d = torch.randn_like(x_t)
    f = lambda z: torch.linalg.vector_norm(y - eig((0.7 * z + 1) / 2))
    h = 1e-6
    fd = (f(x_t.detach() + h * d) - f(x_t.detach() - h * d)) / (2 * h)
    assert abs(float((g * d).sum()) - float(fd)) < 1e-6 * abs(float(fd)) + 1e-9
    assert torch.allclose(norms, f(x_t.detach()).view(1))


def test_num_samples_returns_samples_mean_std_and_callback():
    prior, sched = dps.load_model("analytic")
    eig, _, _ = small_system()
    seen = []
    out, inter = dps.EigenPSFDPSPipeline(prior, sched, eig)(
        torch.rand(2, 3, 16, 16), num_inference_steps=10, step_size=1.0, num_samples=3,
        generator=torch.Generator().manual_seed(0), intermediate_freq=4, callback=lambda i, t, *a: seen.append((i, t)))
    assert out["samples"].shape == (2, 3, 3, 16, 16)
    assert torch.allclose(out["mean"], out["samples"].mean(1)) and torch.allclose(out["std"], out["samples"].std(1))
    assert inter["steps"] == [0, 4, 8, 9] and inter["x0_hat"][0].shape == (6, 3, 16, 16)
    assert [i for i, _ in seen] == list(range(10)) and seen[0][1] > seen[-1][1]


def test_bf16_autocast_x0_close_to_fp32():
    unet, sched = tiny_unet(), tiny_scheduler()
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400)
    eps32 = unet(x_t, t).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eps16 = unet(x_t, t).sample.float()
    a = sched.alphas_cumprod[400]
    x0_32, x0_16 = dps.tweedie_estimate(x_t, eps32, a), dps.tweedie_estimate(x_t, eps16, a)
    assert (x0_16 - x0_32).norm() / x0_32.norm() < 0.02
    eig, _, _ = small_system()
    out, _ = dps.EigenPSFDPSPipeline(unet, sched, eig)(torch.rand(1, 3, 16, 16), num_inference_steps=5,
                                                       dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_analytic_prior_ignores_half_precision_autocast():
    prior, sched = dps.load_model("analytic")
    eig, _, _ = small_system()
    y = torch.rand(1, 3, 16, 16)
    runs = [dps.EigenPSFDPSPipeline(prior, sched, eig)(y, num_inference_steps=20, dtype=dt,
                                                       generator=torch.Generator().manual_seed(0))[0]
            for dt in (torch.float32, torch.bfloat16)]
    assert torch.equal(*runs)


def test_resume_from_saved_state_is_bit_identical():
    unet, sched = tiny_unet(), tiny_scheduler()
    eig, _, _ = small_system()
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    y = torch.rand(1, 3, 16, 16)
    full, _ = pipe(y, num_inference_steps=12, step_size=1.0, generator=torch.Generator().manual_seed(3))
    saved = {}

    class Stop(Exception):
        pass

    def cb(i, t, x_t, x0_hat, res):
        if i == 5:
            saved.update(x_t=x_t.clone(), state=gen.get_state())
            raise Stop

    gen = torch.Generator().manual_seed(3)
    with pytest.raises(Stop):
        pipe(y, num_inference_steps=12, step_size=1.0, generator=gen, callback=cb)
    gen2 = torch.Generator()
    gen2.set_state(saved["state"])
    resumed, _ = pipe(y, num_inference_steps=12, step_size=1.0, generator=gen2, x_T=saved["x_t"], start_index=6)
    assert torch.equal(full, resumed)


def test_bad_sampler_arguments():
    pipe = dps.EigenPSFDPSPipeline(tiny_unet(), tiny_scheduler(), small_system()[0])
    y = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(y, num_inference_steps=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(y, num_inference_steps=1001)
    with pytest.raises(ValueError, match="step_size"):
        pipe(y, step_size=-1)


# --- 5. models: local directories, the cache and the downloader -------------------------------

def test_load_local_directory_and_analytic(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    unet, sched = dps.load_model(path)
    ref = tiny_unet()
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(unet(x, 10).sample, ref(x, 10).sample, atol=1e-5)
    assert sched.config.num_train_timesteps == 1000
    prior, s2 = dps.load_model("analytic")
    assert prior(torch.randn(1, 3, 20, 30), 10).sample.shape == (1, 3, 20, 30)


def test_missing_local_directory_is_clear(tmp_path):
    with pytest.raises(dps.ModelUnavailableError, match="does not exist"):
        dps.load_model(str(tmp_path / "nope"))


@pytest.fixture
def tiny_files(tmp_path):
    return files_from_dir(save_tiny_model(tmp_path / "src"))


def test_download_resumes_dropped_connection_byte_identical(tmp_path, tiny_files, monkeypatch):
    weights = "diffusion_pytorch_model.safetensors"
    half = len(tiny_files[weights]) // 2
    with FakeHub("acme/tiny-ddpm", tiny_files, drop_first_at={weights: half}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        snap = dps.download_model("acme/tiny-ddpm", cache_dir=tmp_path / "cache", max_retries=3, backoff_base=0.01,
                                  progress=False)
    ranges = [r for p, r in hub.requests if p.endswith(weights)]
    assert ranges[0] is None and ranges[1] is not None
    assert int(ranges[1][len("bytes="):].rstrip("-")) >= half - 65536 and int(ranges[1][6:].rstrip("-")) > 0
    for name, data in tiny_files.items():
        assert open(os.path.join(snap, name), "rb").read() == data
    unet, _ = dps.load_model("acme/tiny-ddpm", cache_dir=tmp_path / "cache", local_files_only=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(unet(x, 3).sample, tiny_unet()(x, 3).sample, atol=1e-5)


def test_download_killed_process_resumes(tmp_path, tiny_files):
    weights = "diffusion_pytorch_model.safetensors"
    cache = tmp_path / "cache"
    with FakeHub("acme/tiny-ddpm", tiny_files, trickle_s=0.01) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": ROOT}
        code = f"import dps; dps.download_model('acme/tiny-ddpm', cache_dir={str(cache)!r}, progress=False)"
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
        partial_dir = cache / "models--acme--tiny-ddpm" / ".partial" / hub.sha
        partial = partial_dir / (weights + ".incomplete")
        deadline = time.time() + 60
        while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 40000):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = partial.stat().st_size
        assert 0 < kept < len(tiny_files[weights])
        hub.trickle_s = 0.0
        os.environ["HF_ENDPOINT"] = hub.endpoint
        try:
            snap = dps.download_model("acme/tiny-ddpm", cache_dir=cache, progress=False)
        finally:
            del os.environ["HF_ENDPOINT"]
    last = [r for p, r in hub.requests if p.endswith(weights)][-1]
    assert last == f"bytes={kept}-"
    assert open(os.path.join(snap, weights), "rb").read() == tiny_files[weights]


def test_corrupt_download_fails_checksum(tmp_path, tiny_files, monkeypatch):
    with FakeHub("acme/tiny-ddpm", tiny_files, corrupt=True) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(dps.ModelUnavailableError, match="checksum"):
            dps.download_model("acme/tiny-ddpm", cache_dir=tmp_path / "c", max_retries=2, backoff_base=0.01,
                               progress=False)
    assert dps.cached_snapshot("acme/tiny-ddpm", tmp_path / "c") is None


def test_unreachable_hub_empty_cache_errors_quickly(tmp_path, monkeypatch):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.time()
    with pytest.raises(dps.ModelUnavailableError, match="--download_only.*--model_cache"):
        dps.load_model("acme/tiny-ddpm", cache_dir=tmp_path / "empty")
    assert time.time() - t0 < 10


def test_offline_mode_never_touches_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(dps.ModelUnavailableError, match="offline"):
        dps.load_model("acme/tiny-ddpm", cache_dir=tmp_path)


def test_hf_home_is_honoured(tmp_path, tiny_files, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with FakeHub("acme/tiny-ddpm", tiny_files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "secret-token")
        snap = dps.download_model("acme/tiny-ddpm", progress=False)
    assert snap.startswith(str(tmp_path / "hfhome" / "hub"))
    assert set(hub.authorization) == {"Bearer secret-token"}
    assert dps.cached_snapshot("acme/tiny-ddpm") == snap
