"""DAPS (dps.daps_step): its annealing levels, its x̂₀, the exact Gaussian draw of p(x₀ | x̂₀, y)
against a dense computation, the Langevin alternative, and the whole sampler against the exact
posterior of the analytic prior."""

import json

import numpy as np
import pytest
import torch

import dps
import priors
from helpers import SMALL, cli, defocus_system, dense_matrix, face_under_defocus, only_run, tiny_scheduler, tiny_unet


def psnr(a, b):
    return float(-10 * torch.log10(((a.double() - b.double()) ** 2).mean()))


def test_annealing_levels_are_distinct_descending_timesteps_on_the_karras_spacing():
    sched = tiny_scheduler()
    t = dps.daps_timesteps(200, sched)
    assert len(set(t)) == 200 and t == sorted(t, reverse=True)
    ab = sched.alphas_cumprod.double()
    sigma = ((1 - ab) / ab).sqrt()
    # the first and last levels are the DDPM steps nearest σ = 100 and 0.1
    assert abs(np.log(float(sigma[t[0]]) / 100)) < 0.02 and abs(np.log(float(sigma[t[-1]]) / 0.1)) < 0.1
    with pytest.raises(ValueError, match=r"1\.\.\d+ for daps"):
        dps.check_num_inference_steps(900, sched, "daps")


def context(operator, y, options, sigma, seed=0):
    return dps.StepContext(eps=None, sched=tiny_scheduler(), operator=operator, y=y,
                           generator=torch.Generator().manual_seed(seed), options=options, sigma_y=sigma)


def test_cg_draw_has_the_dense_gaussian_conditional_mean_and_covariance():
    """p(u | û, y) ∝ N(u; û, r²I) N(y; Au, σ²I) is N(m, S) with S = (AᵀA/σ² + I/r²)⁻¹,
    m = S (Aᵀy/σ² + û/r²). 6000 perturb-and-MAP draws (CG to 1e-10) against the dense S and m."""
    eig = defocus_system(6)
    A = dense_matrix(eig, (3, 6, 6))
    g = torch.Generator().manual_seed(0)
    u_true = torch.rand(1, 3, 6, 6, generator=g, dtype=torch.float64)
    sigma, r = 0.05, 0.2
    y = eig(u_true) + sigma * torch.randn(u_true.shape, generator=g, dtype=torch.float64)
    u_hat = (u_true + 0.1 * torch.randn(u_true.shape, generator=g, dtype=torch.float64))
    n = 6000
    ctx = context(eig, y.expand(n, -1, -1, -1), {"cg_tol": 1e-10, "cg_max_iter": 2000}, sigma)
    draws = dps.daps_conditional_cg(ctx, u_hat.expand(n, -1, -1, -1).clone(), r, sigma).reshape(n, -1)
    S = torch.linalg.inv(A.T @ A / sigma ** 2 + torch.eye(A.shape[1], dtype=torch.float64) / r ** 2)
    m = S @ (A.T @ y.reshape(-1) / sigma ** 2 + u_hat.reshape(-1) / r ** 2)
    sd = S.diagonal().sqrt()
    z = (draws.mean(0) - m) / (sd / n ** 0.5)                                 # standard normal each
    assert float(z.abs().max()) < 4.5, float(z.abs().max())
    # Whitened by S's Cholesky factor the draws are N(0, I): the eigenvalues of their covariance lie
    # within the Marchenko-Pastur edges (1 ± √(p/n))² = 0.75..1.29 for p = 108, n = 6000.
    L = torch.linalg.cholesky(S)
    w = torch.linalg.solve_triangular(L, (draws - m).T, upper=False)
    ev = torch.linalg.eigvalsh(torch.cov(w))
    assert 0.7 < float(ev.min()) and float(ev.max()) < 1.35, (float(ev.min()), float(ev.max()))
    assert float((draws.var(0) / S.diagonal() - 1).abs().max()) < 0.1


