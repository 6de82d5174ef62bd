"""DiffPIR's data step x̃₀ = argmin ‖y − Ax‖² + ρ‖x − z‖²: solved to its stated tolerance, stopped by
the discrepancy principle where asked, data-consistent at the last step; against dense solves."""

import numpy as np
import pytest
import torch

import dps
import priors
import physics
from helpers import defocus_system, dense_matrix


def problem(size=8, sigma=0.02, seed=0):
    """(operator, its dense matrix, y = A x + n, z, the noise norm)."""
    eig = defocus_system(size)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    noise = sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    y = eig(x) + noise
    z = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return eig, dense_matrix(eig, (3, size, size)), y, z, float(noise.norm())


def argmin(A, y, z, rho):
    n = A.shape[1]
    return torch.linalg.solve(A.T @ A + rho * torch.eye(n, dtype=torch.float64),
                              A.T @ y.reshape(-1) + rho * z.reshape(-1)).reshape(z.shape)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("rho", [1e-4, 1e-2, 1.0])
def test_data_step_reaches_the_argmin_to_its_tolerance(rho, precondition):
    """Early (ρ = 1e-4: nearly a bare deconvolution) and late steps: with the discrepancy rule off, the
    solve stops by its tolerance rule and is within tol·‖x* − z‖ of the dense argmin x*."""
    eig, A, y, z, _ = problem()
    ref = argmin(A, y, z, rho)
    gains = dps.region_psf_gains(eig, z.shape, z.device, z.dtype) if precondition else None
    P = dps.region_preconditioner(gains, rho) if precondition else None
    tol = 1e-3
    x, iters, rule = dps.proximal_cg(eig, y, z, rho, tol, None, 20000, P)
    assert dps.STOP_RULES[int(rule)] == "tolerance"
    gap = float((x - ref).norm() / (ref - z).norm())
    assert gap <= tol, gap
    few, _, rule_few = dps.proximal_cg(eig, y, z, rho, tol, None, max(1, int(iters) // 4), P)
    assert dps.STOP_RULES[int(rule_few)] == "cap" and float((few - ref).norm() / (ref - z).norm()) > gap


def test_discrepancy_stops_at_the_first_iterate_that_explains_the_data_to_the_noise_level():
    eig, A, y, z, noise_norm = problem(sigma=0.05)
    rho = 1e-5
    x, iters, rule = dps.proximal_cg(eig, y, z, rho, 1e-3, noise_norm, 5000)
    assert dps.STOP_RULES[int(rule)] == "discrepancy" and int(iters) >= 1
    assert float((y - eig(x)).norm()) <= noise_norm
    before, _, _ = dps.proximal_cg(eig, y, z, rho, 1e-3, noise_norm, int(iters) - 1)
    assert float((y - eig(before)).norm()) > noise_norm
    # It is not the argmin, which fits the noise: well below the noise level.
    assert float((y.reshape(-1) - A @ argmin(A, y, z, rho).reshape(-1)).norm()) < 0.8 * noise_norm


def test_stopped_images_are_frozen_and_independent_of_their_batch():
    eig, _, y, z, noise_norm = problem()
    y2, z2 = torch.cat([y, 0.5 * y]), torch.cat([z, z.flip(-1)])
    rho = torch.tensor([1e-2, 1e-3], dtype=torch.float64).view(2, 1, 1, 1)
    both, it_both, rule_both = dps.proximal_cg(eig, y2, z2, rho, 1e-3, None, 5000)
    for b in range(2):
        alone, it, rule = dps.proximal_cg(eig, y2[b:b + 1], z2[b:b + 1], rho[b:b + 1], 1e-3, None, 5000)
        assert int(it) == int(it_both[b]) and int(rule) == int(rule_both[b])
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-10, atol=1e-12)


def test_region_preconditioner_is_symmetric_positive_definite_and_saves_iterations():
    eig = defocus_system(8)
    gains = dps.region_psf_gains(eig, (1, 3, 8, 8), "cpu", torch.float64)
    P = dense_matrix(dps.region_preconditioner(gains, 1e-3), (3, 8, 8))
    torch.testing.assert_close(P, P.T, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(P).min()) > 0
    eig32, _, y, z, _ = (defocus_system(32),) + problem(32)[1:]
    gains = dps.region_psf_gains(eig32, z.shape, "cpu", torch.float64)
    _, plain, _ = dps.proximal_cg(eig32, y, z, 1e-3, 1e-3, None, 5000)
    _, pre, _ = dps.proximal_cg(eig32, y, z, 1e-3, 1e-3, None, 5000, dps.region_preconditioner(gains, 1e-3))
    assert int(pre) < 0.8 * int(plain), (int(pre), int(plain))


def test_region_preconditioner_declines_an_operator_that_changes_the_shape():
    op = physics.LuminanceOperator(defocus_system(8))
    assert dps.region_psf_gains(op, (1, 3, 8, 8), "cpu", torch.float64) is None


def test_diffpir_final_step_is_the_data_consistent_argmin(monkeypatch):
    """The last step has no discrepancy stop and returns the argmin itself (ᾱ_{t−1} = 1): the
    sampler's output is the dense argmin for that step's x̂₀ and ρ, to the stated tolerance."""
    eig, A, y, _, _ = problem(sigma=0.05)
    calls, original = [], dps.data_proximal_step

    def spy(operator, y_, x0_hat, rho, opt, noise_norm, gains=None, watch=None):
        calls.append((x0_hat.double(), rho, noise_norm))
        return original(operator, y_, x0_hat, rho, opt, noise_norm, gains, watch)

    monkeypatch.setattr(dps, "data_proximal_step", spy)
    prior, sched = priors.load_model("analytic")
    out, inter = dps.EigenPSFDPSPipeline(prior, sched, eig.float())(
        y.float(), num_inference_steps=10, method="diffpir", sigma_y=0.05, generator=torch.Generator().manual_seed(0))
    x0_hat, rho, noise_norm = calls[-1]
    assert noise_norm is None and all(c[2] is not None for c in calls[:-1])
    ref = argmin(A, y, (x0_hat + 1) / 2, float(rho))
    gap = float((out.double() - ref.clamp(0, 1)).norm() / (ref - (x0_hat + 1) / 2).norm())
    assert gap <= dps.SAMPLERS["diffpir"][1]["cg_tol"], gap
    rules = inter["cg_stop_rule_per_image"]
    assert rules.shape == (10, 1) and dps.STOP_RULES[int(rules[-1, 0])] == "tolerance"
    assert inter["cg_iterations_per_image"][-1, 0] >= 1  # the last step does iterate (it used to stop at 0)


def test_diffpir_rho_follows_its_schedule(monkeypatch):
    """ρ_t = λ σ_y² ᾱ_t / (1 − ᾱ_t) on DiffPIR's quadratic timesteps (σ_y floored at 1e-3), written
    out from the scheduler's ᾱ: it grows from about 1e-8 at t = 999 to its largest at t = 0."""
    rhos, original = [], dps.data_proximal_step

    def spy(operator, y_, x0_hat, rho, opt, noise_norm, gains=None, watch=None):
        rhos.append(float(rho))
        return original(operator, y_, x0_hat, rho, opt, noise_norm, gains, watch)

    monkeypatch.setattr(dps, "data_proximal_step", spy)
    eig, _, y, _, _ = problem(sigma=0.05)
    prior, sched = priors.load_model("analytic")
    for sigma, used in ((0.05, 0.05), (0.0, 1e-3)):
        rhos.clear()
        dps.EigenPSFDPSPipeline(prior, sched, eig.float())(y.float(), num_inference_steps=12, method="diffpir",
                                                           options={"lambda": 3.0}, sigma_y=sigma,
                                                           generator=torch.Generator().manual_seed(0))
        abar = sched.alphas_cumprod.double()
        expected = [3.0 * used ** 2 * float(abar[t] / (1 - abar[t])) for t in dps.quadratic_timesteps(12, 1000)]
        np.testing.assert_allclose(rhos, expected, rtol=1e-5)


def test_under_the_discrepancy_rule_the_path_does_not_follow_the_speed_setting():
    """Where the rule can stop CG, its stopping point depends on the path (bench/bench_data_step.py:
    plain and preconditioned answers 150-450% of the correction apart), so the path is part of the
    method: plain CG, whatever `precondition` says (preconditioned, it took 3.7× the iterations at
    camera size: bench_data_step --part cost). That setting changes only the solves that run to
    cg_tol, which end at the same argmin either way."""
    eig, _, y, z, noise_norm = problem(sigma=0.05)
    gains = dps.region_psf_gains(eig, z.shape, z.device, z.dtype)
    x0_hat = 2 * z - 1
    for rho in (2e-4, 3e-3):
        on, off = ({"cg_tol": 1e-3, "cg_max_iter": 5000, "precondition": p} for p in (True, False))
        with_rule = [dps.data_proximal_step(eig, y, x0_hat, rho, o, 1.02 * noise_norm, gains) for o in (on, off)]
        assert dps.STOP_RULES[int(with_rule[0][2])] == "discrepancy"
        assert torch.equal(with_rule[0][0], with_rule[1][0]) and torch.equal(with_rule[0][1], with_rule[1][1])
        plain = dps.data_proximal_step(eig, y, x0_hat, rho, on, 1.02 * noise_norm)          # no gains: plain CG
        assert torch.equal(plain[0], with_rule[0][0]) and torch.equal(plain[1], with_rule[0][1])
        pcg = dps.proximal_cg(eig, y, z, rho, 1e-3, 1.02 * noise_norm, 5000, dps.region_preconditioner(gains, rho))
        assert not torch.allclose(2 * pcg[0] - 1, with_rule[0][0])            # the path matters: it is not this one
        solved_on, solved_off = (dps.data_proximal_step(eig, y, x0_hat, rho, o, None, gains) for o in (on, off))
        assert int(solved_on[1]) < int(solved_off[1])                                           # it pays
        gap = float((solved_on[0] - solved_off[0]).norm() / (solved_off[0] - x0_hat).norm())
        assert gap < 2e-3, gap                                                                  # the same argmin


def test_the_default_tau_lets_the_truth_pass_the_bound():
    """τ > 1 (Engl, Hanke & Neubauer 1996): ‖n‖/(σ√m) ≈ 1 ± 1/√(2m), so at τ = 1 half of the noise
    draws put the truth itself outside the bound (0.505 of 200 in review), and CG then fits that
    noise. The default, IR Tools' 1.01, lets it through in nearly every draw at 64² RGB
    (m = 12,288: 94% expected, 50% at τ = 1) and in every draw at camera sizes, with the data step
    then doing nothing to it."""
    import config
    tau = config.sampler_defaults()["diffpir"]["discrepancy"]
    assert tau > 1
    eig = defocus_system(64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)
    sigma, m = 0.05, x.numel()
    passed = 0
    for _ in range(200):
        y = eig(x) + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
        _, iters, _ = dps.proximal_cg(eig, y, x, 1e-4, 1e-2, tau * sigma * m ** 0.5, 100)
        passed += int(iters) == 0
    assert passed >= 180, passed
