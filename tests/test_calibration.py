"""PSF grids measured from calibration images of point sources, against the known per-pixel truth."""

import json
import os

import numpy as np
import pytest
import tifffile
import torch

import calibration
import physics
from helpers import cli

FIELD = dict(sigma_scale=1.2, mu_scale=0.0)  # correlated Gaussians centred on their source
# (a PSF's offset from its source cannot be measured without knowing where the sources are: the
# calibration centres every PSF on its centroid, so the truth used here has none)


def field_and_target(snr, beads, H=256, G=4, k=15, seed=0, field=FIELD, mode="correlated"):
    field = physics.SVBlurSimulator(H, H, k, G, dtype=torch.float64).simulate_field(mode, seed=seed, **field)
    img, rows, cols = calibration.calibration_target(field, snr, beads, np.random.default_rng(seed))
    return field, img


def erase(img, rows, cols, seed=1):
    """The sources in img[rows, cols] removed: fresh background of the same statistics instead."""
    out = img.copy()
    rng = np.random.default_rng(seed)
    region = out[rows, cols]
    out[rows, cols] = rng.poisson(10.0, region.shape) + rng.normal(0, 2.0, region.shape)
    return out


def rel_error(est, true):
    return float(np.linalg.norm(est - true) / np.linalg.norm(true))


# Nyquist-sampled PSFs, as a microscope sampled at Nyquist (pixel = λ/4NA) records them:
# - Gaussians 1-3 px wide (the simulator's default sigma_scale; 21x21 kernels, so 384x384 to fit
#   3-8 beads per cell), on the six fields of bench/bench_calibration.py section 3;
# - defocus disks of radius 1-4.4 px whose rim is blurred by the Airy core (edge_sigma 0.84 px).
#   The disk field has no random draw: the seed moves the sources and the noise.
# Narrower Gaussians (sigma < 0.8 px) and disks with a 1-px rim are undersampled, and one spot
# cannot be registered sub-pixel to 5% (docs/calibration.md).
NYQUIST = {"gaussians": dict(mode="correlated", field=dict(sigma_scale=2.0, mu_scale=0.0), H=384, k=21),
           "disks": dict(mode="defocus", field=dict(max_radius=4.4, edge_sigma=0.84), H=256, k=15)}
# Field 4 curves within its cells faster than 3-8 beads per cell can follow (7.2% at SNR 100); a
# known limit, kept visible: the test fails if it starts to pass, so the docs can be updated.
CURVES = pytest.mark.xfail(strict=True, reason="beads on field 4: the PSF curves within cells (docs/calibration.md)")
CASES = [pytest.param(psfs, seed, beads, snr, bound, id=f"{psfs}-{'beads' if beads else 'array'}-{seed}-snr{snr}",
                      marks=[CURVES] if (psfs, seed, beads, snr) == ("gaussians", 4, True, 100) else [])
         for psfs, seeds in (("gaussians", range(6)), ("disks", range(3)))
         for beads in (False, True) for seed in seeds for snr, bound in ((100, 0.05), (20, 0.15))]


@pytest.mark.parametrize("psfs,seed,beads,snr,bound", CASES)
def test_estimated_grid_matches_true_node_psfs(psfs, seed, beads, snr, bound):
    field, img = field_and_target(snr, beads, seed=seed, **NYQUIST[psfs])
    k = NYQUIST[psfs]["k"]
    cal = calibration.estimate_psf_grid(img, 4, k)
    assert cal.counts.min() >= (3 if beads else 1) and not cal.filled
    err = rel_error(cal.psfs, field.node_grid().numpy())
    assert err <= bound, err
    assert np.allclose(cal.psfs.sum((-2, -1)), 1) and (cal.psfs >= 0).all()


