"""Diffraction PSFs of a lens: a circular pupil with Seidel wavefront aberrations, evaluated at
one wavelength per colour channel (docs/forward-model.md, "lens").

Wavefront (Hopkins' field-dependent Seidel form), in waves at the reference wavelength, for the
normalised pupil point ρ (|ρ| ≤ 1) and field point h (|h| = 1 at the image corners):

    W(ρ; h) = W020 |ρ|² + W040 |ρ|⁴ + W131 (h·ρ)|ρ|² + W222 (h·ρ)² + W220 |h|²|ρ|² + W111 (h·ρ)
              defocus     spherical    coma            astigmatism   field curvature  lateral colour

Longitudinal colour adds a defocus per channel, lateral colour a tilt per channel (both in waves
at the reference wavelength; the optical path difference is a length, so at wavelength λ the
phase is 2π W λ_ref / λ). The field at the image plane is the pupil's Fraunhofer transform,
computed at exactly the wanted samples by a matrix Fourier transform (Soummer et al. 2007,
Opt. Express 15, 15935):

    E(s) = ∫ P(ρ) exp(2πi W λ_ref/λ) exp(−iπ ρ·s p/(λN)) dρ,        s in pixels,

p the pixel pitch and N the f-number, so the unaberrated intensity is the Airy pattern
[2 J₁(v)/v]², v = π |s| p/(λN) (first zero at 1.22 λN). Each pixel integrates q × q samples.
"""

from __future__ import annotations

import math

import torch

# Pupil samples per diameter and PSF samples per pixel side, when a call does not say.
PUPIL_SAMPLES = 96
OVERSAMPLE = 3
# Above this share of a PSF's light outside the k × k window a lens is refused (the window cuts it).
MAX_LOST_LIGHT = 0.05


def pupil_coords(n: int, dtype=torch.float64, device="cpu"):
    """(ρ (n,) sample centres across [−1, 1], the disc mask (n, n), dρ)."""
    rho = (torch.arange(n, dtype=dtype, device=device) + 0.5) * 2 / n - 1
    mask = (rho[:, None] ** 2 + rho[None, :] ** 2 <= 1).to(dtype)
    return rho, mask, 2 / n


def seidel_wavefront(ry, rx, hy, hx, c: dict):
    """W (waves at λ_ref) for pupil points (ry, rx) and field points (hy, hx), broadcast together;
    c: W020, W040, W131, W222, W220, W111 (missing terms are 0)."""
    r2 = ry ** 2 + rx ** 2
    hr = hy * ry + hx * rx
    return (c.get("W020", 0) * r2 + c.get("W040", 0) * r2 ** 2 + c.get("W131", 0) * hr * r2
            + c.get("W222", 0) * hr ** 2 + c.get("W220", 0) * (hy ** 2 + hx ** 2) * r2 + c.get("W111", 0) * hr)


