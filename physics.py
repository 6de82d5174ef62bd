"""Spatially varying (SV) blur: PSF-grid simulation, EigenPSF decomposition and operators.

Forward model (docs/forward-model.md):

    y = A(x) + n,     A(x) ≈ Σₖ Cₖ ⊙ (x ∗ Bₖ)              (gather form)
                      A(x) ≈ Σₖ Bₖ ∗ (Cₖ ⊙ x)              (scatter form)

where Bₖ are basis kernels ("EigenPSFs") and Cₖ coefficient maps. The PSF at a
pixel p is hₚ = Σₖ Cₖ[p] Bₖ. In the *gather* form hₚ is the PSF that blurs *into*
output pixel p; in the *scatter* form it is the PSF with which source pixel p
spreads its light (product convolution; flux conserving where no light leaves
through the boundary).

Simulations do not use that model as their truth: a continuous PSF field (PSFField)
gives every pixel its own PSF, and GroundTruthBlur blurs a scene with a real margin by
valid convolution. The reconstruction sees only the node grid sampled from the field.

Every operator is a composition of exactly-transposable linear pieces

    A = Crop ∘ Conv ∘ Pad      (per term k, with Cₖ ⊙ before or after)

so `adjoint` is the exact transpose (checked by tests to 1e-10 in float64).

Conventions: images are (B, C, H, W), kernels (k, k) with k odd and the centre at
index r = k // 2; convolution is (x ∗ h)[p] = Σᵤ h[u] x[p − u].
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import config
from config import BLUR_MODES, BOUNDARIES, FORMS, INTERPOLATIONS, resolve_form, resolve_grid_size  # noqa: F401

log = logging.getLogger(__name__)

# Mode parameters as config.yaml sets them: the one source, here for the Python API's defaults.
MODE_DEFAULTS = config.mode_defaults()


# How far (px from the kernel centre) each PSF family of a mode section reaches, from that
# section's parameters, with the names its error message uses. SVBlurSimulator refuses PSFs that
# reach beyond kernel_size // 2; fit_sizes_to_kernel scales SIZE_KEYS until they do not.
REACH = {
    "motion": [("motion blur of max_length", lambda p: p["max_length"] / 2, "max_length")],
    "defocus": [("defocus disk of max_radius + 3·edge_sigma", lambda p: p["max_radius"] + 3 * p["edge_sigma"],
                 "max_radius or edge_sigma")],
    "correlated": [("correlated Gaussian (3·1.5·sigma_scale + mu_scale)",
                    lambda p: 4.5 * p["sigma_scale"] + p["mu_scale"], "sigma_scale or mu_scale")],
}
REACH["random_iid"] = REACH["motion"] + [("defocus disk of max_radius", lambda p: p["max_radius"], "max_radius"),
    ("Gaussian of 3·1.5·sigma_scale", lambda p: 4.5 * p["sigma_scale"], "sigma_scale")]
SIZE_KEYS = {"motion": ("min_length", "max_length"), "defocus": ("min_radius", "max_radius", "edge_sigma"),
             "correlated": ("sigma_scale", "mu_scale"),
             "random_iid": ("min_length", "max_length", "min_radius", "max_radius", "sigma_scale")}


def mode_sections(mode: str) -> tuple:
    """The config sections a blur mode reads (mixed reads motion and defocus)."""
    _choice("blur_mode", mode, BLUR_MODES)
    return ("motion", "defocus") if mode == "mixed" else (mode,)


def fit_sizes_to_kernel(section: str, params: dict, kernel_size: int):
    """params with its size parameters scaled by one factor so that the PSFs fit kernel_size, or
    None when they already fit. Sizes are rounded down (to 1e-3 px), so the result always fits."""
    if section not in REACH:   # lens: no size parameter to scale (LensField measures the light it loses)
        return None
    p = {**MODE_DEFAULTS[section], **params}
    reach = max(extent(p) for _, extent, _ in REACH[section])
    if reach <= kernel_size // 2:
        return None
    f = (kernel_size // 2) / reach
    return {**p, **{k: math.floor(p[k] * f * 1000) / 1000 for k in SIZE_KEYS[section]}}


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
# 1. Continuous PSF fields and the node grids sampled from them
# ----------------------------------------------------------------------------

N_FOURIER_FEATURES = 128  # terms of each smooth random field (random Fourier features)
IID_BLEND_WIDTH = 0.3     # random_iid truth: Gaussian blending width of node PSFs, in grid cells


class SVBlurSimulator:
    """Draws a continuous SV PSF field for an H×W image and samples its G×G node grid.

    Every PSF parameter (motion length and angle, defocus radius, Gaussian widths, orientation
    and offsets) is a smooth function of the pixel position, drawn once from the generator;
    `simulate_field` returns it as a PSFField that gives the PSF at any position. The node grid
    (G, G, k, k) is that field sampled at the centres of a G×G tiling, which is what a calibration
    would measure; the per-pixel ground truth (GroundTruthBlur) evaluates it at every pixel.
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

    def _check_fit(self, what: str, extent: float, limit_name: str) -> None:
        r = self.k // 2
        if extent > r + 1e-9:
            raise ValueError(
                f"{what} reaches {extent:.2f} px from the centre but kernel_size={self.k} only holds {r} px; "
                f"increase kernel_size to at least {2 * math.ceil(extent) + 1} or reduce {limit_name}")

    def _check_params(self, mode, p) -> None:
        if mode in ("motion", "mixed", "random_iid"):
            _nonneg_range("min_length", p["min_length"], "max_length", p["max_length"])
        if mode in ("defocus", "mixed", "random_iid"):
            _nonneg_range("min_radius", p["min_radius"], "max_radius", p["max_radius"])
        if mode in ("defocus", "mixed") and p["edge_sigma"] < 0:
            raise ValueError(f"edge_sigma must be >= 0, got {p['edge_sigma']}")
        if mode in ("correlated", "random_iid") and p["sigma_scale"] <= 0:
            raise ValueError(f"sigma_scale must be > 0, got {p['sigma_scale']}")
        if mode == "correlated" and (p["correlation_length"] < 0 or p["mu_scale"] < 0):
            raise ValueError("correlation_length and mu_scale must be >= 0")
        if mode == "lens":
            check_lens_params(p)
        for section in mode_sections(mode):
            for what, extent, names in REACH.get(section, ()):
                self._check_fit(what, extent(p), names)

    def _fourier_features(self, gen, correlation_length: float) -> dict:
        """Frequencies (M, 2) and phases (M,) of one zero-mean, unit-variance random field with
        Gaussian correlation exp(−d²/2ℓ²), ℓ in grid cells (at least 0.5: a field finer than the
        grid would be white noise, which no continuous truth can be)."""
        ell = max(float(correlation_length), 0.5)
        omega = torch.randn(N_FOURIER_FEATURES, 2, generator=gen, device=self.device, dtype=self.dtype) / ell
        phase = torch.rand(N_FOURIER_FEATURES, generator=gen, device=self.device, dtype=self.dtype) * 2 * math.pi
        return {"omega": omega, "phase": phase}

    def _draw(self, mode, p, gen) -> dict:
        """Every random number the field needs, drawn in a fixed order from `gen`."""
        d = {}
        if mode in ("motion", "mixed"):
            d["base_angle"] = torch.rand((), generator=gen, device=self.device, dtype=self.dtype) * math.pi
            d["angle"] = self._fourier_features(gen, max(self.G / 3, 1.0))
        elif mode == "correlated":
            for name in ("sig_a", "sig_b", "theta", "mu_y", "mu_x"):
                d[name] = self._fourier_features(gen, p["correlation_length"])
        elif mode == "random_iid":
            G = self.G
            d["u"] = torch.rand(6, G, G, 1, 1, generator=gen, device=self.device, dtype=self.dtype)
            d["family"] = torch.randint(0, 3, (G, G, 1, 1), generator=gen, device=self.device)
        return d

    def simulate_field(self, mode: str = "motion", seed=None, generator=None, **mode_params) -> "PSFField":
        """The continuous PSF field of `mode`. `mode_params` override MODE_DEFAULTS[mode]; unknown
        names raise ValueError. Randomness comes only from `generator` (or one seeded with `seed`)."""
        _choice("blur_mode", mode, BLUR_MODES)
        unknown = set(mode_params) - set(MODE_DEFAULTS[mode])
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for blur_mode {mode!r}; "
                             f"allowed: {sorted(MODE_DEFAULTS[mode])}")
        p = {**MODE_DEFAULTS[mode], **mode_params}
        self._check_params(mode, p)
        if mode == "lens":   # a lens is deterministic: it draws nothing
            return LensField(self, p)
        gen = _make_generator(seed, generator, self.device)
        return PSFField(self, mode, p, self._draw(mode, p, gen))

    def simulate_sv_kernel_grid(self, mode: str = "motion", seed=None, generator=None, **mode_params):
        """The (G, G, k, k) node grid of a freshly drawn field: PSFs ≥ 0, each summing to 1."""
        return self.simulate_field(mode, seed, generator, **mode_params).node_grid()


