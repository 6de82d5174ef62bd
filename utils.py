"""Files in and out for EigenPSF-DPS: images, PSF-grid files, metrics, run folders, errors and exit codes.

Images cross this boundary once: files -> float tensors (1, C, H, W) in [0, 1], and back.
Metrics use that fixed [0, 1] range (data_range=1); nothing is min-max rescaled. The config
lives in config.py, figures in plots.py.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from datetime import datetime

import numpy as np

log = logging.getLogger("eigenpsf_dps")

# torch is imported inside the few functions that need it: main.py parses flags (and answers
# --help or a config error) with this module and config.py before the seconds-long torch import.

MAX_URL_BYTES = 50 * 2 ** 20      # an image URL may send at most this much ...
MAX_URL_SECONDS = 120             # ... within this many seconds in all
MAX_IMAGE_PIXELS = 8192 * 8192    # per frame, checked from the header before any pixel is decoded
MAX_PSF_ELEMENTS = 2 ** 26        # G*G*k*k of a PSF grid file (512 MB as float64), checked from the header
MAX_PSF_GRID, MAX_PSF_SIZE = 256, 255  # the config's limits on grid_size and kernel_size
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SAMPLE_FACE = (130, 240, 240)  # centre row, centre column and side of the face in scikit-image's astronaut


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""

# Exit codes of main.py (docs/cli.md): 0 done, 2 bad input, 3 sampler diverged, 4 a batch
# finished but some images failed, 75 preempted (checkpoint saved), 130 interrupted (Ctrl-C).
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_BATCH_INCOMPLETE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 4, 75, 130


# ----------------------------------------------------------------------------
# 1. Images
# ----------------------------------------------------------------------------

def sample_image() -> np.ndarray:
    """The astronaut portrait (public domain, ships with scikit-image), cropped around the face."""
    from skimage import data
    cy, cx, side = SAMPLE_FACE
    return data.astronaut()[cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2]


def _fetch_url(url: str) -> bytes:
    import requests
    try:
        with requests.get(url, stream=True, timeout=(10, 30)) as r:
            r.raise_for_status()
            ctype = r.headers.get("Content-Type", "")
            if not ctype.startswith("image/"):
                raise UserError(f"{url} is not an image (Content-Type {ctype or 'missing'!r})")
            if int(r.headers.get("Content-Length") or 0) > MAX_URL_BYTES:
                raise UserError(f"{url} is larger than {MAX_URL_BYTES // 2 ** 20} MB")
            buf, deadline = bytearray(), time.monotonic() + MAX_URL_SECONDS
            for chunk in r.iter_content(1 << 16):
                buf += chunk
                if len(buf) > MAX_URL_BYTES:
                    raise UserError(f"{url} is larger than {MAX_URL_BYTES // 2 ** 20} MB")
                if time.monotonic() > deadline:  # the read timeout alone lets a slow server drip forever
                    raise UserError(f"{url} took longer than {MAX_URL_SECONDS} s to download")
            return bytes(buf)
    except requests.RequestException as e:
        raise UserError(f"could not download image {url}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def decode_image(raw, name: str) -> np.ndarray:
    """Bytes or a path -> float64 (H, W, C) in [0, 1], C = 1 (gray) or 3 (RGB). 16-bit is scaled by
    65535; alpha dropped; gray stays gray."""
    import imageio.v3 as iio
    src = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    check_pixel_count(src, name)
    try:
        arr = iio.imread(src)
    except Exception as e:  # imageio raises many types for undecodable files
        raise UserError(f"cannot decode image {name}: not an image, or a corrupt one ({type(e).__name__})") from None
    return to_float_image(np.asarray(arr), name)


def _declared_pixels(src) -> int:
    """Pixels per frame that an image file's header declares, read without decoding any pixel.

    TIFF headers are read by tifffile (which also handles what Pillow cannot open), everything
    else by Pillow's lazy open. Returns 0 when neither can parse the header (decoding then fails
    with its own message).
    """
    from PIL import Image
    if hasattr(src, "read"):
        src.seek(0)
        head = src.read(4)
        src.seek(0)
    else:
        with open(src, "rb") as f:
            head = f.read(4)
    try:
        if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            import tifffile
            with tifffile.TiffFile(src) as tif:
                return max((p.imagewidth * p.imagelength for p in tif.pages), default=0)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we want the number, not Pillow's check
        try:
            with Image.open(src) as im:
                return im.size[0] * im.size[1]
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    except Exception:  # not an image format either reader knows: the decoder reports it
        return 0
    finally:
        if hasattr(src, "seek"):
            src.seek(0)


def check_pixel_count(src, name: str) -> None:
    """Refuses an image whose header declares more than MAX_IMAGE_PIXELS pixels (a decompression
    bomb: a few kB that would decode to many GB), before decoding it."""
    n = _declared_pixels(src)
    if n > MAX_IMAGE_PIXELS:
        raise UserError(f"{name}: the image declares {n:,} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
                        f"(8192x8192); refusing to decode it")


def to_float_image(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first TIFF
    if arr.dtype == np.uint8:
        x = arr.astype(np.float64) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float64) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float64)
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1):
            raise UserError(f"{name}: floating-point image values must lie in [0, 1] "
                            f"(got {np.nanmin(x):.3g}..{np.nanmax(x):.3g})")
    elif arr.dtype == bool:
        x = arr.astype(np.float64)
    else:
        raise UserError(f"{name}: unsupported pixel type {arr.dtype}")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise UserError(f"{name}: unsupported image shape {arr.shape}")
    if x.shape[-1] in (2, 4):  # drop alpha: the blur acts on the colour; say so, and when it hid pixels
        alpha, x = x[..., -1], x[..., :-1]
        transparent = float((alpha < 1).mean())
        if transparent:
            log.warning("%s: alpha channel dropped; %.1f%% of the pixels were not opaque, and their colour is "
                        "restored as it is stored", name, 100 * transparent)
        else:
            log.info("%s: alpha channel dropped (fully opaque)", name)
    if not np.isfinite(x).all():
        raise UserError(f"{name}: image contains NaN or Inf")
    return x


def read_image(spec: str) -> np.ndarray:
    """'sample', a file path or an http(s) URL -> (H, W, C) float64 in [0, 1], C = 1 (gray) or 3."""
    if spec == "sample":
        return sample_image().astype(np.float64) / 255.0
    if spec.startswith(("http://", "https://")):
        return decode_image(_fetch_url(spec), spec)
    if not os.path.exists(spec):
        raise UserError(f"image not found: {spec}")
    if os.path.isdir(spec):
        raise UserError(f"image path is a directory: {spec}")
    if not spec.lower().endswith(IMAGE_EXTS):
        raise UserError(f"unsupported image format {os.path.splitext(spec)[1] or '(none)'} for {spec}; "
                        f"use PNG, JPEG or TIFF")
    return decode_image(spec, spec)


def center_crop_resize(img: np.ndarray, size: int, margin: int = 0, box=None) -> np.ndarray:
    """A square crop resized to (size + 2·margin)², float in [0, 1].

    box = (centre row, centre col, side) of the region that becomes the central size×size; the
    margin is real content around it, cut from a proportionally larger crop. Where the source has
    too little room around the box (default: the largest centred square), the crop keeps the
    largest square that fits and the central region covers correspondingly less of it.
    """
    from skimage.transform import resize
    h, w = img.shape[:2]
    cy, cx, side = box if box is not None else (h / 2, w / 2, min(h, w))
    room = 2 * min(cy, h - cy, cx, w - cx)
    n = size + 2 * margin
    T = max(1, int(min(side * n / size, room)))
    top, left = int(round(cy - T / 2)), int(round(cx - T / 2))
    crop = img[top:top + T, left:left + T]
    return np.clip(resize(crop, (n, n), anti_aliasing=T > n, order=3), 0, 1)


def load_scene(spec: str, size: int, margin: int) -> np.ndarray:
    """The clean scene of a simulation: (size + 2·margin)² RGB in [0, 1]. Its central size×size is
    the clean reference; the margin is real content beyond the field of view, which the ground
    truth blurs into the borders of y. The sample is cut around the face of the full astronaut."""
    if spec == "sample":
        from skimage import data
        return center_crop_resize(data.astronaut().astype(np.float64) / 255.0, size, margin, SAMPLE_FACE)
    return center_crop_resize(read_image(spec), size, margin)


def load_sample_image(source: str = "sample", size: int = 256, device="cpu"):
    """The first version's image loader: 'sample', a file path or an http(s) URL -> (1, 3, size,
    size) float32 in [0, 1] on `device`, centre-cropped and resized as the CLI does, with the
    CLI's checks (formats, pixel and URL limits). A gray image is repeated to RGB."""
    img = load_scene(source, size, 0)
    return to_tensor(np.repeat(img, 3, -1) if img.shape[-1] == 1 else img, device)