def test_langevin_draw_approaches_the_same_conditional():
    """The Langevin alternative, run long at a small step, samples the same Gaussian (its bias is
    O(step)): mean within 3 standard errors plus 2%·sd, per-pixel variance within 15%."""
    eig = defocus_system(6)
    A = dense_matrix(eig, (3, 6, 6))
    g = torch.Generator().manual_seed(1)
    u_true = torch.rand(1, 3, 6, 6, generator=g, dtype=torch.float64)
    sigma, r = 0.05, 0.2
    y = eig(u_true) + sigma * torch.randn(u_true.shape, generator=g, dtype=torch.float64)
    u_hat = u_true.clone()
    n = 2000
    ctx = context(eig, y.expand(n, -1, -1, -1), {"langevin_steps": 400, "langevin_step": 0.1, "lr_min_ratio": 1.0},
                  sigma)
    draws = dps.daps_conditional_langevin(ctx, u_hat.expand(n, -1, -1, -1).clone(), r, sigma, 0.0).reshape(n, -1)
    S = torch.linalg.inv(A.T @ A / sigma ** 2 + torch.eye(A.shape[1], dtype=torch.float64) / r ** 2)
    m = S @ (A.T @ y.reshape(-1) / sigma ** 2 + u_hat.reshape(-1) / r ** 2)
    sd = S.diagonal().sqrt()
    assert float(((draws.mean(0) - m).abs() / (3 * sd / n ** 0.5 + 0.02 * sd)).max()) < 1
    assert float((draws.var(0) / S.diagonal() - 1).abs().max()) < 0.15


def test_one_ode_step_is_tweedie():
    unet, sched = tiny_unet(), tiny_scheduler()
    sched.set_timesteps(timesteps=dps.daps_timesteps(20, sched))
    x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = int(sched.timesteps[5])
    ctx = dps.StepContext(eps=lambda x, i, tt=None: unet(x, t if tt is None else tt).sample, sched=sched,
                          operator=None, y=None, generator=None, options={"ode_steps": 1}, sigma_y=0.01)
    with torch.no_grad():
        want = dps.tweedie_estimate(x_t, unet(x_t, t).sample, sched.alphas_cumprod[t].item()).clamp(-1, 1)
        assert torch.equal(dps.daps_x0_hat(ctx, 5, t, x_t), want)
        ctx.options["ode_steps"] = 3
        assert not torch.allclose(dps.daps_x0_hat(ctx, 5, t, x_t), want)


@pytest.mark.slow
def test_daps_lands_near_the_exact_posterior_mean():
    """Analytic prior, y from the reconstruction model (32² face, defocus, σ = 0.01): the mean of 4
    DAPS samples at its defaults against the exact posterior mean, beside DiffPIR at its defaults."""
    x, eig, _ = face_under_defocus(32, kernel_size=7, max_radius=3)
    sigma = 0.01
    y = eig(x) + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior, sched = priors.load_model("analytic")
    exact, _ = dps.gaussian_posterior(prior, eig, y, sigma)
    pipe = dps.EigenPSFDPSPipeline(prior, sched, eig.float())
    run = lambda m: pipe(y.float(), num_inference_steps=dps.DEFAULT_STEPS[m], method=m, sigma_y=sigma,  # noqa: E731
                         num_samples=4, generator=torch.Generator().manual_seed(1))[0]["mean"]
    daps_mean, diffpir_mean = run("daps"), run("diffpir")
    xs, ex = x.float(), exact.float()
    print(f"DAPS {psnr(daps_mean[0], ex):.2f} dB, DiffPIR {psnr(diffpir_mean[0], ex):.2f} dB against the exact mean; "
          f"truth: DAPS {psnr(daps_mean[0], xs):.2f}, DiffPIR {psnr(diffpir_mean[0], xs):.2f}, "
          f"exact {psnr(ex, xs):.2f}, blurred {psnr(y.float().clamp(0, 1), xs):.2f}")
    # measured: DAPS 28.06, DiffPIR 27.32 dB against the exact mean; against the truth 23.90 and
    # 22.78 dB (exact mean 25.67, blurred 21.34)
    assert psnr(daps_mean[0], ex) > 27.0 and psnr(daps_mean[0], ex) > psnr(diffpir_mean[0], ex)
    assert psnr(daps_mean[0], xs) > psnr(y.float().clamp(0, 1), xs) + 1.0