class PSFField:
    """A spatially varying PSF field: PSF parameters as smooth functions of pixel position.

    `psfs_on_grid(rows, cols)` draws the PSFs at every (row, col) pair of two coordinate vectors
    (pixels of the H×W image; positions outside it are allowed and clamp the radial profile).
    Families are vectorized: parameters are (R, C, 1, 1) against kernel offsets (k, k).

    random_iid is i.i.d. per node by definition, so its continuous field is a BlendedGridField of
    the node PSFs.
    """

    def __init__(self, sim: SVBlurSimulator, mode: str, params: dict, draws: dict):
        self.sim, self.mode, self.params, self.draws = sim, mode, params, draws
        self.H, self.W, self.k, self.G = sim.H, sim.W, sim.k, sim.G
        self.device, self.dtype = sim.device, sim.dtype
        self.channels = 0   # one PSF for every colour channel (lens: one per wavelength)
        r = self.k // 2
        u = torch.arange(-r, r + 1, device=self.device, dtype=self.dtype)
        self.v, self.u = torch.meshgrid(u, u, indexing="ij")  # (k, k): row offset v, column offset u
        if mode == "random_iid":  # i.i.d. node PSFs, blended smoothly in between
            self.blend = BlendedGridField(self._iid_node_psfs(), *self.node_coords(), self.H, self.W)

    def node_coords(self):
        """(ys, xs) pixel coordinates of the G×G node grid (cell centres)."""
        return grid_node_coords(self.G, self.H), grid_node_coords(self.G, self.W)

    def shifted(self, dy: float, dx: float) -> "PSFField":
        """The same field with every PSF drawn displaced by (dy, dx) px: a point source at a
        sub-pixel position, rendered exactly from the analytic families (no interpolation)."""
        if self.mode == "random_iid":
            raise ValueError("random_iid PSFs are blended node PSFs and cannot be redrawn sub-pixel")
        other = copy.copy(self)
        other.v, other.u = self.v - dy, self.u - dx
        return other

    def node_grid(self):
        """(G, G, k, k): the field sampled at the node coordinates."""
        ys, xs = self.node_coords()
        return self.psfs_on_grid(ys, xs)

    # -- smooth fields of position; py (R, 1), px (1, C) -> (R, C) ----------------------------

    def _cells(self, py, px):
        """Positions in grid-cell units: node (i, j) sits at (i + 0.5, j + 0.5)."""
        return (py + 0.5) * self.G / self.H, (px + 0.5) * self.G / self.W

    def _radius(self, py, px):
        """Distance from the image centre, 0 there and 1 at the corner pixels (clamped beyond)."""
        cy, cx = (self.H - 1) / 2, (self.W - 1) / 2
        rho_max = math.hypot(cy, cx)
        if rho_max == 0:
            return torch.zeros_like(py + px)
        return (torch.sqrt((py - cy) ** 2 + (px - cx) ** 2) / rho_max).clamp(max=1)

    def _random_field(self, feats, py, px):
        """√(2/M) Σₘ cos(ωₘ·u + φₘ): unit variance, Gaussian correlation (random Fourier features)."""
        uy, ux = self._cells(py, px)
        arg = uy[..., None] * feats["omega"][:, 0] + ux[..., None] * feats["omega"][:, 1] + feats["phase"]
        return math.sqrt(2 / feats["phase"].numel()) * torch.cos(arg).sum(-1)

    def _checker(self, py, px):
        """True on the cells where `mixed` uses motion: the node grid's (i + j) even rule, per cell."""
        uy, ux = self._cells(py, px)
        i = uy.floor().clamp(0, self.G - 1)
        j = ux.floor().clamp(0, self.G - 1)
        return (i + j) % 2 == 0

    # -- PSF families ----------------------------------------------------------------------------

    def _line(self, length, angle):
        """Anti-aliased line segment: tent profile of the distance to the segment (sub-pixel)."""
        dy, dx = torch.sin(angle), torch.cos(angle)
        t = torch.maximum(torch.minimum(self.u * dx + self.v * dy, length / 2), -length / 2)
        dist = torch.sqrt((self.u - t * dx) ** 2 + (self.v - t * dy) ** 2)
        return (1 - dist).clamp_min(0)

    def _disk(self, radius, edge_sigma=0.0):
        """A defocus disk of radius R at distance d from its centre.

        edge_sigma = 0: geometric optics, pixel coverage approximated by clamp(R + 1/2 − d, 0, 1):
        a 1-px ramp at the rim, sharper than any lens passes (not band-limited).
        edge_sigma > 0: the geometric disk convolved with a Gaussian for diffraction (σ = edge_sigma
        px; at Nyquist sampling, pixel = λ/4NA, the Airy core's σ ≈ 0.21·λ/NA is 0.84 px) and the
        pixel's area (a box, taken as a Gaussian of the same variance, 1/12 px²): blurred_disk with
        s² = edge_sigma² + 1/12. Band-limited in effect, as a real lens's PSF is.
        """
        d = torch.sqrt(self.u ** 2 + self.v ** 2)
        if edge_sigma == 0:
            return (radius + 0.5 - d).clamp(0, 1)
        # The profile at each distinct offset length only (~k²/8 of them on the integer grid), gathered
        # back to (…, k, k): the per-pixel truth draws a PSF for every pixel.
        lengths, index = torch.unique(d, return_inverse=True)
        radius = torch.as_tensor(radius, dtype=d.dtype, device=d.device)[..., None]   # (…, 1, 1, 1)
        return blurred_disk(lengths, radius, math.sqrt(edge_sigma ** 2 + 1 / 12))[..., 0, 0, index]

    def _gaussian(self, sigma_major, sigma_minor, theta, mu_y, mu_x):
        c, s = torch.cos(theta), torch.sin(theta)
        du, dv = self.u - mu_x, self.v - mu_y
        a = du * c + dv * s
        b = -du * s + dv * c
        return torch.exp(-0.5 * ((a / sigma_major) ** 2 + (b / sigma_minor) ** 2))

    @staticmethod
    def _unit(psf):
        return psf / psf.sum((-2, -1), keepdim=True)

    def _iid_node_psfs(self):
        p, u, family = self.params, self.draws["u"], self.draws["family"]
        length = p["min_length"] + (p["max_length"] - p["min_length"]) * u[0]
        radius = p["min_radius"] + (p["max_radius"] - p["min_radius"]) * u[1]
        sig_a, sig_b = p["sigma_scale"] * (0.5 + u[2]), p["sigma_scale"] * (0.5 + u[3])
        theta = math.pi * u[4]
        fams = [self._line(length, theta), self._disk(radius), self._gaussian(sig_a, sig_b, theta, 0 * u[5], 0 * u[5])]
        fams = [self._unit(f) for f in fams]
        return torch.where(family == 0, fams[0], torch.where(family == 1, fams[1], fams[2]))

    # -- public ----------------------------------------------------------------------------------

    def psfs_on_grid(self, rows, cols):
        """(R, C, k, k) PSFs at every pair of pixel coordinates rows (R,) × cols (C,)."""
        rows = torch.as_tensor(rows, device=self.device, dtype=self.dtype)
        cols = torch.as_tensor(cols, device=self.device, dtype=self.dtype)
        if self.mode == "random_iid":
            return self.blend.psfs_on_grid(rows, cols)
        py, px = rows[:, None], cols[None, :]
        return self._unit(self._family_psfs(py, px))

    def _family_psfs(self, py, px):
        p, d = self.params, self.draws
        col = lambda f: f[..., None, None]  # noqa: E731  (R, C) -> (R, C, 1, 1)
        if self.mode in ("motion", "mixed"):
            length = p["min_length"] + (p["max_length"] - p["min_length"]) * self._radius(py, px)
            # bounded so that the direction spans at most angle_variation degrees over the image
            spread = math.radians(p["angle_variation"]) / 2 * torch.tanh(self._random_field(d["angle"], py, px))
            motion = self._unit(self._line(col(length), col(d["base_angle"] + spread)))
        if self.mode in ("defocus", "mixed"):
            radius = p["min_radius"] + (p["max_radius"] - p["min_radius"]) * self._radius(py, px)
            defocus = self._unit(self._disk(col(radius), p["edge_sigma"]))
        if self.mode == "motion":
            return motion
        if self.mode == "defocus":
            return defocus
        if self.mode == "mixed":
            return torch.where(col(self._checker(py, px)), motion, defocus)
        # correlated: widths in [0.5, 1.5]·sigma_scale and offsets in [−mu_scale, mu_scale] (bounded
        # maps of smooth fields), so the support bound checked above is a guarantee, not a hope.
        s, m = p["sigma_scale"], p["mu_scale"]
        f = {name: torch.tanh(self._random_field(d[name], py, px)) for name in ("sig_a", "sig_b", "theta", "mu_y", "mu_x")}
        return self._gaussian(col(s * (1 + 0.5 * f["sig_a"])), col(s * (1 + 0.5 * f["sig_b"])), col(math.pi * f["theta"]),
                              col(m * f["mu_y"]), col(m * f["mu_x"]))