def test_where_beads_miss_the_node_psfs_the_blur_is_still_as_right():
    """The xfail above (beads, field 4, SNR 100: node PSFs 7.2% off) costs a restoration nothing:
    against the per-pixel truth, on a random scene, the estimated grid's operator (bilinear between
    nodes) errs no more than the true node grid's, to 1%. The local fit gives each node the field
    around it, which interpolation between nodes needs. (The field's mean PSF at every node: 1.7x.)"""
    field, img = field_and_target(100, True, seed=4, **NYQUIST["gaussians"])
    H, r = field.H, field.k // 2
    truth = physics.GroundTruthBlur(field, "scatter")
    x_ext = torch.rand(1, 1, H + 2 * r, H + 2 * r, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_ext[..., r:r + H, r:r + H]

    def operator_error(grid):
        op = physics.GridSVBlurOperator(torch.as_tensor(grid), H, H, "scatter", "reflect", "bilinear")
        return physics.operator_relative_error(op, truth, x, x_ext)
    true_grid = field.node_grid()
    estimated = calibration.estimate_psf_grid(img, 4, field.k).psfs
    assert rel_error(estimated, true_grid.numpy()) > 0.05          # the miss is still there
    assert operator_error(estimated) <= 1.01 * operator_error(true_grid)


def test_spatial_variation_is_recovered_not_averaged_away():
    """Each cell's PSF is closer to its own node PSF than to the field's mean PSF."""
    field, img = field_and_target(100, beads=False)
    cal = calibration.estimate_psf_grid(img, 4, 15)
    true = field.node_grid().numpy()
    mean = true.mean((0, 1))
    own = np.linalg.norm(cal.psfs - true, axis=(-2, -1))
    other = np.linalg.norm(cal.psfs - mean, axis=(-2, -1))
    assert (own < other).mean() > 0.9


def test_rejections_hot_pixel_edge_saturation_overlap():
    field, img = field_and_target(100, beads=False, seed=1)
    img = img.copy()
    img[100, 3] = img.max() * 2                       # a hot pixel
    unit = calibration.render_point_sources(field, [2.3, 60.0, 60.0 + 7], [120.0, 200.0, 200.0 + 5], [5e4, 5e4, 5e4])
    img = img + unit                                  # a spot cut by the top edge and an overlapping pair
    sat = img.max() * 0.9
    bright = calibration.render_point_sources(field, [180.0], [100.0], [1e7])
    img = np.minimum(img + bright, sat)               # one saturated spot, clipped at the sensor's maximum
    cal = calibration.estimate_psf_grid(img, 4, 15, saturation=sat)
    rej = cal.rejected()
    assert rej["hot pixel"] >= 1 and rej["edge"] >= 1 and rej["overlap"] >= 2 and rej["saturated"] >= 1, rej
    assert rel_error(cal.psfs, field.node_grid().numpy()) < 0.06


def test_empty_cells_are_filled_with_a_warning_and_too_many_is_an_error():
    field, img = field_and_target(100, beads=False)
    holes = erase(img, slice(0, 64), slice(0, 64))   # cell (0, 0) loses its spot
    cal = calibration.estimate_psf_grid(holes, 4, 15)
    assert cal.filled == [(0, 0)] and cal.counts[0, 0] == 0
    corner = erase(erase(img, slice(None), slice(128, None)), slice(128, None), slice(None))  # one quarter left
    with pytest.raises(ValueError, match=r"12 of 16 grid cells have no usable spot"):
        calibration.estimate_psf_grid(corner, 4, 15)


def write_tif(path, img):
    img = np.clip(img, 0, None)
    tifffile.imwrite(path, np.round(img / img.max() * 65535).astype(np.uint16))
    return str(path)


def test_cli_writes_grid_pictures_and_report(tmp_path, capsys, monkeypatch, caplog):
    field, img = field_and_target(50, beads=True)
    src = write_tif(tmp_path / "spots.tif", img)
    out = tmp_path / "grid.npz"
    r = cli(["--calibration", src, "--grid_size", "4", "--kernel_size", "15", "--save_psf_grid", str(out),
             "--save_dir", str(tmp_path / "res")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    run = r.stdout.strip().splitlines()[-1]
    for f in ("psf_grid.npz", "calibration.json", "config.yaml", "images/spots.png", "images/psf_grid.png",
              "images/cells.png"):
        assert os.path.isfile(os.path.join(run, f)), f
    with np.load(out) as z:
        assert z["psfs"].shape == (4, 4, 15, 15) and z["positions"].shape == (4, 4, 2)
        assert rel_error(z["psfs"], field.node_grid().numpy()) < 0.08
    report = json.loads(open(os.path.join(run, "calibration.json")).read())
    assert report["spots_accepted"] >= 48 and sum(map(sum, report["spots_per_cell"])) == report["spots_accepted"]
    # FIELD's Gaussians are 0.6-1.8 px wide (median narrow-axis sigma 0.71 px): undersampled, and said so.
    assert report["median_narrow_axis_sigma_px"] < 0.8
    assert report["registration_error_estimate"] > calibration.REGISTRATION_WARN and "undersampled" in r.stderr


def narrow_sigma_of(psfs):
    """Median over PSFs of the σ along their narrow axis: the smaller eigenvalue of each PSF's
    weighted covariance of pixel positions (numpy's cov), an independent computation."""
    k = psfs.shape[-1]
    yy, xx = np.mgrid[:k, :k]
    pos = np.stack([yy.ravel(), xx.ravel()])
    flat = np.clip(psfs, 0, None).reshape(-1, k * k)
    return float(np.median([np.sqrt(np.linalg.eigvalsh(np.cov(pos, aweights=p, ddof=0))[0]) for p in flat]))


@pytest.mark.parametrize("scale,H,k", [(0.7, 256, 15), (1.2, 256, 15), (2.0, 384, 21)])
def test_spot_width_is_measured_before_registration(scale, H, k):
    """The spots' narrow-axis σ, measured on the raw pixels at SNR 20, matches the true node PSFs'
    to 0.05 px, from badly undersampled (0.41 px) to Nyquist-sampled (1.18 px) Gaussians; the
    registered PSFs could not show this (interpolation widens them)."""
    field, img = field_and_target(20, False, H=H, k=k, field=dict(sigma_scale=scale, mu_scale=0.0))
    cal = calibration.estimate_psf_grid(img, 4, k)
    true = narrow_sigma_of(field.node_grid().numpy())
    assert abs(cal.narrow_sigma - true) <= 0.05, (cal.narrow_sigma, true)
    assert (cal.registration_error > calibration.REGISTRATION_WARN) == (scale < 2.0)


def registration_floor(field, n=30):
    """RMS error of registering one noise-free spot of `field`'s centre PSF by cubic spline, given
    its true sub-pixel offset (drawn exactly by the simulator), against the PSF drawn at offset 0."""
    from scipy.ndimage import shift
    ys, xs = field.node_coords()
    true = field.psfs_on_grid(ys[:1], xs[:1])[0, 0].numpy()
    errs = []
    for dy, dx in np.random.default_rng(0).uniform(-0.5, 0.5, (n, 2)):
        seen = field.shifted(dy, dx).psfs_on_grid(ys[:1], xs[:1])[0, 0].numpy()
        back = shift(np.pad(seen, 3), (-dy, -dx), order=3, mode="constant")[3:-3, 3:-3]
        errs.append(rel_error(back / back.sum(), true))
    return float(np.sqrt(np.mean(np.square(errs))))


@pytest.mark.parametrize("edge_sigma", [0.0, 0.3, 0.5, 0.84])
def test_registration_error_estimate_matches_the_real_registration_floor(edge_sigma):
    """Disks of one radius (3 px, where the estimate is worst of 2, 3 and 4 px), from a 1-px rim to
    a Nyquist-sampled one: the estimate the calibration makes from the spots' spectra (SNR 100,
    beads) is within 2.5 points of the error of registering such a spot by interpolation, computed
    from the truth (0.4% to 7.4% here). The warning is given for the 1-px rim and not for the
    rims blurred by 0.5 px or more; at 0.3 px (4.4%) the estimate reads 6.5%, so either is fair."""
    params = dict(min_radius=3.0, max_radius=3.0, edge_sigma=edge_sigma)
    field, img = field_and_target(100, True, mode="defocus", field=params)
    floor = registration_floor(field)
    cal = calibration.estimate_psf_grid(img, 4, 15)
    assert abs(cal.registration_error - floor) <= 0.025, (cal.registration_error, floor)
    if edge_sigma != 0.3:
        assert (cal.registration_error > calibration.REGISTRATION_WARN) == (edge_sigma == 0), cal.registration_error


def blank(H=256):
    rng = np.random.default_rng(0)
    return rng.poisson(10.0, (H, H)) + rng.normal(0, 2.0, (H, H))


def one_spot():
    field, _ = field_and_target(100, beads=False)
    return blank() + calibration.render_point_sources(field, [128.3], [100.6], [1e5])


def corner_spots():
    _, img = field_and_target(100, beads=False)
    return erase(erase(img, slice(None), slice(128, None)), slice(128, None), slice(None))


def one_pixel_spots():
    """Gaussians of σ 0.15-0.45 px: nearly all their light in one pixel, like hot pixels."""
    return field_and_target(100, beads=False, field=dict(sigma_scale=0.3, mu_scale=0.0))[1]


BAD = {"blank image": (blank, "15", "no usable point sources"),
       "one-pixel spots": (one_pixel_spots, "15", "are the PSFs undersampled"),
       "one spot": (one_spot, "15", "15 of 16 grid cells have no usable spot"),
       "spots in one corner": (corner_spots, "15", "12 of 16 grid cells"),
       "kernel larger than spacing": (lambda: field_and_target(100, beads=True)[1], "41", "spot spacing")}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_calibration_input_exit_2_and_no_grid(case, tmp_path, capsys, monkeypatch, caplog):
    make, k, pattern = BAD[case]
    src = write_tif(tmp_path / "c.tif", make())
    out = tmp_path / "grid.npz"
    r = cli(["--calibration", src, "--grid_size", "4", "--kernel_size", k, "--save_psf_grid", str(out),
             "--save_dir", str(tmp_path / "res")], capsys, monkeypatch, caplog)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and pattern in lines[0], r.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "res").exists()


@pytest.mark.slow
def test_restoring_with_the_estimated_grid_is_as_good_as_with_the_true_grid(tmp_path, capsys, monkeypatch, caplog):
    """A scene through the same optics, restored once with the calibrated grid and once with the
    true node grid (analytic prior, same seed): within 0.5 dB PSNR of each other."""
    import utils
    H, k = 128, 15
    field = physics.SVBlurSimulator(H, H, k, 4, dtype=torch.float64).simulate_field("correlated", seed=3, **FIELD)
    img, _, _ = calibration.calibration_target(field, 100, False, np.random.default_rng(3))
    cal = calibration.estimate_psf_grid(img, 4, k)
    coords = tuple(c.numpy() for c in field.node_coords())
    utils.save_psf_grid(str(tmp_path / "est.npz"), cal.psfs, coords)
    utils.save_psf_grid(str(tmp_path / "true.npz"), field.node_grid(), coords)
    delta = np.zeros((4, 4, k, k))
    delta[..., k // 2, k // 2] = 1
    utils.save_psf_grid(str(tmp_path / "wrong.npz"), delta, coords)   # a failed calibration: no blur at all
    scene = utils.load_scene("sample", H, k // 2)
    x_ext = utils.to_tensor(scene).double()
    y = physics.GroundTruthBlur(field, "scatter")(x_ext)
    y = (y + 0.02 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)).clamp(0, 1)
    tifffile.imwrite(tmp_path / "y.tif", utils.to_numpy(y).astype(np.float32), photometric="rgb")
    clean = scene[k // 2:k // 2 + H, k // 2:k // 2 + H]
    psnr, restored = {}, {}
    for name in ("est", "true", "wrong"):
        r = cli(["--model_id", "analytic", "--blurred", str(tmp_path / "y.tif"), "--psf_grid", str(tmp_path / f"{name}.npz"),
                 "--num_samples", "2", "--num_inference_steps", "30", "--step_size", "8", "--seed", "0",
                 "--no_intermediates", "--save_dir", str(tmp_path / name)], capsys, monkeypatch, caplog)
        assert r.returncode == 0, r.stderr[-2000:]
        run = r.stdout.strip().splitlines()[-1]
        restored[name] = np.load(os.path.join(run, "restored.npy")).astype(np.float64)
        psnr[name] = utils.psnr(clean, restored[name])
    assert abs(psnr["est"] - psnr["true"]) <= 0.5, psnr
    # Same seed, same noise path: what differs is the operator. The calibrated grid's restoration is
    # far closer to the true grid's than a wrong grid's is (so the check above can fail).
    gap = lambda a, b: np.linalg.norm(restored[a] - restored[b])  # noqa: E731
    assert gap("est", "true") < 0.25 * gap("wrong", "true"), (gap("est", "true"), gap("wrong", "true"))


@pytest.mark.parametrize("beads", [False, True])
def test_every_registered_cutout_sums_to_one(beads, monkeypatch):
    """Each spot's registered cut-out is a PSF (sum 1) before the node fit averages them; a
    cut-out scaled another way (to its maximum, say) would weight bright and faint spots unequally."""
    cutouts, original = [], calibration._registered_cutout

    def spy(img, cy, cx, k):
        out = original(img, cy, cx, k)
        cutouts.append(out[0])
        return out

    monkeypatch.setattr(calibration, "_registered_cutout", spy)
    _, img = field_and_target(100, beads, H=128, G=2, k=15)
    cal = calibration.estimate_psf_grid(img, 2, 15)
    assert len(cutouts) >= sum(s["status"] == "accepted" for s in cal.spots) >= 4
    np.testing.assert_allclose([c.sum() for c in cutouts], 1.0, rtol=1e-12)


def comet(k, length, angle, fade=1.0):
    """A coma-like k×k spot: a bright core with a tail of widening Gaussians along `angle` (rad),
    the one at distance t weighted 1 / (1 + fade·t)."""
    h = k // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1].astype(np.float64)
    psf = np.zeros((k, k))
    for t in np.linspace(0, length, 12):
        cy, cx = t * np.sin(angle), t * np.cos(angle)
        s = 0.8 + 0.25 * t
        psf += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)) / (1 + fade * t)
    return psf / psf.sum()


def test_coma_pointing_out_at_every_edge_and_corner_is_rejected_not_a_crash():
    """Comet-shaped spots with their peak just inside the edge test (k//2 + 3 px from the border) and
    their tail pointing outward: the (weighted) centroid moves out by more than half a pixel (0.63
    px for this tail), so the cut-out registration would take leaves the image (it raised 'all
    input arrays must have the same shape'). Such spots are 'edge' rejections, and the interior
    array still gives the grid."""
    H, k, G = 96, 9, 2
    rng = np.random.default_rng(0)
    img = rng.normal(10.0, 1.0, (H, H))
    R = k // 2 + 3
    normal = comet(k, 0.0, 0.0)
    for r in (30, 66):                                   # a 2×2 array of round spots, one per cell
        for c in (30, 66):
            img[r - k // 2:r + k // 2 + 1, c - k // 2:c + k // 2 + 1] += 3000 * normal
    edges = {(R, 48): -np.pi / 2, (H - 1 - R, 48): np.pi / 2, (48, R): np.pi, (48, H - 1 - R): 0.0,
             (R, R): -3 * np.pi / 4, (R, H - 1 - R): -np.pi / 4, (H - 1 - R, R): 3 * np.pi / 4,
             (H - 1 - R, H - 1 - R): np.pi / 4}
    for (r, c), angle in edges.items():     # the spot's peak (a pixel off its box centre) lands on (r, c)
        spot = comet(k, 4.0, angle, fade=0.5)
        py, px = np.unravel_index(spot.argmax(), spot.shape)
        top, left = r - py, c - px
        ys, xs = slice(max(top, 0), min(top + k, H)), slice(max(left, 0), min(left + k, H))
        img[ys, xs] += 3000 * spot[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left]
    cal = calibration.estimate_psf_grid(img, G, k)
    status = {(round(s["row"]), round(s["col"])): s["status"] for s in cal.spots}
    near_edge = [s for s in cal.spots if min(s["row"], s["col"], H - 1 - s["row"], H - 1 - s["col"]) < R + 2]
    accepted = [s for s in cal.spots if s["status"] == "accepted"]
    # The four tails along an axis pull the centroid out by more than half a pixel: rejected. A
    # diagonal tail pulls each axis less, and such a spot is kept only if its cut-out fits.
    assert len(near_edge) == 8 and sum(s["status"] == "edge" for s in near_edge) >= 4, status
    assert all(calibration._fits(img, s["row"], s["col"], R) for s in accepted), status
    assert cal.counts.sum() == len(accepted) >= 4 and cal.psfs.shape == (2, 2, k, k)


def clipped_disk_target(tmp_path, full=4095, tags=()):
    """A Nyquist-sampled soft-disk array at peak SNR 100 in photons, the brightest spots clipped at
    `full` (a 12-bit camera), stored as a 16-bit TIFF: (path, unclipped image, clipped spots)."""
    field, img = field_and_target(100, False, **{k: v for k, v in NYQUIST["disks"].items()})
    # Scaled so that the four brightest cells' spots (the narrowest disks) pass 4095 and the rest not.
    top = np.sort([img[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].max() for r in range(4) for c in range(4)])[::-1]
    img = np.clip(img * 4095 / np.sqrt(top[3] * top[4]), 0, None)
    clipped = np.minimum(img, full)
    path = tmp_path / "spots12.tif"
    tifffile.imwrite(path, clipped.round().astype(np.uint16), extratags=list(tags))
    n_clipped = sum(1 for r in range(4) for c in range(4)
                    if (clipped[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] >= full).sum() >= 2)
    return str(path), n_clipped


@pytest.mark.parametrize("how", ["plateau", "tag", "flag"])
def test_12_bit_saturation_in_a_16_bit_file_is_caught(tmp_path, how, capsys, monkeypatch, caplog):
    """0.999 of the 16-bit range never saw a 12-bit camera's clip at 4095; the spots that reach it are
    now rejected as saturated and counted, from a plateau at the image's maximum, from the file's
    MaxSampleValue tag, or from --saturation."""
    tags = [(281, "H", 1, 4095, True)] if how == "tag" else []
    src, n_clipped = clipped_disk_target(tmp_path, tags=tags)
    assert n_clipped >= 2
    args = ["--calibration", src, "--grid_size", "4", "--kernel_size", "15", "--save_dir", str(tmp_path / "res")]
    r = cli(args + (["--saturation", "4095"] if how == "flag" else []), capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(open(os.path.join(r.stdout.strip().splitlines()[-1], "calibration.json")).read())
    assert report["saturation"] == 4095 and report["spots_rejected"]["saturated"] == n_clipped, report
    said = {"plateau": "sit exactly at the image's maximum 4095", "tag": "the maximum sample value the file declares",
            "flag": "(--saturation"}[how]
    assert said in r.stderr


def test_an_unclipped_16_bit_target_reports_no_saturation(tmp_path, capsys, monkeypatch, caplog):
    src, _ = clipped_disk_target(tmp_path, full=65535)
    r = cli(["--calibration", src, "--grid_size", "4", "--kernel_size", "15", "--save_dir", str(tmp_path / "res")],
            capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(open(os.path.join(r.stdout.strip().splitlines()[-1], "calibration.json")).read())
    assert report["spots_rejected"]["saturated"] == 0 and "maximum" not in r.stderr


@pytest.mark.parametrize("case", ["kernel 5 on 1-3 px Gaussians", "kernel 3", "photograph"])
def test_what_cannot_be_a_calibration_is_refused_with_the_reason(case, tmp_path, capsys, monkeypatch, caplog):
    if case == "photograph":
        from skimage import data
        src, k = write_tif(tmp_path / "photo.tif", data.camera().astype(np.float64)), 15
        G = 3
    else:
        _, img = field_and_target(100, False, **NYQUIST["gaussians"])
        src, k, G = write_tif(tmp_path / "spots.tif", img), int(case.split()[1]), 4
    r = cli(["--calibration", src, "--grid_size", str(G), "--kernel_size", str(k), "--save_dir", str(tmp_path / "res")],
            capsys, monkeypatch, caplog)
    assert r.returncode == 2 and "flux lies outside the" in r.stderr and "kernel_size is too small" in r.stderr
    assert not (tmp_path / "res").exists() or not os.listdir(tmp_path / "res")


def test_point_sources_that_fit_their_kernel_keep_their_flux_inside_it():
    for beads in (False, True):
        _, img = field_and_target(20, beads, **NYQUIST["disks"])
        cal = calibration.estimate_psf_grid(img, 4, 15)
        assert cal.flux_outside < calibration.OUTSIDE_WARN, cal.flux_outside


def test_high_background_costs_at_most_half_again_the_low_background_error():
    """Widefield fluorescence: at peak SNR 20 and 1000 photons of background the grid's L2 error is
    within 1.5x of that at 10 photons (an array of correlated Gaussians, the bench's worst case:
    31.1% against 11.5% before), and the centroid is neither pulled to pixel centres nor noisy.
    Fails with the old clipped box centroid (slope 0.86, RMS 0.20 px) and without the node PSFs'
    noise suppression (28% against 11% even with perfect registration)."""
    field = physics.SVBlurSimulator(256, 256, 15, 4, dtype=torch.float64).simulate_field("correlated", seed=0, **FIELD)
    true = field.node_grid().numpy()
    errors = {}
    for background in (10, 1000):
        runs = []
        for seed in range(3):
            img, rows, cols = calibration.calibration_target(field, 20, False, np.random.default_rng(seed),
                                                             background=background)
            cal = calibration.estimate_psf_grid(img, 4, 15)
            runs.append((rel_error(cal.psfs, true), *calibration.centroid_errors(cal, rows, cols)))
        errors[background], slope, rms = np.mean(runs, 0)
        assert abs(slope - 1) < 0.05 and rms < 0.08, (background, slope, rms)
    assert errors[1000] <= 1.5 * errors[10], errors


def test_weighted_centroid_finds_the_centre_of_a_symmetric_spot_off_the_pixel_grid():
    """A noise-free elliptical Gaussian and a disk at a sub-pixel position, on a uniform offset (a
    background estimate that is off): the centre to 2e-3 px (the sampled disk's own asymmetry is
    1.6e-3 px), whatever the offset. A window centred on the nearest pixel is pulled to it by the
    offset."""
    yy, xx = np.mgrid[:41, :41].astype(np.float64)
    for cy, cx in ((20.3, 19.6), (20.45, 20.5), (19.9, 20.1)):
        gauss = np.exp(-((yy - cy) ** 2 / (2 * 1.6 ** 2) + (xx - cx) ** 2 / (2 * 0.9 ** 2)))
        disk = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - 3.0) / 0.3))
        for spot in (gauss, disk):
            for offset in (0.0, 0.02):
                r, c = np.unravel_index(spot.argmax(), spot.shape)
                est = calibration._centroid(spot + offset, r, c, 15)
                np.testing.assert_allclose(est, (cy, cx), atol=2e-3)


@pytest.mark.parametrize("beads", [False, True])
def test_node_psf_noise_variance_is_what_the_spots_noise_gives(beads):
    """_node_psf's pixel variance (Σ Lᵢ² Vᵢ, for the cell mean and for the local quadratic fit)
    against the empirical variance of the node PSF over 4000 draws of the spots' noise."""
    rng = np.random.default_rng(0)
    n = 4 if not beads else 25
    pos = rng.uniform(-60, 60, (n, 2)) if beads else rng.uniform(-20, 20, (n, 2))
    V = rng.uniform(0.5, 2.0, n) * 1e-4
    truth = rng.uniform(0, 1, (n, 9))
    own = [(None, *pos[i], 0.0, V[i]) for i in range(n)]
    draws, variance = [], None
    for _ in range(4000):
        P = truth + rng.normal(0, 1, truth.shape) * np.sqrt(V)[:, None]
        own = [(P[i].reshape(3, 3), *pos[i], 0.0, V[i]) for i in range(n)]
        psf, variance = calibration._node_psf(own, pos, P, V, 0.0, 0.0, 64.0, 64.0)
        draws.append(psf)
    near = (np.hypot(*(pos / 64).T) < calibration.LOCAL_FIT_RADIUS).sum()
    assert (near >= calibration.LOCAL_FIT_MIN_SPOTS) == beads       # both branches are exercised
    np.testing.assert_allclose(np.var(draws, 0), variance, rtol=0.1)


def test_noise_suppression_keeps_the_spot_and_removes_the_empty_pixels():
    """A Gaussian PSF plus white noise of known variance: the pixels where the PSF is strong keep
    their value (within 2%), the pixels where it is absent go mostly to zero, and the L2 error
    falls (the noise is more than half of it before)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-7:8, -7:8].astype(np.float64)
    psf = np.exp(-(yy ** 2 + xx ** 2) / (2 * 1.2 ** 2))
    psf /= psf.sum()
    variance = (0.02 * psf.max()) ** 2
    noisy = psf + rng.normal(0, np.sqrt(variance), psf.shape)
    out = calibration._suppress_noise(noisy, variance)
    strong, empty = psf > 0.2 * psf.max(), psf < 1e-4 * psf.max()
    np.testing.assert_allclose(out[strong], noisy[strong], rtol=0.02)
    assert np.mean(out[empty] == 0) > 0.6 and np.abs(out[empty]).mean() < 0.3 * np.abs(noisy[empty]).mean()
    assert rel_error(out, psf) < 0.6 * rel_error(noisy, psf)


# --- colour ------------------------------------------------------------------------------------

def rgb_spot_array(H=192, G=4, shift_px=(1.0, 0.0, -1.0), sigmas=(1.2, 1.4, 1.7), snr=300, seed=0):
    """An RGB array of pixel-integrated Gaussian spots (exact erf integrals, independent of the
    code under test), one per cell near its centre, with lateral colour: channel c's spot moved by
    shift_px[c]·h, h the normalised field position (|h| = 1 at the corners). Poisson noise on a
    background of 10. Returns (image (H, W, 3), the true offset of channel c at spot s (S, 3, 2))."""
    from scipy.special import erf
    rng = np.random.default_rng(seed)
    c0, rmax = (H - 1) / 2, (H - 1) / 2 * np.sqrt(2)
    edges = np.arange(H + 1) - 0.5
    img, offsets = np.zeros((H, H, 3)), []
    for i in range(G):
        for j in range(G):
            y, x = (np.array([i, j]) + 0.5) * H / G - 0.5 + rng.uniform(-0.5, 0.5, 2)
            h = (np.array([y, x]) - c0) / rmax
            off = np.array([s * h for s in shift_px])                    # (3, 2)
            offsets.append(off)
            for c, s in enumerate(sigmas):
                cy, cx = y + off[c, 0], x + off[c, 1]
                py = np.diff(0.5 * erf((edges - cy) / (np.sqrt(2) * s)))
                px = np.diff(0.5 * erf((edges - cx) / (np.sqrt(2) * s)))
                img[..., c] += snr * 10 * np.outer(py, px) * 2 * np.pi * s * s
    img = rng.poisson(img + 10).astype(np.float64)
    return img, np.array(offsets)


def test_colour_calibration_keeps_lateral_colour():
    """Every channel cut out at the luminance centroid: channel c's PSF centroid minus green's is
    the true lateral colour at that node, within 0.1 px (registering each channel at its own
    centroid would make it 0 everywhere)."""
    G, k = 4, 15
    img, offsets = rgb_spot_array(G=G)
    cal = calibration.estimate_psf_grid(img, G, k)
    assert cal.psfs.shape == (G, G, 3, k, k) and cal.counts.sum() == G * G
    u = np.arange(k) - k // 2
    cen = np.stack([(cal.psfs.sum(-1) * u).sum(-1), (cal.psfs.sum(-2) * u).sum(-1)], -1)   # (G, G, 3, 2)
    true = offsets.reshape(G, G, 3, 2)
    for c in (0, 2):
        np.testing.assert_allclose(cen[:, :, c] - cen[:, :, 1], true[:, :, c] - true[:, :, 1], atol=0.1)
    assert np.abs(true[:, :, 0] - true[:, :, 2]).max() > 1.0       # the test has lateral colour to lose


def test_cli_calibrates_a_16_bit_rgb_tiff_into_a_colour_grid(tmp_path, capsys, monkeypatch, caplog):
    img, _ = rgb_spot_array()
    tifffile.imwrite(tmp_path / "spots.tif", np.round(img / img.max() * 65535).astype(np.uint16), photometric="rgb")
    r = cli(["--calibration", str(tmp_path / "spots.tif"), "--grid_size", "4", "--kernel_size", "15",
             "--save_dir", str(tmp_path / "out"), "--save_psf_grid", str(tmp_path / "g.npz")], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lateral colour" in r.stderr
    assert np.load(tmp_path / "g.npz")["psfs"].shape == (4, 4, 3, 15, 15)
