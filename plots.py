"""Figures of a run folder: the comparison, the posterior std, the EigenPSFs, the PSF grid, the
calibration spots and cells, the training loss and the sampler's progress.

matplotlib is imported on first use (_plt), so that a run without figures never pays for it.
"""

from __future__ import annotations

import math

import numpy as np

from utils import to_numpy


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, tight=False):
    """Writes and closes fig. The per-image figures are laid out by hand in inches (_axes), so they
    have no margins at any aspect; bbox_inches="tight" would draw every figure twice (it doubled
    the time of the progress plot), so only the one-off figures with free-form labels use it."""
    if tight:
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)
    else:
        fig.savefig(path, dpi=100)
    _plt().close(fig)


TITLE_IN, GAP_IN = 0.3, 0.08     # inches: a title line above a panel; the gap between panels


def _axes(fig, x, y, w, h, off=True):
    """Axes at (x, y) of size w × h, in inches from the figure's bottom-left corner."""
    W, H = fig.get_size_inches()
    ax = fig.add_axes((x / W, y / H, w / W, h / H))
    if off:
        ax.set_axis_off()
    return ax


def _title(ax, text, fontsize):
    """A title 0.06 in above ax. (Axes.set_title measures every tick label to place itself, which
    took a third of the progress plot's time.)"""
    from matplotlib.transforms import offset_copy
    ax.text(0.5, 1.0, text, ha="center", va="bottom", fontsize=fontsize,
            transform=offset_copy(ax.transAxes, ax.figure, y=0.06, units="inches"))


def _rgb(img, cmap=None, vmin=0.0, vmax=1.0):
    """(H, W, 3) float RGB of an (H, W, C) image in [0, 1] (gray for C = 1), or of an (H, W)
    array through a colormap between vmin and vmax."""
    img = np.asarray(img, dtype=np.float64)
    if cmap is not None:
        t = np.clip((img - vmin) / (vmax - vmin if vmax > vmin else 1.0), 0, 1)
        return _plt().get_cmap(cmap)(t)[..., :3]
    img = np.clip(img, 0, 1)
    return np.repeat(img, 3, -1) if img.shape[-1] == 1 else img[..., :3]


def _strip_width(n, panel_w):
    """Inches taken by n panels of panel_w inches with GAP_IN between them."""
    return n * panel_w + (n - 1) * GAP_IN


def _panel_strip(fig, x, y, panel_w, images, titles, fontsize):
    """A titled row of equal-sized (h, w, 3) RGB images, panel_w inches each, bottom-left at (x, y).

    They are drawn as one mosaic in one Axes (each Axes costs ~30 ms to build and draw). Small
    images are first enlarged by whole pixels, so that the white gutters come out ≈ GAP_IN."""
    h, w = images[0].shape[:2]
    f = math.ceil(100 / w) if w < 100 else 1                 # pixel blocks stay sharp below
    wf = w * f
    g = max(1, round(GAP_IN * wf / panel_w))                  # gutter, enlarged pixels
    mosaic = np.ones((h * f, len(images) * (wf + g) - g, 3))
    for j, img in enumerate(images):
        mosaic[:, j * (wf + g):j * (wf + g) + wf] = np.repeat(np.repeat(img, f, 0), f, 1)
    ax = _axes(fig, x, y, _strip_width(len(images), panel_w), panel_w * h / w)
    ax.imshow(mosaic, aspect="auto", interpolation="nearest" if f > 1 else "antialiased")
    for j, title in enumerate(titles):   # centred above each panel, 0.06 in clear of it, and no wider
        size = min(fontsize, panel_w * 72 / (0.6 * max(len(title), 1)))   # (a character is ~0.6 em)
        ax.text(j * (wf + g) + wf / 2, -0.5 - 0.06 * wf / panel_w, title, ha="center", va="bottom", fontsize=size)


