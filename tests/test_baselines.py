"""The classical baselines against dense, brute-force computations on tiny problems."""

import math

import pytest
import torch

import baselines
from helpers import defocus_system, dense_matrix


def gradient_matrix(H, W):
    """Forward differences (rows, then columns) of one H×W channel, written out entry by entry."""
    rows = []
    for i in range(H):
        for j in range(W):
            if i + 1 < H:
                r = torch.zeros(H * W, dtype=torch.float64)
                r[(i + 1) * W + j], r[i * W + j] = 1, -1
                rows.append(r)
            if j + 1 < W:
                r = torch.zeros(H * W, dtype=torch.float64)
                r[i * W + j + 1], r[i * W + j] = 1, -1
                rows.append(r)
    return torch.stack(rows)


def measurement(size=8, sigma=0.02, seed=0):
    eig = defocus_system(size)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    return eig, (eig(x) + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp_min(0)


@pytest.mark.parametrize("n_iter", [1, 7, 30])
def test_richardson_lucy_matches_a_dense_implementation(n_iter):
    eig, y = measurement()
    A = dense_matrix(eig, (3, 8, 8))
    yv = y.reshape(-1)
    x = torch.full_like(yv, float(yv.mean()))
    for _ in range(n_iter):
        x = x * (A.T @ (yv / (A @ x))) / (A.T @ torch.ones_like(yv))
    ours, iters, _ = baselines.richardson_lucy(eig, y, sigma=0.0, tau=0.0, max_iter=n_iter)
    assert int(iters) == n_iter
    torch.testing.assert_close(ours.reshape(-1), x, rtol=1e-9, atol=1e-12)


def test_richardson_lucy_stays_non_negative_and_conserves_flux():
    """Each iterate keeps ⟨Aᵀ1, x⟩ = Σ y (the multiplicative update's invariant) and x >= 0."""
    eig, y = measurement(16, sigma=0.05)
    y = y - 0.02        # negative pixels, as a background-subtracted camera gives: RL clamps y to >= 0
    weight = eig.adjoint(torch.ones_like(y))
    for n in (1, 5, 40):
        x, _, _ = baselines.richardson_lucy(eig, y, sigma=0.0, tau=0.0, max_iter=n)
        assert float(x.min()) >= 0
        assert math.isclose(float((weight * x).sum()), float(y.clamp_min(0).sum()), rel_tol=1e-9)


def test_richardson_lucy_stops_at_the_discrepancy():
    eig, y = measurement(16, sigma=0.05)
    x, iters, reached = baselines.richardson_lucy(eig, y, sigma=0.05)
    bound = 0.05 * math.sqrt(y.numel())
    assert bool(reached) and float((y - eig(x)).norm()) <= bound
    before, _, _ = baselines.richardson_lucy(eig, y, sigma=0.05, max_iter=int(iters) - 1)
    assert float((y - eig(before)).norm()) > bound


def test_gradient_normal_is_the_dense_difference_operator():
    v = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    D = gradient_matrix(5, 7)
    ref = (D.T @ D @ v.reshape(6, 35).T).T.reshape(v.shape)
    torch.testing.assert_close(baselines._gradient_normal(v), ref)


def test_tikhonov_is_the_dense_solution_at_the_alpha_the_discrepancy_principle_picks():
    eig, y = measurement(8, sigma=0.05)
    A = dense_matrix(eig, (3, 8, 8))
    D = torch.block_diag(*[gradient_matrix(8, 8)] * 3)
    x, alpha, _ = baselines.tikhonov(eig, y, sigma=0.05)
    a = float(alpha)

    def dense(alpha):
        return torch.linalg.solve(A.T @ A + alpha * D.T @ D, A.T @ y.reshape(-1))

    ref = dense(a)
    assert float((x.reshape(-1) - ref).norm() / ref.norm()) < 1e-3
    bound = 0.05 * math.sqrt(y.numel())
    residual = lambda v: float((y.reshape(-1) - A @ v).norm())  # noqa: E731
    assert residual(ref) <= bound < residual(dense(a * 10 ** 0.125))   # the largest α on the grid that fits
    assert 1e-6 < a < 1.0


def test_baselines_take_one_sigma_per_image_and_keep_alpha_in_range():
    eig, y = measurement(8, sigma=0.05)
    flat = torch.full_like(y, 0.5)
    both = torch.cat([y, flat])
    x, alpha, _ = baselines.tikhonov(eig, both, torch.tensor([0.05, 0.01]))
    assert float(alpha.max()) <= baselines.TIKHONOV_ALPHAS[0]          # a flat scene fits at the top of the range
    alone, a0, _ = baselines.tikhonov(eig, y, 0.05)
    assert float(alpha[0]) == float(a0)
    x_rl, _, reached = baselines.richardson_lucy(eig, both, torch.tensor([0.05, 0.01]))
    assert reached.shape == (2,)