def sample_offsets(k: int, q: int, dtype=torch.float64, device="cpu"):
    """The k·q sample positions (px from the PSF centre) of k pixels, q per pixel at their centres."""
    m = torch.arange(k * q, dtype=dtype, device=device)
    return -(k // 2) - 0.5 + (m + 0.5) / q


def intensity(W, wavelength_um, f_number, pitch_um, k, q=OVERSAMPLE, n=PUPIL_SAMPLES, ref_um=None):
    """Unnormalised |E|² (B, k·q, k·q) at sample_offsets(k, q) for wavefronts W (B, n, n) in waves
    at ref_um (default: the wavelength itself); wavelength_um (B,) or a number. Unaberrated,
    E(0) = Σ P dρ² is the sampled pupil's area (≈ π)."""
    B = W.shape[0]
    dt = W.dtype
    lam = torch.as_tensor(wavelength_um, dtype=dt, device=W.device).expand(B)
    ref = lam if ref_um is None else torch.as_tensor(ref_um, dtype=dt, device=W.device)
    rho, mask, d = pupil_coords(n, dt, W.device)
    field = mask * torch.exp(2j * math.pi * W * (ref / lam).view(-1, 1, 1)) * d ** 2      # (B, n, n), complex
    s = sample_offsets(k, q, dt, W.device)
    scale = pitch_um / (lam * f_number)                                                  # (B,)
    A = torch.exp(-1j * math.pi * scale.view(-1, 1, 1) * s.view(1, -1, 1) * rho.view(1, 1, -1))  # (B, kq, n)
    E = A @ field.to(A.dtype) @ A.transpose(1, 2)                                        # (B, kq, kq)
    return E.real ** 2 + E.imag ** 2


def pixel_psfs(I, k, q):
    """(B, k·q, k·q) samples -> (B, k, k) pixel PSFs (each pixel the mean of its q × q samples)."""
    return I.reshape(-1, k, q, k, q).mean((2, 4))


def total_energy(wavelength_um, f_number, pitch_um, q, n=PUPIL_SAMPLES):
    """Σ |E|² over the whole image plane at the sampling of `intensity`, by Parseval: the pupil's
    sampled area times (2/(scale))² / (1/q)², scale = p/(λN). A PSF's share of it inside its
    window is the light it keeps."""
    _, mask, d = pupil_coords(n)
    scale = pitch_um / (wavelength_um * f_number)
    return float(mask.sum()) * d ** 2 * (2 / scale) ** 2 * q ** 2


def lens_coefficients(p: dict, channel: int) -> dict:
    """The Seidel coefficients (waves at the reference wavelength) of one colour channel."""
    return {"W020": p["defocus"] + p["longitudinal_colour"][channel], "W040": p["spherical"], "W131": p["coma"],
            "W222": p["astigmatism"], "W220": p["field_curvature"], "W111": p["lateral_colour"][channel]}


def lens_psfs(hy, hx, p: dict, k: int, dtype=torch.float64, device="cpu", chunk=64):
    """(P, C, k, k) unit-sum pixel PSFs at P normalised field points (hy, hx) (each (P,)), one
    channel per entry of p["wavelengths_nm"], and the largest share of light any of them lost
    outside the k × k window. p: config.yaml's physics.lens section."""
    q = p["oversample"]
    # The transform of a pupil sampled n times is periodic, with period n·λN/p px: at least twice the
    # window, so that no tail of a replica folds back in (the shortest wavelength is the tightest).
    n = max(p["pupil_samples"], math.ceil(2 * k * p["pixel_pitch_um"] / (min(p["wavelengths_nm"]) / 1000 * p["f_number"])))
    rho, _, _ = pupil_coords(n, torch.float64, device)
    hy, hx = (torch.as_tensor(h, dtype=torch.float64, device=device).view(-1, 1, 1) for h in (hy, hx))
    ref = p["reference_wavelength_nm"] / 1000
    out, lost = [], 0.0
    for c, lam_nm in enumerate(p["wavelengths_nm"]):
        lam = lam_nm / 1000
        coeffs = lens_coefficients(p, c)
        parts = []
        for a in range(0, hy.shape[0], chunk):        # chunks of field points: (chunk, n, n) complex temporaries
            W = seidel_wavefront(rho.view(1, -1, 1), rho.view(1, 1, -1), hy[a:a + chunk], hx[a:a + chunk], coeffs)
            I = intensity(W, lam, p["f_number"], p["pixel_pitch_um"], k, q, n, ref)
            parts.append(pixel_psfs(I, k, q))
        psf = torch.cat(parts)
        kept = psf.sum((-2, -1)) * q ** 2 / total_energy(lam, p["f_number"], p["pixel_pitch_um"], q, n)
        lost = max(lost, float(1 - kept.min()))
        out.append(psf / psf.sum((-2, -1), keepdim=True))
    return torch.stack(out, 1).to(device, dtype), lost


def field_points(rows, cols, H: int, W: int):
    """Normalised field coordinates (hy, hx) (R, C) of pixel rows × cols: 0 at the image centre,
    |h| = 1 at the corner pixels (not clamped: a margin pixel lies slightly beyond)."""
    cy, cx = (H - 1) / 2, (W - 1) / 2
    rmax = math.hypot(cy, cx) or 1.0
    rows = torch.as_tensor(rows, dtype=torch.float64)
    cols = torch.as_tensor(cols, dtype=torch.float64)
    hy = ((rows - cy) / rmax)[:, None].expand(-1, cols.numel())
    hx = ((cols - cx) / rmax)[None, :].expand(rows.numel(), -1)
    return hy, hx
