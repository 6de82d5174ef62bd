"""Diffusion posterior samplers over a diffusers DDPM: DPS and DiffPIR, in one loop.

One shared loop (`EigenPSFDPSPipeline.__call__`) owns what every sampler shares: the schedule, x_T,
num_samples, divergence checks, the callback and resume. Each sampler is one small per-step
function in `SAMPLERS`, with the signature `step(ctx, i, t, x_t) -> (x_prev, x0_hat, residual)`,
as k-diffusion's sampling.py keeps one function per method.

DPS (Chung et al., 2022, Alg. 1; Eq. numbers refer to that paper), every t:

    ε      = ε_θ(x_t, t)
    x̂₀     = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                              (Tweedie, Eq. 11)
    x'     = DDPM ancestral step from (x̂₀, x_t)                       (DDPMScheduler.step)
    r      = y − A((x̂₀ + 1)/2)                                        (residual, image in [0, 1])
    x_{t−1} = x' − ζ ∇_{x_t} ‖r‖                                      (Alg. 1, ζ_t = ζ/‖r‖ on ‖r‖²)

DiffPIR (Zhu et al., CVPR Workshops 2023, Alg. 1), about 100 steps and no backward pass:

    x̂₀     = Tweedie estimate, as above
    x̃₀     = argmin_x ‖y − A x‖² + ρ_t ‖x − x̂₀‖²,  ρ_t = λ σ_y² ᾱ_t/(1−ᾱ_t)   (Eq. 13, x in [0, 1])
    ε̂      = (x_t − √ᾱ_t x̃₀) / √(1−ᾱ_t)
    x_{t−1} = √ᾱ_{t−1} x̃₀ + √(1−ᾱ_{t−1}) (√(1−ζ) ε̂ + √ζ ε),   ε ~ N(0, I)   (Eq. 15)

The DDPM step itself is diffusers' `DDPMScheduler.step`: this module never re-derives it.
The samplers write no files; progress leaves through `callback`.

Also here: the exact posterior that the analytic Gaussian prior (priors.AnalyticPrior) implies
for a linear blur (`gaussian_posterior`), which the samplers are checked against. Where the
ε-models come from (hub downloads, diffusers and ADM checkpoints, the analytic prior) is
priors.py.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

import config
import physics
import priors
import timing
import tiling

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = priors.DEFAULT_MODEL_ID


# ----------------------------------------------------------------------------
# 1. Pieces the samplers share
# ----------------------------------------------------------------------------

def randn_tensor(shape, generator=None, device=None, dtype=None):
    """diffusers' randn_tensor (its draw order for a list of generators, so that a run matches
    DDPMPipeline's), imported at the first draw: the exact posterior never imports diffusers."""
    from diffusers.utils.torch_utils import randn_tensor as draw
    return draw(shape, generator=generator, device=device, dtype=dtype)


def tweedie_estimate(x_t, eps, alpha_bar_t):
    """x̂₀ = E[x₀ | x_t] = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t  (DPS Eq. 11, ε-parameterisation)."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def residual_norms(y, operator, x0_hat):
    """Per-image ‖yᵢ − A((x̂₀ᵢ + 1)/2)‖, (B,): x̂₀ in the model's [−1, 1], y and A in [0, 1]."""
    return torch.linalg.vector_norm((y - operator((x0_hat + 1) / 2)).flatten(1), dim=1)


def compute_likelihood_gradient(x_t, x0_hat, y, operator):
    """g = ∇_{x_t} Σᵢ ‖yᵢ − A((x̂₀ᵢ + 1)/2)‖ and the per-image residual norms (B,).

    The unsquared per-image norm is the official DPS update (ζ/‖r‖ applied to ‖r‖²), so each
    image's step is independent of the others in the batch. x_t must require grad and x0_hat
    must have been computed from it.
    """
    norms = residual_norms(y, operator, x0_hat)                         # (B,)
    (g,) = torch.autograd.grad(norms.sum(), x_t)
    return g, norms.detach()


def clip_per_image(g, max_norm: float):
    """Scale each image's gradient so that ‖gᵢ‖ <= max_norm (0 disables)."""
    if max_norm <= 0:
        return g
    norms = torch.linalg.vector_norm(g.flatten(1), dim=1).clamp_min(1e-12)
    return g * (max_norm / norms).clamp(max=1).view(-1, *([1] * (g.ndim - 1)))


def _image_dot(u, v):
    """Per-image inner product of (B, ...) tensors, shaped (B, 1, ..., 1) to broadcast back."""
    return (u * v).sum(tuple(range(1, u.ndim)), keepdim=True)


def conjugate_gradient(apply_M, b, x, max_iter: int, tol: float, precondition=None):
    """Solves M x = b for a symmetric positive (semi)definite M, image by image (dim 0).

    Warm-started at x. Image i stops when ‖b − M xᵢ‖ <= tol·‖bᵢ‖; a stopped image is frozen, so
    its answer does not depend on its neighbours in the batch. precondition: v ↦ P⁻¹v for a
    symmetric positive definite P ≈ M (preconditioned CG), or None. Returns (x, iterations (B,)).
    """
    dot = _image_dot
    P = precondition or (lambda v: v)  # noqa: E731
    r = b - apply_M(x)
    z = P(r)
    p, rz = z.clone(), dot(r, z)
    target = tol ** 2 * dot(b, b)
    active = (dot(r, r) if precondition else rz) > target
    iters = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):  # a host sync per iteration: cheap next to M
            break
        Mp = apply_M(p)
        alpha = torch.where(active, rz / dot(p, Mp).clamp_min(1e-30), torch.zeros_like(rz))
        x, r = x + alpha * p, r - alpha * Mp
        z = P(r)
        rz_new = dot(r, z)
        iters += active.flatten().long()
        p = torch.where(active, z + rz_new / rz.clamp_min(1e-30) * p, p)
        rz = torch.where(active, rz_new, rz)
        active = active & ((dot(r, r) if precondition else rz) > target)
    return x, iters


def _quad_spacing(n: int, n_train: int):
    """t = T−1 − ⌊√linspace(0, T², n)⌋ with the last step at t = 0, as the official code builds it."""
    seq = np.sqrt(np.linspace(0, n_train ** 2, n)).astype(np.int64)
    seq[-1] -= 1
    return np.clip(n_train - 1 - seq, 0, n_train - 1)


def quadratic_timesteps(n: int, n_train: int):
    """DiffPIR's 'quad' spacing (official code, skip_type='quad'), dense near t = 0 where the
    details form. Distinct for n up to about T/2; beyond that a ValueError names the limit."""
    t = _quad_spacing(n, n_train)
    if len(np.unique(t)) != n:
        most = max(m for m in range(1, n) if len(np.unique(_quad_spacing(m, n_train))) == m)
        raise ValueError(f"num_inference_steps must be in 1..{most} for diffpir (its quadratic spacing repeats "
                         f"timesteps beyond that), got {n}")
    return [int(v) for v in t]


# DAPS's annealing: σ from DAPS_SIGMA_MAX to DAPS_SIGMA_MIN on Karras et al.'s ρ = 7 spacing, its
# official configs (configs/sampler/edm_daps.yaml); its x̂₀ ODE runs down to DAPS_ODE_SIGMA_MIN.
DAPS_SIGMA_MAX, DAPS_SIGMA_MIN, DAPS_ODE_SIGMA_MIN, DAPS_RHO = 100.0, 0.1, 0.01, 7


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = DAPS_RHO):
    """n levels from sigma_max to sigma_min, (σ_max^(1/ρ) + r (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, r in [0, 1]
    (Karras et al. 2022, Eq. 5)."""
    r = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def nearest_timesteps(sched, sigmas):
    """The DDPM timestep whose σ_t = √((1−ᾱ_t)/ᾱ_t) is nearest each σ (in log σ): the VP model's
    noise level for a VE level σ (x_vp = √ᾱ_t x_ve)."""
    ab = sched.alphas_cumprod.double()
    log_sigma_t = 0.5 * torch.log((1 - ab) / ab)
    target = torch.log(torch.as_tensor(np.asarray(sigmas, dtype=np.float64)))
    return [int(v) for v in (log_sigma_t[None, :] - target[:, None]).abs().argmin(1)]


