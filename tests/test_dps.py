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

import config
import dps
import physics
import priors
from fakehub import FakeHub, files_from_dir
from helpers import dense_matrix, face_under_defocus, full_and_resumed, save_tiny_model, tiny_scheduler, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_system(H=16, W=16, n=2, mode="motion", **params):
    pc = dict(blur_mode=mode, kernel_size=5, grid_size=2, n_eigen_psfs=n, form="gather", boundary="reflect",
              motion=dict(max_length=4), defocus=dict(max_radius=2), **params)
    field, _ = physics.create_ground_truth(H, W, pc, seed=0)
    return physics.build_operators(field.node_grid(), H, W, pc)   # (EigenPSF op, its full-rank grid op, decomposition)


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


# --- 1. equals diffusers' DDPMPipeline with ζ = 0 ------------------------------------------

@pytest.mark.parametrize("steps", [1, 13, 50])
def test_zero_step_size_matches_diffusers_ddpm_pipeline(steps):
    unet, sched = tiny_unet(), tiny_scheduler()
    eig, _, _ = small_system()
    y = torch.rand(2, 3, 16, 16)
    ours, _ = dps.EigenPSFDPSPipeline(unet, sched, eig)(
        y, num_inference_steps=steps, options={"step_size": 0.0}, generator=torch.Generator().manual_seed(1))
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
    x, eig, true = face_under_defocus(40, kernel_size=9, max_radius=4)
    sigma = 0.02
    y = true(x) + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior, sched = priors.load_model("analytic")
    mu = prior.mu.view(1, -1, 1, 1).expand_as(x)
    half = lambda v: prior.apply_covariance(v, 0.5)                       # Σ^{1/2}
    normal = lambda w: w + half(eig.adjoint(eig(half(w)))) / (4 * sigma ** 2)
    rhs = half(eig.adjoint(y - eig(torch.ones_like(x)) / 2 - eig(mu) / 2)) / (2 * sigma ** 2)
    x_pm = ((mu + half(conjugate_gradient(normal, rhs))) + 1) / 2
    # DPS over the same prior and operator, mean of 8 posterior samples.
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig.float())
    out, _ = pipe(y.float(), num_inference_steps=1000, options={"step_size": 4.0}, num_samples=8,
                  generator=torch.Generator().manual_seed(1))
    x = x.float()
    p_blur, p_pm, p_dps = psnr(y.float().clamp(0, 1), x), psnr(x_pm.float().clamp(0, 1), x), psnr(out["mean"][0], x)
    # measured: blurred 20.6 dB, posterior mean 23.9 dB, DPS mean 23.1 dB (30.1 dB against the exact mean)
    assert p_dps > p_blur + 1.0, (p_blur, p_pm, p_dps)
    assert p_dps > p_pm - 1.5, (p_blur, p_pm, p_dps)
    assert psnr(out["mean"][0], x_pm.float()) > 26.0  # DPS mean is close to the exact mean itself


# --- 3. the analytic prior's denoiser is the exact MMSE ------------------------------------------

def test_analytic_eps_equals_dense_mmse():
    prior, sched = priors.load_model("analytic")
    C, H, W = 3, 4, 6
    # Dense prior covariance Σ = Σ_c ⊗ R, with R the circulant autocovariance from the spectrum.
    s = torch.fft.irfft2(priors._spectrum_shape(H, W, prior.f0, "cpu", torch.float64), s=(H, W), norm="ortho")
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
    fit = priors.fit_analytic_prior()
    np.testing.assert_allclose(fit["mean"], priors.ANALYTIC_PRIOR["mean"], atol=1e-3)
    np.testing.assert_allclose(fit["channel_cov"], priors.ANALYTIC_PRIOR["channel_cov"], atol=1e-4)
    assert abs(fit["f0"] - priors.ANALYTIC_PRIOR["f0"]) < 1e-4


# --- 4. guidance, batching, divergence, knobs -----------------------------------------------------

def test_guidance_lowers_residual():
    prior, sched = priors.load_model("analytic")
    eig, true, _ = small_system(32, 32, n=4)
    x = torch.rand(1, 3, 32, 32)
    y = true(x)
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
    res = {}
    for zeta in (0.0, 2.0):
        _, inter = pipe(y, num_inference_steps=100, options={"step_size": zeta}, generator=torch.Generator().manual_seed(0),
                        intermediate_freq=99)
        res[zeta] = float(inter["residual"][-1][0])
    assert res[2.0] < 0.5 * res[0.0], res