def to_tensor(img: np.ndarray, device="cpu"):
    """(H, W, C) [0, 1] -> (1, C, H, W) float32."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(img)).float().permute(2, 0, 1)[None].to(device)


def to_numpy(x) -> np.ndarray:
    """(1, C, H, W) or (C, H, W) -> (H, W, C) float64 in [0, 1] (clamped, never rescaled)."""
    if x.ndim == 4:
        x = x[0]
    return x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)


def save_image(path: str, img) -> None:
    """An (H, W, C) array or (1, C, H, W) tensor in [0, 1] as an 8-bit PNG (gray for C = 1)."""
    from PIL import Image
    arr = np.clip(img, 0, 1) if isinstance(img, np.ndarray) else to_numpy(img)
    u8 = np.round(arr * 255).astype(np.uint8)
    Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8).save(path)


def save_tiff16(path: str, img: np.ndarray) -> None:
    """An (H, W, C) array in [0, 1] as a 16-bit TIFF (for 16-bit inputs: no precision lost to 8 bits)."""
    import tifffile
    arr = np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)
    tifffile.imwrite(path, arr[..., 0] if arr.shape[-1] == 1 else arr, photometric="minisblack"
                     if arr.shape[-1] == 1 else "rgb")


def bit_depth(spec: str) -> int:
    """Bits per sample of an image file (16 for 16-bit PNG/TIFF), read from its header; 8 for the
    sample, URLs and anything unknown."""
    if spec == "sample" or spec.startswith(("http://", "https://")):
        return 8
    try:
        if spec.lower().endswith((".tif", ".tiff")):
            import tifffile
            with tifffile.TiffFile(spec) as tif:
                return 8 * tif.pages[0].dtype.itemsize if tif.pages[0].dtype.kind == "u" else 8
        from PIL import Image
        with Image.open(spec) as im:
            return 16 if im.mode.startswith("I;16") or im.mode == "I" else 8
    except Exception:  # unreadable files are reported by the decoder
        return 8


def declared_max_sample(spec: str):
    """The largest sample value a TIFF declares (its SMaxSampleValue tag, or MaxSampleValue when
    that is below the dtype's range, as 12- and 14-bit cameras write), in the file's own units;
    None when it declares none (or the file is not a TIFF)."""
    if not spec.lower().endswith((".tif", ".tiff")) or not os.path.isfile(spec):
        return None
    try:
        import tifffile
        with tifffile.TiffFile(spec) as tif:
            page = tif.pages[0]
            full = np.iinfo(page.dtype).max if page.dtype.kind == "u" else None
            for name in ("SMaxSampleValue", "MaxSampleValue"):
                tag = page.tags.get(name)
                if tag is not None:
                    value = float(np.max(tag.value))
                    if name == "SMaxSampleValue" or (full is not None and value < full):
                        return value
    except Exception:  # unreadable files are reported by the decoder
        return None
    return None


def full_scale(spec: str) -> float:
    """What 1.0 of read_image's [0, 1] scale is in the file's own units (65535 for 16-bit, 255 for
    8-bit, 1 for floating point)."""
    if spec == "sample" or spec.startswith(("http://", "https://")):
        return 255.0
    try:
        if spec.lower().endswith((".tif", ".tiff")):
            import tifffile
            with tifffile.TiffFile(spec) as tif:
                dtype = tif.pages[0].dtype
                return float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0
    except Exception:
        pass
    return 65535.0 if bit_depth(spec) == 16 else 255.0


# ----------------------------------------------------------------------------
# 2. Metrics on the fixed [0, 1] range
# ----------------------------------------------------------------------------

def psnr(ref: np.ndarray, est: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio
    return float(peak_signal_noise_ratio(ref, np.clip(est, 0, 1), data_range=1.0))


SSIM_DEFINITION = ("Wang et al. 2004: Gaussian window sigma=1.5, population covariance, K1=0.01, K2=0.03, "
                   "data_range=1, mean over channels (scikit-image gaussian_weights=True, sigma=1.5, "
                   "use_sample_covariance=False)")


def ssim(ref: np.ndarray, est: np.ndarray) -> float:
    """SSIM as in Wang et al. 2004 (see SSIM_DEFINITION), on the fixed [0, 1] range."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(ref, np.clip(est, 0, 1), data_range=1.0, channel_axis=-1,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


# LPIPS (Zhang et al. 2018), as the DPS and DiffPIR tables report it: the `lpips` package, its v0.1
# linear layers on torchvision's ImageNet backbone. The backbone weights are torchvision's files in
# torch.hub's cache ($TORCH_HOME/hub/checkpoints); --download_only fetches them, and a run never does.
LPIPS_BACKBONES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
LPIPS_WEIGHTS_URL = "https://download.pytorch.org/models/"
LPIPS_DEFINITION = "lpips package v0.1 (Zhang et al. 2018), {net} backbone, inputs in [0, 1] mapped to [-1, 1]"
_LPIPS = {}


def lpips_weights_path(net: str) -> str:
    import torch
    return os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_BACKBONES[net])