def plot_comparison(path, panels):
    """panels: list of (title, (H, W, C) image); the figure follows the images' aspect ratio."""
    h, w = panels[0][1].shape[:2]
    n, pw = len(panels), 4.0
    fig = _plt().figure(figsize=(_strip_width(n, pw), pw * h / w + TITLE_IN))
    _panel_strip(fig, 0, 0, pw, [_rgb(img) for _, img in panels], [t for t, _ in panels], 10)
    _save(fig, path)


def _image_with_colorbar(path, data, title, fontsize, label, width, right, **imshow):
    """One (H, W) array `width` inches wide, titled, with a labelled colorbar in `right` inches of
    margin; 0.1 in below for the colorbar's end labels."""
    height = width * data.shape[0] / data.shape[1]
    fig = _plt().figure(figsize=(width + right, height + TITLE_IN + 0.1))
    ax = _axes(fig, 0, 0.1, width, height)
    im = ax.imshow(data, **imshow)
    _title(ax, title, fontsize)
    fig.colorbar(im, cax=_axes(fig, width + 0.15, 0.1, 0.15, height, off=False), label=label)
    _save(fig, path)


def plot_std(path, std):
    """The per-pixel posterior std (H, W, C), averaged over channels, with a colorbar in the
    units of the [0, 1] image scale (not rescaled to its own maximum)."""
    _image_with_colorbar(path, np.asarray(std).mean(-1), "posterior std per pixel (mean over channels)", 9,
                         "std, [0, 1] image scale", 4.0, 1.3, cmap="magma", vmin=0)


def plot_eigenpsfs(path, basis, maps, explained, max_k=10):
    """Top row: basis kernels Bₖ; bottom row: coefficient maps Cₖ (diverging colormap).

    B₁.. and C₁.. share one colour scale each, so a component with almost no variance shows as
    flat rather than being stretched into structure it does not have.
    """
    K_all = basis.shape[0]
    K = min(K_all, max_k)
    b, m = basis[:K].cpu().numpy(), maps[:K].cpu().numpy()
    blim = float(np.abs(b[1:]).max()) if K > 1 else 1.0
    mlim = float(np.abs(m[1:]).max()) if K > 1 else 1.0
    # A unit-norm direction with ~0 variance is numerical noise: drawn blank, not stretched.
    noise = [k > 0 and float(explained[k - 1]) < 1e-6 for k in range(K)]
    tops = [_rgb(b[0], "magma", 0, float(b[0].max()) or 1.0)]
    tops += [_rgb(0 * b[k] if noise[k] else b[k], "RdBu_r", -(blim or 1), blim or 1) for k in range(1, K)]
    bottoms = [_rgb(m[0], "RdBu_r", -1, 1)] + [_rgb(m[k], "RdBu_r", -(mlim or 1), mlim or 1) for k in range(1, K)]
    titles = ["B0 (mean PSF)"] + [f"B{k} (~0 var: not shown)" if noise[k] else
                                  f"B{k} ({100 * float(explained[k - 1]):.2g}% var)" for k in range(1, K)]
    pw, aspect = 2.0, m.shape[1] / m.shape[2]
    strip = _strip_width(K, pw)
    W = max(strip + 0.4, 7.0)               # room for the suptitle however small K is, and edge titles
    fig = _plt().figure(figsize=(W, pw + pw * aspect + 2 * TITLE_IN + 0.35))
    x0 = (W - strip) / 2
    _panel_strip(fig, x0, 0, pw, bottoms, [f"C{k}" for k in range(K)], 8)
    _panel_strip(fig, x0, pw * aspect + TITLE_IN, pw, tops, titles, 8)
    shown = f"first {K} of K={K_all}" if K < K_all else f"all K={K_all}"
    fig.suptitle(f"EigenPSFs Bₖ (top) and coefficient maps Cₖ (bottom): {shown}; "
                 f"B₁.. and C₁.. share one colour scale", fontsize=9, y=1 - 0.08 / fig.get_size_inches()[1], va="top")
    _save(fig, path)