def check_lens_params(p: dict) -> None:
    """ValueError unless the lens section is physical: positive f-number, pitch and wavelengths,
    1 or 3 wavelengths, and one longitudinal and lateral colour entry per wavelength."""
    C = len(p["wavelengths_nm"])
    if C not in (1, 3):
        raise ValueError(f"lens.wavelengths_nm needs 3 entries (R, G, B) or 1 (a mono lens), got {C}")
    for name in ("longitudinal_colour", "lateral_colour"):
        if len(p[name]) != C:
            raise ValueError(f"lens.{name} needs one entry per wavelength ({C}), got {len(p[name])}")
    if min(p["wavelengths_nm"]) <= 0 or p["reference_wavelength_nm"] <= 0:
        raise ValueError("lens wavelengths must be > 0 nm")
    if p["f_number"] <= 0 or p["pixel_pitch_um"] <= 0:
        raise ValueError("lens.f_number and lens.pixel_pitch_um must be > 0")


class LensField:
    """The PSF field of a lens (optics.py): diffraction PSFs of a pupil with field-dependent Seidel
    aberrations, one channel per wavelength (a single wavelength gives one PSF for every channel).

    node_grid() holds the exact PSFs at the reconstruction's nodes, as a calibration would measure
    them. The simulated truth (psfs_on_grid) is not that grid's model: exact PSFs on a grid
    truth_grid_factor times finer, blended between its nodes by BlendedGridField's normalised
    Gaussian weights (neither the reconstruction's bilinear rule nor its PCA). Computing the exact
    PSF at every pixel would cost one pupil transform per pixel and channel.
    """

    def __init__(self, sim: SVBlurSimulator, params: dict):
        import optics
        self.optics, self.sim, self.mode, self.params = optics, sim, "lens", params
        self.H, self.W, self.k, self.G = sim.H, sim.W, sim.k, sim.G
        self.device, self.dtype = sim.device, sim.dtype
        self.channels = len(params["wavelengths_nm"]) if len(params["wavelengths_nm"]) > 1 else 0
        n_fine = self.G * params["truth_grid_factor"]
        ys, xs = grid_node_coords(n_fine, self.H), grid_node_coords(n_fine, self.W)
        self.truth = BlendedGridField(self.psfs_at(ys, xs), ys, xs, self.H, self.W)

    def psfs_at(self, rows, cols):
        """(R, C', [C,] k, k) exact PSFs at every pair of pixel coordinates rows × cols."""
        hy, hx = self.optics.field_points(rows, cols, self.H, self.W)
        psf, lost = self.optics.lens_psfs(hy.reshape(-1), hx.reshape(-1), self.params, self.k, self.dtype, self.device)
        if lost > self.optics.MAX_LOST_LIGHT:
            raise ValueError(f"lens PSFs lose up to {100 * lost:.0f}% of their light outside kernel_size={self.k}; "
                             f"increase kernel_size or reduce the aberrations")
        psf = psf.reshape(len(rows), len(cols), *psf.shape[1:])
        return psf if self.channels else psf[:, :, 0]

    def node_coords(self):
        return grid_node_coords(self.G, self.H), grid_node_coords(self.G, self.W)

    def node_grid(self):
        return self.psfs_at(*self.node_coords())

    def psfs_on_grid(self, rows, cols):
        return self.truth.psfs_on_grid(rows, cols)

    def shifted(self, dy: float, dx: float):
        raise ValueError("lens PSFs are blended from a fine grid and cannot be redrawn sub-pixel")


_LEGENDRE = np.polynomial.legendre.leggauss(24)  # nodes and weights on [−1, 1]


def blurred_disk(d, radius, s):
    """A uniform disk of radius R convolved with an isotropic Gaussian of std s, at distance d
    from its centre (R and s in the units of d; peak value 1 for R ≫ s).

    That is Pr(|X + d| ≤ R) for X ~ N(0, s²I₂). In polar coordinates around the disk's centre the
    distance |X + d| has the Rice density, so
        P(d) = ∫₀^R (r/s²) exp(−(r − d)²/2s²) i0e(r·d/s²) dr,   i0e(z) = e^(−z) I₀(z).
    The Gaussian factor confines the integrand to |r − d| < 6s, so 24-point Gauss–Legendre over
    [max(0, d − 6s), min(R, d + 6s)] is exact to 1e-7 (tested against scipy's non-central χ²).
    A loop over quadrature nodes, not pixels: memory stays a few times that of d.
    """
    lo = (d - 6 * s).clamp(min=0)
    hi = torch.minimum(d + 6 * s, torch.as_tensor(radius, dtype=d.dtype, device=d.device))
    half, mid = ((hi - lo) / 2).clamp(min=0), (hi + lo) / 2
    total = torch.zeros_like(d + mid)
    for t, w in zip(*_LEGENDRE):
        r = mid + half * float(t)
        total = total + float(w) * r * torch.exp(-0.5 * ((r - d) / s) ** 2) * torch.special.i0e(r * d / s ** 2)
    return total * half / s ** 2


class BlendedGridField:
    """A PSF field known only at the nodes of a rectilinear grid (random_iid, or a measured grid
    used for simulation), made continuous by normalised Gaussian weights of width
    IID_BLEND_WIDTH node spacings along each axis.

    This interpolant is smooth and non-negative, and it is deliberately neither the
    reconstruction's bilinear nor its nearest-node rule, so a simulation with it is no inverse
    crime. At a node, the neighbours' weight is exp(−1/(2·0.3²)) ≈ 0.4%.
    """

    def __init__(self, node_psfs, ys, xs, img_height, img_width):
        self.node_psfs = node_psfs / node_psfs.sum((-2, -1), keepdim=True)   # (Gy, Gx, [C,] k, k)
        self.channels = grid_channels(node_psfs)
        self.device, self.dtype = node_psfs.device, node_psfs.dtype
        self.ys = torch.as_tensor(ys, device=self.device, dtype=self.dtype)
        self.xs = torch.as_tensor(xs, device=self.device, dtype=self.dtype)
        self.H, self.W, self.k = img_height, img_width, node_psfs.shape[-1]

    def node_coords(self):
        return self.ys, self.xs

    def node_grid(self):
        return self.psfs_on_grid(self.ys, self.xs)

    def _weights(self, coords, nodes, n_pixels):
        """(len(coords), len(nodes)) normalised Gaussian weights along one axis."""
        spacing = (nodes[-1] - nodes[0]) / (len(nodes) - 1) if len(nodes) > 1 else torch.tensor(float(n_pixels))
        logits = -0.5 * ((coords[:, None] - nodes[None]) / (IID_BLEND_WIDTH * spacing)) ** 2
        return torch.softmax(logits, 1)  # normalised without underflow far outside the grid

    def psfs_on_grid(self, rows, cols):
        """(R, C, k, k) PSFs at every pair rows (R,) × cols (C,); separable in the two axes."""
        rows = torch.as_tensor(rows, device=self.device, dtype=self.dtype)
        cols = torch.as_tensor(cols, device=self.device, dtype=self.dtype)
        wy, wx = self._weights(rows, self.ys, self.H), self._weights(cols, self.xs, self.W)
        return torch.einsum("ri,ij...,cj->rc...", wy, self.node_psfs, wx)


def _nonneg_range(lo_name, lo, hi_name, hi):
    if lo < 0 or hi < lo:
        raise ValueError(f"need 0 <= {lo_name} <= {hi_name}, got {lo_name}={lo}, {hi_name}={hi}")


GRID_SHAPES = "(Gy, Gx, k, k) or, one PSF per colour channel, (Gy, Gx, C, k, k)"