def lpips_unavailable(net: str):
    """Why LPIPS with this backbone cannot be computed here (one line), or None when it can."""
    if net == "off":
        return "off (run.lpips: off)"
    try:
        import lpips  # noqa: F401 - it imports torchvision, which a CPU-only torch may not load
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError against this torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"not computed: the lpips package does not import here ({first})"
    if not os.path.isfile(lpips_weights_path(net)):
        return (f"not computed: the {net} backbone weights {LPIPS_BACKBONES[net]} are not in "
                f"{os.path.dirname(lpips_weights_path(net))}; fetch them with python main.py --download_only")
    return None


def lpips_distance(ref, est, net: str = "vgg", device="cpu") -> list:
    """Per-image LPIPS between (B, C, H, W) tensors in [0, 1] (C = 1 is repeated to RGB). Call
    lpips_unavailable first: this raises where it would have said why."""
    import torch
    import lpips
    key = (net, str(device))
    if key not in _LPIPS:
        _LPIPS[key] = lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)
    to_model = lambda x: (2 * torch.as_tensor(x).float().clamp(0, 1) - 1).expand(-1, 3, -1, -1).to(device)  # noqa: E731
    with torch.no_grad():
        return [float(v) for v in _LPIPS[key](to_model(ref), to_model(est)).flatten()]