def _psf_mosaic(g, k):
    """(ny, nx, k, k[, 3]) PSFs -> one image with a 1-pixel white gutter around each PSF."""
    ny, nx = g.shape[:2]
    tiles = np.ones((ny, k + 1, nx, k + 1) + g.shape[4:])
    tiles[:, :k, :, :k] = g.swapaxes(1, 2)
    flat = tiles.reshape(ny * (k + 1), nx * (k + 1), *g.shape[4:])
    return np.pad(flat, ((1, 0), (1, 0)) + ((0, 0),) * (flat.ndim - 2), constant_values=1)


def plot_psf_grid(path, grid, max_side=16):
    """The PSF field as a mosaic (each PSF scaled to its own max); large grids are subsampled.

    A colour grid (Gy, Gx, 3, k, k) is one RGB composite per node, the three channels scaled by
    that node's largest value, so that a channel's wider PSF shows as a coloured fringe and lateral
    colour as coloured edges; other channel counts are drawn as one gray mosaic per channel."""
    Gy, Gx, k = *grid.shape[:2], grid.shape[-1]
    sy, sx = max(1, math.ceil(Gy / max_side)), max(1, math.ceil(Gx / max_side))
    g = np.asarray(grid[::sy, ::sx] if isinstance(grid, np.ndarray) else grid[::sy, ::sx].cpu(), dtype=np.float64)
    sub = f" (every {sy}th row / {sx}th column)" if sy > 1 or sx > 1 else ""
    title = f"PSF grid {Gy}x{Gx}, {k}x{k} kernels{sub}"
    if g.ndim == 5 and g.shape[2] == 3:
        g = g / np.maximum(g.max(axis=(-3, -2, -1), keepdims=True), 1e-12)
        mosaic = _psf_mosaic(np.moveaxis(g, 2, -1), k)
        plt = _plt()
        width = 6.0
        fig = plt.figure(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + TITLE_IN + 0.1))
        ax = _axes(fig, 0, 0.1, width, width * mosaic.shape[0] / mosaic.shape[1])
        ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest")
        _title(ax, f"{title}: R, G, B channels, scaled by each node's max", 10)
        _save(fig, path)
        return
    g = g / np.maximum(g.max(axis=(-2, -1), keepdims=True), 1e-12)
    if g.ndim == 5:   # channels side by side
        mosaic = np.concatenate([_psf_mosaic(g[:, :, c], k) for c in range(g.shape[2])], 1)
        title += f", channels 0..{g.shape[2] - 1} left to right"
    else:
        mosaic = _psf_mosaic(g, k)
    _image_with_colorbar(path, mosaic, title, 10, "PSF value / that PSF's maximum", 6.0, 1.5, cmap="gray",
                         interpolation="nearest", vmin=0, vmax=1)


SPOT_COLOURS = {"accepted": "lime", "noise": "gray", "hot pixel": "magenta", "edge": "orange",
                "saturated": "red", "overlap": "cyan"}


def plot_calibration_spots(path, img, spots):
    """The calibration image (square-root stretch of its fixed [0, 1] range) with every detected
    spot marked, accepted and each rejection reason in its own colour, with counts in the legend."""
    plt = _plt()
    h, w = img.shape
    fig, ax = plt.subplots(figsize=(8, 8 * h / w))
    ax.imshow(np.sqrt(np.clip(img, 0, 1)), cmap="gray", vmin=0, vmax=1)
    for status, colour in SPOT_COLOURS.items():
        pts = [(s["row"], s["col"]) for s in spots if s["status"] == status]
        if pts:
            r, c = np.array(pts).T
            ax.scatter(c, r, s=60, facecolors="none", edgecolors=colour, linewidths=1.2, label=f"{status} ({len(pts)})")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.7)
    ax.set_title("detected point sources", fontsize=10)
    ax.axis("off")
    _save(fig, path, tight=True)   # free-form legend and axis labels; written once per calibration