def daps_timesteps(n: int, sched):
    """DAPS's annealing levels as the distinct DDPM timesteps nearest them; a ValueError names the
    limit where the levels would repeat timesteps."""
    t = nearest_timesteps(sched, karras_sigmas(DAPS_SIGMA_MAX, DAPS_SIGMA_MIN, n))
    if len(set(t)) != n:
        most = max(m for m in range(1, n) if len(set(nearest_timesteps(sched, karras_sigmas(
            DAPS_SIGMA_MAX, DAPS_SIGMA_MIN, m)))) == m)
        raise ValueError(f"num_inference_steps must be in 1..{most} for daps (its annealing levels repeat "
                         f"timesteps beyond that), got {n}")
    return t


def set_timesteps(sched, method: str, n: int) -> None:
    """DPS: diffusers' own spacing for n steps. DiffPIR: the quadratic spacing of its official code.
    DAPS: its annealing levels."""
    if method == "diffpir":
        sched.set_timesteps(timesteps=quadratic_timesteps(n, sched.config.num_train_timesteps))
    elif method == "daps":
        sched.set_timesteps(timesteps=daps_timesteps(n, sched))
    else:
        sched.set_timesteps(n)


def check_num_inference_steps(n, scheduler, method: str = "dps") -> None:
    """The one check of num_inference_steps: 1..the scheduler's training steps (diffpir: fewer)."""
    n_train = scheduler.config.num_train_timesteps
    if not isinstance(n, int) or not 1 <= n <= n_train:
        raise ValueError(f"num_inference_steps must be in 1..{n_train}, got {n!r}")
    if method == "diffpir":
        quadratic_timesteps(n, n_train)
    if method == "daps":
        daps_timesteps(n, scheduler)


# ‖x_t‖ above RUNAWAY_FACTOR·√n (n values per image) at RUNAWAY_CHECKS divergence checks in a row means
# the guidance overshoots: the diffusion process keeps E‖x_t‖² = ᾱ_t E‖x₀‖² + (1 − ᾱ_t) n ≤ n for x₀ in
# [−1, 1]. Measured: sound DPS runs of a learned prior peak at 1.02–1.40·√n, the first version's
# step_size = 100 on the analytic prior (a garbage result) at 6.6·√n. x̂₀ would be the wrong
# yardstick: an ε-model's x̂₀ = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t magnifies the model's error 1/√ᾱ_t-fold
# (about 160× at t = 999), so unclamped, its residual passes 50‖y‖ early in runs that end well.
RUNAWAY_FACTOR, RUNAWAY_CHECKS = 3.0, 3


# sampler -> (its name in messages, what to try when it diverges)
DIVERGENCE_HINTS = {"dps": ("DPS", "try a smaller step_size or set gradient_clip (e.g. 1.0)"),
                    "diffpir": ("DiffPIR", "try a larger lambda, a smaller zeta, or check sigma_noise"),
                    "daps": ("DAPS", "check sigma_noise, or use conditional cg (no step size)")}


class DivergenceError(RuntimeError):
    """x_t became NaN/Inf, or the residual ran away. Carries what was produced before it happened."""

    def __init__(self, step, total, partial, intermediates, reason="NaN or Inf in x_t", method="dps"):
        name, hint = DIVERGENCE_HINTS[method]
        super().__init__(f"{name} diverged at step {step}/{total} ({reason}); {hint}")
        self.step, self.partial, self.intermediates = step, partial, intermediates


# ----------------------------------------------------------------------------
# 2. The samplers: one step each, one signature
# ----------------------------------------------------------------------------

@dataclass
class StepContext:
    """What a step function may use. eps(x_t, i) runs the UNet (under the caller's autocast) and
    returns its float32 output: ε̂ in the first C channels, and for a learned-variance model (ADM)
    C more, the variance interpolation v that DDPMScheduler(variance_type="learned_range") reads;
    y is (B·S, C_y, H, W) in [0, 1]; options is the method's config section."""
    eps: Callable
    sched: DDPMScheduler
    operator: Callable
    y: torch.Tensor
    generator: object
    options: dict
    sigma_y: float | torch.Tensor   # one σ_y, or one per sample (B·S, 1, 1, 1) float64
    stats: dict = field(default_factory=lambda: {"cg_iterations": [], "cg_stop_rule": []})
    eps_vjp: Callable | None = None   # (x_t, i, v) -> Jᵀv of eps at x_t, tile by tile; None when untiled
    cache: dict = field(default_factory=dict)   # what a step computes once per run (DiffPIR's preconditioner)
    watch: Callable = field(default_factory=timing.Stopwatch)   # stages: unet, data_step, preconditioner


def dps_step(ctx, i, t, x_t):
    """One DPS step (Chung et al. 2022, Alg. 1): the DDPM step minus ζ ∇_{x_t}‖y − A(x̂₀)‖.

    Returns (x_{t−1}, x̂₀, per-image ‖y − A(x̂₀)‖), detached.
    """
    zeta = ctx.options["step_size"]
    if ctx.eps_vjp is not None and zeta > 0:
        return _dps_step_tiled(ctx, i, t, x_t, zeta)
    x_t = x_t.detach().requires_grad_(zeta > 0)
    with torch.set_grad_enabled(zeta > 0):
        # diffusers' DDPM step; a learned-variance output (2C channels) is split there, and its
        # variance used for the noise, as guided-diffusion's p_sample does
        out = ctx.sched.step(ctx.eps(x_t, i), t, x_t, generator=ctx.generator)
        x0_hat = out.pred_original_sample
        if zeta > 0:
            with ctx.watch("unet"):   # the backward through the UNet (and the operator)
                g, res = compute_likelihood_gradient(x_t, x0_hat, ctx.y, ctx.operator)
            x_prev = out.prev_sample.detach() - zeta * clip_per_image(g, ctx.options["gradient_clip"])
        else:
            res, x_prev = residual_norms(ctx.y, ctx.operator, x0_hat), out.prev_sample
    return x_prev.detach(), x0_hat.detach(), res.detach()


def _dps_step_tiled(ctx, i, t, x_t, zeta):
    """dps_step with a tiled ε, in memory that follows the tile size: ε over all tiles without a
    graph, then the chain rule ∇_{x_t}‖r‖ = ∂‖r‖/∂x_t + Jᵀ ∂‖r‖/∂ε, with ∂‖r‖/∂ε from autograd
    through the DDPM step and the operator (no UNet), and Jᵀ applied tile by tile."""
    with torch.no_grad():
        eps = ctx.eps(x_t, i)
    x_leaf, eps_leaf = x_t.detach().requires_grad_(True), eps.requires_grad_(True)
    with torch.enable_grad():
        out = ctx.sched.step(eps_leaf, t, x_leaf, generator=ctx.generator)
        res = residual_norms(ctx.y, ctx.operator, out.pred_original_sample)
        g_x, g_eps = torch.autograd.grad(res.sum(), [x_leaf, eps_leaf])
    g = g_x + ctx.eps_vjp(x_t, i, g_eps)
    x_prev = out.prev_sample.detach() - zeta * clip_per_image(g, ctx.options["gradient_clip"])
    return x_prev, out.pred_original_sample.detach(), res.detach()


# DiffPIR's σ_y floor: its official code uses max(0.001, σ) so that σ = 0 keeps ρ_t > 0.
SIGMA_Y_FLOOR = 1e-3

# How each image's data step ended (DiffPIR): its code in `cg_stop_rule`.
STOP_RULES = ("tolerance", "discrepancy", "cap")


def _per_image_norm(v):
    return torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, *([1] * (v.ndim - 1)))