@pytest.mark.slow
def test_cli_runs_daps_on_real_data_and_records_its_solves(tmp_path, capsys, monkeypatch, caplog):

    common = ["--model_id", "analytic", "--no_intermediates", *SMALL]
    r = cli(common + ["--img_size", "32", "--blur_mode", "defocus", "--sigma_noise", "0.02", "--num_inference_steps",
                      "5", "--save_dir", str(tmp_path / "sim"), "--save_psf_grid", str(tmp_path / "g.npz")],
            capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    sim = only_run(tmp_path / "sim")
    r = cli(common + ["--blurred", str(sim / "images/blurred.png"), "--psf_grid", str(tmp_path / "g.npz"),
                      "--sigma_noise", "0.02", "--sampler", "daps", "--num_inference_steps", "20", "--num_samples", "2",
                      "--save_dir", str(tmp_path / "real")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((only_run(tmp_path / "real") / "metrics.json").read_text())
    assert m["sampler"] == "daps" and m["status"] == "complete" and m["daps.conditional"] == "cg"
    assert len(m["cg_iterations_per_step"]) == 20 and set(m["cg_stop_rules"]) == set(dps.STOP_RULES)


def test_final_mean_returns_the_last_conditional_mean_not_a_draw(monkeypatch):
    """final: mean ends on m = (AᵀA/σ² + I/r²)⁻¹ (Aᵀy/σ² + û/r²) of the last level (a dense solve
    here), where final: draw adds the conditional's noise (std up to r = 0.05 at σ_min = 0.1)."""
    eig = defocus_system(6)
    A = dense_matrix(eig, (3, 6, 6))
    prior, sched = priors.load_model("analytic")
    g = torch.Generator().manual_seed(0)
    sigma = 0.02
    y = eig(torch.rand(1, 3, 6, 6, generator=g, dtype=torch.float64)) + sigma * torch.randn(1, 3, 6, 6, generator=g,
                                                                                            dtype=torch.float64)
    outs = {}
    for final in ("mean", "draw"):
        seen = []
        original = dps.daps_x0_hat
        monkeypatch.setattr(dps, "daps_x0_hat", lambda *a: seen.append(original(*a)) or seen[-1])
        pipe = dps.EigenPSFDPSPipeline(prior, sched, eig)
        outs[final], _ = pipe(y.float(), num_inference_steps=5, method="daps", sigma_y=sigma,
                              options={"final": final, "cg_tol": 1e-8, "cg_max_iter": 500},
                              generator=torch.Generator().manual_seed(1))
        monkeypatch.setattr(dps, "daps_x0_hat", original)
        if final == "mean":
            t = int(dps.daps_timesteps(5, sched)[-1])
            a_t = float(sched.alphas_cumprod[t])
            r = ((1 - a_t) / a_t) ** 0.5 / 2
            u_hat = ((seen[-1] + 1) / 2).double().reshape(-1)
            m = torch.linalg.solve(A.T @ A / sigma ** 2 + torch.eye(A.shape[1], dtype=torch.float64) / r ** 2,
                                   A.T @ y.reshape(-1) / sigma ** 2 + u_hat / r ** 2)
    assert torch.allclose(outs["mean"].double().reshape(-1), m.clamp(0, 1), atol=2e-4)
    assert float((outs["draw"] - outs["mean"]).abs().max()) > 1e-2      # a draw is not the mean