def plot_cell_map(path, counts, snr):
    """Accepted spots per grid cell and their median peak SNR, with colorbars and the counts written in."""
    plt = _plt()
    # wspace leaves the left colorbar's labels clear of the right panel's row label
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"wspace": 0.5})
    G_rows, G_cols = counts.shape
    for ax, data, title, cmap, fmt in ((axes[0], counts, "accepted spots per cell", "viridis", "{:d}"),
                                       (axes[1], snr, "median peak SNR per cell", "magma", "{:.0f}")):
        im = ax.imshow(data, cmap=cmap, vmin=0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(G_cols))          # one tick per cell, at its centre
        ax.set_yticks(range(G_rows))
        ax.set_xlabel("grid column")
        ax.set_ylabel("grid row")
        light = data.max() * 0.5 if data.size and data.max() > 0 else 1
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, fmt.format(int(v) if fmt == "{:d}" else float(v)), ha="center", va="center", fontsize=8,
                    color="black" if v > light else "white")
    _save(fig, path, tight=True)   # free-form legend and axis labels; written once per calibration


def plot_loss_curve(path, history):
    """Training loss per step (and its running mean over 50 steps) and the validation loss."""
    plt = _plt()
    h = np.asarray(history, dtype=float).reshape(-1, 3)
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(h):
        ax.plot(h[:, 0], h[:, 1], lw=0.5, alpha=0.35, color="C0", label="train (per step)")
        k = min(50, len(h))
        ax.plot(h[k - 1:, 0], np.convolve(h[:, 1], np.ones(k) / k, mode="valid"), color="C0", label=f"train ({k}-step mean)")
        v = ~np.isnan(h[:, 2])
        ax.plot(h[v, 0], h[v, 2], "o-", color="C1", ms=3, label="validation (EMA weights, fixed crops)")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("ε-prediction MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path, tight=True)


def _log_tick_labels(axis, values) -> None:
    """Plain "0.0201" labels (3 significant digits; the default's mathtext costs ~70 ms, and
    LogFormatter labels every tick of a curve within one decade alike, "2e-02"), on few enough ticks
    not to overlap: the decades alone when the values span one or more, else 1, 2 and 5 × 10^k."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    if v.size and np.log10(v.max() / v.min()) >= 1:
        axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_minor_formatter(FormatStrFormatter("%.3g"))


def plot_progress(path, steps, images, curve_steps, curve_values, max_panels=8):
    """x̂₀ across steps (first image of the batch) and the curve of ‖y − A(x̂₀)‖/‖y‖ (its values at
    curve_steps, every log_every steps)."""
    if not steps:
        return
    idx = np.unique(np.linspace(0, len(steps) - 1, min(max_panels, len(steps))).round().astype(int))
    first = [to_numpy(images[i][:1]) for i in idx]
    h, w = first[0].shape[:2]
    pw = 2.2 * min(1.0, w / h)                    # panels at most 2.2 in tall
    ph, curve = pw * h / w, 2.6
    strip = _strip_width(len(idx), pw)
    fig = _plt().figure(figsize=(strip + 0.75 + curve + 0.1, max(ph, 1.6) + TITLE_IN + 0.1))
    top = max(ph, 1.6) + 0.1 - ph                                # the strip hangs from the top
    _panel_strip(fig, 0, top, pw, [_rgb(f) for f in first], [f"step {steps[i]}" for i in idx], 8)
    ax = _axes(fig, strip + 0.75, 0.45, curve, max(ph, 1.6) - 0.35, off=False)   # room for tick labels
    ax.semilogy(curve_steps, curve_values)
    _log_tick_labels(ax.yaxis, curve_values)
    ax.set_xlabel("step", labelpad=1)
    _title(ax, "‖y − A(x̂₀)‖ / ‖y‖", 9)
    _save(fig, path)
