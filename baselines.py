"""Classical restorations beside the diffusion result: what the prior adds is the gap to these.

Both use the reconstruction's own linear operator A (the EigenPSF operator, or any operator with
`forward` and an exact `adjoint`) and stop by Morozov's discrepancy principle, ‖y − Ax‖ <= τσ√m
(m pixels of y, σ the noise std; Hansen, "Discrete Inverse Problems", 2010, §5.2; τ = 1 by default):

- `richardson_lucy`: spatially varying Richardson-Lucy (Richardson 1972, Lucy 1974) with A and Aᵀ,
  as Lauer (2002) and Denis et al. (2015) run it with PCA PSFs. Multiplicative, so its iterates stay
  non-negative, and each conserves the flux ⟨Aᵀ1, x⟩ = Σy. Stopped at the discrepancy (RL is
  semi-convergent: run on, it fits the noise), within `max_iter`.
- `tikhonov`: x_α = argmin ‖y − Ax‖² + α‖∇x‖² (first-order Tikhonov: smoothness, no pull toward
  black), each α solved by CG to a relative residual of 1e-4, and α chosen by the discrepancy
  principle: the largest α on a log grid (factor 10, then bisected to a factor of about 1.33)
  whose residual is at most τσ√m.

Images in [0, 1], (B, C, H, W). No file I/O; the caller writes the results.
"""

from __future__ import annotations

import math

import torch

SIGMA_FLOOR = 1e-3         # as DiffPIR's: σ = 0 (noise-free simulation) keeps a finite stopping point
RL_MAX_ITER = 200          # Richardson-Lucy's cap when the discrepancy is not reached
TIKHONOV_ALPHAS = (1.0, 1e-6)   # the range searched for α (largest first)
TIKHONOV_CG_TOL, TIKHONOV_CG_MAX_ITER = 1e-4, 300


def _norms(v):
    """Per-image ‖v‖, (B,)."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1)


def noise_bound(y, sigma, tau=1.0):
    """τσ√m per image, (B,): the residual norm that white noise of std σ has (Morozov). sigma: one
    value, or one per image."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).flatten().clamp_min(SIGMA_FLOOR)
    return (tau * s * math.sqrt(y[0].numel())).expand(y.shape[0]).to(y.dtype)


def richardson_lucy(operator, y, sigma, tau=1.0, max_iter=RL_MAX_ITER, eps=1e-6):
    """x_{k+1} = x_k ⊙ Aᵀ(y / A x_k) / Aᵀ1 from the flat image of y's mean, until ‖y − Ax_k‖ <= τσ√m.

    y is clamped to >= 0 (RL's Poisson model needs non-negative data) and A x_k to >= eps.
    Returns (x, iterations (B,), stopped by the discrepancy (B,) bool)."""
    y = y.clamp_min(0)
    norm = operator.adjoint(torch.ones_like(y)).clamp_min(eps)             # Aᵀ1: 1 inside, less near a lossy edge
    x = y.mean((1, 2, 3), keepdim=True).expand_as(y).clone()
    bound = noise_bound(y, sigma, tau)
    active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    iters = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    for _ in range(max_iter):
        Ax = operator(x)
        active = active & (_norms(y - Ax) > bound)
        if not bool(active.any()):
            break
        update = x * operator.adjoint(y / Ax.clamp_min(eps)) / norm
        x = torch.where(active.view(-1, 1, 1, 1), update, x)
        iters += active.long()
    reached = _norms(y - operator(x)) <= bound
    return x, iters, reached


def _gradient_normal(v):
    """∇ᵀ∇ v for forward differences with Neumann (replicate) boundaries: the graph Laplacian."""
    out = torch.zeros_like(v)
    dy, dx = v[..., 1:, :] - v[..., :-1, :], v[..., :, 1:] - v[..., :, :-1]
    out[..., 1:, :] += dy
    out[..., :-1, :] -= dy
    out[..., :, 1:] += dx
    out[..., :, :-1] -= dx
    return out


def _tikhonov_solve(operator, y, alpha, x0):
    """CG on (AᵀA + α∇ᵀ∇) x = Aᵀy from x0, image by image, to TIKHONOV_CG_TOL."""
    from dps import conjugate_gradient  # the samplers' per-image CG; imported here to keep this module light
    normal = lambda v: operator.adjoint(operator(v)) + alpha * _gradient_normal(v)  # noqa: E731
    x, iters = conjugate_gradient(normal, operator.adjoint(y), x0, TIKHONOV_CG_MAX_ITER, TIKHONOV_CG_TOL)
    return x, int(iters.max())


def tikhonov(operator, y, sigma, tau=1.0):
    """First-order Tikhonov with α from the discrepancy principle (see the module docstring).

    Returns (x, α (B,) chosen per image, total CG iterations). A batch shares the α grid; each
    image keeps the largest α whose residual is within its bound."""
    bound = noise_bound(y, sigma, tau)
    hi, lo = math.log10(TIKHONOV_ALPHAS[0]), math.log10(TIKHONOV_ALPHAS[1])
    x = operator.adjoint(y)
    best = x.clone()
    chosen = torch.full((y.shape[0],), 10 ** lo, dtype=torch.float64)
    found = torch.zeros(y.shape[0], dtype=torch.bool)
    total = 0

    def solve(log_alpha, start):
        nonlocal total
        sol, n = _tikhonov_solve(operator, y, 10 ** log_alpha, start)
        total += n
        return sol, (_norms(y - operator(sol)) <= bound).cpu()

    # 1. From the largest α down by factors of 10 (warm-started), until every image fits.
    e = hi
    while e >= lo - 1e-9:
        x, ok = solve(e, x)
        new = ok & ~found
        best[new.to(best.device)] = x[new.to(best.device)]
        chosen[new] = 10 ** e
        found |= ok
        if bool(found.all()):
            break
        e -= 1
    # 2. Bisect each found decade in log α three times (to a factor of 10^(1/8) ≈ 1.33).
    for step in (0.5, 0.25, 0.125):
        trial = (torch.log10(chosen) + step).clamp(max=hi)   # never above the searched range
        for value in sorted(set(trial[found & (trial > torch.log10(chosen))].tolist())):
            sol, ok = solve(value, best)
            take = found & ok & (trial == value)
            best[take.to(best.device)] = sol[take.to(best.device)]
            chosen[take] = 10 ** value
    if not bool(found.all()):  # no α in range fits: the least regularised one
        best[~found.to(best.device)] = x[~found.to(best.device)]
    return best, chosen, total


def restore_baselines(operator, y, sigma, tau=1.0):
    """Both baselines on y: {name: (x clamped to [0, 1], facts for metrics.json)}."""
    with torch.no_grad():
        x_rl, it_rl, reached = richardson_lucy(operator, y, sigma, tau)
        x_tk, alpha, it_tk = tikhonov(operator, y, sigma, tau)
    return {
        "richardson_lucy": (x_rl.clamp(0, 1), {"iterations": int(it_rl.max()), "stopped_by": "discrepancy" if bool(
            reached.all()) else f"cap ({RL_MAX_ITER} iterations)"}),
        "tikhonov": (x_tk.clamp(0, 1), {"alpha": float(alpha.max()), "cg_iterations_total": it_tk,
                                        "regulariser": "first-order (gradient), alpha by the discrepancy principle"}),
    }
