"""PSF grids measured from calibration images of point sources (pinholes, beads, stars), and the
simulated calibration targets the estimator is tested and benchmarked on.

`estimate_psf_grid(image, grid_size, kernel_size)` finds the spots, rejects the ones it cannot
trust (noise, hot pixels, edges, saturation, overlaps), registers each accepted spot sub-pixel on
its centroid and fits each node's PSF from the spots around it (docs/calibration.md).
The forward models it feeds live in physics.py; this module only reads images.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

import config
import physics
import plots
import utils
from physics import PSFField, grid_node_coords, validate_kernel_size

log = logging.getLogger(__name__)

REJECTIONS = ("noise", "hot pixel", "edge", "saturated", "overlap")
MAX_EMPTY_FRACTION = 0.25  # more empty cells than this and the grid would be mostly guessed


def render_point_sources(field: PSFField, rows, cols, fluxes):
    """An (H, W) float64 image of point sources at sub-pixel positions (rows, cols) with the given
    fluxes, seen through `field`: every spot is the analytic PSF of its own position, displaced
    sub-pixel exactly (PSFField.shifted). Spots near the border are clipped by it."""
    img = np.zeros((field.H, field.W))
    r = field.k // 2
    for py, px, f in zip(rows, cols, fluxes):  # one small paste per spot
        iy, ix = int(round(py)), int(round(px))
        psf = field.shifted(py - iy, px - ix).psfs_on_grid(torch.tensor([py]), torch.tensor([px]))[0, 0]
        psf = psf.double().cpu().numpy()
        y0, x0 = max(iy - r, 0), max(ix - r, 0)
        y1, x1 = min(iy + r + 1, field.H), min(ix + r + 1, field.W)
        if y1 > y0 and x1 > x0:
            img[y0:y1, x0:x1] += f * psf[y0 - iy + r:y1 - iy + r, x0 - ix + r:x1 - ix + r]
    return img


def calibration_target(field: PSFField, snr: float, beads: bool, rng, background=10.0, read_noise=2.0):
    """A simulated calibration image through `field`, in photons: (image, rows, cols).

    beads=False: a regular array, one source per cell near its centre (±0.5 px, sub-pixel);
    beads=True: 3–8 sources per cell at random positions, none closer than k + 2 px. Every source
    has the same flux, set so that the median spot's peak SNR, A / √(A + background + read_noise²),
    is `snr`; Poisson and Gaussian read noise are added. rng: a numpy Generator.
    """
    H, W, G, k = field.H, field.W, field.G, field.k
    rows, cols = [], []
    for i in range(G):          # a few tries per source in each of G² cells
        for j in range(G):
            want, placed = (int(rng.integers(3, 9)) if beads else 1), 0
            for _ in range(200 * want):
                if placed == want:
                    break
                if beads:
                    y, x = (i + rng.uniform(0.05, 0.95)) * H / G, (j + rng.uniform(0.05, 0.95)) * W / G
                else:
                    y, x = (i + 0.5) * H / G - 0.5 + rng.uniform(-0.5, 0.5), (j + 0.5) * W / G - 0.5 + rng.uniform(-0.5, 0.5)
                inside = k <= y <= H - 1 - k and k <= x <= W - 1 - k
                if inside and all(max(abs(y - r), abs(x - c)) > k + 2 for r, c in zip(rows, cols)):
                    rows.append(y)
                    cols.append(x)
                    placed += 1
    unit = render_point_sources(field, rows, cols, np.ones(len(rows)))
    peak = np.median([unit[int(round(r)), int(round(c))] for r, c in zip(rows, cols)])
    b = background + read_noise ** 2
    flux = (snr ** 2 + np.sqrt(snr ** 4 + 4 * snr ** 2 * b)) / 2 / peak   # solves A/√(A + b) = snr for A
    img = rng.poisson(flux * unit + background) + rng.normal(0, read_noise, unit.shape)
    return img, np.array(rows), np.array(cols)


def centroid_errors(cal, rows, cols):
    """(pixel-locking slope, RMS position error in px) of a calibration's accepted spots against
    the nearest true sources of a simulated target (rows, cols from calibration_target; its PSFs
    centred, so a source's position is its spot's centre). The slope is that of the estimated
    against the true sub-pixel position: 1 is unbiased, below 1 pulled towards pixel centres."""
    est = np.array([(s["row"], s["col"]) for s in cal.spots if s["status"] == "accepted"])
    true = np.stack([rows, cols], 1)
    true = true[np.abs(est[:, None] - true[None]).max(-1).argmin(1)]
    phase = true - np.round(true)
    slope = np.polyfit(phase.ravel(), (est - np.round(true)).ravel(), 1)[0]
    return float(slope), float(np.sqrt(((est - true) ** 2).sum(1).mean()))


@dataclass
class Calibration:
    """What estimate_psf_grid measured. Arrays are numpy; spots are plain dicts."""
    psfs: object               # (G, G, k, k), or (G, G, C, k, k) in colour; float64, each ≥ 0 and summing to 1
    positions: object          # (G, G, 2) [row, col] of the cell centres
    spots: list                # {"row", "col", "snr", "status"}: status "accepted" or one of REJECTIONS
    counts: object             # (G, G) accepted spots per cell
    snr: object                # (G, G) median peak SNR of the accepted spots (0 where none)
    filled: list               # (i, j) cells filled from their neighbours
    noise: float               # robust noise std of the background-subtracted image
    narrow_sigma: float        # median σ (px) of the accepted spots along their narrow axis
    registration_error: float  # median estimated error of registering one spot sub-pixel (_near_nyquist)
    flux_outside: float = 0.0  # median share of an accepted spot's flux in the 3-px ring outside the k×k kernel

    def rejected(self) -> dict:
        return {r: sum(s["status"] == r for s in self.spots) for r in REJECTIONS}


def _background(img, tile):
    """A smooth background: sigma-clipped medians of tile×tile blocks, interpolated bilinearly
    (as astronomers' 2-D background estimators do), and the robust noise std (MAD) around it."""
    from skimage.transform import resize
    H, W = img.shape
    ny, nx = max(1, H // tile), max(1, W // tile)
    med = np.empty((ny, nx))
    for i in range(ny):        # a few dozen tiles: a loop over blocks, not pixels
        for j in range(nx):
            block = img[i * H // ny:(i + 1) * H // ny, j * W // nx:(j + 1) * W // nx].ravel()
            for _ in range(3):  # clip the spots out of the block's statistics
                m, s = np.median(block), 1.4826 * np.median(np.abs(block - np.median(block)))
                block = block[block <= m + 3 * max(s, 1e-12)]
            med[i, j] = np.median(block)
    bg = resize(med, (H, W), order=1, mode="edge") if med.size > 1 else np.full((H, W), med[0, 0])
    resid = img - bg
    noise = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    return bg, max(float(noise), 1e-12 * max(float(np.abs(img).max()), 1e-300))


def _classify(img, raw, peaks, noise, k, threshold, saturation):
    """Status of each candidate peak: accepted, or the first reason to reject it."""
    H, W = img.shape
    R = k // 2 + 3                               # the cut-out below needs k + 6 pixels around the peak
    status = []
    for r, c in peaks:                           # tens to thousands of spots, each a few pixel reads
        win = img[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
        neighbours = np.sort(win.ravel())[-2] if win.size > 1 else 0.0
        if win.sum() < threshold * 3 * noise:    # the 3×3 flux is not significant: a noise peak
            status.append("noise")
        elif neighbours < 0.15 * img[r, c]:      # a lone bright pixel: no PSF is that sharp
            status.append("hot pixel")
        elif r < R or c < R or r >= H - R or c >= W - R:
            status.append("edge")
        elif saturation is not None and (raw[r - R:r + R + 1, c - R:c + R + 1] >= saturation).sum() >= 2:
            status.append("saturated")           # a clipped, flat top (one pixel at the maximum is not)
        else:
            status.append("accepted")
    # Overlap: two real spots whose k×k boxes intersect; both are unusable.
    real = np.array([i for i, s in enumerate(status) if s not in ("noise", "hot pixel")], dtype=int)
    if real.size > 1:
        p = np.asarray(peaks)[real]
        d = np.abs(p[:, None, :] - p[None, :, :]).max(-1)   # Chebyshev distance between peaks
        np.fill_diagonal(d, k)
        for i in real[(d < k).any(1)]:
            status[i] = "overlap"
    return status


def _raw_peak(img, r, c):
    """A maximum of the smoothed image can sit a pixel off the raw one: the raw maximum nearby."""
    r0, c0 = max(r - 1, 0), max(c - 1, 0)
    win = img[r0:r + 2, c0:c + 2]
    dr, dc = np.unravel_index(np.argmax(win), win.shape)
    return int(r0 + dr), int(c0 + dc)


def _box(img, cy, cx, h):
    """The (2h + 1)² pixels around the pixel nearest (cy, cx), and that pixel's row and column."""
    ry, rx = int(round(cy)), int(round(cx))
    return img[ry - h:ry + h + 1, rx - h:rx + h + 1], ry, rx


def _fits(img, cy, cx, h) -> bool:
    """Whether the (2h + 1)² box around the pixel nearest (cy, cx) lies inside the image."""
    ry, rx = int(round(cy)), int(round(cx))
    return h <= ry < img.shape[0] - h and h <= rx < img.shape[1] - h


CENTROID_TOL, CENTROID_MAX_ITER = 1e-4, 50   # px; the weighted centroid halves its error each iteration


def _centroid(img, r, c, k):
    """Sub-pixel centre: the iteratively weighted centroid (Baker & Moallem 2007, Opt. Express 15,
    5147), starting from the raw peak (r, c).

    Each iteration takes the centroid of the background-subtracted pixels times a Gaussian window
    of the spot's own width, centred on the current *sub-pixel* estimate, and moves there. Its
    fixed point is the centre of any symmetric spot. Why not the plain centroid of a box: a box
    centred on the nearest pixel, with negative pixels clipped to zero (as this used to be), adds
    a uniform positive flux that pulls the estimate towards that pixel (pixel locking; measured at
    background 1000, peak SNR 20: slope 0.86, RMS 0.20 px), and the noise of every pixel in the
    box enters in proportion to its distance. The window keeps the pixels where the spot is (at
    that background: slope 1.01, RMS 0.06 px). A Gaussian fit would do as well for Gaussian
    spots, but not for disks or coma; the weighted centroid asks no model. For an asymmetric spot
    (coma) the fixed point sits nearer the peak than the intensity centroid would: a consistent
    registration point across spots, not the centroid itself."""
    h = k // 2
    if not _fits(img, r, c, h):
        return float(r), float(c)
    width = min(max(math.sqrt(np.mean(_second_moments(img, r, c, k)[:2])), 0.8), h / 2)
    v = np.arange(-h, h + 1, dtype=np.float64)
    cy, cx = float(r), float(c)
    for _ in range(CENTROID_MAX_ITER):
        if not _fits(img, cy, cx, h):      # never past the image edge: the caller rejects such a spot
            break
        box, ry, rx = _box(img, cy, cx, h)
        dy, dx = v[:, None] + (ry - cy), v[None, :] + (rx - cx)
        w = box * np.exp(-(dy ** 2 + dx ** 2) / (2 * width ** 2))
        total = w.sum()
        if total <= 0:
            break
        sy, sx = (w * dy).sum() / total, (w * dx).sum() / total
        cy, cx = cy + sy, cx + sx
        if max(abs(sy), abs(sx)) < CENTROID_TOL:
            break
    return cy, cx


# The median share of the accepted spots' flux in a 3-px ring outside the k×k kernel. Measured on
# the simulated targets (Nyquist-sampled Gaussians and disks, arrays and beads, SNR 20-100): at most
# 0.2% (any one spot: 2.3%); Gaussians of sigma 1-3 px in a 5×5 kernel 33%, in 3×3 63%; a photograph
# (scikit-image's camera) 25%. Above OUTSIDE_WARN a warning gives the share, above OUTSIDE_MAX the
# calibration is refused.
OUTSIDE_WARN, OUTSIDE_MAX = 0.02, 0.10


def _flux_outside(img, cy, cx, k):
    """Share of the background-subtracted flux in the 3-px ring around the k×k box at (cy, cx)."""
    inner, outer = _box(img, cy, cx, k // 2)[0].sum(), _box(img, cy, cx, k // 2 + 3)[0].sum()
    return float(np.clip((outer - inner) / outer, 0, 1)) if outer > 0 else 0.0


NEAR_NYQUIST = 0.45       # cycles/px: the band that no interpolation can shift correctly
REGISTRATION_WARN = 0.05  # above this estimated registration error the spots are called undersampled


def _near_nyquist(img, cy, cx, k, noise):
    """The share of a spot's amplitude at spatial frequencies ≥ NEAR_NYQUIST cycles/px,
    √(P_high / P_all), from its raw k×k pixels with the background noise's power (k²·noise² per
    bin) subtracted. Content there is aliased or nearly so, and a sub-pixel shift by interpolation
    gets it wrong. Against the error of registering one noise-free spot by cubic spline with its
    true offset (bench section 5; tests), the share is within about 2 points, for Gaussians of σ
    0.6-1.5 px and disks of radius 2-4 px with any rim. The spot's own shot noise is not
    subtracted (the gain is unknown): well-sampled spots read up to 3.7% at peak SNR 20, 5-8% at 10."""
    power = np.abs(np.fft.fft2(_box(img, cy, cx, k // 2)[0])) ** 2
    f = np.fft.fftfreq(k)
    high = np.hypot(f[:, None], f[None, :]) >= NEAR_NYQUIST
    noise_power = k * k * noise ** 2
    p_high = power[high].sum() - high.sum() * noise_power
    p_all = power.sum() - power.size * noise_power
    return math.sqrt(max(p_high, 0.0) / p_all) if p_all > 0 else 0.0


def _second_moments(img, cy, cx, k):
    """(var_y, var_x, cov_yx) of a spot about (cy, cx), in px², before any interpolation (which
    would widen it), in a disk that shrinks to 3σ + 1 px (twice; σ along the narrow axis) so that
    the background noise of the whole box does not swamp a narrow spot. Zeros if the disk holds no
    positive flux."""
    h = k // 2
    box, ry, rx = _box(img, cy, cx, h)
    v = np.arange(-h, h + 1)
    yy, xx = v[:, None] + (ry - cy), v[None, :] + (rx - cx)
    radius, moments = float(h), (0.0, 0.0, 0.0)
    for _ in range(3):
        w = box * (yy ** 2 + xx ** 2 <= radius ** 2)
        total = w.sum()
        if total <= 0:
            return 0.0, 0.0, 0.0
        moments = a, b, c = (w * yy * yy).sum() / total, (w * xx * xx).sum() / total, (w * yy * xx).sum() / total
        radius = min(float(h), max(2.0, 3 * _narrow(a, b, c) + 1))
    return moments


def _narrow(a, b, c):
    """σ along the narrow axis: the square root of the smaller eigenvalue of [[a, c], [c, b]]."""
    return math.sqrt(max((a + b) / 2 - math.sqrt(((a - b) / 2) ** 2 + c * c), 0.0))


def _narrow_sigma(img, cy, cx, k):
    """σ along a spot's narrow axis, in px (_second_moments)."""
    return _narrow(*_second_moments(img, cy, cx, k))


def _registered_cutout(img, cy, cx, k):
    """The k×k PSF around (cy, cx), shifted sub-pixel (cubic spline) so that the centroid sits on
    the kernel centre, normalised to sum 1; and the flux it was divided by."""
    from scipy.ndimage import shift
    box, ry, rx = _box(img, cy, cx, k // 2 + 3)   # 3 px more each side for the spline's reach
    box = shift(box, (ry - cy, rx - cx), order=3, mode="constant")[3:-3, 3:-3]
    return box / box.sum(), float(box.sum())


def luminance_image(img):
    """(H, W, C) -> (H, W): the Rec. 709 luminance of an RGB image, else the channel mean (a gray
    image's own values): what spots are found and centred on."""
    return img @ np.array(physics.LUMINANCE_WEIGHTS) if img.shape[-1] == 3 else img.mean(-1)


def _cutter(chans, tile):
    """cut(img, noise, cy, cx, k) -> (registered PSF, its pixels' noise variance): of the gray image
    itself, or (chans given) of every colour channel at the same (cy, cx), each channel's own
    background taken out: ((C, k, k), (C,))."""
    if chans is None:
        def cut(img, noise, cy, cx, k):
            psf, flux = _registered_cutout(img, cy, cx, k)
            return psf, (noise / flux) ** 2
        return cut
    planes = [_background(chans[..., c], tile) for c in range(chans.shape[-1])]
    planes = [(chans[..., c] - bg, n) for c, (bg, n) in enumerate(planes)]

    def cut(img, noise, cy, cx, k):
        parts = [(_registered_cutout(p, cy, cx, k), n) for p, n in planes]
        return np.stack([psf for (psf, _), _ in parts]), np.array([(n / flux) ** 2 for (_, flux), n in parts])
    return cut


def estimate_psf_grid(image, grid_size: int, kernel_size: int, saturation=None, threshold: float = 5.0) -> Calibration:
    """Measures a (G, G, k, k) PSF grid from an image of point sources (pinholes, beads, stars).

    1. Background: sigma-clipped tile medians, bilinearly interpolated; noise by MAD.
    2. Detection: local maxima (scikit-image peak_local_max) of the lightly smoothed image above
       `threshold`·noise.
    3. Rejection of noise peaks, hot pixels, spots clipped by the edge (at the raw peak, and again
       where the centroid puts the cut-out), saturated spots (two or more pixels of the box ≥
       `saturation`, in image units) and overlapping pairs.
    4. Sub-pixel centroid; each spot cut out at k×k, shifted so its centroid is the kernel centre,
       and normalised to sum 1.
    5. Spots are assigned to a G×G grid of equal cells; each cell's spots make its "effective PSF"
       at the node (their average; with enough spots nearby, a local quadratic fit across the
       neighbouring cells evaluated at the node: _node_psf); empty cells are filled from their
       neighbours, and more than MAX_EMPTY_FRACTION empty cells is an error naming them.
       Each spot's narrow-axis σ and the share of its amplitude near the Nyquist frequency (an
       estimate of its registration error) are measured on its raw pixels (_narrow_sigma,
       _near_nyquist), to tell the user when the spots are undersampled.

    image: (H, W) float, gray, any linear scale; or (H, W, C) colour, which gives a colour grid
    (G, G, C, k, k): spots are found, checked and centred on the luminance (Rec. 709 for RGB, else
    the channel mean), then every channel is cut out at that one position, so the channels'
    offsets from each other (lateral colour) stay in their PSFs; a spot clipped in any channel
    is saturated. Raises ValueError on unusable input.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max
    validate_kernel_size(kernel_size)
    img0 = np.asarray(image, dtype=np.float64)
    if img0.ndim == 3 and img0.shape[-1] == 1:
        img0 = img0[..., 0]
    if img0.ndim not in (2, 3):
        raise ValueError(f"calibration image must be (H, W) gray or (H, W, C) colour, got shape {img0.shape}")
    chans = img0 if img0.ndim == 3 else None
    if chans is not None:
        img0 = luminance_image(chans)
    G, k, (H, W) = grid_size, kernel_size, img0.shape
    if min(H, W) < 2 * k or G < 1 or min(H, W) // G < k:
        raise ValueError(f"a {H}x{W} calibration image cannot hold a {G}x{G} grid of {k}x{k} PSFs "
                         f"(each cell needs at least {k} px; lower grid_size or kernel_size)")
    # 1-2. Background, noise and candidate peaks (smoothing makes flat-topped disks unimodal).
    bg, noise = _background(img0, max(2 * k, min(H, W) // 8))
    img = img0 - bg
    smooth = gaussian_filter(img, max(1.0, k / 10))
    s_noise = 1.4826 * np.median(np.abs(smooth - np.median(smooth)))
    peaks = peak_local_max(smooth, min_distance=max(2, k // 4), threshold_abs=threshold * max(s_noise, 1e-300),
                           exclude_border=False)
    peaks = [_raw_peak(img, r, c) for r, c in peaks]
    status = _classify(img, img0 if chans is None else chans.max(-1), peaks, noise, k, threshold, saturation)
    cut = _cutter(chans, max(2 * k, min(H, W) // 8))
    spots = [{"row": float(r), "col": float(c), "snr": float(img[r, c] / noise), "status": s}
             for (r, c), s in zip(peaks, status)]
    # 3-4. Registered cut-outs of the accepted spots, collected per cell with their positions.
    cells = [[[] for _ in range(G)] for _ in range(G)]
    for s in spots:
        if s["status"] != "accepted":
            continue
        cy, cx = _centroid(img, int(s["row"]), int(s["col"]), k)
        if not _fits(img, cy, cx, k // 2 + 3):  # the cut-out is taken where registration puts the spot:
            s["status"] = "edge"                # a tail (coma at the field edge) can pull it off the image
            continue
        s["row"], s["col"], s["sigma"] = cy, cx, _narrow_sigma(img, cy, cx, k)
        s["near_nyquist"], s["outside"] = _near_nyquist(img, cy, cx, k, noise), _flux_outside(img, cy, cx, k)
        i, j = min(int((cy + 0.5) * G / H), G - 1), min(int((cx + 0.5) * G / W), G - 1)
        psf, variance = cut(img, noise, cy, cx, k)
        cells[i][j].append((psf, cy, cx, s["snr"], variance))   # with its pixels' noise variance
    check_point_like(spots, k)
    return _assemble_grid(cells, spots, noise, H, W, k)


def check_point_like(spots, k) -> None:
    """Refuses a calibration whose accepted spots keep more than OUTSIDE_MAX of their flux outside
    the kernel: the kernel cuts them off (too small for these PSFs), or they are not point sources
    at all (a photograph)."""
    shares = [s["outside"] for s in spots if s["status"] == "accepted"]
    if shares and np.median(shares) > OUTSIDE_MAX:
        raise ValueError(f"a median {100 * np.median(shares):.0f}% of the accepted spots' flux lies outside the "
                         f"{k}x{k} kernel (point sources that fit keep under {100 * OUTSIDE_WARN:.0f}%): kernel_size "
                         f"is too small for these PSFs, or the image is not of point sources")


LOCAL_FIT_RADIUS = 1.2   # cells: how far from a node the spots of a local fit may lie
LOCAL_FIT_MIN_SPOTS = 10  # fewer within that radius (an array target has 5): the cell's own mean


def _node_psf(own, pos, P, V, node_y, node_x, cell_h, cell_w):
    """The effective PSF at one node (k², flat) and the noise variance of each of its pixels.

    With LOCAL_FIT_MIN_SPOTS or more spots within LOCAL_FIT_RADIUS cells (bead targets), a
    per-pixel quadratic fit of the PSF against position, P(p) ≈ a + b·d + d·C·d with d = p − node,
    weighted by a tricube of the distance (LOESS): a is the PSF at the node. The spots of the
    neighbouring cells pin the curvature that one cell's 3-8 spots cannot (measured: 9.7 -> 8.7%
    for the bench's defocus beads at SNR 100, and 5.4 -> 4.2% for a fast-varying Gaussian field).
    Otherwise (one spot per cell: an array target, whose spot sits at the node) the plain mean of
    the cell's own spots.
    Both are linear in the spots' PSFs, a = Σᵢ Lᵢ Pᵢ, so the node's pixel variance is Σᵢ Lᵢ² Vᵢ.
    own: this cell's spots, each (psf (k, k), row, col, snr, variance); pos (N, 2) [row, col], P
    (N, k²) and V (N,) the positions, flattened PSFs and pixel variances of every accepted spot,
    built once for all nodes.
    """
    dy, dx = (pos[:, 0] - node_y) / cell_h, (pos[:, 1] - node_x) / cell_w
    near = np.flatnonzero(np.hypot(dy, dx) < LOCAL_FIT_RADIUS)
    if len(near) < LOCAL_FIT_MIN_SPOTS:
        return np.mean([s[0].ravel() for s in own], 0), sum(s[4] for s in own) / len(own) ** 2
    y, x = dy[near], dx[near]
    w = np.sqrt((1 - (np.hypot(y, x) / LOCAL_FIT_RADIUS) ** 3) ** 3)        # √tricube: weighted least squares
    X = np.stack([np.ones_like(y), y, x, y * y, x * x, y * x], 1) * w[:, None]  # (n, 6)
    L = np.linalg.pinv(X)[0] * w              # the fit's first coefficient is a = L @ P[near]
    return L @ P[near], (L ** 2) @ V[near]     # V (N,) or, colour, (N, C): one variance per channel


NOISE_TAU = 2.0  # standard errors: a pixel whose 3×3 mean is within this of zero is mostly noise


def _suppress_noise(psf, variance):
    """A node PSF with the background noise of its empty pixels taken out: each pixel scaled by
    (1 − τ²·σ²/m²)₊, where m is its 3×3 neighbourhood mean and σ² = variance/9 that mean's noise
    variance (a non-negative garrote, Breiman 1995, as in Donoho-Johnstone thresholding, decided
    on a local mean so that a faint but extended wing, significant over nine pixels, survives).

    Why: at a high background the noise is spread evenly over the k×k kernel, while the PSF
    occupies a few pixels of it. At peak SNR 20 and 1000 photons of background, with every spot
    registered at its true position, the noise of the empty pixels alone left 28% L2 error
    (11% at 10 photons). Pixels well above the noise (the core, real wings) keep their value to
    within (τσ/m)²."""
    from scipy.ndimage import uniform_filter
    m = uniform_filter(psf, 3, mode="constant")
    return psf * np.clip(1 - NOISE_TAU ** 2 * (variance / 9) / np.maximum(m * m, 1e-300), 0, None)


def _rejection_hint(rejected, many):
    """What most likely went wrong when more than `many` spots were rejected for one reason."""
    if rejected["overlap"] > many:
        return "; is kernel_size larger than the spot spacing?"
    if rejected["hot pixel"] > many:
        return ("; spots one pixel wide cannot be told from hot pixels: are the PSFs undersampled "
                "(image with more magnification)?")
    return ""


def _assemble_grid(cells, spots, noise, H, W, k) -> Calibration:
    """5. Cell PSFs; empty cells filled from their neighbours, or an error when too many."""
    G = len(cells)
    counts = np.array([[len(cells[i][j]) for j in range(G)] for i in range(G)])
    rejected = {r: sum(s["status"] == r for s in spots) for r in REJECTIONS}
    why = ", ".join(f"{n} {r}" for r, n in rejected.items() if n) or "none"
    if counts.sum() == 0:
        hint = _rejection_hint(rejected, len(spots) / 2)
        raise ValueError(f"no usable point sources in the calibration image ({len(spots)} candidates rejected: {why}){hint}")
    empty = [(int(i), int(j)) for i, j in np.argwhere(counts == 0)]
    if len(empty) > MAX_EMPTY_FRACTION * G * G:
        hint = _rejection_hint(rejected, counts.sum())
        raise ValueError(f"{len(empty)} of {G * G} grid cells have no usable spot (rows, cols {empty[:12]}"
                         f"{'...' if len(empty) > 12 else ''}); spread point sources over the whole field or lower "
                         f"grid_size (rejected: {why}){hint}")
    ys, xs = grid_node_coords(G, H).numpy(), grid_node_coords(G, W).numpy()
    every = [s for row in cells for cell in row for s in cell]
    shape = every[0][0].shape                                       # (k, k), or (C, k, k) in colour
    psfs = np.full((G, G) + shape, np.nan)
    pos = np.array([(s[1], s[2]) for s in every])                   # (N, 2)
    P = np.stack([s[0].ravel() for s in every])                     # (N, k²)
    V = np.array([s[4] for s in every])                             # (N,)
    for i, j in np.argwhere(counts > 0):
        psf, variance = _node_psf(cells[i][j], pos, P, V, ys[i], xs[j], H / G, W / G)
        psf = psf.reshape(shape)
        psfs[i, j] = _suppress_noise(psf, variance) if len(shape) == 2 else \
            np.stack([_suppress_noise(p, v) for p, v in zip(psf, variance)])
    todo = list(empty)
    while todo:  # fill from filled 8-neighbours, outward
        done = []
        for i, j in todo:
            nb = psfs[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].reshape((-1,) + shape)
            nb = nb[~np.isnan(nb.reshape(len(nb), -1)[:, 0])]
            if len(nb):
                done.append(((i, j), nb.mean(0)))
        for (i, j), p in done:
            psfs[i, j] = p
        todo = [c for c in todo if np.isnan(psfs[c].flat[0])]
    psfs = np.clip(psfs, 0, None)
    psfs /= psfs.sum((-2, -1), keepdims=True)
    snr = np.array([[np.median([m[3] for m in cells[i][j]]) if cells[i][j] else 0.0 for j in range(G)]
                    for i in range(G)])
    accepted = [s for s in spots if s["status"] == "accepted"]
    narrow, aliased, outside = (float(np.median([s[key] for s in accepted]))
                                for key in ("sigma", "near_nyquist", "outside"))
    return Calibration(psfs, np.stack(np.meshgrid(ys, xs, indexing="ij"), -1), spots, counts, snr, empty, noise, narrow,
                       aliased, outside)


# ----------------------------------------------------------------------------
# The --calibration run: an image of point sources in, a PSF grid file and its pictures out
# ----------------------------------------------------------------------------

def calibrate(cfg) -> int:
    """--calibration: measures the PSF grid from an image of point sources (calibration.estimate_psf_grid),
    writes it (--save_psf_grid, else RUN_DIR/psf_grid.npz) with pictures and calibration.json, and
    exits. Nothing is written when the image cannot give a grid."""
    d, pc, rc = cfg["data"], cfg["physics"], cfg["run"]
    img = utils.read_image(d["calibration"])                       # (H, W, C) in [0, 1]
    if img.shape[-1] == 3:
        log.info("RGB calibration image: one PSF per channel, every channel cut out at its spot's luminance "
                 "centroid, so lateral colour (the channels' offsets) is kept")
    G, k = config.resolve_grid_size(pc), pc["kernel_size"]
    saturation = saturation_level(d["calibration"], d["saturation"], img.max(-1))
    try:  # spots with clipped pixels (in any channel) are rejected as saturated
        cal = estimate_psf_grid(img if img.shape[-1] == 3 else img[..., 0], G, k, saturation=saturation)
    except ValueError as e:
        raise utils.UserError(f"{d['calibration']}: {e}") from None
    utils.check_writable(rc["save_dir"])
    if d["save_psf_grid"]:
        utils.check_writable(os.path.dirname(os.path.abspath(d["save_psf_grid"])))
    run_dir = utils.make_run_dir(rc["save_dir"], prefix="calibration")
    os.makedirs(os.path.join(run_dir, "images"))
    coords = (cal.positions[:, 0, 0], cal.positions[0, :, 1])
    for path in {os.path.join(run_dir, "psf_grid.npz"), d["save_psf_grid"] or os.path.join(run_dir, "psf_grid.npz")}:
        utils.save_psf_grid(path, cal.psfs, coords)
    report = {"image": d["calibration"], "grid_size": G, "kernel_size": k, "noise": cal.noise,
              "spots_accepted": int(cal.counts.sum()), "spots_rejected": cal.rejected(),
              "cells_filled_from_neighbours": [list(c) for c in cal.filled],
              "spots_per_cell": cal.counts.tolist(), "median_peak_snr_per_cell": cal.snr.round(2).tolist(),
              "saturation": round(saturation * utils.full_scale(d["calibration"]), 3),
              "median_narrow_axis_sigma_px": round(cal.narrow_sigma, 3),
              "registration_error_estimate": round(cal.registration_error, 4),
              "flux_outside_kernel": round(cal.flux_outside, 4)}
    utils.write_json(os.path.join(run_dir, "calibration.json"), report)
    config.save_yaml(os.path.join(run_dir, "config.yaml"), cfg)
    plots.plot_calibration_spots(os.path.join(run_dir, "images", "spots.png"), luminance_image(img), cal.spots)
    plots.plot_psf_grid(os.path.join(run_dir, "images", "psf_grid.png"), cal.psfs)
    plots.plot_cell_map(os.path.join(run_dir, "images", "cells.png"), cal.counts, cal.snr)
    log.info("%d spots accepted; rejected: %s", cal.counts.sum(),
             ", ".join(f"{n} {r}" for r, n in cal.rejected().items() if n) or "none")
    if cal.registration_error > REGISTRATION_WARN:
        log.warning("the spots look undersampled: %.0f%% of their amplitude lies near the Nyquist frequency, so "
                    "registering one spot sub-pixel errs by about as much (median sigma %.2f px along the narrow "
                    "axis; a Gaussian needs 0.8 px, a disk's rim a blur of 0.5 px or more). More magnification "
                    "(smaller pixels) would help; but faint spots (peak SNR 10 or less) read 5-8%% from their "
                    "shot noise alone (docs/calibration.md)", 100 * cal.registration_error, cal.narrow_sigma)
    if cal.flux_outside > OUTSIDE_WARN:
        log.warning("a median %.0f%% of the spots' flux lies outside the %dx%d kernel: the grid's PSFs are cut off "
                    "there; increase kernel_size", 100 * cal.flux_outside, k, k)
    if cal.filled:
        log.warning("%d cell(s) had no usable spot and were filled from their neighbours: %s", len(cal.filled),
                    ", ".join(map(str, cal.filled)))
    log.info("PSF grid %s written to %s", "x".join(map(str, cal.psfs.shape)),
             d["save_psf_grid"] or os.path.join(run_dir, "psf_grid.npz"))
    print(run_dir)
    return 0


PLATEAU_PIXELS = 4   # this many pixels exactly at the image's maximum: a clipped plateau, not a peak


def saturation_level(path, given, img):
    """The saturation threshold on read_image's [0, 1] scale, with an info line saying where it came
    from: --saturation (file units); the TIFF's declared maximum sample; a plateau (PLATEAU_PIXELS
    or more pixels exactly at the image's maximum: what a 12- or 14-bit camera clipping inside a
    16-bit file leaves); else 0.999 of the file's range."""
    scale, name = utils.full_scale(path), os.path.basename(path)
    if given != "auto":
        if not 0 < given <= scale:
            raise utils.UserError(f"--saturation must be in (0, {scale:g}] for {name} (its full scale), got {given:g}")
        log.info("%s: saturation at %g (--saturation, of %g full scale)", name, given, scale)
        return given / scale
    declared = utils.declared_max_sample(path)
    if declared is not None:
        log.info("%s: saturation at %g, the maximum sample value the file declares", name, declared)
        return declared / scale
    top = float(img.max())
    at_top = int((img == top).sum())
    if at_top >= PLATEAU_PIXELS and top < 0.999:
        log.info("%s: %d pixels sit exactly at the image's maximum %g (of %g full scale): treated as the camera's "
                 "saturation; set --saturation if that is wrong", name, at_top, round(top * scale, 3), scale)
        return top
    return 0.999