def validate_kernel_grid(kernel_grid: torch.Tensor) -> None:
    """Raises ValueError unless kernel_grid is (Gy, Gx, k, k) or (Gy, Gx, C, k, k) (channel axis 2),
    finite, non-negative, with no all-zero PSF."""
    ok = torch.is_tensor(kernel_grid) and kernel_grid.ndim in (4, 5) and kernel_grid.shape[-1] == kernel_grid.shape[-2]
    if not ok:
        shape = tuple(kernel_grid.shape) if hasattr(kernel_grid, "shape") else type(kernel_grid).__name__
        raise ValueError(f"kernel grid must have shape {GRID_SHAPES}, got {shape}")
    validate_kernel_size(int(kernel_grid.shape[-1]))
    if not torch.isfinite(kernel_grid).all():
        raise ValueError("kernel grid contains NaN or Inf")
    if (kernel_grid < 0).any():
        raise ValueError(f"kernel grid has negative entries (min {kernel_grid.min().item():.3g}); PSFs must be >= 0")
    if (kernel_grid.sum((-2, -1)) <= 0).any():
        raise ValueError("kernel grid has an all-zero PSF; every PSF needs positive mass")


def grid_channels(kernel_grid) -> int:
    """Colour channels of a PSF grid: 0 for a (Gy, Gx, k, k) grid (one PSF for every channel)."""
    return int(kernel_grid.shape[2]) if kernel_grid.ndim == 5 else 0


def mono_if_equal(kernel_grid):
    """A colour grid whose channels are all the same PSFs (or C = 1) is that mono grid: the same
    operator, at a third of the cost. Anything else is returned as it is."""
    if kernel_grid.ndim == 5 and (kernel_grid.shape[2] == 1 or (kernel_grid == kernel_grid[:, :, :1]).all()):
        return kernel_grid[:, :, 0].contiguous()
    return kernel_grid


def luminance_grid(kernel_grid):
    """The PSF a gray sensor sees through a colour (Gy, Gx, 3, k, k) grid for a white scene: the
    Rec. 709 luminance-weighted mix of the channels' unit-sum PSFs (still unit sum)."""
    g = kernel_grid / kernel_grid.sum((-2, -1), keepdim=True)
    w = torch.tensor(LUMINANCE_WEIGHTS, dtype=g.dtype, device=g.device).view(3, 1, 1)
    return (g * w).sum(2)


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
    nodes = node_coords.to(torch.float64).contiguous()  # e.g. a strided column of a positions array
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
    """K EigenPSFs and their coefficient maps; a colour grid's have a leading channel axis C
    (one decomposition per channel: see compute_eigen_decomposition)."""
    basis_kernels: torch.Tensor        # ([C,] K, k, k); basis_kernels[..., 0, :, :] is the mean PSF
    coefficient_maps: torch.Tensor     # ([C,] K, H, W); coefficient_maps[..., 0, :, :] == 1
    singular_values: torch.Tensor      # ([C,] min(N, k²)) of the centred PSF matrix
    explained_variance_ratio: torch.Tensor  # ([C,] K-1) per kept component
    grid_coefficients: torch.Tensor    # ([C,] K, Gy, Gx) coefficients at the grid nodes
    interpolation: str = "bilinear"
    colour: bool = False               # True: one basis per colour channel (leading axis C)

    @property
    def n_components(self) -> int:
        return self.basis_kernels.shape[-3]

    @property
    def explained_variance_per_channel(self) -> list:
        """Fraction of each channel's PSF variance (around its mean PSF) captured by the K−1
        components: 0 at K = 1, 1 for a grid of identical PSFs. One entry for a mono grid."""
        S = self.singular_values.double().reshape(-1, self.singular_values.shape[-1])
        evr = self.explained_variance_ratio.double().reshape(S.shape[0], -1)
        return [1.0 if float((s ** 2).sum()) == 0 else float(e.sum()) for s, e in zip(S, evr)]

    @property
    def total_explained_variance(self) -> float:
        """The worst channel's explained variance (explained_variance_per_channel)."""
        return min(self.explained_variance_per_channel)


# Centred PSFs whose energy is below this share of the PSFs' own are equal up to rounding.
NO_VARIANCE = 1e-20


def _unit_psf_rows(kernel_grid: torch.Tensor) -> torch.Tensor:
    """(C or 1, N, k²) float64: each channel's N node PSFs as unit-sum rows, the matrix the PCA
    (compute_eigen_decomposition) and the choice of K (rank_for_share) both work on."""
    N, k = kernel_grid.shape[0] * kernel_grid.shape[1], kernel_grid.shape[-1]
    P = kernel_grid.to(torch.float64)
    P = (P.movedim(2, 0) if kernel_grid.ndim == 5 else P[None]).reshape(-1, N, k * k)
    return P / P.sum(-1, keepdim=True)


def _pca(P: torch.Tensor, n_eigen_psfs: int):
    """(basis (K, k²), node coefficients (K, N), S, explained ratios (K−1,), K) of N unit-sum PSFs
    P (N, k²), in float64: B₀ the mean, B₁.. the top principal directions of the centred PSFs."""
    N = P.shape[0]
    mean = P.mean(0)
    D = P - mean
    # 1. SVD of the centred PSF matrix (N, k²): rows of Vh are the EigenPSFs.
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    if (S ** 2).sum() <= NO_VARIANCE * (P ** 2).sum():  # identical PSFs up to rounding: no variance to explain
        S = torch.zeros_like(S)
    # The SVD has min(N, k²) components: K beyond that + 1 (the mean) has nothing left to add.
    if n_eigen_psfs - 1 > S.numel():
        log.info("n_eigen_psfs=%d exceeds the rank of a grid of %d PSFs of %d pixels (at most %d components + "
                 "the mean); using K=%d", n_eigen_psfs, N, P.shape[1], S.numel(), S.numel() + 1)
        n_eigen_psfs = S.numel() + 1
    n_comp = n_eigen_psfs - 1
    total = (S ** 2).sum()
    evr = (S[:n_comp] ** 2) / total if total > 0 else torch.zeros(n_comp, dtype=torch.float64)
    basis = torch.cat([mean[None], Vh[:n_comp]], 0)
    coeff = torch.cat([torch.ones(1, N, dtype=torch.float64), (U[:, :n_comp] * S[:n_comp]).T], 0)
    return basis, coeff, S, evr, n_eigen_psfs


def compute_eigen_decomposition(kernel_grid: torch.Tensor, n_eigen_psfs: int, img_height: int, img_width: int,
                                interpolation: str = "bilinear", node_coords=None) -> EigenPSFDecomposition:
    """PCA of the G² PSFs (Eq. "A(x) ≈ Σₖ Cₖ ⊙ (x ∗ Bₖ)").

    B₀ is the mean PSF with C₀ ≡ 1; B₁..B_{K−1} are the top principal directions of the
    centred PSFs. Centred directions sum to zero, so every reconstructed PSF sums to 1
    whatever K is. With K = G² (or the rank + 1) the reconstruction of the node PSFs is exact;
    a larger K is capped there with an info line.

    A colour grid (Gy, Gx, C, k, k) gets one decomposition per channel, K terms each (chosen over
    one basis shared by the channels with per-channel maps: at the same K and the same FFT count
    its model error is lower; bench/bench_colour.py --part basis measures both). A colour grid whose
    channels are equal is the mono grid (mono_if_equal).

    node_coords: optional (ys, xs) pixel coordinates of grid rows/columns (default: cell centres).
    """
    validate_kernel_grid(kernel_grid)
    kernel_grid = mono_if_equal(kernel_grid)
    Gy, Gx = kernel_grid.shape[:2]
    k = kernel_grid.shape[-1]
    N = Gy * Gx
    if not isinstance(n_eigen_psfs, int) or not 1 <= n_eigen_psfs <= N:
        raise ValueError(f"n_eigen_psfs must be in 1..{N} (the number of PSFs in the grid), got {n_eigen_psfs!r}")
    if img_height < k or img_width < k:
        raise ValueError(f"image ({img_height}x{img_width}) is smaller than the kernel ({k}x{k})")
    _choice("interpolation", interpolation, INTERPOLATIONS)
    dtype, colour = kernel_grid.dtype, kernel_grid.ndim == 5
    P = _unit_psf_rows(kernel_grid)                                         # (C or 1, N, k²)
    parts = [_pca(Pc, n_eigen_psfs) for Pc in P]
    K = parts[0][4]
    basis = torch.stack([p[0] for p in parts]).reshape(-1, K, k, k)
    coeff = torch.stack([p[1] for p in parts]).reshape(-1, K, Gy, Gx)
    S, evr = torch.stack([p[2] for p in parts]), torch.stack([p[3] for p in parts])
    # Interpolate coefficients to full resolution: C = Wy · c · Wxᵀ.
    ys, xs = node_coords if node_coords is not None else (grid_node_coords(Gy, img_height), grid_node_coords(Gx, img_width))
    Wy = interpolation_matrix(torch.as_tensor(ys), img_height, interpolation).to(P.device)
    Wx = interpolation_matrix(torch.as_tensor(xs), img_width, interpolation).to(P.device)
    maps = torch.einsum("hi,ckij,wj->ckhw", Wy, coeff, Wx)
    squeeze = (lambda t: t) if colour else (lambda t: t[0])  # noqa: E731
    decomp = EigenPSFDecomposition(*(squeeze(t).to(dtype) for t in (basis, maps, S, evr, coeff)), interpolation,
                                   colour)
    if decomp.total_explained_variance < 0.9:
        log.warning("EigenPSF decomposition with K=%d explains only %.1f%% of the PSF variance%s; "
                    "increase n_eigen_psfs for a faithful operator", K, 100 * decomp.total_explained_variance,
                    " (worst channel)" if colour else "")
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