def download_lpips_weights(net: str) -> str:
    """torchvision's backbone file for LPIPS into torch.hub's cache (sha256 prefix checked)."""
    import torch
    path = lpips_weights_path(net)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        name = LPIPS_BACKBONES[net]
        torch.hub.download_url_to_file(LPIPS_WEIGHTS_URL + name, path, hash_prefix=name.rsplit("-", 1)[1].split(".")[0])
    return path


# ----------------------------------------------------------------------------
# 3. Run folders
# ----------------------------------------------------------------------------

def check_writable(save_dir: str) -> None:
    """save_dir, or the nearest existing folder above it, must be writable. Nothing is created
    here, so a run that stops on bad input leaves no empty results folder behind."""
    path = os.path.abspath(save_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"save_dir {save_dir!r} is not writable: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"save_dir {save_dir!r} is not writable: no write permission in {path}")


def make_run_dir(save_dir: str, prefix="run") -> str:
    """Creates results/run_YYYYMMDD_HHMMSS[_N] atomically (os.mkdir fails if it exists)."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"save_dir {save_dir!r} is not writable: {e.strerror or e}") from None
    base = os.path.join(save_dir, f"{prefix}_{datetime.now().strftime('%Y%m%d_%H%M%S')}")
    for n in range(10000):
        path = base if n == 0 else f"{base}_{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a unique run folder under {save_dir}")


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=float)
    os.replace(tmp, path)


def jsonable(data):
    """data as plain JSON types (tuples become lists); TypeError for anything JSON cannot hold."""
    return json.loads(json.dumps(data, allow_nan=True))


def format_duration(seconds: float) -> str:
    """'45 s', '3.2 min' or '1.5 h'."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def write_metrics_txt(path: str, m: dict) -> None:
    lines = [f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}" for k, v in m.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")




