"""Spatially varying (SV) blur: PSF-grid simulation, EigenPSF decomposition and operators.

Forward model (README, "Forward model"):

    y = A(x) + n,     A(x) ≈ Σₖ Cₖ ⊙ (x ∗ Bₖ)              (gather form)
                      A(x) ≈ Σₖ Bₖ ∗ (Cₖ ⊙ x)              (scatter form)

where Bₖ are basis kernels ("EigenPSFs") and Cₖ coefficient maps. The PSF at a
pixel p is hₚ = Σₖ Cₖ[p] Bₖ. In the *gather* form hₚ is the PSF that blurs *into*
output pixel p; in the *scatter* form it is the PSF with which source pixel p
spreads its light (product convolution; flux conserving).

Every operator is a composition of exactly-transposable linear pieces

    A = Crop ∘ Conv ∘ Pad      (per term k, with Cₖ ⊙ before or after)

so `adjoint` is the exact transpose (checked by tests to 1e-10 in float64).

Conventions: images are (B, C, H, W), kernels (k, k) with k odd and the centre at
index r = k // 2; convolution is (x ∗ h)[p] = Σᵤ h[u] x[p − u].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BLUR_MODES = ("motion", "defocus", "mixed", "correlated", "random_iid")
FORMS = ("gather", "scatter")
BOUNDARIES = ("reflect", "zeros", "circular")
INTERPOLATIONS = ("bilinear", "nearest")

# Default per-mode parameters; config.yaml mirrors these.
MODE_DEFAULTS = {
    "motion": {"min_length": 3.0, "max_length": 15.0, "angle_variation": 45.0},
    "defocus": {"min_radius": 1.0, "max_radius": 5.0},
    "correlated": {"sigma_scale": 2.0, "mu_scale": 1.0, "correlation_length": 3.0},
    "random_iid": {"min_length": 3.0, "max_length": 15.0, "min_radius": 1.0,
                   "max_radius": 5.0, "sigma_scale": 2.0},
}
MODE_DEFAULTS["mixed"] = {**MODE_DEFAULTS["motion"], **MODE_DEFAULTS["defocus"]}
DEFAULT_GRID_SIZE = {"random_iid": 64}  # every other mode: 8


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def validate_kernel_size(kernel_size) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer (1, 3, 5, ...), got {kernel_size!r}")


def _make_generator(seed, generator, device) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


# ----------------------------------------------------------------------------
# 1. PSF-grid simulation
# ----------------------------------------------------------------------------

class SVBlurSimulator:
    """Simulates a (G, G, k, k) grid of PSFs sampled at the centres of a G×G tiling.

    Every mode is vectorized over the grid: parameters are (G, G, 1, 1) tensors
    broadcast against the kernel coordinates (1, 1, k, k).
    """

    def __init__(self, img_height: int, img_width: int, kernel_size: int = 21, grid_size: int = 8,
                 device="cpu", dtype=torch.float32):
        validate_kernel_size(kernel_size)
        if not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be an integer >= 1, got {grid_size!r}")
        if img_height < kernel_size or img_width < kernel_size:
            raise ValueError(f"image ({img_height}x{img_width}) must be at least kernel_size={kernel_size} on each side")
        self.H, self.W, self.k, self.G = img_height, img_width, kernel_size, grid_size
        self.device, self.dtype = torch.device(device), dtype
        r = kernel_size // 2
        u = torch.arange(-r, r + 1, device=self.device, dtype=dtype)
        self.v, self.u = torch.meshgrid(u, u, indexing="ij")  # (k, k): row offset v, column offset u

    # -- smooth and random fields over the grid, all (G, G, 1, 1) --------------------------

    def _radius_field(self):
        """Normalised distance of each grid centre from the image centre, in [0, 1]."""
        c = (torch.arange(self.G, device=self.device, dtype=self.dtype) + 0.5) / self.G - 0.5
        yy, xx = torch.meshgrid(c * self.H, c * self.W, indexing="ij")
        rho = torch.sqrt(yy ** 2 + xx ** 2)
        return (rho / rho.max().clamp_min(1e-12))[..., None, None] if self.G > 1 else torch.zeros(1, 1, 1, 1, device=self.device, dtype=self.dtype)

    def _smooth_field(self, gen, correlation_length: float):
        """Zero-mean, unit-std Gaussian random field with Gaussian correlation (in grid cells)."""
        n = self.G
        white = torch.randn(n, n, generator=gen, device=self.device, dtype=self.dtype)
        if correlation_length > 0:
            f = torch.fft.fftfreq(n, device=self.device, dtype=self.dtype)
            fy, fx = torch.meshgrid(f, f, indexing="ij")
            transfer = torch.exp(-2 * (math.pi * correlation_length) ** 2 * (fy ** 2 + fx ** 2))
            white = torch.fft.ifft2(torch.fft.fft2(white) * transfer).real
        white = white - white.mean()
        std = white.std() if n > 1 else torch.ones((), device=self.device, dtype=self.dtype)
        return (white / std.clamp_min(1e-12))[..., None, None]

    # -- PSF families, vectorized over the leading (G, G) ----------------------------------

    def _line(self, length, angle):
        """Anti-aliased line segment: tent profile of the distance to the segment (sub-pixel)."""
        dy, dx = torch.sin(angle), torch.cos(angle)
        t = (self.u * dx + self.v * dy).clamp(-length / 2, length / 2)
        dist = torch.sqrt((self.u - t * dx) ** 2 + (self.v - t * dy) ** 2)
        return (1 - dist).clamp_min(0)

    def _disk(self, radius):
        """Anti-aliased disk: pixel coverage approximated by clamp(R + 1/2 − d, 0, 1)."""
        d = torch.sqrt(self.u ** 2 + self.v ** 2)
        return (radius + 0.5 - d).clamp(0, 1)

    def _gaussian(self, sigma_major, sigma_minor, theta, mu_y, mu_x):
        c, s = torch.cos(theta), torch.sin(theta)
        du, dv = self.u - mu_x, self.v - mu_y
        a = du * c + dv * s
        b = -du * s + dv * c
        return torch.exp(-0.5 * ((a / sigma_major) ** 2 + (b / sigma_minor) ** 2))

    def _check_fit(self, what: str, extent: float, limit_name: str) -> None:
        r = self.k // 2
        if extent > r + 1e-9:
            raise ValueError(
                f"{what} reaches {extent:.2f} px from the centre but kernel_size={self.k} only holds {r} px; "
                f"increase kernel_size to at least {2 * math.ceil(extent) + 1} or reduce {limit_name}")

    # -- public API -------------------------------------------------------------------------

    def simulate_sv_kernel_grid(self, mode: str = "motion", seed=None, generator=None, **mode_params):
        """Returns a (G, G, k, k) grid of non-negative PSFs, each summing to 1.

        `mode_params` override MODE_DEFAULTS[mode]; unknown names raise ValueError.
        Randomness comes only from `generator` (or a fresh one seeded with `seed`).
        """
        _choice("blur_mode", mode, BLUR_MODES)
        unknown = set(mode_params) - set(MODE_DEFAULTS[mode])
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for blur_mode {mode!r}; "
                             f"allowed: {sorted(MODE_DEFAULTS[mode])}")
        p = {**MODE_DEFAULTS[mode], **mode_params}
        gen = _make_generator(seed, generator, self.device)
        G, one = self.G, torch.ones(self.G, self.G, 1, 1, device=self.device, dtype=self.dtype)

        if mode in ("motion", "mixed", "random_iid"):
            _nonneg_range("min_length", p["min_length"], "max_length", p["max_length"])
            self._check_fit("motion blur of max_length", p["max_length"] / 2, "max_length")
        if mode in ("defocus", "mixed", "random_iid"):
            _nonneg_range("min_radius", p["min_radius"], "max_radius", p["max_radius"])
            self._check_fit("defocus disk of max_radius", p["max_radius"], "max_radius")
        if mode in ("correlated", "random_iid"):
            if p["sigma_scale"] <= 0:
                raise ValueError(f"sigma_scale must be > 0, got {p['sigma_scale']}")

        if mode == "motion" or mode == "mixed":
            rho = self._radius_field()
            length = (p["min_length"] + (p["max_length"] - p["min_length"]) * rho) * one
            base = torch.rand((), generator=gen, device=self.device, dtype=self.dtype) * math.pi
            # bounded so that the direction spans at most angle_variation degrees over the image
            angle = base + math.radians(p["angle_variation"]) / 2 * torch.tanh(self._smooth_field(gen, max(G / 3, 1.0)))
            motion = self._line(length, angle)
        if mode == "defocus" or mode == "mixed":
            radius = (p["min_radius"] + (p["max_radius"] - p["min_radius"]) * self._radius_field()) * one
            defocus = self._disk(radius)

        if mode == "motion":
            psf = motion
        elif mode == "defocus":
            psf = defocus
        elif mode == "mixed":
            ii, jj = torch.meshgrid(torch.arange(G, device=self.device), torch.arange(G, device=self.device), indexing="ij")
            checker = ((ii + jj) % 2 == 0)[..., None, None]
            psf = torch.where(checker, motion / motion.sum((-2, -1), keepdim=True),
                              defocus / defocus.sum((-2, -1), keepdim=True))
        elif mode == "correlated":
            # widths in [0.5, 1.5]·sigma_scale and offsets in [−mu_scale, mu_scale] (bounded maps of
            # smooth fields), so the support bound below is a guarantee, not a hope.
            s = p["sigma_scale"]
            L = p["correlation_length"]
            if L < 0 or p["mu_scale"] < 0:
                raise ValueError("correlation_length and mu_scale must be >= 0")
            self._check_fit("correlated Gaussian (3·1.5·sigma_scale + mu_scale)", 4.5 * s + p["mu_scale"], "sigma_scale or mu_scale")
            sig_a = s * (1 + 0.5 * torch.tanh(self._smooth_field(gen, L)))
            sig_b = s * (1 + 0.5 * torch.tanh(self._smooth_field(gen, L)))
            theta = math.pi * torch.tanh(self._smooth_field(gen, L))
            mu_y = p["mu_scale"] * torch.tanh(self._smooth_field(gen, L))
            mu_x = p["mu_scale"] * torch.tanh(self._smooth_field(gen, L))
            psf = self._gaussian(sig_a, sig_b, theta, mu_y, mu_x)
        else:  # random_iid: every grid point draws its own family and parameters
            self._check_fit("Gaussian of 3·1.5·sigma_scale", 4.5 * p["sigma_scale"], "sigma_scale")
            u = torch.rand(6, G, G, 1, 1, generator=gen, device=self.device, dtype=self.dtype)
            family = torch.randint(0, 3, (G, G, 1, 1), generator=gen, device=self.device)
            length = p["min_length"] + (p["max_length"] - p["min_length"]) * u[0]
            radius = p["min_radius"] + (p["max_radius"] - p["min_radius"]) * u[1]
            sig_a = p["sigma_scale"] * (0.5 + u[2])
            sig_b = p["sigma_scale"] * (0.5 + u[3])
            theta = math.pi * u[4]
            fams = [self._line(length, theta), self._disk(radius), self._gaussian(sig_a, sig_b, theta, 0 * u[5], 0 * u[5])]
            fams = [f / f.sum((-2, -1), keepdim=True) for f in fams]
            psf = torch.where(family == 0, fams[0], torch.where(family == 1, fams[1], fams[2]))
        return psf / psf.sum((-2, -1), keepdim=True)


def _nonneg_range(lo_name, lo, hi_name, hi):
    if lo < 0 or hi < lo:
        raise ValueError(f"need 0 <= {lo_name} <= {hi_name}, got {lo_name}={lo}, {hi_name}={hi}")


def validate_kernel_grid(kernel_grid: torch.Tensor) -> None:
    """Raises ValueError unless kernel_grid is (Gy, Gx, k, k), finite, non-negative, no all-zero PSF."""
    if not torch.is_tensor(kernel_grid) or kernel_grid.ndim != 4 or kernel_grid.shape[-1] != kernel_grid.shape[-2]:
        shape = tuple(kernel_grid.shape) if hasattr(kernel_grid, "shape") else type(kernel_grid).__name__
        raise ValueError(f"kernel grid must have shape (G, G, k, k), got {shape}")
    validate_kernel_size(int(kernel_grid.shape[-1]))
    if not torch.isfinite(kernel_grid).all():
        raise ValueError("kernel grid contains NaN or Inf")
    if (kernel_grid < 0).any():
        raise ValueError(f"kernel grid has negative entries (min {kernel_grid.min().item():.3g}); PSFs must be >= 0")
    if (kernel_grid.sum((-2, -1)) <= 0).any():
        raise ValueError("kernel grid has an all-zero PSF; every PSF needs positive mass")


# ----------------------------------------------------------------------------
# 2. Interpolation from grid nodes to pixels (shared by both operators)
# ----------------------------------------------------------------------------

def grid_node_coords(n_nodes: int, n_pixels: int) -> torch.Tensor:
    """Pixel coordinates of the centres of n_nodes equal cells tiling n_pixels pixels."""
    return (torch.arange(n_nodes, dtype=torch.float64) + 0.5) * n_pixels / n_nodes - 0.5


def interpolation_matrix(node_coords: torch.Tensor, n_pixels: int, mode: str) -> torch.Tensor:
    """(n_pixels, n_nodes) weights, rows summing to 1. Nodes must be increasing.

    bilinear: piecewise linear between nodes, constant beyond the outer nodes (this equals
    F.interpolate(mode="bilinear", align_corners=False) on a regular grid). nearest: the
    closest node.
    """
    _choice("interpolation", mode, INTERPOLATIONS)
    nodes = node_coords.to(torch.float64)
    n = nodes.numel()
    p = torch.arange(n_pixels, dtype=torch.float64)
    Wm = torch.zeros(n_pixels, n, dtype=torch.float64)
    if n == 1:
        Wm[:, 0] = 1
        return Wm
    if mode == "nearest":
        idx = (p[:, None] - nodes[None, :]).abs().argmin(1)
        Wm[torch.arange(n_pixels), idx] = 1
        return Wm
    pc = p.clamp(nodes[0], nodes[-1])
    hi = torch.searchsorted(nodes, pc, right=True).clamp(1, n - 1)
    lo = hi - 1
    frac = (pc - nodes[lo]) / (nodes[hi] - nodes[lo])
    rows = torch.arange(n_pixels)
    Wm[rows, lo] += 1 - frac
    Wm[rows, hi] += frac
    return Wm


# ----------------------------------------------------------------------------
# 3. EigenPSF decomposition
# ----------------------------------------------------------------------------

@dataclass
class EigenPSFDecomposition:
    basis_kernels: torch.Tensor        # (K, k, k); basis_kernels[0] is the mean PSF
    coefficient_maps: torch.Tensor     # (K, H, W); coefficient_maps[0] == 1
    singular_values: torch.Tensor      # (min(N, k²),) of the centred PSF matrix
    explained_variance_ratio: torch.Tensor  # (K-1,) cumulative-free, per kept component
    grid_coefficients: torch.Tensor    # (K, Gy, Gx) coefficients at the grid nodes
    interpolation: str = "bilinear"

    @property
    def n_components(self) -> int:
        return self.basis_kernels.shape[0]

    @property
    def total_explained_variance(self) -> float:
        """Fraction of the PSF grid's variance (around the mean PSF) captured by the K−1 components."""
        return float(self.explained_variance_ratio.sum()) if self.explained_variance_ratio.numel() else 1.0