# Default cap on an operator's temporaries per chunk (K components, bands of rows, or PSF rows): peak memory then
# grows linearly with the batch and the image, and the chunks stay large enough to run at full speed.
MAX_CHUNK_BYTES = 256 * 2 ** 20
# The EigenPSF operator's cap on the CPU. Chunks under glibc's mmap threshold (32 MB at most) are
# reused from the heap; larger ones are mapped and unmapped at every call, and their page faults
# dominated: at 256² RGB, K = 25, forward + adjoint took 43-67 ms with 256 MB chunks and 20-21 ms
# with 16 MB ones (median of 20, default allocator; with device.tune_cpu_allocator, as a run sets it, 23-25 ms
# and 20-22 ms). 4-8 MB is no faster; on a GPU large chunks are cheaper (fewer launches).
CPU_CHUNK_BYTES = 16 * 2 ** 20


class SVBlurOperator(torch.nn.Module):
    """A(x) = Σₖ Cₖ ⊙ (x ∗ Bₖ) (gather) or Σₖ Bₖ ∗ (Cₖ ⊙ x) (scatter), with exact adjoint.

    Each application costs K+1 real FFTs per channel (one per term plus one shared), all
    batched. Convolutions are linear (padded by the kernel radius with the chosen boundary,
    transformed at a 5-smooth length), so the only boundary effect is the padding itself. An
    image whose spectra exceed max_chunk_bytes is done in bands of rows, each with its halo
    (_bands): the same result, with temporaries that do not grow with the image.
    """

    def __init__(self, decomposition: EigenPSFDecomposition, form: str = "gather", boundary: str = "reflect",
                 max_chunk_bytes: int | None = None):
        super().__init__()
        _choice("form", form, FORMS)
        _choice("boundary", boundary, BOUNDARIES)
        self.form, self.boundary, self.max_chunk_bytes = form, boundary, max_chunk_bytes
        # A colour operator holds one basis per channel (axis C) and blurs channel c of x with it.
        self.colour = bool(getattr(decomposition, "colour", False))
        self.register_buffer("basis_kernels", decomposition.basis_kernels.clone())      # ([B,] [C,] K, k, k)
        self.register_buffer("coefficient_maps", decomposition.coefficient_maps.clone())  # ([B,] [C,] K, H, W)
        self.channels = self.basis_kernels.shape[-4] if self.colour else 0
        self.H, self.W = self.coefficient_maps.shape[-2:]
        self.k = self.basis_kernels.shape[-1]
        self.r = self.k // 2
        if self.H < self.k or self.W < self.k:
            raise ValueError(f"image ({self.H}x{self.W}) is smaller than the kernel ({self.k}x{self.k})")
        self.Hp, self.Wp = self.H + 2 * self.r, self.W + 2 * self.r
        self.fft_shape = (_fast_len(self.Hp), _fast_len(self.Wp))
        self._cache = {}

    def _setup(self, x):
        """Index maps and coefficient maps for x's device/dtype, cached.

        The cache is rebuilt only when the device or dtype changes, so the hot loop does no host
        work. Kernel spectra are made per band height (_spectra), also once.
        """
        key = (x.device, x.dtype)
        if key not in self._cache:
            pad = _Pad(self.H, self.W, self.r, self.boundary, x.device)
            C = self.coefficient_maps.to(x.device, x.dtype)
            # Padding is a gather, so Pad(Cₖ ⊙ x) = Pad(Cₖ) ⊙ Pad(x) and Padᵀ(Pad(Cₖ) ⊙ z) = Cₖ ⊙ Padᵀ(z):
            # the scatter form pads (and un-pads) one image instead of K weighted copies.
            C_pad = pad.forward(C) if self.form == "scatter" else None                  # (K, Hp, Wp)
            if self.batched:  # (B, [C,] K, ...) -> (B, 1, [C,] K, ...): broadcasts over x's samples (and channels)
                C = C.unsqueeze(1)
                C_pad = C_pad.unsqueeze(1) if C_pad is not None else None
            self._cache = {key: (pad, C, C_pad, {})}
        return self._cache[key]

    def _spectra(self, x, Fh):
        """(spec, spec_t): the basis kernels' spectra on an (Fh, Fw) FFT grid, and their conjugates
        (the adjoint's), for x's device/dtype; made once per band height."""
        spectra = self._setup(x)[3]
        if Fh not in spectra:
            # Kernel centred at index 0 of the FFT grid, so products are plain convolutions.
            kern = self.basis_kernels.to(x.device, x.dtype)
            kern = F.pad(kern, (0, self.fft_shape[1] - self.k, 0, Fh - self.k))
            kern = torch.roll(kern, (-self.r, -self.r), (-2, -1))
            spec = torch.fft.rfft2(kern)                                           # ([B,] K, Fh, Fw//2+1)
            # conj() is lazy in torch, and products with a lazily conjugated operand run ~2x slower.
            spec_t = spec.conj().resolve_conj()
            if self.batched:
                spec, spec_t = spec.unsqueeze(1), spec_t.unsqueeze(1)
            spectra[Fh] = (spec, spec_t)
        return spectra[Fh]

    @classmethod
    def stacked(cls, decompositions, form: str = "gather", boundary: str = "reflect",
                max_chunk_bytes: int | None = None):
        """One operator for a batch of images, each with its own PSF grid: basis (B, K, k, k) and
        maps (B, K, H, W), K the largest of theirs (a missing component is zero and adds nothing).
        Image b of x, or its S consecutive samples when x holds B·S images, is blurred with
        decompositions[b]. For one grid shared by a batch, use the plain operator: it is not copied."""
        colour = {bool(getattr(d, "colour", False)) for d in decompositions}
        channels = {d.basis_kernels.shape[0] for d in decompositions if getattr(d, "colour", False)}
        if len(colour) > 1 or len(channels) > 1:
            raise ValueError("cannot stack mono and colour PSF grids, or colour grids of different channel counts")
        K = max(d.basis_kernels.shape[-3] for d in decompositions)
        grow = lambda t: F.pad(t, (0, 0, 0, 0, 0, K - t.shape[-3]))  # noqa: E731  zero components up to K
        both = SimpleNamespace(basis_kernels=torch.stack([grow(d.basis_kernels) for d in decompositions]),
                               coefficient_maps=torch.stack([grow(d.coefficient_maps) for d in decompositions]),
                               colour=colour.pop())
        return cls(both, form, boundary, max_chunk_bytes)

    @property
    def batched(self) -> bool:
        return self.basis_kernels.ndim == 4 + self.colour

    def _per_image(self, fn, x):
        """Applies fn with x's images grouped by the operator's batch: (B·S, C, H, W) -> (B, S·C, H, W)
        (a colour operator's: (B, S, C, H, W), so that channel c meets basis c)."""
        if not self.batched:
            return fn(x)
        B = self.basis_kernels.shape[0]
        if x.shape[0] % B:
            raise ValueError(f"this operator holds {B} images' PSFs; x has {x.shape[0]} images (not a multiple)")
        out = fn(x.reshape(B, -1, *x.shape[-3 if self.colour else -2:]))
        return out.reshape(x.shape[0], -1, *out.shape[-2:])

    def _check_channels(self, x):
        if self.colour and x.shape[1] != self.channels:
            raise ValueError(f"this operator's PSF grid has {self.channels} colour channels; the image has {x.shape[1]}")

    def forward(self, x):
        _check_image(x, self.H, self.W)
        self._check_channels(x)
        x, in_dtype = _fft_dtype(x)
        return self._per_image(self._forward, x).to(in_dtype)

    def adjoint(self, y):
        _check_image(y, self.H, self.W)
        self._check_channels(y)
        y, in_dtype = _fft_dtype(y)
        return self._per_image(self._adjoint, y).to(in_dtype)

    def _cap(self, x):
        return self.max_chunk_bytes or (CPU_CHUNK_BYTES if x.device.type == "cpu" else MAX_CHUNK_BYTES)

    def _row_bytes(self, x):
        """Bytes of one FFT row of one K component's (N, C, ·, Fw) spectra (complex: 2 reals)."""
        return math.prod(x.shape[:-2]) * self.fft_shape[1] * x.element_size() * 2

    def _bands(self, x):
        """(band height nb, FFT height Fh): the output rows (or the adjoint's input rows) are done
        nb at a time, each band with its 2r rows of halo on an Fh ≥ nb + 2r grid, so that one K
        component's (N, C, Fh, Fw) spectra stay under max_chunk_bytes. One band (nb = H, Fh the
        whole image's) when they fit: then nothing changes. Why bands: on the CPU, temporaries
        above glibc's mmap threshold (32 MB at most) are mapped and unmapped at every call, and
        their page faults made the operator's time grow faster than the pixels (4096² RGB: 448 MB
        per component); an FFT of a band also stays in cache. The convolution is exact either way:
        each band reads the rows it needs, and the halo's share of the work is at most 1/3."""
        row = self._row_bytes(x)
        if self.fft_shape[0] * row <= self._cap(x):
            return self.H, self.fft_shape[0]
        fit = max(int(self._cap(x) // row), 1)                                  # FFT rows under the cap
        smooth = max(n for n in range(max(fit // 2, 1), fit + 1) if _fast_len(n) == n)
        Fh = max(smooth, _fast_len(6 * self.r + 1))                             # the halo at most 1/3 of a band
        return Fh - 2 * self.r, Fh

    def _k_chunks(self, x, Fh):
        """Slices over the K components such that one chunk's (N, C, K', Fh, Fw) spectra stay under
        max_chunk_bytes (default: CPU_CHUNK_BYTES on the CPU, MAX_CHUNK_BYTES elsewhere): peak memory then grows linearly in the batch, not in batch × K. Without
        autograd (DiffPIR, adjoints) the chunks' temporaries are freed as they go; under autograd
        (DPS) each chunk keeps what its backward needs, as the unchunked product would."""
        K = self.basis_kernels.shape[-3]
        per_k = Fh * self._row_bytes(x)
        step = max(1, min(K, int(self._cap(x) // max(per_k, 1))))
        return [slice(k, min(k + step, K)) for k in range(0, K, step)]

    def _forward(self, x):
        pad, C, C_pad, _ = self._setup(x)
        xp = pad.forward(x).unsqueeze(-3)                                   # (N, C, 1, Hp, Wp)
        (nb, Fh), r, H, W = self._bands(x), self.r, self.H, self.W
        spec, _ = self._spectra(x, Fh)
        s, ks_all = (Fh, self.fft_shape[1]), self._k_chunks(x, Fh)
        out = None
        for a in range(0, H, nb):                                           # output rows a..b read xp rows a..b+2r
            b = min(a + nb, H)
            xb = xp[..., a:b + 2 * r, :]
            if self.form == "gather":
                # 1. one FFT of the padded band (N, C, 1, Fh, Fw'); 2. K inverse FFTs; 3. weight and sum.
                X = torch.fft.rfft2(xb, s=s)
                yb = sum((torch.fft.irfft2(X * spec[..., ks, :, :], s=s)[..., r:r + b - a, r:r + W]
                          * C[..., ks, a:b, :]).sum(-3) for ks in ks_all)
            else:
                # scatter: 1. K FFTs of Pad(Cₖ) ⊙ Pad(x) = Pad(Cₖ ⊙ x); 2. sum spectra over K; 3. one inverse FFT.
                # In-place products: these (N, C, K, ...) temporaries dominate the memory traffic.
                Z = sum(torch.fft.rfft2(xb * C_pad[..., ks, a:b + 2 * r, :], s=s).mul_(spec[..., ks, :, :]).sum(-3)
                        for ks in ks_all)
                yb = torch.fft.irfft2(Z, s=s)[..., r:r + b - a, r:r + W]
            if nb >= H:
                return yb
            out = yb.new_empty(*yb.shape[:-2], H, W) if out is None else out
            out[..., a:b, :] = yb
        return out

    def _adjoint(self, y):
        pad, C, C_pad, _ = self._setup(y)
        (nb, Fh), r, H, W = self._bands(y), self.r, self.H, self.W
        _, spec_t = self._spectra(y, Fh)
        s, ks_all = (Fh, self.fft_shape[1]), self._k_chunks(y, Fh)
        res = y.new_zeros(*y.shape[:-2], self.Hp, self.Wp)
        for a in range(0, H, nb):        # input rows a..b reach padded rows a..b+2r: the bands' halos add up
            b = min(a + nb, H)
            embed = (r, s[1] - W - r, r, Fh - (b - a) - r)                  # F.pad order
            yb = y[..., None, a:b, :]
            if self.form == "gather":
                # Aᵀ = Padᵀ Σₖ Convₖᵀ Embed (Cₖ ⊙ ·): K FFTs, sum spectra, one inverse FFT.
                Z = sum(torch.fft.rfft2(F.pad(yb * C[..., ks, a:b, :], embed), s=s).mul_(spec_t[..., ks, :, :]).sum(-3)
                        for ks in ks_all)
                xb = torch.fft.irfft2(Z, s=s)[..., : b - a + 2 * r, : self.Wp]
            else:
                # scatter: Aᵀ = Padᵀ Σₖ Pad(Cₖ) ⊙ Convₖᵀ Embed(·): one FFT, K inverse FFTs, one Padᵀ.
                Y = torch.fft.rfft2(F.pad(yb, embed), s=s)
                xb = sum((torch.fft.irfft2(Y * spec_t[..., ks, :, :], s=s)[..., : b - a + 2 * r, : self.Wp]
                          * C_pad[..., ks, a:b + 2 * r, :]).sum(-3) for ks in ks_all)
            res[..., a:b + 2 * r, :] += xb
        return pad.adjoint(res)


def stack_operators(ops):
    """One operator for a batch whose image b (with its S consecutive samples) is seen by ops[b].

    One operator object shared by the whole batch (one PSF grid) is returned as it is, never
    copied B times. Otherwise the ops must have the same structure (LuminanceOperator and
    CroppedOperator wrappers, same crop) around SVBlurOperators of one size; see
    SVBlurOperator.stacked.
    """
    first = ops[0]
    if all(op is first for op in ops):
        return first
    if isinstance(first, LuminanceOperator):
        return LuminanceOperator(stack_operators([op.op for op in ops]))
    if isinstance(first, CroppedOperator):
        return CroppedOperator(stack_operators([op.op for op in ops]), first.top, first.left, first.H, first.W)
    if not isinstance(first, SVBlurOperator):
        raise TypeError(f"cannot stack {type(first).__name__} operators")
    return SVBlurOperator.stacked(ops, first.form, first.boundary).to(first.basis_kernels.device)


# ----------------------------------------------------------------------------
# 6. Exact per-pixel SV convolution, chunked over rows
# ----------------------------------------------------------------------------

def _rows_per_chunk(z, n_cols, k, max_chunk_bytes):
    per_row = n_cols * k ** 2 * z.element_size() * (1 + 2 * z.shape[0] * z.shape[1])
    return max(1, int(max_chunk_bytes // per_row))


def _kernel_first(h):
    """(R, W, k²) -> (k², R, W), and a colour field's (R, W, C, k²) -> (C, k², R, W): against
    (B, C, k², R, W) patches, channel c meets its own PSFs."""
    return h.movedim((0, 1), (-2, -1))


def _check_field_channels(x, channels):
    if channels and x.shape[1] != channels:
        raise ValueError(f"this blur's PSFs have {channels} colour channels; the image has {x.shape[1]}")


def _sv_gather(z, n_rows, n_cols, psfs, k, flip, max_chunk_bytes):
    """out[p] = Σ_{u'} h_p[u'] · z[p + u'] for p on an (n_rows, n_cols) grid; u' ∈ [0, k)².

    psfs(a, b) -> (b − a, n_cols, k²): the PSFs of output rows a..b−1, flattened in kernel order.
    With flip, h is rotated by 180°, which turns the correlation into a convolution.
    """
    B, C = z.shape[:2]
    out = z.new_empty(B, C, n_rows, n_cols)
    step = _rows_per_chunk(z, n_cols, k, max_chunk_bytes)
    for a in range(0, n_rows, step):  # chunks of rows, not pixels
        b = min(a + step, n_rows)
        patches = F.unfold(z[:, :, a:b + k - 1].reshape(B * C, 1, -1, z.shape[-1]), k)
        patches = patches.reshape(B, C, k * k, b - a, n_cols)             # (B, C, k², R, W)
        h = psfs(a, b).to(z.dtype)                                         # (R, W, [C,] k²)
        if flip:
            h = h.flip(-1)  # flattened (k, k) reversed == rotated by 180°
        # a broadcast multiply-and-sum beats einsum's bmm here by ~2.5x (no permuted copies)
        out[:, :, a:b] = (patches * _kernel_first(h)).sum(2)
    return out


def _sv_scatter(v, psfs, k, flip, max_chunk_bytes):
    """out[p + u'] += h_p[u'] · v[p]: the transpose of _sv_gather, (R, W) -> (R + k − 1, W + k − 1)."""
    B, C, R_all, Wv = v.shape
    out = v.new_zeros(B, C, R_all + k - 1, Wv + k - 1)
    step = _rows_per_chunk(v, Wv, k, max_chunk_bytes)
    for a in range(0, R_all, step):
        b = min(a + step, R_all)
        h = psfs(a, b).to(v.dtype)
        if flip:
            h = h.flip(-1)
        cols = (v[:, :, None, a:b] * _kernel_first(h)).reshape(B * C, k * k, -1)   # (BC, k², R·W)
        folded = F.fold(cols, (b - a + k - 1, Wv + k - 1), k)
        out[:, :, a:b + k - 1] += folded.reshape(B, C, b - a + k - 1, -1)
    return out


class GridSVBlurOperator(torch.nn.Module):
    """The full-rank operator of a node grid: every pixel's PSF interpolated from the grid.

    gather:  y[p] = Σᵤ h_p[u] x̃[p − u]
    scatter: y[p] = Σᵤ h_{src(p−u)}[u] x̃[p − u]   (x̃: padded image, src: its source pixel)

    h_p = Σᵢⱼ Wy[p_y, i] Wx[p_x, j] P[i, j] uses the same interpolation weights and boundary as the
    EigenPSF coefficient maps, so with K = G² the two operators agree to float precision: this is
    the reconstruction's own model at full rank, not the ground truth (see GroundTruthBlur).
    Work is split in row chunks so that memory stays under `max_chunk_bytes`.
    """

    def __init__(self, kernel_grid, img_height, img_width, form="gather", boundary="reflect",
                 interpolation="bilinear", node_coords=None, max_chunk_bytes: int = MAX_CHUNK_BYTES):
        super().__init__()
        validate_kernel_grid(kernel_grid)
        _choice("form", form, FORMS)
        _choice("boundary", boundary, BOUNDARIES)
        kernel_grid = mono_if_equal(kernel_grid)
        Gy, Gx, k = *kernel_grid.shape[:2], kernel_grid.shape[-1]
        if img_height < k or img_width < k:
            raise ValueError(f"image ({img_height}x{img_width}) is smaller than the kernel ({k}x{k})")
        self.form, self.boundary, self.H, self.W, self.k, self.r = form, boundary, img_height, img_width, k, k // 2
        self.max_chunk_bytes, self.channels = max_chunk_bytes, grid_channels(kernel_grid)
        psfs = kernel_grid / kernel_grid.sum((-2, -1), keepdim=True)
        self.register_buffer("kernel_grid", psfs)                     # (Gy, Gx, [C,] k, k)
        self.register_buffer("psfs", psfs.reshape(Gy, -1))
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
        """psfs(a, b) for _sv_gather/_sv_scatter: (b − a, len(cols), k²) interpolated PSFs of rows[a:b]."""
        Gx = self.Wx.shape[1]

        def psfs(a, b):
            m = (self.Wy[rows[a:b]] @ self.psfs).reshape(b - a, Gx, -1)   # (R, Gx, [C·]k²)
            h = torch.einsum("wj,rjn->rwn", self.Wx[cols], m)
            return h.unflatten(-1, (self.channels, -1)) if self.channels else h
        return psfs

    def _pad(self, x):
        return _Pad(self.H, self.W, self.r, self.boundary, x.device)

    def forward(self, x):
        _check_image(x, self.H, self.W)
        _check_field_channels(x, self.channels)
        pad, k, mb = self._pad(x), self.k, self.max_chunk_bytes
        rows, cols = torch.arange(self.H, device=x.device), torch.arange(self.W, device=x.device)
        if self.form == "gather":
            return _sv_gather(pad.forward(x), self.H, self.W, self._psfs(rows, cols), k, True, mb)
        # scatter: every padded source i spreads h_{src(i)} around itself; keep the valid window.
        out = _sv_scatter(pad.forward(x), self._psfs(self.src_y, self.src_x), k, False, mb)
        return out[..., 2 * self.r: 2 * self.r + self.H, 2 * self.r: 2 * self.r + self.W]

    def adjoint(self, y):
        _check_image(y, self.H, self.W)
        _check_field_channels(y, self.channels)
        pad, k, mb = self._pad(y), self.k, self.max_chunk_bytes
        rows, cols = torch.arange(self.H, device=y.device), torch.arange(self.W, device=y.device)
        if self.form == "gather":
            return pad.adjoint(_sv_scatter(y, self._psfs(rows, cols), k, True, mb))
        y_ext = F.pad(y, (2 * self.r,) * 4)
        z = _sv_gather(y_ext, self.H + 2 * self.r, self.W + 2 * self.r, self._psfs(self.src_y, self.src_x), k, False, mb)
        return pad.adjoint(z)


class GroundTruthBlur(torch.nn.Module):
    """The simulated physics: exact per-pixel SV blur of a PSFField, by valid convolution.

    The scene x_ext is (B, C, H + 2r, W + 2r): the field of view plus r = k // 2 pixels of real
    content beyond each edge, so the borders of y hold light from outside the field of view and no
    boundary rule is assumed. Every pixel's PSF comes from the continuous field itself, with no
    PCA and no blending of node PSFs (random_iid excepted: see PSFField).

    gather:  y[p] = Σᵤ h_p[u] x_ext[p − u]                 (PSF indexed by the output pixel)
    scatter: y[p] = Σ_q h_q[p − q] x_ext[q]                (each source q spreads with its own PSF)

    with p over the H×W field of view and q over all H + 2r by W + 2r scene pixels, both in image
    coordinates (x_ext[q] sits at array index q + r). `adjoint` is the exact transpose.
    """

    def __init__(self, field: PSFField, form: str = "gather", max_chunk_bytes: int = 64 * 2 ** 20):
        super().__init__()
        _choice("form", form, FORMS)
        self.field, self.form, self.max_chunk_bytes = field, form, max_chunk_bytes
        self.H, self.W, self.k, self.r = field.H, field.W, field.k, field.k // 2
        self.channels = getattr(field, "channels", 0)

    def _psfs(self, rows, cols):
        return lambda a, b: self.field.psfs_on_grid(rows[a:b], cols).flatten(-2)

    def _coords(self, margin, device):
        """Image coordinates of the output rows/cols (margin 0) or of the scene (margin r)."""
        return (torch.arange(-margin, self.H + margin, device=device),
                torch.arange(-margin, self.W + margin, device=device))

    def forward(self, x_ext):
        _check_image(x_ext, self.H + 2 * self.r, self.W + 2 * self.r)
        _check_field_channels(x_ext, self.channels)
        k, r, mb = self.k, self.r, self.max_chunk_bytes
        if self.form == "gather":
            return _sv_gather(x_ext, self.H, self.W, self._psfs(*self._coords(0, x_ext.device)), k, True, mb)
        out = _sv_scatter(x_ext, self._psfs(*self._coords(r, x_ext.device)), k, False, mb)  # (H + 4r, W + 4r)
        return out[..., 2 * r: 2 * r + self.H, 2 * r: 2 * r + self.W]

    def adjoint(self, y):
        _check_image(y, self.H, self.W)
        _check_field_channels(y, self.channels)
        k, r, mb = self.k, self.r, self.max_chunk_bytes
        if self.form == "gather":
            return _sv_scatter(y, self._psfs(*self._coords(0, y.device)), k, True, mb)
        y_ext = F.pad(y, (2 * r,) * 4)
        return _sv_gather(y_ext, self.H + 2 * r, self.W + 2 * r, self._psfs(*self._coords(r, y.device)), k, False, mb)

    def crop(self, x_ext):
        """The field of view (B, C, H, W) of a scene x_ext."""
        return x_ext[..., self.r: self.r + self.H, self.r: self.r + self.W]


class TrueSVBlurOperator(torch.nn.Module):
    """The per-pixel ground truth (GroundTruthBlur) applied to a (B, C, H, W) image, for a scene
    with no margin of its own: the k // 2 pixels beyond each edge are supplied by `boundary`
    (reflect by default: the mirror image without repeating the edge row), then every pixel is
    blurred with its own PSF from the continuous field. Not the reconstruction model: no PCA and no
    node grid. `adjoint` is its exact transpose. For a scene with real content beyond the edge,
    use GroundTruthBlur on it (create_ground_truth)."""

    def __init__(self, field: PSFField, form: str = "gather", boundary: str = "reflect"):
        super().__init__()
        self.truth = GroundTruthBlur(field, form)
        self.H, self.W, self.boundary = field.H, field.W, boundary
        self._pad = None

    def _padding(self, device):
        if self._pad is None or self._pad.iy.device != torch.device(device):
            self._pad = _Pad(self.H, self.W, self.truth.r, self.boundary, device)
        return self._pad

    def forward(self, x):
        _check_image(x, self.H, self.W)
        return self.truth(self._padding(x.device).forward(x))

    def adjoint(self, y):
        return self._padding(y.device).adjoint(self.truth.adjoint(y))


LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)  # Rec. 709 / sRGB relative luminance


def luminance(x):
    """(..., 3, H, W) RGB -> (..., 1, H, W) Rec. 709 luminance."""
    w = torch.tensor(LUMINANCE_WEIGHTS, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(-3, keepdim=True)


class LuminanceOperator(torch.nn.Module):
    """y = lum(A(x)): an RGB scene seen by a gray sensor, (B, 3, H, W) -> (B, 1, H, W).

    A acts on each channel alike, so lum ∘ A = A ∘ lum and the adjoint is Aᵀ(w ⊗ y).
    """

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return luminance(self.op(x))

    def adjoint(self, y):
        w = torch.tensor(LUMINANCE_WEIGHTS, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        return self.op.adjoint(y * w)


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

def mode_params(physics_config: dict) -> dict:
    """The parameters of the chosen mode from config sub-sections (mixed reads motion+defocus)."""
    out = {}
    for section in mode_sections(physics_config["blur_mode"]):
        out.update(physics_config.get(section, {}))
    return out


def build_operators(kernel_grid, H, W, physics_config, node_coords=None):
    """(eigenpsf_op, grid_op, decomposition) for a given PSF grid.

    grid_op is the grid's full-rank operator (GridSVBlurOperator): the reconstruction's model
    without the PCA truncation, not the ground truth.
    """
    eigen_op, decomp = build_eigen_operator(kernel_grid, H, W, physics_config, node_coords)
    grid_op = GridSVBlurOperator(kernel_grid, H, W, eigen_op.form, eigen_op.boundary,
                                 physics_config.get("interpolation", "bilinear"), node_coords)
    return eigen_op, grid_op, decomp


# n_eigen_psfs: auto. Measured on 8×8 grids of 21-px PSFs at 128² (docs/forward-model.md): the model
# error against the per-pixel truth stops falling near 99% of the variance (lens: K = 25, 2.68% against
# 2.66% at full rank and 3.14% at K = 10; motion: K = 13; defocus: K = 5). The cap bounds the cost,
# which grows with K.
RANK_SHARE, RANK_CAP = 0.99, 32


def rank_for_share(kernel_grid, share=RANK_SHARE, cap=RANK_CAP) -> tuple:
    """(K, explained share): the fewest EigenPSFs (the mean + K − 1 principal directions, as
    compute_eigen_decomposition takes them) whose explained variance reaches `share` in every
    channel, at most `cap` and the number of PSFs. The share is the worst channel's at that K."""
    P = _unit_psf_rows(mono_if_equal(kernel_grid))
    N = P.shape[1]
    S2 = torch.linalg.svdvals(P - P.mean(1, keepdim=True)) ** 2            # (C, min(N, k²))
    total = S2.sum(-1, keepdim=True)
    cum = torch.cat([torch.zeros_like(S2[:, :1]), S2.cumsum(-1) / total.clamp_min(1e-300)], -1)  # cum[:, n]: n comps.
    no_variance = total <= NO_VARIANCE * (P ** 2).sum((1, 2))[:, None]   # equal PSFs: the mean says it all
    cum = torch.where(no_variance, torch.ones_like(cum), cum)
    n = int((cum < share).sum(-1).max())                                    # components needed, worst channel
    K = min(n + 1, cap, N, cum.shape[1])
    return K, float(cum[:, K - 1].min())


def build_eigen_operator(kernel_grid, H, W, physics_config, node_coords=None):
    """(eigenpsf_op, decomposition) alone: the K-term model A(x) = sum_k C_k * (x conv B_k) of the
    grid on an H x W domain, without the full-rank grid operator beside it. n_eigen_psfs: an int,
    "all" (every PSF: the exact operator at the nodes) or "auto" (rank_for_share, with an info line)."""
    n = physics_config["n_eigen_psfs"]
    if n in ("all", "full"):
        n = kernel_grid.shape[0] * kernel_grid.shape[1]
    auto = n == "auto"
    if auto:
        n, explained = rank_for_share(kernel_grid)
    decomp = compute_eigen_decomposition(kernel_grid, n, H, W, physics_config.get("interpolation", "bilinear"),
                                         node_coords)
    if auto:  # said after the decomposition, which knows whether the grid's channels differ
        log.info("n_eigen_psfs auto: K=%d explains %.1f%% of the PSF variance%s (the fewest for %g%%, at most %d; "
                 "--n_eigen_psfs K sets it)", n, 100 * explained, " (worst channel)" if decomp.colour else "",
                 100 * RANK_SHARE, RANK_CAP)
    return SVBlurOperator(decomp, resolve_form(physics_config), physics_config.get("boundary", "reflect")), decomp


def create_sv_blur_system(H: int, W: int, physics_config: dict, device="cpu", seed=None, generator=None,
                          dtype=torch.float32):
    """Simulates a PSF field from `physics_config` (config.yaml's `physics` section) and returns
    (eigenpsf_op, true_op, decomposition), as the first version did.

    true_op is the per-pixel ground truth (TrueSVBlurOperator) on a (B, C, H, W) image, the scene
    beyond the edge supplied by physics_config's boundary (reflect by default): simulate with it,
    and the EigenPSF operator, built from the field's node grid, is not the model that made y. For
    the reconstruction model at full rank use build_operators; for a scene with real margins,
    create_ground_truth.
    """
    field = create_ground_truth(H, W, physics_config, device, seed, generator, dtype)[0]
    eig_op, _, decomp = build_operators(field.node_grid(), H, W, physics_config)
    true_op = TrueSVBlurOperator(field, resolve_form(physics_config), physics_config.get("boundary", "reflect"))
    return eig_op.to(device), true_op, decomp


def create_ground_truth(H: int, W: int, physics_config: dict, device="cpu", seed=None, generator=None,
                        dtype=torch.float32):
    """(field, truth_op): a continuous PSF field drawn from `physics_config` and its per-pixel
    GroundTruthBlur, which maps a scene with k // 2 pixels of margin, (B, C, H + 2r, W + 2r), to
    y (B, C, H, W). The reconstruction's node grid is field.node_grid()."""
    mode = physics_config["blur_mode"]
    _choice("blur_mode", mode, BLUR_MODES)
    sim = SVBlurSimulator(H, W, physics_config.get("kernel_size", 21), resolve_grid_size(physics_config), device, dtype)
    field = sim.simulate_field(mode, seed=seed, generator=generator, **mode_params(physics_config))
    return field, GroundTruthBlur(field, resolve_form(physics_config))


@torch.no_grad()
def operator_errors(eigen_op, true_op, x, x_ext=None):
    """(‖A_eig x − A_true x_ext‖ / ‖A_true x_ext‖ on the given image batch, that ratio for each colour
    channel as a list), from one application of each operator (the per-pixel truth is the slow one).

    x_ext is the scene with margin when true_op is a GroundTruthBlur (default: x itself).
    """
    ref = true_op(x if x_ext is None else x_ext)
    diff = eigen_op(x) - ref
    ratio = lambda dims: torch.linalg.vector_norm(diff, dim=dims) / torch.linalg.vector_norm(ref, dim=dims).clamp_min(1e-30)  # noqa: E731
    return float(ratio(None)), [float(e) for e in ratio((0, 2, 3))]


@torch.no_grad()
def operator_relative_error(eigen_op, true_op, x, x_ext=None) -> float:
    """‖A_eig x − A_true x_ext‖ / ‖A_true x_ext‖ on the given image batch (operator_errors' first)."""
    return operator_errors(eigen_op, true_op, x, x_ext)[0]