# ----------------------------------------------------------------------------
# 4. Measured PSF grids (.npy / .npz) and noise estimation
# ----------------------------------------------------------------------------

GRID_LAYOUT = "(Gy, Gx, k, k), or (Gy, Gx, C, k, k) for one PSF per colour channel"


def load_psf_grid(path: str):
    """Reads (Gy, Gx, k, k) PSFs, or colour (Gy, Gx, C, k, k) ones (channel axis 2), and optional
    (Gy, Gx, 2) [row, col] pixel positions.

    .npy holds the PSFs alone; .npz holds `psfs` and optionally `positions`. Returns
    (psfs float64 array normalised to sum 1, (ys, xs) node coordinates or None, original sums).
    """
    if not os.path.isfile(path):
        raise UserError(f"PSF grid file not found: {path}")
    check_psf_grid_header(path)
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if "psfs" not in z:
                    raise UserError(f"{path}: .npz must contain an array 'psfs' {GRID_LAYOUT}; found {list(z.keys())}")
                psfs = z["psfs"]
                positions = z["positions"] if "positions" in z else None
        elif path.endswith(".npy"):
            psfs, positions = np.load(path, allow_pickle=False), None
        else:
            raise UserError(f"PSF grid must be a .npy or .npz file, got {path}")
    except UserError:
        raise  # already names the file
    except (ValueError, OSError) as e:
        detail = str(e).splitlines()[0].replace(path, "").strip(" :'\"") or type(e).__name__  # numpy repeats the path
        raise UserError(f"cannot read PSF grid {path}: {detail[:200]}") from None
    psfs = np.asarray(psfs, dtype=np.float64)
    check_grid_layout(path, psfs.shape)
    if psfs.shape[-1] % 2 == 0:
        raise UserError(f"{path}: PSF size must be odd (the centre is a pixel), got {psfs.shape[-1]}; pad each PSF "
                        f"with one row and column of zeros to make it odd (this shifts it by half a pixel)")
    if not np.isfinite(psfs).all():
        raise UserError(f"{path}: PSF grid contains NaN or Inf")
    if (psfs < 0).any():
        raise UserError(f"{path}: PSF grid has negative values (min {psfs.min():.3g}); PSFs must be >= 0")
    sums = psfs.sum((-2, -1))
    if (sums <= 0).any():
        bad = np.argwhere(sums <= 0)[0]
        raise UserError(f"{path}: PSF at grid index {tuple(int(i) for i in bad)} has no mass (all zeros)")
    coords = None
    if positions is not None:
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape != psfs.shape[:2] + (2,) or not np.isfinite(pos).all():
            raise UserError(f"{path}: positions must be finite with shape {psfs.shape[:2] + (2,)}, got {pos.shape}")
        ys, xs = pos[:, 0, 0], pos[0, :, 1]
        if not (np.allclose(pos[..., 0], ys[:, None], atol=1e-6) and np.allclose(pos[..., 1], xs[None, :], atol=1e-6)):
            raise UserError(f"{path}: positions must form a rectilinear grid (rows share a y, columns share an x)")
        if (np.diff(ys) <= 0).any() or (np.diff(xs) <= 0).any():
            raise UserError(f"{path}: positions must increase along rows and columns")
        coords = (ys, xs)
    return psfs / sums[..., None, None], coords, sums