def compute_eigen_decomposition(kernel_grid: torch.Tensor, n_eigen_psfs: int, img_height: int, img_width: int,
                                interpolation: str = "bilinear", node_coords=None) -> EigenPSFDecomposition:
    """PCA of the G² PSFs (Eq. "A(x) ≈ Σₖ Cₖ ⊙ (x ∗ Bₖ)").

    B₀ is the mean PSF with C₀ ≡ 1; B₁..B_{K−1} are the top principal directions of the
    centred PSFs. Centred directions sum to zero, so every reconstructed PSF sums to 1
    whatever K is. With K = G² the reconstruction is exact.

    node_coords: optional (ys, xs) pixel coordinates of grid rows/columns (default: cell centres).
    """
    validate_kernel_grid(kernel_grid)
    Gy, Gx, k, _ = kernel_grid.shape
    N = Gy * Gx
    if not isinstance(n_eigen_psfs, int) or not 1 <= n_eigen_psfs <= N:
        raise ValueError(f"n_eigen_psfs must be in 1..{N} (the number of PSFs in the grid), got {n_eigen_psfs!r}")
    if img_height < k or img_width < k:
        raise ValueError(f"image ({img_height}x{img_width}) is smaller than the kernel ({k}x{k})")
    _choice("interpolation", interpolation, INTERPOLATIONS)
    dtype = kernel_grid.dtype
    P = kernel_grid.reshape(N, k * k).to(torch.float64)
    P = P / P.sum(1, keepdim=True)
    mean = P.mean(0)
    D = P - mean
    # 1. SVD of the centred PSF matrix (N, k²): rows of Vh are the EigenPSFs.
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    n_comp = n_eigen_psfs - 1
    total = (S ** 2).sum()
    evr = (S[:n_comp] ** 2) / total if total > 0 else torch.zeros(n_comp, dtype=torch.float64)
    # 2. Basis (K, k, k) and node coefficients (K, Gy, Gx).
    basis = torch.cat([mean[None], Vh[:n_comp]], 0).reshape(n_eigen_psfs, k, k)
    coeff = torch.cat([torch.ones(1, N, dtype=torch.float64), (U[:, :n_comp] * S[:n_comp]).T], 0)
    coeff = coeff.reshape(n_eigen_psfs, Gy, Gx)
    # 3. Interpolate coefficients to full resolution: C = Wy · c · Wxᵀ.
    ys, xs = node_coords if node_coords is not None else (grid_node_coords(Gy, img_height), grid_node_coords(Gx, img_width))
    Wy = interpolation_matrix(torch.as_tensor(ys), img_height, interpolation).to(P.device)
    Wx = interpolation_matrix(torch.as_tensor(xs), img_width, interpolation).to(P.device)
    maps = torch.einsum("hi,kij,wj->khw", Wy, coeff, Wx)
    decomp = EigenPSFDecomposition(basis.to(dtype), maps.to(dtype), S.to(dtype), evr.to(dtype), coeff.to(dtype), interpolation)
    if n_comp > 0 and total > 0 and decomp.total_explained_variance < 0.9:
        log.warning("EigenPSF decomposition with K=%d explains only %.1f%% of the PSF variance; "
                    "increase n_eigen_psfs for a faithful operator", n_eigen_psfs, 100 * decomp.total_explained_variance)
    return decomp