@pytest.mark.parametrize("prior_kind,method", [("tiny_unet", "dps"), ("analytic", "dps"), ("tiny_unet", "diffpir")])
def test_batch_independence_with_per_image_generators(prior_kind, method):
    """Per-image generators (diffusers' list form) and the per-image norm make images independent.
    Equality is to float tolerance, not bitwise: batched convolutions may sum in another order."""
    unet, sched = (tiny_unet(), tiny_scheduler()) if prior_kind == "tiny_unet" else priors.load_model("analytic")
    eig, _, _ = small_system()
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    # A measurement that the operator can explain: on uniform noise (no image explains it) DiffPIR's
    # data steps run to their cap in float32, where batched rounding moves each stopping point
    # within the solve's stated tolerance (1% of the correction), far above this test's 1e-4.
    y = eig(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    y = y + 0.02 * torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(num_inference_steps=20, method=method, sigma_y=0.02)
    both, _ = pipe(y, generator=gens([5, 6]), **kw)
    one, _ = pipe(y[:1], generator=gens([5]), **kw)
    assert torch.allclose(both[:1], one, atol=1e-4), (both[:1] - one).abs().max()
    other, _ = pipe(y[1:], generator=gens([6]), **kw)
    assert torch.allclose(both[1:], other, atol=1e-4)


def test_huge_step_size_diverges_with_clear_error():
    unet, sched = tiny_unet(), tiny_scheduler(clip_sample=False)
    eig, _, _ = small_system()
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    with pytest.raises(dps.DivergenceError, match=r"diverged at step \d+/50.*smaller step_size.*gradient_clip") as ei:
        pipe(torch.rand(1, 3, 16, 16), num_inference_steps=50, options={"step_size": 1e38}, check_every=5,
             generator=torch.Generator().manual_seed(0), intermediate_freq=1)
    assert 1 <= ei.value.step <= 50
    assert ei.value.intermediates["steps"]  # what existed is handed back


def test_runaway_x_t_is_divergence_not_success():
    """A step size far too large drives x_t far beyond the diffusion's ‖x_t‖ ≤ √n: that must stop
    as a divergence, not end 'complete' (while a sane step size finishes)."""
    unet, sched = priors.load_model("analytic")
    eig, true, _ = small_system()
    y = true(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    with pytest.raises(dps.DivergenceError, match=r"ran away to .*√n.*smaller step_size") as ei:
        pipe(y, num_inference_steps=60, options={"step_size": 1e9}, check_every=5, generator=torch.Generator().manual_seed(0))
    assert ei.value.step < 60
    out, _ = pipe(y, num_inference_steps=60, options={"step_size": 1.0}, check_every=5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


class BiasedEps(torch.nn.Module):
    """An ε-model with a constant error at t > 800, where learned models err most: x̂₀ unclamped is
    then off by bias·√(1−ᾱ_t)/√ᾱ_t, some 10–30 at the first steps, while x_t stays in range."""

    def __init__(self, unet, bias):
        super().__init__()
        self.unet, self.bias, self.config = unet, bias, unet.config

    def forward(self, x_t, t):
        out = self.unet(x_t, t)
        return type(out)(sample=out.sample + (self.bias if int(t) > 800 else 0.0))


def test_an_ill_conditioned_x0_hat_early_is_not_divergence():
    """Unclamped x̂₀ of an imperfect ε-model lies far off the data at the first steps (its residual
    many times ‖y‖), yet the run is sound: only x_t running away is a divergence."""
    unet, sched = priors.load_model("analytic")
    eig, true, _ = small_system()
    y = true(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    pipe = dps.EigenPSFDPSPipeline(BiasedEps(unet, 0.2), sched, eig)
    out, inter = pipe(y, num_inference_steps=60, options={"step_size": 1.0, "gradient_clip": 1.0}, check_every=1,
                      clip_denoised=False, intermediate_freq=1, generator=torch.Generator().manual_seed(0))
    y_norm = float(torch.linalg.vector_norm(y))
    assert all(float(r) > 10 * y_norm for r in inter["residual"][:3])   # what the old rule called a runaway
    assert torch.isfinite(out).all() and float(inter["residual"][-1]) < y_norm


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
    prior, sched = priors.load_model("analytic")
    eig, _, _ = small_system()
    seen = []
    out, inter = dps.EigenPSFDPSPipeline(prior, sched, eig)(
        torch.rand(2, 3, 16, 16), num_inference_steps=10, options={"step_size": 1.0}, num_samples=3,
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
    for method in dps.SAMPLERS:
        out, _ = dps.EigenPSFDPSPipeline(unet, sched, eig)(torch.rand(1, 3, 16, 16), num_inference_steps=5, method=method,
                                                           dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), method


def test_analytic_prior_ignores_half_precision_autocast():
    prior, sched = priors.load_model("analytic")
    eig, _, _ = small_system()
    y = torch.rand(1, 3, 16, 16)
    runs = [dps.EigenPSFDPSPipeline(prior, sched, eig)(y, num_inference_steps=20, dtype=dt,
                                                       generator=torch.Generator().manual_seed(0))[0]
            for dt in (torch.float32, torch.bfloat16)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("method", ["dps", "diffpir", "daps"])
def test_resume_from_saved_state_is_bit_identical(method):
    unet, sched = tiny_unet(), tiny_scheduler()
    eig, _, _ = small_system()
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    y = torch.rand(1, 3, 16, 16)
    full, resumed = full_and_resumed(pipe, y, num_inference_steps=12, method=method, sigma_y=0.01)
    assert torch.equal(full, resumed)


def test_bad_sampler_arguments():
    pipe = dps.EigenPSFDPSPipeline(tiny_unet(), tiny_scheduler(), small_system()[0])
    y = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(y, num_inference_steps=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(y, num_inference_steps=1001)
    with pytest.raises(ValueError, match="step_size"):
        pipe(y, options={"step_size": -1})
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        pipe(y, method="ddim")
    with pytest.raises(ValueError, match="unknown dps option.*zeta"):
        pipe(y, options={"zeta": 0.5})
    with pytest.raises(ValueError, match="zeta must be in"):
        pipe(y, method="diffpir", options={"zeta": 1.5})
    with pytest.raises(ValueError, match=r"1\.\.5\d\d for diffpir"):
        pipe(y, method="diffpir", num_inference_steps=1000)
    with pytest.raises(ValueError, match="sigma_y"):
        pipe(y, method="diffpir", sigma_y=-0.1)


# --- 5. models: local directories, the cache and the downloader -------------------------------

def test_load_local_directory_and_analytic(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    unet, sched = priors.load_model(path)
    ref = tiny_unet()
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(unet(x, 10).sample, ref(x, 10).sample, atol=1e-5)
    assert sched.config.num_train_timesteps == 1000
    prior, s2 = priors.load_model("analytic")
    assert prior(torch.randn(1, 3, 20, 30), 10).sample.shape == (1, 3, 20, 30)


def test_missing_local_directory_is_clear(tmp_path):
    with pytest.raises(priors.ModelUnavailableError, match="does not exist"):
        priors.load_model(str(tmp_path / "nope"))


@pytest.fixture
def tiny_files(tmp_path):
    return files_from_dir(save_tiny_model(tmp_path / "src"))


def test_download_resumes_dropped_connection_byte_identical(tmp_path, tiny_files, monkeypatch):
    weights = "diffusion_pytorch_model.safetensors"
    half = len(tiny_files[weights]) // 2
    with FakeHub("acme/tiny-ddpm", tiny_files, drop_first_at={weights: half}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        snap = priors.download_model("acme/tiny-ddpm", cache_dir=tmp_path / "cache", max_retries=3, backoff_base=0.01,
                                  progress=False)
    ranges = [r for p, r in hub.requests if p.endswith(weights)]
    assert ranges[0] is None and ranges[1] is not None
    assert int(ranges[1][len("bytes="):].rstrip("-")) >= half - 65536 and int(ranges[1][6:].rstrip("-")) > 0
    for name, data in tiny_files.items():
        assert open(os.path.join(snap, name), "rb").read() == data
    unet, _ = priors.load_model("acme/tiny-ddpm", cache_dir=tmp_path / "cache", local_files_only=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(unet(x, 3).sample, tiny_unet()(x, 3).sample, atol=1e-5)


def test_download_killed_process_resumes(tmp_path, tiny_files):
    weights = "diffusion_pytorch_model.safetensors"
    cache = tmp_path / "cache"
    with FakeHub("acme/tiny-ddpm", tiny_files, trickle_s=0.01) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": ROOT}
        code = f"import priors; priors.download_model('acme/tiny-ddpm', cache_dir={str(cache)!r}, progress=False)"
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
            snap = priors.download_model("acme/tiny-ddpm", cache_dir=cache, progress=False)
        finally:
            del os.environ["HF_ENDPOINT"]
    last = [r for p, r in hub.requests if p.endswith(weights)][-1]
    assert last == f"bytes={kept}-"
    assert open(os.path.join(snap, weights), "rb").read() == tiny_files[weights]


def test_corrupt_download_fails_checksum(tmp_path, tiny_files, monkeypatch):
    with FakeHub("acme/tiny-ddpm", tiny_files, corrupt=True) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(priors.ModelUnavailableError, match="checksum"):
            priors.download_model("acme/tiny-ddpm", cache_dir=tmp_path / "c", max_retries=2, backoff_base=0.01,
                               progress=False)
    assert priors.cached_snapshot("acme/tiny-ddpm", tmp_path / "c") is None


def test_unreachable_hub_empty_cache_errors_quickly(tmp_path, monkeypatch):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.time()
    with pytest.raises(priors.ModelUnavailableError, match="--download_only.*--model_cache"):
        priors.load_model("acme/tiny-ddpm", cache_dir=tmp_path / "empty")
    assert time.time() - t0 < 10


def test_offline_mode_never_touches_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(priors.ModelUnavailableError, match="offline"):
        priors.load_model("acme/tiny-ddpm", cache_dir=tmp_path)


def test_hf_home_is_honoured(tmp_path, tiny_files, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with FakeHub("acme/tiny-ddpm", tiny_files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "secret-token")
        snap = priors.download_model("acme/tiny-ddpm", progress=False)
    assert snap.startswith(str(tmp_path / "hfhome" / "hub"))
    assert set(hub.authorization) == {"Bearer secret-token"}
    assert priors.cached_snapshot("acme/tiny-ddpm") == snap


# --- 6. DiffPIR and the sampler registry -----------------------------------------------------------

def test_registry_defaults_are_config_yaml():
    """config.yaml is the one source of defaults: the library's must equal it, sampler by sampler."""
    cfg = config.load_config(os.path.join(ROOT, "config.yaml"))["sampler"]
    assert set(dps.SAMPLERS) == set(config.SAMPLER_METHODS) == set(dps.DEFAULT_STEPS)
    for name, (step, defaults) in dps.SAMPLERS.items():
        assert cfg[name] == defaults, name
        assert callable(step)


def test_conjugate_gradient_per_image_matches_dense_solve_and_ignores_neighbours():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    M = M @ M.T + 0.1 * torch.eye(12, dtype=torch.float64)
    apply = lambda v: (v.reshape(v.shape[0], 12) @ M).reshape(v.shape)
    b = torch.randn(3, 1, 3, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 1e3]).view(3, 1, 1, 1)
    x, iters = dps.conjugate_gradient(apply, b, torch.zeros_like(b), 200, 1e-10)
    ref = torch.linalg.solve(M, b.reshape(3, 12).T).T.reshape(b.shape)
    assert torch.allclose(x, ref, rtol=1e-7, atol=1e-12) and (iters <= 13).all()
    # An image stops when it converges, whatever its neighbours still need.
    loose, it_b = dps.conjugate_gradient(apply, b, torch.zeros_like(b), 200, 1e-3)
    alone, it_1 = dps.conjugate_gradient(apply, b[1:2], torch.zeros_like(b[1:2]), 200, 1e-3)
    assert torch.equal(loose[1:2], alone) and it_b[1] == it_1[0]


def test_preconditioned_cg_solves_the_same_system_in_fewer_iterations():
    """An ill-conditioned M = D + low rank: with P = D (exact inverse known) PCG lands on the dense
    solution, in fewer iterations than plain CG; a useless P (the identity) changes nothing."""
    g = torch.Generator().manual_seed(2)
    n = 40
    d = torch.logspace(0, 5, n, dtype=torch.float64)
    U = torch.randn(n, 3, generator=g, dtype=torch.float64)
    M = torch.diag(d) + U @ U.T
    apply = lambda v: (v.reshape(v.shape[0], n) @ M).reshape(v.shape)  # noqa: E731
    b = torch.randn(2, 1, 5, 8, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve(M, b.reshape(2, n).T).T.reshape(b.shape)
    plain, it_plain = dps.conjugate_gradient(apply, b, torch.zeros_like(b), 500, 1e-12)
    pcg, it_pcg = dps.conjugate_gradient(apply, b, torch.zeros_like(b), 500, 1e-12,
                                         lambda v: (v.reshape(v.shape[0], n) / d).reshape(v.shape))
    torch.testing.assert_close(pcg, ref, rtol=1e-8, atol=1e-12)
    assert (it_pcg <= 6).all() and (it_pcg < it_plain).all(), (it_pcg, it_plain)
    same, it_same = dps.conjugate_gradient(apply, b, torch.zeros_like(b), 500, 1e-12, lambda v: v)
    assert torch.equal(it_same, it_plain) and torch.allclose(same, plain, rtol=1e-10, atol=1e-14)


def test_diffpir_without_data_and_fresh_noise_is_deterministic_ddim():
    """λ → ∞ makes the data step the identity and ζ = 0 removes the fresh noise: DiffPIR is then
    DDIM with η = 0 (Song et al. 2021, Eq. 12) on DiffPIR's quadratic timesteps, written out here."""
    unet, sched = tiny_unet(), tiny_scheduler(clip_sample=False)
    eig, _, _ = small_system()
    y = torch.rand(1, 3, 16, 16)
    out, _ = dps.EigenPSFDPSPipeline(unet, sched, eig)(
        y, num_inference_steps=15, method="diffpir", options={"lambda": 1e30, "zeta": 0.0}, sigma_y=0.1,
        generator=torch.Generator().manual_seed(4))
    ts = dps.quadratic_timesteps(15, 1000)
    assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    abar = sched.alphas_cumprod
    with torch.no_grad():
        for k, t in enumerate(ts):
            a, a_prev = abar[t], abar[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0)
            eps = unet(x, torch.tensor(t)).sample
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert torch.allclose(out, ((x + 1) / 2).clamp(0, 1), atol=1e-4), (out - ((x + 1) / 2).clamp(0, 1)).abs().max()


@pytest.mark.slow
def test_diffpir_near_exact_posterior_mean_and_beats_dps_at_a_tenth_of_the_steps():
    """Analytic prior, so the posterior is Gaussian and its mean exact (dps.gaussian_posterior, checked
    against this file's own CG in test_dps_lands_near_exact_posterior_mean). y comes from the
    reconstruction model itself, so the prior and the likelihood are DiffPIR's own. DiffPIR at 100
    steps with every data step solved (its algorithm as written) must land near that mean, closer
    than DPS at 250 steps, with no backward pass; with the default discrepancy stop it lands
    further from it (the rule regularises), still closer than DPS."""
    x, eig, _ = face_under_defocus(32, kernel_size=7, max_radius=3)
    sigma = 0.01
    y = eig(x) + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior, sched = priors.load_model("analytic")
    exact, _ = dps.gaussian_posterior(prior, eig, y, sigma)
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig.float())
    run = lambda m, n, o: pipe(y.float(), num_inference_steps=n, method=m, options=o, sigma_y=sigma, num_samples=4,
                               generator=torch.Generator().manual_seed(1))[0]["mean"]
    solved, default = run("diffpir", 100, {"discrepancy": 0.0}), run("diffpir", 100, None)
    dps_mean = run("dps", 250, {"step_size": 4.0})
    xs, ex = x.float(), exact.float()
    # measured (noise seeds 0, 1, 2): blurred 21.3, exact mean 25.7-26.0 dB; DiffPIR solved 24.0-24.3,
    # default 22.8-23.0, DPS 23.3-23.4 dB against the truth; against the exact mean DiffPIR solved
    # 29.3-29.4, default 27.3, DPS 25.6-25.8 dB (a 4-sample mean: sampling noise bounds these)
    assert psnr(solved[0], xs) > psnr(y.float().clamp(0, 1), xs) + 2.0
    assert psnr(solved[0], ex) > 28.5 and psnr(solved[0], ex) > psnr(dps_mean[0], ex) + 2.5
    assert 27.0 < psnr(default[0], ex) < psnr(solved[0], ex) and psnr(default[0], ex) > psnr(dps_mean[0], ex) + 1.0


def dense_posterior(prior, eig, y, sigma, shape, prior_scale=1.0):
    """(mean, covariance) of the analytic prior's posterior in [0, 1] image units, by dense linear
    algebra on the operator's matrix taken column by column: independent of CG and of the adjoint.
    prior_scale γ: the prior's covariance is γΣ."""
    A = dense_matrix(eig, shape) / 2                                       # x₀ in [−1, 1] -> y
    S = prior_scale * dense_matrix(lambda v: prior.apply_covariance(v), shape)   # prior covariance γΣ
    post = torch.linalg.inv(torch.linalg.inv(S) + A.T @ A / sigma ** 2)
    mu = prior.mu.view(1, -1, 1, 1).expand(1, *shape).reshape(-1)
    half = torch.full((int(np.prod(shape)),), 0.5, dtype=torch.float64)
    rhs = torch.linalg.solve(S, mu) + A.T @ (y.reshape(-1) - dense_matrix(eig, shape) @ half) / sigma ** 2
    return (post @ rhs + 1) / 2, post / 4


def test_gaussian_posterior_samples_have_the_exact_covariance():
    """Perturbation-optimisation draws, against the dense posterior covariance of a tiny problem."""
    eig, _, _ = small_system(6, 6, n=2)
    eig = eig.double()
    prior, _ = priors.load_model("analytic")
    y, sigma = torch.rand(1, 3, 6, 6, dtype=torch.float64), 0.1
    mean, draws = dps.gaussian_posterior(prior, eig, y, sigma, n_samples=4000,
                                         generator=torch.Generator().manual_seed(0), tol=1e-10)
    post_mean, post_cov = dense_posterior(prior, eig, y, sigma, (3, 6, 6))
    assert torch.allclose(mean.reshape(-1), post_mean, atol=1e-6)
    std = draws[0].reshape(4000, -1).std(0)
    assert torch.allclose(std, post_cov.diagonal().sqrt(), rtol=0.06), (std / post_cov.diagonal().sqrt()).aminmax()


def test_exact_method_gives_each_image_its_dense_posterior_mean():
    """method 'exact' on a batch of two images, each with its own operator (stacked) and its own σ_y:
    each result is its image's dense posterior mean, the solve reports a relative residual within
    cg_tol, and a learned prior is refused (it has no closed form)."""
    prior, sched = priors.load_model("analytic")
    ops = [small_system(6, 6, n=2)[0].double(), small_system(6, 6, n=2, mode="defocus")[0].double()]
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5 + 0.25
    y = torch.cat([op(x[b:b + 1]) for b, op in enumerate(ops)])
    sigmas = [0.05, 0.2]
    pipe = dps.EigenPSFDPSPipeline(prior, sched, physics.stack_operators(ops))
    out, inter = pipe(y.float(), method="exact", options={"cg_tol": 1e-9, "evidence": False}, sigma_y=sigmas)
    for b, op in enumerate(ops):
        post_mean, _ = dense_posterior(prior, op, y[b:b + 1], sigmas[b], (3, 6, 6))
        assert torch.allclose(out[b].double().reshape(-1), post_mean.clamp(0, 1).float().double(), atol=1e-5), b
    assert all(r <= 1e-9 for r in inter["exact"]["relative_residual"]) and min(inter["exact"]["cg_iterations"]) >= 1
    assert inter["exact"]["prior_scale"] == [1.0, 1.0] and inter["exact"]["sigma_y"] == sigmas
    # the default: each image's γ and σ_e by evidence, and then its dense posterior mean under them
    out, inter = pipe(y.float(), method="exact", options={"cg_tol": 1e-9}, sigma_y=sigmas)
    gammas, sigma_e = inter["exact"]["prior_scale"], inter["exact"]["sigma_y"]
    assert inter["exact"]["evidence"] and gammas[0] != gammas[1] and sigma_e != sigmas
    for b, op in enumerate(ops):
        post_mean, _ = dense_posterior(prior, op, y[b:b + 1], sigma_e[b], (3, 6, 6), gammas[b])
        assert torch.allclose(out[b].double().reshape(-1), post_mean.clamp(0, 1).float().double(), atol=1e-5), b
    with pytest.raises(ValueError, match="no closed-form|has none"):
        dps.EigenPSFDPSPipeline(tiny_unet(), tiny_scheduler(), ops[0])(y[:1].float(), method="exact", sigma_y=0.1)


@pytest.mark.parametrize("mode", ["motion", "defocus"])
def test_exact_posterior_preconditioner_cuts_the_iterations(monkeypatch, mode):
    """The centre-PSF preconditioner of the exact posterior steers CG to the same answer in a
    fraction of the iterations at small σ (measured at 32², tol 1e-6: 105-166 against 761-879 at
    σ = 0.005, 36-49 against 247-273 at 0.02): at most a third of plain CG's here, at the default
    tolerance, and the same image to 1e-4."""
    prior, _ = priors.load_model("analytic")
    eig = small_system(32, 32, n=3, mode=mode)[0].double()
    y = eig(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for sigma in (0.005, 0.02):
        tol = dps.OPTIONS["exact"]["cg_tol"]
        mean, _, st = dps.exact_posterior(prior, eig, y, sigma, tol=tol)
        with monkeypatch.context() as m:
            m.setattr(dps, "_posterior_preconditioner", lambda *args: None)
            plain, _, st0 = dps.exact_posterior(prior, eig, y, sigma, tol=tol)
        assert int(st["cg_iterations"]) <= int(st0["cg_iterations"]) / 3, (sigma, st, st0)
        assert torch.allclose(mean, plain, atol=1e-4)


def stationary_system(H, k=9, width=1.5):
    """The EigenPSF operator of one Gaussian PSF at every node with periodic boundary: a periodic
    convolution, the operator evidence_nll's approximation takes A to be."""
    r = torch.arange(k, dtype=torch.float64) - k // 2
    psf = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * width ** 2))
    grid = (psf / psf.sum()).expand(2, 2, k, k).contiguous()
    pc = dict(kernel_size=k, grid_size=2, n_eigen_psfs=1, form="gather", boundary="circular")
    return physics.build_operators(grid, H, H, pc)[0].double()


def test_evidence_gives_back_the_prior_scale_and_noise_the_measurement_was_drawn_with():
    """Two measurements drawn from the very model evidence_fit assumes: x₀ ~ N(μ, γΣ) (the analytic
    prior's periodic draws rescaled), a periodic blur, noise σ_e, with σ_y given as half of σ_e (the
    model error the fit is there to absorb). It returns each image's γ within 10% and σ_e within 3%
    (measured at 128²: 0.197 for 0.2, 3.03 for 3; 0.0199 for 0.02, 0.0050 for 0.005), and the
    negative log-evidence is smallest there among nearby values."""
    H = 128
    op = stationary_system(H)
    prior, _ = priors.load_model("analytic")
    gen = torch.Generator().manual_seed(0)
    gamma, sigma_e = torch.tensor([0.2, 3.0], dtype=torch.float64), torch.tensor([0.02, 0.005], dtype=torch.float64)
    x0, mu = prior.sample_prior((2, 3, H, H), generator=gen).double(), prior.mu.view(1, -1, 1, 1)
    x = (mu + gamma.sqrt().view(2, 1, 1, 1) * (x0 - mu) + 1) / 2
    y = op(x) + sigma_e.view(2, 1, 1, 1) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    g, s = dps.evidence_fit(prior, op, y, sigma_e / 2)
    assert torch.allclose(g, gamma, rtol=0.1) and torch.allclose(s, sigma_e, rtol=0.03), (g, s)
    at_fit = dps.evidence_nll(prior, op, y, g, s)
    for fg, fs in ((1.3, 1), (1 / 1.3, 1), (1, 1.1), (1, 1 / 1.1)):
        assert (dps.evidence_nll(prior, op, y, g * fg, s * fs) > at_fit).all(), (fg, fs)


def test_exact_method_floors_sigma_like_diffpir():
    """σ_y = 0 (a noise-free simulation, or an estimate of 0 on a clean image) is floored at
    SIGMA_Y_FLOOR, as DiffPIR floors it: the same answer as at the floor, finite."""
    prior, sched = priors.load_model("analytic")
    eig = small_system(6, 6, n=2)[0]
    y = eig(torch.full((1, 3, 6, 6), 0.5))
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
    at_zero, _ = pipe(y, method="exact", sigma_y=0.0)
    at_floor, _ = pipe(y, method="exact", sigma_y=dps.SIGMA_Y_FLOOR)
    assert torch.isfinite(at_zero).all() and torch.equal(at_zero, at_floor)


def test_exact_method_draws_come_around_the_exact_mean():
    """With num_samples > 1 the exact method returns exact posterior draws (their spread matches the
    dense posterior's standard deviation) and the exact mean itself as `mean`."""
    prior, sched = priors.load_model("analytic")
    eig = small_system(6, 6, n=2)[0].double()
    y = eig(torch.full((1, 3, 6, 6), 0.5, dtype=torch.float64))
    out, _ = dps.EigenPSFDPSPipeline(prior, sched, eig)(y.float(), method="exact", num_samples=400, sigma_y=0.1,
                                                        generator=torch.Generator().manual_seed(0),
                                                        options={"evidence": False})
    post_mean, post_cov = dense_posterior(prior, eig, y, 0.1, (3, 6, 6))
    assert out["samples"].shape == (1, 400, 3, 6, 6)
    assert torch.allclose(out["mean"].double().reshape(-1), post_mean.clamp(0, 1), atol=1e-5)
    ratio = out["std"].double().reshape(-1) / post_cov.diagonal().sqrt()
    assert 0.8 < float(ratio.median()) < 1.2, ratio.aminmax()


def test_region_gains_of_a_mono_operator_whose_channels_differ_by_rounding():
    """A mono operator's batched FFTs can leave its channels 1e-11 apart at one probe and equal at
    another (measured at K = 15): the preconditioner's gains must still have one shape (this
    crashed DiffPIR's first step of a 64² motion simulation)."""
    eig, _, _ = small_system(16, 16, n=2)
    calls = []

    def rounding(x):      # channel 0 of the first probe's response off by rounding only
        out = eig(x)
        calls.append(1)
        if len(calls) == 1:
            out = out.clone()
            out[:, 0] += 1e-12 * out[:, 0].abs().max()
        return out
    gains, _ = dps.region_psf_gains(rounding, (1, 3, 16, 16), "cpu", torch.float32)
    assert gains.shape == (1, 4, 1, 16, 9)


def test_diffpir_with_zero_sigma_stays_finite():
    prior, sched = priors.load_model("analytic")
    eig, true, _ = small_system()
    y = true(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    out, inter = dps.EigenPSFDPSPipeline(prior, sched, eig)(y, num_inference_steps=20, method="diffpir", sigma_y=0.0,
                                                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and len(inter["cg_iterations"]) == 20
    assert 1 <= max(inter["cg_iterations"]) <= dps.SAMPLERS["diffpir"][1]["cg_max_iter"]


def test_diffpir_through_cropped_luminance_operator():
    """Odd-sized gray y, RGB prior on a padded domain: the data step goes through both wrappers'
    adjoints, and it pulls x̂₀ toward the data (against the same run with the data step off)."""
    unet, sched = tiny_unet(), tiny_scheduler()
    eig, _, _ = small_system()
    op = physics.LuminanceOperator(physics.CroppedOperator(eig, 1, 2, 13, 11))
    y = op(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))        # (1, 1, 13, 11)
    pipe = dps.EigenPSFDPSPipeline(unet, sched, op)
    res = {}
    for lam in (1.0, 1e30):
        out, inter = pipe(y, num_inference_steps=10, method="diffpir", options={"lambda": lam}, sigma_y=0.01,
                          x_size=(16, 16), intermediate_freq=9, generator=torch.Generator().manual_seed(1))
        assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
        res[lam] = float(inter["residual"][-1][0])
    assert res[1.0] < 0.5 * res[1e30], res


@pytest.mark.parametrize("S", [1, 2])
def test_per_image_sigma_y_gives_each_image_its_own_diffpir_result(S):
    """σ_y given per image (as folder runs with estimated noise do): image b of the batch, with
    its S samples, equals its run alone with its own σ_y; a wrong count is a clear error."""
    eig, _, _ = small_system(16, 16, n=3)
    pipe = dps.EigenPSFDPSPipeline(*priors.load_model("analytic"), eig)  # a prior without batch-dependent rounding
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds for _ in range(S)]  # noqa: E731
    kw = dict(num_inference_steps=5, method="diffpir", num_samples=S)
    pick = (lambda out: out) if S == 1 else (lambda out: out["samples"])  # noqa: E731
    both = pick(pipe(y, sigma_y=[0.01, 0.2], generator=gens([1, 2]), **kw)[0])
    for b, s in enumerate([0.01, 0.2]):
        alone = pick(pipe(y[b:b + 1], sigma_y=s, generator=gens([1 + b]), **kw)[0])
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(both[1:], pick(pipe(y[1:], sigma_y=0.01, generator=gens([2]), **kw)[0]))  # σ matters
    with pytest.raises(ValueError, match="one per image"):
        pipe(y, sigma_y=[0.1, 0.1, 0.1], **kw)