def proximal_cg(operator, y, z, rho, tol, noise_norm, max_iter, precondition=None):
    """CG for x = argmin_x ‖y − Ax‖² + ρ‖x − z‖², i.e. (AᵀA + ρI) d = Aᵀ(y − Az) for the correction
    d = x − z, from d = 0, image by image. Image i stops at the first of three rules:

    - tolerance: ‖r‖ <= ρ·tol·‖d‖ for the normal-equation residual r. AᵀA + ρI has no eigenvalue
      below ρ, so then ‖x − x*‖ <= ‖r‖/ρ <= tol·‖x − z‖: x is the argmin to `tol` relative to the
      correction. A zero right-hand side (z is the argmin) stops here at 0 iterations.
    - discrepancy: ‖y − Ax‖ <= noise_norm (Morozov's discrepancy principle, τσ√m; Hansen,
      "Discrete Inverse Problems", 2010, §5.2): x explains the data to the noise level, and more
      iterations would fit the noise. noise_norm None (or 0) turns the rule off.
    - cap: max_iter iterations, a safety net; metrics report how often it is hit.

    The data residual s = y − Ax is updated alongside (one forward and one adjoint per iteration).
    A stopped image is frozen, so its answer does not depend on its batch. precondition: v ↦ P⁻¹v
    for a symmetric positive definite P ≈ AᵀA + ρI, or None. Returns (x, iterations (B,),
    rule (B,) as indices into STOP_RULES).
    """
    dot = _image_dot
    P = precondition or (lambda v: v)  # noqa: E731
    s = y - operator(z)
    r = operator.adjoint(s)
    d = torch.zeros_like(z)
    q = P(r)
    p, rq = q.clone(), dot(r, q)
    rule = torch.full((z.shape[0],), STOP_RULES.index("cap"), dtype=torch.long, device=z.device)
    iters = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)

    def stopped():
        converged = _per_image_norm(r) <= rho * tol * _per_image_norm(d)
        fits = _per_image_norm(s) <= noise_norm if noise_norm is not None else torch.zeros_like(converged)
        rule.copy_(torch.where(converged.flatten(), STOP_RULES.index("tolerance"),
                               torch.where(fits.flatten(), STOP_RULES.index("discrepancy"), rule)))
        return converged | fits

    active = ~stopped()
    # The updates are in place (addcmul_): a camera-size image holds its CG vectors once, without
    # image-sized temporaries beside them. An inactive image gets α = 0 and keeps its p.
    for _ in range(max_iter):
        if not bool(active.any()):  # a host sync per iteration: cheap next to the operator
            break
        Ap = operator(p)
        Mp = operator.adjoint(Ap)
        Mp.addcmul_(rho, p) if torch.is_tensor(rho) else Mp.add_(p, alpha=rho)
        alpha = torch.where(active, rq / dot(p, Mp).clamp_min(1e-30), torch.zeros_like(rq))
        d.addcmul_(alpha, p), r.addcmul_(alpha, Mp, value=-1), s.addcmul_(alpha, Ap, value=-1)
        del Ap, Mp
        iters += active.flatten().long()
        q = P(r)
        rq_new = dot(r, q)
        p.mul_(torch.where(active, rq_new / rq.clamp_min(1e-30), torch.ones_like(rq))).addcmul_(active.to(q.dtype), q)
        rq = torch.where(active, rq_new, rq)
        active = active & ~stopped()
    return z + d, iters, rule


# Nodes per image side of DiffPIR's data-step preconditioner, spaced from corner to corner (2: the
# four corners, where this field's blur is widest). Measured at 64², defocus (radius 1-3 px, 11-px
# PSFs), CG to 1% of the correction: 2 nodes cut the iterations from 220 to 111 at ρ = 2.4e-4 and
# from 64 to 34 at ρ = 2.3e-3; the centre PSF alone (1 node) needs more than no preconditioner (352
# and 65); 4 and 8 nodes save no more iterations than 2 and cost more. Nodes at the centres of
# 2×2 cells instead did worse (279 and 55; 4×4 cells 125 and 28, at four times the FFTs).
PRECONDITIONER_REGIONS = 2


def _hat_weights(n_regions: int, n: int, dtype, device):
    """(R, n) piecewise-linear weights that peak at R nodes spaced from pixel 0 to n − 1 and sum to 1:
    physics' bilinear interpolation rule (one node: all ones)."""
    nodes = torch.linspace(0, n - 1, n_regions, dtype=torch.float64) if n_regions > 1 else torch.zeros(1)
    return physics.interpolation_matrix(nodes, n, "bilinear").T.to(device, dtype)


# Channels whose responses differ by less than this share of their peak are one response: a mono
# operator's batched FFTs can leave its channels apart by rounding (6e-12 of 0.067 measured, K = 15).
CHANNELS_EQUAL_RTOL = 1e-6


def _channels_equal(psfs) -> bool:
    """Whether every (N, C, H, W) response in `psfs` is the same in all channels (to rounding)."""
    return all(bool((p - p[:, :1]).abs().max() <= CHANNELS_EQUAL_RTOL * p.abs().max()) for p in psfs)