# ----------------------------------------------------------------------------
# 4. Padding as an index map, so that its transpose is an exact scatter-add
# ----------------------------------------------------------------------------

def _pad_index(n: int, r: int, boundary: str) -> torch.Tensor:
    """Source index of each of the n + 2r padded positions; index n is the zero slot."""
    i = torch.arange(-r, n + r)
    if boundary == "circular":
        return i % n
    if boundary == "reflect":  # mirror without repeating the edge, like F.pad(mode="reflect")
        if r >= n:
            raise ValueError(f"reflect boundary needs the image ({n} px) larger than the kernel radius ({r})")
        i = i.abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    return torch.where((i < 0) | (i >= n), torch.full_like(i, n), i)


class _Pad:
    """Pad (..., H, W) -> (..., H+2r, W+2r) by index maps; `adjoint` is its exact transpose."""

    def __init__(self, H, W, r, boundary, device):
        _choice("boundary", boundary, BOUNDARIES)
        self.H, self.W = H, W
        self.iy = _pad_index(H, r, boundary).to(device)
        self.ix = _pad_index(W, r, boundary).to(device)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1))  # append the zero slot at index H (rows) and W (cols)
        return x.index_select(-2, self.iy).index_select(-1, self.ix)

    def adjoint(self, z):
        shape = z.shape[:-2]
        out = z.new_zeros(*shape, self.H + 1, z.shape[-1]).index_add_(-2, self.iy, z)
        out = out.new_zeros(*shape, self.H + 1, self.W + 1).index_add_(-1, self.ix, out)
        return out[..., : self.H, : self.W]

    def to(self, device):
        self.iy, self.ix = self.iy.to(device), self.ix.to(device)
        return self


