"""Lens optics (optics.py, --blur_mode lens) against closed forms: the Airy pattern, Maréchal's
Strehl ratio, Parseval's energy, the image shift of a tilt; and the lens field's structure."""

import math

import numpy as np
import pytest
import scipy.special
import torch

import config
import optics
import physics

LENS = config.defaults()["physics"]["lens"]


def wavefront(n, coeffs, hy=1.0, hx=0.0):
    rho, mask, _ = optics.pupil_coords(n)
    W = optics.seidel_wavefront(rho.view(1, -1, 1), rho.view(1, 1, -1), torch.tensor([[[hy]]], dtype=torch.float64),
                                torch.tensor([[[hx]]], dtype=torch.float64), coeffs)
    return W, mask


def test_unaberrated_pupil_gives_the_airy_pattern():
    """[2 J1(v)/v]², v = π r p/(λN), point-sampled, to 1e-4 of the peak (a 256-sample pupil)."""
    n, lam, N, p, k = 256, 0.55, 2.0, 0.5, 21
    I = optics.intensity(torch.zeros(1, n, n, dtype=torch.float64), lam, N, p, k, 1, n)[0]
    s = optics.sample_offsets(k, 1)
    v = (math.pi * torch.sqrt(s[:, None] ** 2 + s[None, :] ** 2) * p / (lam * N)).numpy()
    airy = np.where(v == 0, 1.0, (2 * scipy.special.j1(v) / np.where(v == 0, 1, v)) ** 2)
    np.testing.assert_allclose((I / I.max()).numpy(), airy, atol=1e-4)
    # E(0) is the pupil's area: the peak is π² for the unit disc
    assert float(I.max()) == pytest.approx(math.pi ** 2, rel=2e-3)


@pytest.mark.parametrize("coeffs", [{"W222": 0.15}, {"W040": 0.3, "W020": -0.3}, {"W131": 0.05}, {"W220": 0.08}])
def test_small_aberrations_follow_marechal(coeffs):
    """Strehl ratio (peak over the unaberrated peak) ≈ exp(−(2πσ)²), σ the pupil's RMS wavefront
    error in waves (after removing its mean; tilt-free terms so the peak stays at the centre, or
    coma small enough that its shift costs < 0.2% of the peak)."""
    n, lam, N, p = 256, 0.55, 2.0, 0.5
    W, mask = wavefront(n, coeffs)
    mean = (W * mask).sum() / mask.sum()
    sigma = float(torch.sqrt(((W - mean) ** 2 * mask).sum() / mask.sum()))
    peak = optics.intensity(W, lam, N, p, 1, 1, n)[0, 0, 0]
    peak0 = optics.intensity(torch.zeros_like(W), lam, N, p, 1, 1, n)[0, 0, 0]
    assert 0.01 < sigma < 0.05
    assert float(peak / peak0) == pytest.approx(math.exp(-(2 * math.pi * sigma) ** 2), abs=4e-3)


def test_energy_is_conserved_whatever_the_aberration():
    """Parseval: an aberration moves light, it does not remove it. The unaberrated window's share of
    the pupil's light lies between the Airy encircled energies 1 − J0(v)² − J1(v)² of the window's
    inscribed and circumscribed circles, and every aberrated PSF keeps the same share (a few waves
    move the light far less than the window's half-width)."""
    lam, N, p, k, q, n = 0.55, 2.0, 1.0, 61, 2, 256
    total = optics.total_energy(lam, N, p, q, n)
    encircled = lambda r: 1 - scipy.special.j0(math.pi * r * p / (lam * N)) ** 2 \
        - scipy.special.j1(math.pi * r * p / (lam * N)) ** 2  # noqa: E731
    shares = []
    for coeffs in ({}, {"W222": 1.0, "W131": 1.0}, {"W020": 2.0}):
        W, _ = wavefront(n, coeffs, 0.6, 0.5)
        shares.append(float(optics.intensity(W, lam, N, p, k, q, n).sum()) / total)
    assert encircled(k / 2) < shares[0] < encircled(k / 2 * math.sqrt(2))
    assert shares[1:] == pytest.approx([shares[0]] * 2, abs=1e-3)


def test_a_tilt_shifts_the_image_by_its_closed_form():
    """W111 waves of tilt at the pupil edge move the PSF by 2·W111·λ_ref·N/p px along h, whatever the
    wavelength (the optical path is a length; lateral colour is a per-channel tilt): with W111 for
    exactly 1 px, the tilted intensity is the untilted one moved by one pixel."""
    n, N, p, k, q, ref = 128, 2.0, 3.0, 21, 3, 0.54
    W111 = p / (2 * ref * N)
    W, _ = wavefront(n, {"W111": W111}, 0.0, 1.0)
    for lam in (0.46, 0.6):
        tilted = optics.pixel_psfs(optics.intensity(W, lam, N, p, k, q, n, ref_um=ref), k, q)[0]
        plain = optics.pixel_psfs(optics.intensity(torch.zeros_like(W), lam, N, p, k, q, n), k, q)[0]
        np.testing.assert_allclose(tilted[:, 1:].numpy(), plain[:, :-1].numpy(), rtol=1e-9, atol=1e-12)


def test_lens_field_colours_and_truth():
    """Default lens: channels differ and widen from red to blue as configured, lateral colour
    separates the corner centroids, and the truth between nodes is not the node grid's model."""
    H = W = 64
    field = physics.SVBlurSimulator(H, W, 21, 4, dtype=torch.float64).simulate_field("lens", **LENS)
    grid = field.node_grid()
    assert grid.shape == (4, 4, 3, 21, 21) and field.channels == 3
    assert torch.allclose(grid.sum((-2, -1)), torch.ones(4, 4, 3, dtype=torch.float64))
    u = torch.arange(21, dtype=torch.float64) - 10
    cx = (grid.sum(-2) * u).sum(-1)                       # (4, 4, 3) column centroids
    var = (grid.sum(-2) * u ** 2).sum(-1) - cx ** 2 + (grid.sum(-1) * u ** 2).sum(-1) - (grid.sum(-1) * u).sum(-1) ** 2
    assert (var[..., 0] < var[..., 1]).all() and (var[..., 1] < var[..., 2]).all()     # R sharpest, B widest
    assert float((cx[0, 0, 0] - cx[0, 0, 2]).abs()) > 0.5                              # lateral colour at a corner
    # nodes are exact diffraction PSFs; the truth at a node is the fine grid's Gaussian blend
    ys, xs = field.node_coords()
    truth_at_nodes = field.psfs_on_grid(ys, xs)
    rel = float((truth_at_nodes - grid).norm() / grid.norm())
    assert 1e-4 < rel < 0.1


def test_mono_lens_and_bad_lens_settings():
    sim = physics.SVBlurSimulator(32, 32, 21, 2, dtype=torch.float64)
    mono = sim.simulate_field("lens", **{**LENS, "wavelengths_nm": [540.0], "longitudinal_colour": [0.0],
                                         "lateral_colour": [0.0]})
    assert mono.channels == 0 and mono.node_grid().shape == (2, 2, 21, 21)
    with pytest.raises(ValueError, match="one entry per wavelength"):
        sim.simulate_field("lens", **{**LENS, "lateral_colour": [0.0, 1.0]})
    with pytest.raises(ValueError, match="lose up to .* outside kernel_size=9"):
        physics.SVBlurSimulator(32, 32, 9, 2).simulate_field("lens", **LENS)