def region_psf_gains(operator, shape, device, dtype, n_regions=PRECONDITIONER_REGIONS):
    """The local blur at R×R nodes spanning the image from corner to corner (the peaks of the
    blending weights), probed with a point source through `operator` itself
    (any wrapper, a per-image stacked operator too): (|ĥ_r(f)|² (N, R², H, W//2+1) on the periodic
    H×W grid, per channel (N, R², C, H, W//2+1): a colour operator blurs each channel with its own
    PSFs; √w_r (R², H, W) for blending weights w_r that sum to 1), or None when the operator
    changes the image's shape (a gray y from an RGB x), where this preconditioner does not apply."""
    N, C, H, W = shape
    wy, wx = _hat_weights(n_regions, H, dtype, device), _hat_weights(n_regions, W, dtype, device)
    cy = (wy.argmax(1) if n_regions > 1 else torch.tensor([H // 2])).tolist()
    cx = (wx.argmax(1) if n_regions > 1 else torch.tensor([W // 2])).tolist()
    psfs, roots = [], []
    for i, j in itertools.product(range(n_regions), range(n_regions)):
        delta = torch.zeros(shape, dtype=dtype, device=device)
        delta[..., cy[i], cx[j]] = 1
        psf = operator(delta)
        if psf.shape != delta.shape:
            return None
        psfs.append(torch.roll(psf, (-cy[i], -cx[j]), (-2, -1)))               # centred at index 0, (N, C, H, W)
        roots.append((wy[i][:, None] * wx[j][None, :]).sqrt())
    # A mono operator's channels share one response: its gains serve all, at a third of the memory.
    one = _channels_equal(psfs)
    gains = [torch.fft.rfft2(p[:, :1] if one else p).abs() ** 2 for p in psfs]
    return torch.stack(gains, 1), torch.stack(roots)


def region_preconditioner(gains, rho, watch=None):
    """v ↦ P⁻¹v = Σ_r √w_r F⁻¹[F(√w_r v) / (|ĥ_r|² + ρ)]: each region's PSF as a convolution,
    blended (after Nagy & O'Leary 1998's piecewise restoration of SV blur). Each term is symmetric
    positive semidefinite and Σ_r w_r = 1, so P⁻¹ is symmetric positive definite, as CG needs."""
    gain, root = gains
    rho = rho.view(-1, 1, 1, 1, 1) if torch.is_tensor(rho) else rho
    inv = 1 / (gain + rho)                                                  # (N, R², C, H, W//2+1)
    root = root[None, :, None]                                              # (1, R², 1, H, W)

    watch = watch or timing.Stopwatch()

    def apply(v):   # one region at a time: the FFT buffers of a camera-size image stay one region's
        with watch("preconditioner"):
            out = torch.zeros_like(v)
            for r in range(root.shape[1]):
                u = torch.fft.rfft2(v * root[:, r]) * inv[:, r]
                out += torch.fft.irfft2(u, s=v.shape[-2:]) * root[:, r]
            return out
    return apply


def data_proximal_step(operator, y, x0_hat, rho, opt, noise_norm, gains=None, watch=None):
    """x̃₀ = argmin_x ‖y − A x‖² + ρ ‖x − z‖² with z = (x̂₀ + 1)/2 (DiffPIR Eq. 13, image in [0, 1]),
    by proximal_cg with the operator's exact adjoint: to `cg_tol` relative to the correction, or
    until the discrepancy principle stops it (noise_norm; None solves to cg_tol). gains: from
    region_psf_gains, to precondition (None: plain CG). Returns (x̃₀ in [−1, 1], iterations (B,),
    stop rule (B,)). watch: a timing.Stopwatch for the preconditioner's share, or None.

    Under the discrepancy rule, where CG stops depends on its path, so the path is part of the
    method: plain CG there, whatever opt["precondition"] says; opt["precondition"] applies to the
    solves that run to cg_tol (the last step, discrepancy=0), which end at the same argmin either
    way. Measured (bench/bench_data_step.py --part cost, 512² RGB, K = 5, σ = 0.01, 20 steps × 2
    samples): preconditioned under the rule 13.9 CG iterations per step and 27.1 s of data step,
    plain 3.8 and 6.8 s, and the plain path's mean 0.40 dB nearer the truth; on 8 problems at 64²
    plain was nearer the truth in 6 (by up to 0.35 dB), the preconditioned one nearer the exact
    posterior mean in 6 (by up to 0.9 dB). The preconditioner did not pay there, so it stays off.
    """
    pcg = gains is not None and noise_norm is None and opt["precondition"]
    precondition = region_preconditioner(gains, rho, watch) if pcg else None
    x, iters, rule = proximal_cg(operator, y, (x0_hat + 1) / 2, rho, opt["cg_tol"], noise_norm, opt["cg_max_iter"],
                                 precondition)
    return 2 * x - 1, iters, rule


def diffpir_step(ctx, i, t, x_t):
    """One DiffPIR step (Zhu et al. 2023, Alg. 1): Tweedie x̂₀, the data proximal step (Eq. 13),
    then the ζ-mixed re-noising to t−1 (Eq. 15). No backward pass.

    ρ_t = λ σ_y² / σ̄_t² with σ̄_t² = (1−ᾱ_t)/ᾱ_t, as the official code sets it. At the last step
    ᾱ_{t−1} = 1, so the result is the data-consistent x̃₀ itself.
    """
    opt, sched = ctx.options, ctx.sched
    a_t = sched.alphas_cumprod[t].item()
    t_prev = int(sched.previous_timestep(t))
    a_prev = sched.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    with torch.no_grad():
        x0_hat = tweedie_estimate(x_t, ctx.eps(x_t, i)[:, :x_t.shape[1]], a_t)   # ε̂: the first C channels
        if sched.config.clip_sample:
            x0_hat = x0_hat.clamp(-1, 1)
        sig = ctx.sigma_y
        floored = sig.clamp_min(SIGMA_Y_FLOOR) if torch.is_tensor(sig) else max(sig, SIGMA_Y_FLOOR)
        rho = opt["lambda"] * floored ** 2 * a_t / (1 - a_t)       # in float64, as a Python float would be
        rho = rho.to(x_t.dtype) if torch.is_tensor(rho) else rho
        # Morozov's bound τσ√m on ‖y − Ax̃₀‖; off at the last step, whose x̃₀ is the argmin itself.
        m = ctx.y[0].numel()
        noise_norm = opt["discrepancy"] * floored * m ** 0.5 if opt["discrepancy"] > 0 and t_prev >= 0 else None
        with ctx.watch("data_step"):
            if "gains" not in ctx.cache:  # the PSFs do not change between steps
                with ctx.watch("preconditioner"):
                    ctx.cache["gains"] = region_psf_gains(ctx.operator, x_t.shape, x_t.device, x_t.dtype)
            x0_data, iters, rule = data_proximal_step(ctx.operator, ctx.y, x0_hat, rho, opt, noise_norm,
                                                      ctx.cache.get("gains"), ctx.watch)
        ctx.stats["cg_iterations"].append(iters)
        ctx.stats["cg_stop_rule"].append(rule)
        eps_hat = (x_t - a_t ** 0.5 * x0_data) / (1 - a_t) ** 0.5
        noise = randn_tensor(x_t.shape, generator=ctx.generator, device=x_t.device, dtype=x_t.dtype)
        mix = (1 - opt["zeta"]) ** 0.5 * eps_hat + opt["zeta"] ** 0.5 * noise
        x_prev = a_prev ** 0.5 * x0_data + (1 - a_prev) ** 0.5 * mix
        return x_prev, x0_data, residual_norms(ctx.y, ctx.operator, x0_data)


def daps_x0_hat(ctx, i, t, x_t):
    """x̂₀ from x_t by `ode_steps` Euler steps of the probability-flow ODE (DAPS, Zhang et al. 2025,
    Sec. 3.2), on ρ = 7 levels from σ_t to DAPS_ODE_SIGMA_MIN and then to 0 (its official code's
    first version; ode_steps = 1 is Tweedie's x̂₀). In the VP model's variables an Euler step in σ is
    a DDIM step (η = 0): x_s = √ᾱ_s x̂₀(x_r) + √(1−ᾱ_s) ε̂(x_r)."""
    sched, C = ctx.sched, x_t.shape[1]
    sigma_t = float(((1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t]).sqrt())
    n = ctx.options["ode_steps"]
    levels = karras_sigmas(sigma_t, DAPS_ODE_SIGMA_MIN, n) if n > 1 else [sigma_t]
    ts = [int(t)] + [u for u in nearest_timesteps(sched, levels[1:]) if u < int(t)]
    ts = sorted(set(ts), reverse=True)
    x = x_t
    for k, r in enumerate(ts):
        a_r = sched.alphas_cumprod[r].item()
        x0_hat = tweedie_estimate(x, ctx.eps(x, i, r if k else None)[:, :C], a_r)
        if sched.config.clip_sample:
            x0_hat = x0_hat.clamp(-1, 1)
        if k + 1 < len(ts):
            a_s = sched.alphas_cumprod[ts[k + 1]].item()
            x = a_s ** 0.5 * x0_hat + (1 - a_s) ** 0.5 * (x - a_r ** 0.5 * x0_hat) / (1 - a_r) ** 0.5
    return x0_hat


def daps_conditional_cg(ctx, u_hat, r, sigma, draw=True):
    """An exact draw of u ~ p(u | û, y) ∝ N(u; û, r²I) N(y; Au, σ²I) (u = (x₀ + 1)/2, the [0, 1]
    image): perturb-and-MAP (Papandreou & Yuille 2010), u = argmin ‖y + σε₁ − Au‖² + ρ‖u − (û + rε₂)‖²
    with ρ = σ²/r², solved by proximal_cg to cg_tol (preconditioned: no stopping rule here).
    draw=False: the conditional's mean, the same argmin without the perturbations."""
    opt = ctx.options
    y_pert, u_pert = ctx.y, u_hat
    if draw:
        e1 = randn_tensor(ctx.y.shape, generator=ctx.generator, device=u_hat.device, dtype=u_hat.dtype)
        e2 = randn_tensor(u_hat.shape, generator=ctx.generator, device=u_hat.device, dtype=u_hat.dtype)
        y_pert, u_pert = ctx.y + sigma * e1, u_hat + r * e2
    rho = (sigma / r) ** 2
    rho = rho.to(u_hat.dtype) if torch.is_tensor(rho) else rho
    gains = ctx.cache.get("gains")
    precondition = region_preconditioner(gains, rho, ctx.watch) if gains is not None else None
    u, iters, rule = proximal_cg(ctx.operator, y_pert, u_pert, rho, opt["cg_tol"], None, opt["cg_max_iter"],
                                 precondition)
    ctx.stats["cg_iterations"].append(iters)
    ctx.stats["cg_stop_rule"].append(rule)
    return u


def daps_conditional_langevin(ctx, u_hat, r, sigma, progress):
    """u ~ p(u | û, y) by `langevin_steps` steps of unadjusted Langevin dynamics from û, as DAPS's
    official code (cores/mcmc.py): u ← u + η ∇log p(u) + √(2η) ξ, with the step falling linearly
    over the annealing to lr_min_ratio of its start. The official lr (1e-4 for Gaussian deblur)
    is tied to its tuned data weight 1/τ² (τ = 0.01, not the noise level): lr · 2/τ² = 2 (1 on its
    first branch). Here the data weight is the true 1/σ², so the step is set in the same
    dimensionless terms, η = langevin_step / L, with L = 1/r² + 1/σ² bounding the Hessian of
    −log p (‖A‖ ≤ 1 for PSFs that sum to 1); η·L < 2 is the stability limit."""
    opt = ctx.options
    inv_s2 = 1 / sigma ** 2
    inv_s2 = inv_s2.to(u_hat.dtype) if torch.is_tensor(inv_s2) else inv_s2
    eta = opt["langevin_step"] * (1 + progress * (opt["lr_min_ratio"] - 1)) / (1 / r ** 2 + inv_s2)
    u = u_hat.clone()
    for _ in range(opt["langevin_steps"]):
        grad = (u_hat - u) / r ** 2 + ctx.operator.adjoint(ctx.y - ctx.operator(u)) * inv_s2
        xi = randn_tensor(u.shape, generator=ctx.generator, device=u.device, dtype=u.dtype)
        u = u + eta * grad + (2 * eta) ** 0.5 * xi
    return u


def daps_step(ctx, i, t, x_t):
    """One DAPS step (Zhang et al., CVPR 2025, Alg. 1), in the VP model's variables: x̂₀ from x_t
    (daps_x0_hat), x₀ ~ p(x₀ | x̂₀, y) with the Gaussian N(x̂₀, σ_t²I) around x̂₀ (r_t = σ_t, its
    official code), then x₀ re-noised independently to the next level, x_{t−1} = √ᾱ_{t−1} x₀ +
    √(1−ᾱ_{t−1}) ε. σ_t = √((1−ᾱ_t)/ᾱ_t). The last step returns x₀ itself: the conditional's mean
    (final: mean, measured better than a draw: docs/samplers.md) or a draw (final: draw, the paper's)."""
    opt, sched = ctx.options, ctx.sched
    t_prev = int(sched.previous_timestep(t))
    a_t = sched.alphas_cumprod[t].item()
    a_prev = sched.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    with torch.no_grad():
        x0_hat = daps_x0_hat(ctx, i, t, x_t)
        sig = ctx.sigma_y
        sigma = sig.clamp_min(SIGMA_Y_FLOOR) if torch.is_tensor(sig) else max(sig, SIGMA_Y_FLOOR)
        r = ((1 - a_t) / a_t) ** 0.5 / 2                                  # σ_t on the [0, 1] scale
        u_hat = (x0_hat + 1) / 2
        final_mean = t_prev < 0 and opt["final"] == "mean"
        with ctx.watch("data_step"):
            if opt["conditional"] == "cg" or final_mean:
                if "gains" not in ctx.cache:  # the PSFs do not change between steps
                    with ctx.watch("preconditioner"):
                        ctx.cache["gains"] = region_psf_gains(ctx.operator, x_t.shape, x_t.device, x_t.dtype)
                u = daps_conditional_cg(ctx, u_hat, r, sigma, draw=not final_mean)
            else:
                u = daps_conditional_langevin(ctx, u_hat, r, sigma, i / len(sched.timesteps))
        x0 = 2 * u - 1
        if t_prev < 0:
            return x0, x0, residual_norms(ctx.y, ctx.operator, x0)
        noise = randn_tensor(x_t.shape, generator=ctx.generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * noise
        return x_prev, x0, residual_norms(ctx.y, ctx.operator, x0)


# name -> (step function, default options). The names are config.SAMPLER_METHODS and the defaults
# config.yaml's sampler.<name> section: one source for the CLI and the Python API.
_STEPS = {"dps": dps_step, "diffpir": diffpir_step, "daps": daps_step}
SAMPLERS = {name: (_STEPS[name], options) for name, options in config.sampler_defaults().items()}
DEFAULT_STEPS = config.DEFAULT_STEPS
# Every method's settings: the samplers', and those of the analytic prior's exact posterior (no steps).
OPTIONS = {**{name: options for name, (_, options) in SAMPLERS.items()},
           config.EXACT: dict(config.defaults()["sampler"][config.EXACT])}


def keyword_options(method: str, options: dict | None, settings: dict) -> dict | None:
    """`options` with a sampler's settings given as keywords merged in (`lambda_` is λ). An unknown
    keyword, or one that `options` gives another value, is a TypeError that lists the known ones."""
    if not settings:
        return options
    named = {("lambda" if k == "lambda_" else k): v for k, v in settings.items()}
    known = OPTIONS.get(method, {})
    unknown = sorted(k for k in settings if ("lambda" if k == "lambda_" else k) not in known)
    if unknown:
        names = ", ".join("lambda_" if k == "lambda" else k for k in known)
        raise TypeError(f"unknown keyword argument(s) {', '.join(unknown)} for method {method!r}; its settings "
                        f"are {names or '(unknown method)'}")
    clash = sorted(k for k in named if k in (options or {}) and options[k] != named[k])
    if clash:
        raise TypeError(f"{', '.join(clash)} given as a keyword and in options with different values; keep one")
    return {**(options or {}), **named}


def sampler_options(method: str, options: dict | None) -> dict:
    """The method's defaults overridden by `options`; unknown names and bad values raise ValueError."""
    if method not in OPTIONS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(OPTIONS)}")
    defaults = OPTIONS[method]
    unknown = set(options or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {', '.join(sorted(unknown))}; known: {', '.join(defaults)}")
    opt = {**defaults, **(options or {})}
    for name, value in opt.items():  # the same ranges config.yaml's sampler.<method> is checked against
        allowed = config.choices().get(f"sampler.{method}.{name}")
        if allowed is not None:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
            continue
        lo, hi = config.RANGES[f"sampler.{method}.{name}"]
        config.check_finite(name, value)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else '∞'}], got {value}")
    return opt


# ----------------------------------------------------------------------------
# 3. The shared loop
# ----------------------------------------------------------------------------

class EigenPSFDPSPipeline:
    """Any sampler in SAMPLERS over any ε-prediction diffusers DDPM and any linear operator with
    `forward` (DPS) and `adjoint` (DiffPIR).

    `restored, intermediates = pipeline(y, ...)` with y (B, C, H, W) in [0, 1].
    `restored` is (B, C, H, W) in [0, 1]; with num_samples > 1 it is a dict with
    `samples` (B, S, C, H, W), `mean` and `std` (B, C, H, W).
    `intermediates` holds `steps`, `x0_hat` (CPU, [0, 1]) every `intermediate_freq` steps,
    `residual` (per-image ‖y − A(x̂₀)‖ at those steps), `cg_iterations` (DiffPIR, the most of any
    image, per step), `cg_iterations_per_image` and `cg_stop_rule_per_image` (DiffPIR, (steps, B·S),
    the rule as an index into STOP_RULES; else None).
    """

    def __init__(self, unet, scheduler, operator):
        self.unet, self.scheduler, self.operator = unet, scheduler, operator

    def _scheduler(self, clip_denoised):
        """A private copy of the scheduler; clip_denoised overrides its clip_sample.

        Clamping x̂₀ to [−1, 1] zeroes the likelihood gradient of every pixel it clamps.
        """
        cfg = dict(self.scheduler.config)
        if clip_denoised is not None:
            cfg["clip_sample"] = bool(clip_denoised)
        return type(self.scheduler).from_config(cfg)

    def __call__(self, y, num_inference_steps=1000, method="dps", options=None, sigma_y=0.0, generator=None,
                 callback=None, num_samples=1, intermediate_freq=0, clip_denoised=None, dtype=torch.float32,
                 gradient_checkpointing=False, check_every=10, x_T=None, start_index=0, x_size=None, tiles=None,
                 stopwatch=None, **settings):
        """Runs `method` (a key of SAMPLERS) with `options` (its settings; defaults in SAMPLERS).

        settings: the same settings as keywords, as the first version's API took them
            (`pipe(y, step_size=0.5)`; DiffPIR's λ as `lambda_`); an unknown one is a TypeError.

        sigma_y: the measurement noise std on y's [0, 1] scale (DiffPIR's ρ_t; DPS ignores it), or a
            sequence of B of them, one per image.
        generator: a torch.Generator, or a list of B·num_samples generators (one per image, as in
            diffusers), used for x_T and every noise draw, in diffusers' order.
        callback(i, t, x_t, x0_hat, residual_norm): called after every step with device tensors;
            reading them forces a sync, so callers should read only every few steps.
        check_every: how often (steps) to check x_t for NaN/Inf on the host.
        x_T, start_index: resume from a saved x_t before step `start_index` (with the generator
            restored to its state at that point).
        x_size: (H, W) of the image x when the operator maps a larger domain onto y
            (physics.CroppedOperator); default y's size.
        tiles: a tiling.TilePlan to evaluate the UNet on overlapping tiles (x_t, y and the operator
            stay whole-image; DPS's gradient goes tile by tile); None runs it on the whole image.
        stopwatch: a timing.Stopwatch that gets the UNet's, the data step's and the preconditioner's
            time (stages unet, data_step, preconditioner, exact_solve), or None.
        """
        clock = stopwatch or timing.Stopwatch()
        # 1. Validate and set up the schedule.
        if y.ndim != 4:
            raise ValueError(f"y must be (B, C, H, W), got {tuple(y.shape)}")
        opt = sampler_options(method, keyword_options(method, options, settings))
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if method == config.EXACT:
            with clock("exact_solve"):
                return self.exact(y, opt, sigma_y, generator, num_samples, x_size, callback)
        sigma = per_sample_sigma(sigma_y, y.shape[0], num_samples, y.device)
        sched = self._scheduler(clip_denoised)
        check_num_inference_steps(num_inference_steps, sched, method)
        # Timesteps stay on the host: the scheduler's scalar arithmetic on t then never waits for the GPU.
        set_timesteps(sched, method, num_inference_steps)
        if gradient_checkpointing and hasattr(self.unet, "enable_gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()
        autocast = torch.autocast(y.device.type, dtype=dtype, enabled=dtype != torch.float32)
        timesteps = sched.timesteps                                         # CPU, for the scheduler
        t_device = timesteps.to(y.device)  # the UNet's copy: CUDA graphs skip graphs fed CPU tensors

        def unet_at(i, t=None):
            t_in = t_device[i] if t is None else torch.tensor(t, device=y.device)

            def call(x):
                with autocast, clock("unet"):
                    return self.unet(x, t_in).sample.float()
            return call

        def eps(x_t, i, t=None):
            """ε̂ at step i's timestep, or at timestep t (DAPS's inner ODE) with step i's tiles."""
            return unet_at(i, t)(x_t) if tiles is None else tiling.tiled_eps(unet_at(i, t), x_t, tiles, i)

        def eps_vjp(x_t, i, v):
            return tiling.tiled_eps_vjp(unet_at(i), x_t, tiles, i, v)

        if tiles is not None and tiling.n_tiles(*(x_size or y.shape[-2:]), tiles) == 1:
            tiles = None   # one tile covers the image: that is the untiled run, exactly

        # 2. x_T ~ N(0, I), drawn exactly as DDPMPipeline draws it. y_rep: (B·S, C, H, W).
        B = y.shape[0]
        y_rep = y.repeat_interleave(num_samples, 0).float()
        shape = (y_rep.shape[0], self.unet.config.in_channels) + tuple(x_size or y_rep.shape[-2:])  # the prior's channels
        x_t = randn_tensor(shape, generator=generator, device=y.device, dtype=torch.float32) if x_T is None \
            else x_T.to(y.device, torch.float32)
        ctx = StepContext(eps, sched, self.operator, y_rep, generator, opt, sigma,
                          eps_vjp=eps_vjp if tiles is not None else None, watch=clock)
        step, watch = SAMPLERS[method][0], _Watch(y_rep, len(timesteps), check_every, intermediate_freq, method)

        # 3. The steps; the watch keeps intermediates and stops on divergence.
        for i in range(start_index, len(timesteps)):
            t = timesteps[i]
            x_t, x0_hat, res = step(ctx, i, t, x_t)
            watch(i, x_t, x0_hat, res)
            if callback is not None:
                callback(i, int(t), x_t, x0_hat, res)
        its, rules = ctx.stats["cg_iterations"], ctx.stats["cg_stop_rule"]  # per step: (B·S,) each
        watch.inter["cg_iterations"] = [int(n.max()) for n in its]
        watch.inter["cg_iterations_per_image"] = torch.stack(its).cpu() if its else None  # (steps, B·S)
        watch.inter["cg_stop_rule_per_image"] = torch.stack(rules).cpu() if rules else None  # STOP_RULES indices

        # 4. Back to [0, 1]; split posterior samples.
        x_0 = ((x_t + 1) / 2).clamp(0, 1)
        if num_samples == 1:
            return x_0, watch.inter
        samples = x_0.reshape(B, num_samples, *x_0.shape[1:])
        return {"samples": samples, "mean": samples.mean(1), "std": samples.std(1)}, watch.inter


    def exact(self, y, opt, sigma_y, generator, num_samples, x_size, callback):
        """method 'exact': the AnalyticPrior's exact posterior (exact_posterior), returned as a
        sampler's result: the mean clamped to [0, 1], or with num_samples > 1 exact draws, their
        std, and the exact mean (not the draws' mean). σ_y is floored at SIGMA_Y_FLOOR, as DiffPIR
        floors it (an estimate of 0 on a clean image stays a finite problem). A list of B·S
        generators (one per sample, as the samplers take them): image b draws with its first, so its
        draws do not depend on its batch. With options["evidence"] the prior's scale γ and the noise
        level σ_e come per image from evidence_fit (maximum marginal likelihood) and the posterior is
        that of x₀ ~ N(μ, γΣ), noise σ_e. The solve's iterations and relative residual, γ and the σ
        used, per image, are intermediates["exact"]."""
        if not isinstance(self.unet, priors.AnalyticPrior):
            raise ValueError("method 'exact' is the analytic prior's closed-form posterior; this prior has none "
                             "(use dps, diffpir or daps)")
        gen = generator[::num_samples] if isinstance(generator, (list, tuple)) else generator
        sigma = torch.as_tensor(sigma_y, dtype=torch.float64).flatten().clamp_min(SIGMA_Y_FLOOR)
        gamma = torch.ones(1, dtype=torch.float64)
        with torch.no_grad():
            same = x_size is None or tuple(x_size) == tuple(y.shape[-2:])
            fit = evidence_fit(self.unet, self.operator, y, sigma) if opt["evidence"] and same else None
            if fit is not None:
                gamma, sigma = (v.cpu() for v in fit)
            elif opt["evidence"]:
                log.warning("the evidence fit needs the operator to keep the image's shape; the prior's scale and "
                            "sigma_y stay as given")
            mean, samples, stats = exact_posterior(self.unet, self.operator, y, sigma, num_samples if num_samples > 1 else 0,
                                                   gen, opt["cg_max_iter"], opt["cg_tol"], x_size, gamma)
            x0 = (2 * mean - 1).float()
            res = residual_norms(y.float(), self.operator, x0)
        inter = {"steps": [], "x0_hat": [], "residual": [], "cg_iterations": [], "cg_iterations_per_image": None,
                 "cg_stop_rule_per_image": None,
                 "exact": {"cg_iterations": stats["cg_iterations"].tolist(), "cg_tol": opt["cg_tol"],
                           "relative_residual": stats["relative_residual"].tolist(), "cg_max_iter": opt["cg_max_iter"],
                           "evidence": fit is not None, "prior_scale": gamma.expand(len(y)).tolist(),
                           "sigma_y": sigma.expand(len(y)).tolist()}}
        if callback is not None:   # one row per sample, as the samplers report: the mean in each
            rep = lambda v: v.repeat_interleave(num_samples, 0)  # noqa: E731
            callback(0, 0, rep(x0), rep(x0), rep(res))
        mean = mean.clamp(0, 1).float()
        if samples is None:
            return mean, inter
        return {"samples": samples.clamp(0, 1).float(), "mean": mean, "std": samples.clamp(0, 1).float().std(1)}, inter


def per_sample_sigma(sigma_y, B: int, num_samples: int, device):
    """σ_y as the step functions take it: a float, or for B per-image values a (B·S, 1, 1, 1)
    float64 tensor (each image's value for its S samples)."""
    if not isinstance(sigma_y, (list, tuple, torch.Tensor)):
        if not sigma_y >= 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        return float(sigma_y)
    s = torch.as_tensor(sigma_y, dtype=torch.float64, device=device).flatten()
    if s.shape != (B,) or not bool((s >= 0).all()):
        raise ValueError(f"sigma_y must be one value >= 0 or {B} of them (one per image), got {sigma_y}")
    return s.repeat_interleave(num_samples).view(-1, 1, 1, 1)


class _Watch:
    """Divergence bookkeeping and intermediates for the shared loop. The NaN flag stays on the
    device; the host looks every check_every steps (and at the last), so no step waits for it."""

    def __init__(self, y, n_steps, check_every, intermediate_freq, method):
        self.n, self.every, self.freq, self.method = n_steps, check_every, intermediate_freq, method
        self.first_bad = torch.full((), -1, device=y.device, dtype=torch.long)
        self.last_good, self.runaway = None, 0
        self.inter = {"steps": [], "x0_hat": [], "residual": []}

    def __call__(self, i, x_t, x0_hat, res):
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(x_t).all(), i, self.first_bad)
        last = i == self.n - 1
        if self.freq and (i % self.freq == 0 or last):
            self.inter["steps"].append(i)
            self.inter["x0_hat"].append(((x0_hat + 1) / 2).clamp(0, 1).cpu())
            self.inter["residual"].append(res.cpu())
        if not ((i + 1) % self.every == 0 or last):
            return
        if self.first_bad.item() >= 0:
            raise DivergenceError(int(self.first_bad) + 1, self.n, self.last_good, self.inter, method=self.method)
        ratio = float(torch.linalg.vector_norm(x_t.flatten(1), dim=1).max()) / x_t[0].numel() ** 0.5
        self.runaway = self.runaway + 1 if ratio > RUNAWAY_FACTOR else 0
        if self.runaway >= RUNAWAY_CHECKS:
            raise DivergenceError(i + 1, self.n, self.last_good, self.inter,
                                  f"x_t ran away to ‖x_t‖ = {ratio:.3g}·√n, far beyond the diffusion's ≤ √n", self.method)
        if self.runaway == 0:
            self.last_good = ((x0_hat + 1) / 2).clamp(0, 1)


def create_dps_pipeline(operator, model_id=DEFAULT_MODEL_ID, cache_dir=None, device="cpu", local_files_only=False):
    """Loads the prior (hub id, local diffusers dir or 'analytic') and wraps it with `operator`.

    The operator comes first, as in the first version (`create_dps_pipeline(op, device=…)`); the
    order (model_id, operator) of earlier releases of this one is still accepted."""
    if isinstance(operator, (str, os.PathLike)):
        operator, model_id = model_id, operator
    unet, scheduler = priors.load_model(model_id, cache_dir=cache_dir, device=device, local_files_only=local_files_only)
    return EigenPSFDPSPipeline(unet, scheduler, operator.to(device))



# ----------------------------------------------------------------------------
# 4. The exact posterior of the analytic prior (what the samplers are checked against)
# ----------------------------------------------------------------------------

def gaussian_posterior(prior, operator, y, sigma_y, n_samples=0, generator=None, max_iter=3000, tol=1e-6, prior_scale=1.0):
    """(mean, samples) of exact_posterior: the exact posterior of the AnalyticPrior."""
    mean, samples, _ = exact_posterior(prior, operator, y, sigma_y, n_samples, generator, max_iter, tol,
                                       prior_scale=prior_scale)
    return mean, samples


def exact_posterior(prior, operator, y, sigma_y, n_samples=0, generator=None, max_iter=3000, tol=1e-6, x_size=None,
                    prior_scale=1.0):
    """The exact posterior of the AnalyticPrior's x₀ ~ N(μ, Σ) given y = A((x₀ + 1)/2) + n,
    n ~ N(0, σ_y² I), for a linear `operator` with an adjoint. Returns (mean, samples, stats) in
    [0, 1] image space, unclipped: mean (B, C, H, W), samples (B, n_samples, C, H, W) or None, and
    stats {"cg_iterations": (B,), "relative_residual": (B,)} of the mean's solve.

    In the whitened variable x₀ = μ + Σ^{1/2} w the posterior precision is well conditioned,
        Q = I + Σ^{1/2} Aᵀ A Σ^{1/2} / (4σ²),   Q w̄ = b = Σ^{1/2} Aᵀ (y − A((μ + 1)/2)) / (2σ²),
    and is solved by CG to ‖b − Q w̄‖ <= tol·‖b‖ (the relative residual is measured after the
    solve, one more Q). Samples come by perturbation-optimisation (Papandreou & Yuille 2010):
    w = Q⁻¹(b + ξ) with ξ = ε₁ + Σ^{1/2} Aᵀ ε₂ / (2σ) ~ N(0, Q) is an exact draw of N(Q⁻¹b, Q⁻¹).
    sigma_y: one value, or one per image. x_size: (H, W) of x when A maps a larger domain onto y.
    prior_scale: γ, one value or one per image: the prior's covariance is γΣ (evidence_fit's choice).
    generator: a torch.Generator, or a list of B, one per image (its draws then do not depend on
    the other images).
    """
    y = y.to(torch.float64)
    B, C = y.shape[0], prior.config.in_channels
    sig = torch.as_tensor(sigma_y, dtype=torch.float64, device=y.device).flatten()
    if not bool((sig > 0).all()):
        raise ValueError("the exact posterior needs sigma_y > 0")
    sig = sig.expand(B).reshape(B, 1, 1, 1)
    gam = torch.as_tensor(prior_scale, dtype=torch.float64, device=y.device).flatten().expand(B).reshape(B, 1, 1, 1)
    H, W = x_size or y.shape[-2:]
    half = lambda v, g: prior.apply_covariance(v, 0.5) * g.sqrt()                 # (γΣ)^{1/2}  # noqa: E731
    precision = lambda s, g: lambda w: w + half(operator.adjoint(operator(half(w, g))), g) / (4 * s ** 2)  # noqa: E731
    mu = prior.mu.view(1, -1, 1, 1).expand(B, C, H, W)
    b = half(operator.adjoint(y - operator((mu + 1) / 2)), gam) / (2 * sig ** 2)
    to_image = lambda w, m, g: (m + half(w, g) + 1) / 2  # noqa: E731
    # γΣ with σ is Σ with σ/√γ in the preconditioner's gain
    inv = _posterior_preconditioner(prior, operator, sig / gam.sqrt(), (B, C, H, W), y.device)
    P_inv = lambda g: None if g is None else (lambda v: prior.filter(v, g))  # noqa: E731
    Q = precision(sig, gam)
    w_mean, iters = conjugate_gradient(Q, b, torch.zeros_like(b), max_iter, tol, P_inv(inv))
    norm = lambda v: torch.linalg.vector_norm(v.flatten(1), dim=1)  # noqa: E731
    stats = {"cg_iterations": iters, "relative_residual": norm(b - Q(w_mean)) / norm(b).clamp_min(1e-300)}
    mean = to_image(w_mean, mu, gam)
    if not n_samples:
        return mean, None, stats
    rep = lambda v: v.repeat_interleave(n_samples, 0)  # noqa: E731
    b_s, mu_s, sig_s, gam_s = rep(b), rep(mu), rep(sig), rep(gam)
    e1, e2 = _draws(generator, B, n_samples, (tuple(b.shape[1:]), tuple(y.shape[1:])), b.device)
    w_s, _ = conjugate_gradient(precision(sig_s, gam_s), b_s + e1 + half(operator.adjoint(e2), gam_s) / (2 * sig_s),
                                rep(w_mean), max_iter, tol, P_inv(None if inv is None else rep(inv)))
    return mean, to_image(w_s, mu_s, gam_s).reshape(B, n_samples, *mean.shape[1:]), stats


def _draws(generator, B, S, shapes, device):
    """Standard normal (B·S, *shape) draws, one tensor per shape: from one generator, or image by
    image from a list of B generators (each image's S draws of every shape from its own)."""
    if not isinstance(generator, (list, tuple)):
        return [torch.randn((B * S,) + shape, generator=generator, dtype=torch.float64, device=device) for shape in shapes]
    per_image = [[torch.randn((S,) + shape, generator=g, dtype=torch.float64, device=device) for shape in shapes]
                 for g in generator]
    return [torch.cat([d[k] for d in per_image]) for k in range(len(shapes))]


def _posterior_preconditioner(prior, operator, sig, shape, device):
    """The gain g of v ↦ P⁻¹v = prior.filter(v, g), P = I + Σ^{1/2} HᵀH Σ^{1/2} / (4σ²), H the
    periodic convolution with each image's PSF at the image centre (a point source through the
    operator itself, so a stacked per-image operator gives each image its own): diagonal in the
    prior's channel basis and in Fourier, so P⁻¹ is exact and cheap. It only steers CG (the answer
    is the same); it cuts the iterations from thousands to tens when σ is small. sig: (B, 1, 1, 1).
    Returns g (B, C, H, W//2+1), or None when A changes the image's shape."""
    gain = _centre_gain(operator, shape, device)
    if gain is None:
        return None
    return 1 / (1 + prior.prior_variance(*shape[-2:])[None] * gain / (4 * sig ** 2))


def _centre_gain(operator, shape, device):
    """|ĥ(f)|² (B, 1, H, W//2+1) on the rFFT grid, h each image's PSF at the image centre (a point
    source through the operator); a colour operator's channels averaged (the prior's filter mixes
    channels). None when A changes the image's shape."""
    B, C, H, W = shape
    delta = torch.zeros(shape, dtype=torch.float64, device=device)
    delta[..., H // 2, W // 2] = 1
    psf = operator(delta)
    if psf.shape != delta.shape:
        return None
    psf = torch.roll(psf, (-(H // 2), -(W // 2)), (-2, -1))                    # centred at index 0
    return (torch.fft.rfft2(psf).abs() ** 2).mean(1, keepdim=True)


# The evidence search's box: the prior's scale γ, and σ_e as a multiple of the given σ_y.
EVIDENCE_GAMMA = (1e-3, 1e2)
EVIDENCE_SIGMA = (0.5, 10.0)


def evidence_nll(prior, operator, y, gamma, sigma_e):
    """−2 log p(y | γ, σ_e) + const per image (B,), for x₀ ~ N(μ, γΣ) and y = A((x₀ + 1)/2) + n,
    n ~ N(0, σ_e² I), with A taken as the periodic convolution with its centre PSF h (as the
    preconditioner takes it). Then in the prior's channel basis and orthonormal Fourier every
    coefficient of the residual r = y − A((μ + 1)/2) is independent and zero-mean with variance
        v_c(f) = γ λ_c s(f) |ĥ(f)|² / 4 + σ_e²        (the 1/4: x = (x₀ + 1)/2),
    so −2 log p(y) = Σ_{c,f} w_f (log v_c(f) + |r̂_c(f)|² / v_c(f)), w_f = 2 on the rFFT's complex
    columns and 1 on its real ones (column 0 and, for even W, W/2). gamma, sigma_e: (B,) or (G, B)
    candidates (the result then (G, B)). None when A changes the image's shape."""
    stats = _evidence_stats(prior, operator, y)
    return None if stats is None else _nll(*stats, gamma, sigma_e)


def _evidence_stats(prior, operator, y):
    """(P, |r̂|², w) of evidence_nll: the prior's blurred variance γ = 1 (B, C, H, W//2+1), the
    residual's power (B, C, H, W//2+1) and the column weights (W//2+1,)."""
    y = y.to(torch.float64)
    B, C, H, W = y.shape
    gain = _centre_gain(operator, (B, prior.config.in_channels, H, W), y.device)
    if gain is None or prior.config.in_channels != C:
        return None
    r = y - operator((prior.mu.view(1, -1, 1, 1).expand(B, C, H, W) + 1) / 2)
    power = torch.fft.rfft2(prior._rotate(r, prior.Q.T), norm="ortho").abs() ** 2
    w = torch.full((W // 2 + 1,), 2.0, dtype=torch.float64, device=y.device)
    w[0] = 1
    if W % 2 == 0:
        w[-1] = 1
    return prior.prior_variance(H, W)[None] * gain / 4, power, w


def _nll(P, power, w, gamma, sigma_e):
    gamma, sigma_e = torch.as_tensor(gamma, dtype=torch.float64), torch.as_tensor(sigma_e, dtype=torch.float64)
    shape = torch.broadcast_shapes(gamma.shape, sigma_e.shape)
    g, s = gamma.expand(shape).reshape(-1, P.shape[0]), sigma_e.expand(shape).reshape(-1, P.shape[0])
    out = torch.stack([(((torch.log(v) + power / v) * w).sum((1, 2, 3)))
                       for v in (gi.view(-1, 1, 1, 1) * P + si.view(-1, 1, 1, 1) ** 2 for gi, si in zip(g, s))])
    return out.reshape(shape)


def evidence_fit(prior, operator, y, sigma_y, points=17, zooms=3):
    """(γ, σ_e), each (B,): the prior's scale and the noise level that maximise the evidence
    p(y | γ, σ_e) of evidence_nll (type-II maximum likelihood, MacKay 1992; for a Gaussian prior
    and a convolution, Wiener-filter hyperparameters by marginal likelihood). σ_e absorbs what
    the noise σ_y alone does not explain: the model's own error (PSF grid, EigenPSF truncation),
    quantisation, a low σ estimate; the prior's 1/f² spectrum, fitted once on three photos, is
    rescaled to the image. A grid of points² in log space over EVIDENCE_GAMMA × σ_y·EVIDENCE_SIGMA,
    then `zooms` finer grids around the best (each a quarter of the last one's span). Returns
    None when A changes the image's shape (no centre PSF to take)."""
    stats = _evidence_stats(prior, operator, y)
    if stats is None:
        return None
    B = y.shape[0]
    sig = torch.as_tensor(sigma_y, dtype=torch.float64, device=y.device).flatten().expand(B)
    box = torch.log(torch.tensor([EVIDENCE_GAMMA, EVIDENCE_SIGMA], dtype=torch.float64, device=y.device)).T[..., None]
    lo, hi = box[0].expand(2, B), box[1].expand(2, B)
    for _ in range(zooms + 1):
        t = torch.linspace(0, 1, points, dtype=torch.float64).view(-1, 1)
        lg, ls = lo[0] + t * (hi[0] - lo[0]), lo[1] + t * (hi[1] - lo[1])            # (points, B) each
        G, S = lg[:, None, :].expand(points, points, B), ls[None, :, :].expand(points, points, B)
        nll = _nll(*stats, G.exp().reshape(-1, B), (S.exp() * sig).reshape(-1, B))  # (points², B)
        best = nll.argmin(0)
        centre = torch.stack([G.reshape(-1, B)[best, torch.arange(B)], S.reshape(-1, B)[best, torch.arange(B)]])
        half = (hi - lo) / 8
        lo, hi = torch.maximum(centre - half, box[0]), torch.minimum(centre + half, box[1])
    return centre[0].exp(), centre[1].exp() * sig