def check_grid_layout(path, shape) -> None:
    """One line naming the expected shape unless `shape` is (Gy, Gx, k, k) or (Gy, Gx, C, k, k)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) in (4, 5) and min(shape) >= 1 and shape[-1] == shape[-2]:
        return
    hint = ""
    if len(shape) == 5 and shape[2] == shape[3] and shape[4] != shape[3]:
        hint = "; channels last? put them on axis 2: np.moveaxis(psfs, -1, 2)"
    raise UserError(f"{path}: PSF grid must have shape {GRID_LAYOUT}, got {shape}{hint}")


def _npy_header(f, what):
    """(shape, dtype) from a .npy header, read without touching the data."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise UserError(f"{what} is not a valid .npy array: {str(e).splitlines()[0][:200]}") from None
    return shape, dtype


def check_psf_grid_header(path: str) -> None:
    """Refuses a PSF grid whose header declares absurd dimensions before any array is allocated.

    Limits: G <= MAX_PSF_GRID per side, k <= MAX_PSF_SIZE, G*G*k*k <= MAX_PSF_ELEMENTS.
    """
    import zipfile
    headers = {}
    if path.endswith(".npy"):
        with open(path, "rb") as f:
            headers["psfs"] = _npy_header(f, path)
    elif path.endswith(".npz"):
        try:
            with zipfile.ZipFile(path) as z:
                for key in ("psfs", "positions"):
                    if f"{key}.npy" in z.namelist():
                        with z.open(f"{key}.npy") as f:
                            headers[key] = _npy_header(f, f"{path}:{key}")
        except zipfile.BadZipFile:
            raise UserError(f"{path} is not a valid .npz file (not a zip archive; truncated or another format)") from None
    else:
        raise UserError(f"PSF grid must be a .npy or .npz file, got {path}")
    for key, (shape, dtype) in headers.items():
        if dtype.hasobject or dtype.kind not in "biuf":
            raise UserError(f"{path}: {key} must hold numbers, not {dtype}")
    shape = headers.get("psfs", ((),))[0]
    sides = len(shape) in (4, 5) and (max(shape[:2]) > MAX_PSF_GRID or max(shape[-2:]) > MAX_PSF_SIZE)
    if sides or math.prod(shape) > MAX_PSF_ELEMENTS:
        raise UserError(f"{path}: a PSF grid of shape {shape} is beyond the limits (grid side <= {MAX_PSF_GRID}, "
                        f"PSF size <= {MAX_PSF_SIZE}, {MAX_PSF_ELEMENTS:,} values in all); refusing to load it")
    if "positions" in headers and math.prod(headers["positions"][0]) > 2 * MAX_PSF_GRID ** 2:
        raise UserError(f"{path}: positions of shape {headers['positions'][0]} cannot belong to a PSF grid")


def save_psf_grid(path: str, psfs, coords) -> None:
    """Writes the format load_psf_grid reads: .npz with psfs and positions, or .npy with psfs."""
    psfs = np.asarray(psfs) if isinstance(psfs, (np.ndarray, list)) else psfs.detach().cpu().numpy()
    if not path.endswith((".npy", ".npz")):
        raise UserError(f"--save_psf_grid must end in .npz or .npy, got {path}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path.endswith(".npy"):
            np.save(path, psfs)
            return
        ys, xs = (np.asarray(c, dtype=np.float64) for c in coords)
        np.savez(path, psfs=psfs, positions=np.stack(np.meshgrid(ys, xs, indexing="ij"), -1))
    except OSError as e:
        raise UserError(f"cannot write the PSF grid to {path}: {e.strerror or e}") from None


def estimate_noise_sigma(img: np.ndarray) -> float:
    """Gaussian noise std of an (H, W, 3) [0, 1] image by the wavelet MAD estimator."""
    from skimage.restoration import estimate_sigma
    return float(estimate_sigma(img, channel_axis=-1, average_sigmas=True))


def list_images(folder: str):
    if not os.path.isdir(folder):
        raise UserError(f"not a directory: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
    if not files:
        raise UserError(f"no PNG/JPEG/TIFF images in {folder}")
    return [os.path.join(folder, f) for f in files]


def write_summary_csv(path: str, rows) -> None:
    import csv
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