def _check_image(x, H, W):
    if x.ndim != 4 or x.shape[-2:] != (H, W):
        raise ValueError(f"expected a (B, C, {H}, {W}) tensor, got {tuple(x.shape)}")


def _fft_dtype(x):
    """FFTs need float32/float64: half-precision inputs are computed in float32."""
    if x.dtype in (torch.float32, torch.float64):
        return x, x.dtype
    return x.float(), x.dtype


def _fast_len(n: int) -> int:
    """Smallest 5-smooth integer >= n (fast FFT length)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


# ----------------------------------------------------------------------------
# 5. EigenPSF operator (FFT, batched over K and channels)
# ----------------------------------------------------------------------------

class SVBlurOperator(torch.nn.Module):
    """A(x) = Σₖ Cₖ ⊙ (x ∗ Bₖ) (gather) or Σₖ Bₖ ∗ (Cₖ ⊙ x) (scatter), with exact adjoint.

    Each application costs K+1 real FFTs per channel (one per term plus one shared), all
    batched. Convolutions are linear (padded by the kernel radius with the chosen boundary,
    transformed at a 5-smooth length), so the only boundary effect is the padding itself.
    """

    def __init__(self, decomposition: EigenPSFDecomposition, form: str = "gather", boundary: str = "reflect"):
        super().__init__()
        _choice("form", form, FORMS)
        _choice("boundary", boundary, BOUNDARIES)
        self.form, self.boundary = form, boundary
        self.register_buffer("basis_kernels", decomposition.basis_kernels.clone())      # (K, k, k)
        self.register_buffer("coefficient_maps", decomposition.coefficient_maps.clone())  # (K, H, W)
        K, self.H, self.W = self.coefficient_maps.shape
        self.k = self.basis_kernels.shape[-1]
        self.r = self.k // 2
        if self.H < self.k or self.W < self.k:
            raise ValueError(f"image ({self.H}x{self.W}) is smaller than the kernel ({self.k}x{self.k})")
        self.Hp, self.Wp = self.H + 2 * self.r, self.W + 2 * self.r
        self.fft_shape = (_fast_len(self.Hp), _fast_len(self.Wp))
        self._cache = {}

    def _setup(self, x):
        """Index maps, kernel spectra and coefficient maps for x's device/dtype, cached.

        The cache is rebuilt only when the device or dtype changes, so the hot loop does no
        host work and no kernel FFTs.
        """
        key = (x.device, x.dtype)
        if key not in self._cache:
            pad = _Pad(self.H, self.W, self.r, self.boundary, x.device)
            # Kernel centred at index 0 of the FFT grid, so products are plain convolutions.
            kern = self.basis_kernels.to(x.device, x.dtype)
            kern = F.pad(kern, (0, self.fft_shape[1] - self.k, 0, self.fft_shape[0] - self.k))
            kern = torch.roll(kern, (-self.r, -self.r), (-2, -1))
            C = self.coefficient_maps.to(x.device, x.dtype)
            # Padding is a gather, so Pad(Cₖ ⊙ x) = Pad(Cₖ) ⊙ Pad(x) and Padᵀ(Pad(Cₖ) ⊙ z) = Cₖ ⊙ Padᵀ(z):
            # the scatter form pads (and un-pads) one image instead of K weighted copies.
            C_pad = pad.forward(C) if self.form == "scatter" else None                  # (K, Hp, Wp)
            spec = torch.fft.rfft2(kern)                                           # (K, Fh, Fw//2+1)
            # conj() is lazy in torch, and products with a lazily conjugated operand run ~2x slower.
            spec_t = spec.conj().resolve_conj()
            self._cache = {key: (pad, (spec, spec_t), C, C_pad)}
        return self._cache[key]

    def _conv(self, z, spectra, transpose: bool):
        """Circular convolution (or correlation, its transpose) on the FFT grid with each kernel."""
        Z = torch.fft.rfft2(z, s=self.fft_shape)
        return Z * spectra[1 if transpose else 0]

    def _irfft_crop(self, Z, origin):
        z = torch.fft.irfft2(Z, s=self.fft_shape)
        return z[..., origin:origin + self.H, origin:origin + self.W]

    def forward(self, x):
        _check_image(x, self.H, self.W)
        x, in_dtype = _fft_dtype(x)
        return self._forward(x).to(in_dtype)

    def adjoint(self, y):
        _check_image(y, self.H, self.W)
        y, in_dtype = _fft_dtype(y)
        return self._adjoint(y).to(in_dtype)

    def _forward(self, x):
        pad, spec, C, C_pad = self._setup(x)
        if self.form == "gather":
            # 1. one FFT of the padded image (B, C, 1, Fh, Fw'); 2. K inverse FFTs; 3. weight and sum.
            X = self._conv(pad.forward(x)[:, :, None], spec, transpose=False)
            return (self._irfft_crop(X, self.r) * C).sum(2)
        # scatter: 1. K FFTs of Pad(Cₖ) ⊙ Pad(x) = Pad(Cₖ ⊙ x); 2. sum spectra over K; 3. one inverse FFT.
        # In-place products: these (B, C, K, ...) temporaries dominate the memory traffic.
        Z = torch.fft.rfft2(pad.forward(x)[:, :, None] * C_pad, s=self.fft_shape).mul_(spec[0]).sum(2)
        return self._irfft_crop(Z, self.r)

    def _adjoint(self, y):
        pad, spec, C, C_pad = self._setup(y)
        pad_y = (self.fft_shape[0] - self.H - self.r, self.fft_shape[1] - self.W - self.r)
        if self.form == "gather":
            # Aᵀ = Padᵀ Σₖ Convₖᵀ Embed (Cₖ ⊙ ·): K FFTs, sum spectra, one inverse FFT.
            z = F.pad(y[:, :, None] * C, (self.r, pad_y[1], self.r, pad_y[0]))
            Z = torch.fft.rfft2(z, s=self.fft_shape).mul_(spec[1]).sum(2)
            return pad.adjoint(torch.fft.irfft2(Z, s=self.fft_shape)[..., : self.Hp, : self.Wp])
        # scatter: Aᵀ = Padᵀ Σₖ Pad(Cₖ) ⊙ Convₖᵀ Embed(·): one FFT, K inverse FFTs, one Padᵀ.
        z = F.pad(y[:, :, None], (self.r, pad_y[1], self.r, pad_y[0]))
        zk = torch.fft.irfft2(self._conv(z, spec, transpose=True), s=self.fft_shape)[..., : self.Hp, : self.Wp]
        return pad.adjoint((zk * C_pad).sum(2))


# ----------------------------------------------------------------------------
# 6. Exact per-pixel SV operator (ground truth), chunked over rows
# ----------------------------------------------------------------------------

class TrueSVBlurOperator(torch.nn.Module):
    """Exact SV convolution with the PSF of every pixel interpolated from the grid.

    gather:  y[p] = Σᵤ h_p[u] x̃[p − u]
    scatter: y[p] = Σᵤ h_{src(p−u)}[u] x̃[p − u]   (x̃: padded image, src: its source pixel)

    h_p = Σᵢⱼ Wy[p_y, i] Wx[p_x, j] P[i, j] uses the same interpolation weights as the
    EigenPSF coefficient maps, so with K = G² the two operators agree to float precision.
    Work is split in row chunks so that memory stays under `max_chunk_bytes`.
    """

    def __init__(self, kernel_grid, img_height, img_width, form="gather", boundary="reflect",
                 interpolation="bilinear", node_coords=None, max_chunk_bytes: int = 256 * 2 ** 20):
        super().__init__()
        validate_kernel_grid(kernel_grid)
        _choice("form", form, FORMS)
        _choice("boundary", boundary, BOUNDARIES)
        Gy, Gx, k, _ = kernel_grid.shape
        if img_height < k or img_width < k:
            raise ValueError(f"image ({img_height}x{img_width}) is smaller than the kernel ({k}x{k})")
        self.form, self.boundary, self.H, self.W, self.k, self.r = form, boundary, img_height, img_width, k, k // 2
        self.max_chunk_bytes = max_chunk_bytes
        psfs = kernel_grid / kernel_grid.sum((-2, -1), keepdim=True)
        self.register_buffer("kernel_grid", psfs)                     # (Gy, Gx, k, k)
        self.register_buffer("psfs", psfs.reshape(Gy, Gx * k * k))
        ys, xs = node_coords if node_coords is not None else (grid_node_coords(Gy, img_height), grid_node_coords(Gx, img_width))
        dt = kernel_grid.dtype
        dev = kernel_grid.device
        self.register_buffer("Wy", interpolation_matrix(torch.as_tensor(ys), img_height, interpolation).to(dev, dt))
        self.register_buffer("Wx", interpolation_matrix(torch.as_tensor(xs), img_width, interpolation).to(dev, dt))
        iy = _pad_index(img_height, self.r, boundary)
        ix = _pad_index(img_width, self.r, boundary)
        self.register_buffer("src_y", iy.clamp_max(img_height - 1).to(dev))  # zero slot's PSF is irrelevant
        self.register_buffer("src_x", ix.clamp_max(img_width - 1).to(dev))

    def _psfs(self, rows, cols):
        """(len(rows), len(cols), k²) per-pixel PSFs, flattened in kernel order."""
        Gx = self.Wx.shape[1]
        a = (self.Wy[rows] @ self.psfs).reshape(len(rows), Gx, -1)   # (R, Gx, k²)
        return torch.einsum("wj,rjn->rwn", self.Wx[cols], a)

    def _rows_per_chunk(self, x):
        per_row = (self.W + 2 * self.r) * self.k ** 2 * x.element_size() * (1 + 2 * x.shape[0] * x.shape[1])
        return max(1, int(self.max_chunk_bytes // per_row))


    def _pad(self, x):
        return _Pad(self.H, self.W, self.r, self.boundary, x.device)

    def _unfold_apply(self, z, n_out_rows, n_out_cols, psf_rows, psf_cols, flip):
        """out[p] = Σ_{u'} h_p[u'] · z[p + u'] for p on an (n_out_rows, n_out_cols) grid."""
        B, C = z.shape[:2]
        k2 = self.k ** 2
        out = z.new_empty(B, C, n_out_rows, n_out_cols)
        step = self._rows_per_chunk(z)
        for a in range(0, n_out_rows, step):  # chunks of rows, not pixels
            b = min(a + step, n_out_rows)
            patches = F.unfold(z[:, :, a:b + self.k - 1].reshape(B * C, 1, -1, z.shape[-1]), self.k)
            patches = patches.reshape(B, C, k2, b - a, n_out_cols)             # (B, C, k², R, W)
            h = self._psfs(psf_rows[a:b], psf_cols).to(z.dtype)                # (R, W, k²)
            if flip:
                h = h.flip(-1)  # flattened (k, k) reversed == rotated by 180°
            # a broadcast multiply-and-sum beats einsum's bmm here by ~2.5x (no permuted copies)
            out[:, :, a:b] = (patches * h.permute(2, 0, 1)).sum(2)
        return out

    def _fold_apply(self, v, psf_rows, psf_cols, flip, out_rows):
        """out[p + u'] += h_p[u'] · v[p]  (the transpose of _unfold_apply)."""
        B, C, R_all, Wv = v.shape
        k2 = self.k ** 2
        out = v.new_zeros(B, C, out_rows, Wv + self.k - 1)
        step = self._rows_per_chunk(v)
        for a in range(0, R_all, step):
            b = min(a + step, R_all)
            h = self._psfs(psf_rows[a:b], psf_cols).to(v.dtype)
            if flip:
                h = h.flip(-1)
            cols = (v[:, :, None, a:b] * h.permute(2, 0, 1)).reshape(B * C, k2, -1)   # (BC, k², R·W)
            folded = F.fold(cols, (b - a + self.k - 1, Wv + self.k - 1), self.k)
            out[:, :, a:b + self.k - 1] += folded.reshape(B, C, b - a + self.k - 1, -1)
        return out

    def forward(self, x):
        _check_image(x, self.H, self.W)
        pad = self._pad(x)
        rows, cols = torch.arange(self.H, device=x.device), torch.arange(self.W, device=x.device)
        if self.form == "gather":
            return self._unfold_apply(pad.forward(x), self.H, self.W, rows, cols, flip=True)
        # scatter: every padded source i spreads h_{src(i)} around itself; keep the valid window.
        out = self._fold_apply(pad.forward(x), self.src_y, self.src_x, flip=False, out_rows=self.H + 4 * self.r)
        return out[..., 2 * self.r: 2 * self.r + self.H, 2 * self.r: 2 * self.r + self.W]

    def adjoint(self, y):
        _check_image(y, self.H, self.W)
        pad = self._pad(y)
        rows, cols = torch.arange(self.H, device=y.device), torch.arange(self.W, device=y.device)
        if self.form == "gather":
            return pad.adjoint(self._fold_apply(y, rows, cols, flip=True, out_rows=self.H + 2 * self.r))
        y_ext = F.pad(y, (2 * self.r,) * 4)
        z = self._unfold_apply(y_ext, self.H + 2 * self.r, self.W + 2 * self.r, self.src_y, self.src_x, flip=False)
        return pad.adjoint(z)


class CroppedOperator(torch.nn.Module):
    """y = Crop(A x): the image lives on a larger (padded) domain than the measurement.

    Used when a measurement's size is not one the prior accepts: x is sampled on the padded
    domain, data consistency is enforced only where y was measured, and the result is cropped
    back. No measurement is invented for the padding.
    """

    def __init__(self, op, top: int, left: int, height: int, width: int):
        super().__init__()
        self.op, self.top, self.left, self.H, self.W = op, top, left, height, width

    def forward(self, x):
        return self.op(x)[..., self.top:self.top + self.H, self.left:self.left + self.W]

    def adjoint(self, y):
        Hx, Wx = self.op.H, self.op.W
        return self.op.adjoint(F.pad(y, (self.left, Wx - self.W - self.left, self.top, Hx - self.H - self.top)))


# ----------------------------------------------------------------------------
# 7. System construction and the honest approximation figure
# ----------------------------------------------------------------------------

def resolve_grid_size(physics_config: dict) -> int:
    g = physics_config.get("grid_size", "auto")
    return DEFAULT_GRID_SIZE.get(physics_config["blur_mode"], 8) if g in (None, "auto") else g


def mode_params(physics_config: dict) -> dict:
    """The parameters of the chosen mode from config sub-sections (mixed reads motion+defocus)."""
    mode = physics_config["blur_mode"]
    _choice("blur_mode", mode, BLUR_MODES)
    if mode == "mixed":
        return {**physics_config.get("motion", {}), **physics_config.get("defocus", {})}
    return dict(physics_config.get(mode, {}))


def build_operators(kernel_grid, H, W, physics_config, node_coords=None):
    """(eigenpsf_op, true_op, decomposition) for a given PSF grid."""
    n = physics_config["n_eigen_psfs"]
    N = kernel_grid.shape[0] * kernel_grid.shape[1]
    if n in ("all", "full"):
        n = N
    interp = physics_config.get("interpolation", "bilinear")
    form = physics_config.get("form", "gather")
    boundary = physics_config.get("boundary", "reflect")
    decomp = compute_eigen_decomposition(kernel_grid, n, H, W, interp, node_coords)
    eigen_op = SVBlurOperator(decomp, form, boundary)
    true_op = TrueSVBlurOperator(kernel_grid, H, W, form, boundary, interp, node_coords)
    return eigen_op, true_op, decomp


def create_sv_blur_system(H: int, W: int, physics_config: dict, device="cpu", seed=None, generator=None,
                          dtype=torch.float32):
    """Simulates a PSF grid from `physics_config` and returns (eigenpsf_op, true_op, decomposition).

    physics_config mirrors config.yaml's `physics` section. The kernel grid is available as
    `true_op.kernel_grid`.
    """
    mode = physics_config["blur_mode"]
    _choice("blur_mode", mode, BLUR_MODES)
    sim = SVBlurSimulator(H, W, physics_config.get("kernel_size", 21), resolve_grid_size(physics_config), device, dtype)
    grid = sim.simulate_sv_kernel_grid(mode, seed=seed, generator=generator, **mode_params(physics_config))
    eigen_op, true_op, decomp = build_operators(grid, H, W, physics_config)
    return eigen_op.to(device), true_op.to(device), decomp


@torch.no_grad()
def operator_relative_error(eigen_op, true_op, x) -> float:
    """‖A_eig x − A_true x‖ / ‖A_true x‖ on the given image batch."""
    ref = true_op(x)
    return float(torch.linalg.vector_norm(eigen_op(x) - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
