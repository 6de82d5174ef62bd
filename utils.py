"""Config, image I/O, metrics and plots for EigenPSF-DPS.

Images cross this boundary once: files -> float tensors (1, C, H, W) in [0, 1], and back.
Metrics use that fixed [0, 1] range (data_range=1); nothing is min-max rescaled.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import time
from datetime import datetime

import numpy as np
import yaml

# torch is imported inside the few functions that need it: main.py parses flags (and answers
# --help) with this module before the seconds-long torch import.

MAX_URL_BYTES = 50 * 2 ** 20      # an image URL may send at most this much ...
MAX_URL_SECONDS = 120             # ... within this many seconds in all
MAX_IMAGE_PIXELS = 8192 * 8192    # per frame, checked from the header before any pixel is decoded
MAX_PSF_ELEMENTS = 2 ** 26        # G*G*k*k of a PSF grid file (512 MB as float64), checked from the header
MAX_PSF_GRID, MAX_PSF_SIZE = 256, 255  # the config's limits on grid_size and kernel_size
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SAMPLE_FACE = (130, 240, 240)  # centre row, centre column and side of the face in scikit-image's astronaut


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------
# 1. Config: load, merge, validate, save
# ----------------------------------------------------------------------------

# Keys whose config.yaml default is a keyword: the type of their other values.
TYPES = {"physics.grid_size": int, "data.sigma_noise": float, "data.saturation": float, "sampler.clip_denoised": bool,
         "sampler.num_inference_steps": int, "sampler.tile": int, "train.channels": int}
# Values a key may take besides the type of its default in config.yaml.
ALTERNATIVES = {
    "physics.grid_size": ("auto",),
    "physics.n_eigen_psfs": ("all",),
    "data.sigma_noise": ("auto",),
    "data.saturation": ("auto",),
    "sampler.clip_denoised": ("auto", True, False),
    "sampler.num_inference_steps": ("auto",),
    "sampler.tile": ("off", "auto"),
    "train.channels": ("auto", 1, 3),
}
# The samplers (dps.SAMPLERS holds their code; a test keeps the two in step). Here so that config
# checks need not import diffusers.
SAMPLER_METHODS = ("dps", "diffpir")
def choices() -> dict:
    """The values keyword-valued keys may take; physics.py is the one source for the physics ones.

    Imported here, not at the top: physics imports torch, which --help must not wait for.
    """
    import physics
    return {
        "physics.blur_mode": physics.BLUR_MODES,
        "physics.form": ("auto",) + physics.FORMS,
        "physics.boundary": physics.BOUNDARIES,
        "physics.interpolation": physics.INTERPOLATIONS,
        "sampler.method": SAMPLER_METHODS,
        "run.dtype": ("float32", "bfloat16", "float16"),
        "run.compile": ("off", "default", "reduce-overhead", "max-autotune"),
        "run.lpips": ("vgg", "alex", "off"),
        "train.size": ("tiny", "small", "base"),
    }


# (low, high) inclusive; None = unbounded.
RANGES = {
    "data.img_size": (8, 4096), "data.sigma_noise": (0.0, 1.0), "data.saturation": (0.0, None),
    "physics.kernel_size": (1, 255), "physics.grid_size": (1, 256), "physics.n_eigen_psfs": (1, None),
    "model.max_retries": (1, 100),
    "sampler.dps.step_size": (0.0, None), "sampler.dps.gradient_clip": (0.0, None),
    "sampler.diffpir.lambda": (1e-6, None), "sampler.diffpir.zeta": (0.0, 1.0),
    "sampler.diffpir.cg_max_iter": (1, 10000), "sampler.diffpir.cg_tol": (0.0, 1.0),
    "sampler.diffpir.discrepancy": (0.0, None), "sampler.diffpir.precondition": (False, True),
    "sampler.num_samples": (1, 1024), "sampler.intermediate_freq": (0, None), "sampler.log_every": (1, None),
    "sampler.tile": (8, 8192), "sampler.tile_overlap": (0, 8192), "sampler.tile_batch": (1, 4096),
    "train.crop": (8, 4096), "train.val_fraction": (0.0, 0.9), "train.batch_size": (1, 65536), "train.steps": (1, None),
    "train.lr": (0.0, 1.0), "train.warmup_steps": (0, None), "train.weight_decay": (0.0, None),
    "train.grad_clip": (0.0, None), "train.ema_decay": (0.0, 1.0), "train.eval_every": (1, None),
    "train.sample_every": (1, None), "train.checkpoint_every": (1, None),
    "run.seed": (0, 2 ** 63 - 1), "run.batch_size": (1, 4096),
}


# The first version's config keys -> today's: accepted in config files and --set, each with an info
# line, and written out under today's name. physics.random_iid.grid_size was that version's grid size
# for blur_mode random_iid only: it sets physics.grid_size when the mode is random_iid and is
# otherwise unused (config.yaml's grid_size auto gives random_iid 64, as that version's file did).
ALIASES = {
    "data.image_source": "data.image",
    "physics.sigma_noise": "data.sigma_noise",
    "physics.random_iid.grid_size": "physics.grid_size",
    "model.device": "run.device",
    "model.dtype": "run.dtype",
    "dps.step_size": "sampler.dps.step_size",
    "dps.num_inference_steps": "sampler.num_inference_steps",
    "dps.gradient_clip": "sampler.dps.gradient_clip",
    "dps.gradient_checkpointing": "run.gradient_checkpointing",
    "output.save_dir": "run.save_dir",
    "output.save_intermediate": "run.save_intermediates",
    "output.intermediate_freq": "sampler.intermediate_freq",
}
RANDOM_IID_GRID = "physics.random_iid.grid_size"


def unalias_key(key: str, blur_mode: str, source: str, log=None):
    """Today's name for `key` (itself if current), with an info line for an old name; None for
    physics.random_iid.grid_size under another blur mode, where that version did not use it."""
    if key not in ALIASES:
        return key
    new = ALIASES[key]
    if key == RANDOM_IID_GRID:
        used = blur_mode == "random_iid"   # that version's rule: the random_iid grid replaced grid_size
        if log:
            log.info("%s: %s is the grid size for blur_mode random_iid; %s", source, key,
                     f"used as {new}" if used else f"unused with blur_mode {blur_mode}")
        return new if used else None
    if log:
        log.info("%s: config key %s is now %s", source, key, new)
    return new


def unalias(flat: dict, source: str, blur_mode: str, log=None) -> dict:
    """A flat config with the first version's keys renamed to today's (ALIASES), one info line per
    alias used (blur_mode: the run's, for physics.random_iid.grid_size). An alias given beside its
    current key with another value is a UserError."""
    out = {k: v for k, v in flat.items() if k not in ALIASES}
    for old, value in flat.items():
        new = unalias_key(old, blur_mode, source, log) if old in ALIASES else None
        if new is None:
            continue
        if new in flat and flat[new] != value and old != RANDOM_IID_GRID:
            raise UserError(f"{source}: {old} (the old name of {new}) is {value!r} but {new} is {flat[new]!r}; "
                            f"keep one")
        out[new] = value
    return out


def unflatten(flat: dict) -> dict:
    """The inverse of flatten: {'a.b': v} -> {'a': {'b': v}}."""
    out = {}
    for key, value in flat.items():
        _put(out, key, value)
    return out


def load_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config file {path} must be a mapping of sections")
    return cfg


def flatten(cfg: dict, prefix="") -> dict:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_key(cfg: dict, dotted: str, value, schema: dict) -> None:
    """Sets cfg[a][b]... = value after checking that the key exists in the schema config."""
    flat = flatten(schema)
    if dotted not in flat:
        raise UserError(f"unknown config key {dotted!r}{_key_hint(dotted, flat)}")
    _put(cfg, dotted, value)


def _put(cfg: dict, dotted: str, value) -> None:
    """cfg[a][b]... = value for dotted = 'a.b...', making the sections on the way."""
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _key_hint(dotted: str, flat: dict) -> str:
    """'; did you mean K?' for the nearest current key, matching old names (ALIASES) too."""
    import difflib
    names = {**{k: k for k in flat}, **ALIASES}          # a name (current or old) -> the current key
    near = [k for k in names if k.split(".")[-1] == dotted.split(".")[-1]] or difflib.get_close_matches(dotted, names, 1)
    if not near:
        return ""
    current = names[near[0]]
    return f"; did you mean {current}{f' (formerly {near[0]})' if near[0] != current else ''}?"


def with_defaults(cfg: dict, schema: dict) -> dict:
    """cfg over the schema's values: every key of the schema, cfg's where it has one. A key that
    the schema lacks raises UserError (set_key)."""
    out = {}
    for key, value in {**flatten(schema), **flatten(cfg)}.items():
        set_key(out, key, value, schema)
    return out


def parse_set(item: str):
    """'section.key=value' -> (key, value); the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise UserError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _type_ok(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


def validate_config(cfg: dict, schema: dict) -> dict:
    """Unknown keys, wrong types and out-of-range values raise UserError. Returns cfg."""
    flat, ref, allowed = flatten(cfg), flatten(schema), choices()
    for key, value in flat.items():
        if key not in ref:
            raise UserError(f"unknown config key {key!r}")
        alts = ALTERNATIVES.get(key, ())
        if any(value == a and type(value) is type(a) for a in alts):
            continue
        typ = TYPES.get(key, type(ref[key]))
        if not _type_ok(value, typ):
            allowed = typ.__name__ + "".join(f" or {a!r}" for a in alts if not isinstance(a, bool))
            raise UserError(f"{key} must be {allowed}, got {value!r}")
        if key in allowed and value not in allowed[key]:
            raise UserError(f"{key} must be one of {list(allowed[key])}, got {value!r}")
        check_finite(key, value)
        if key in RANGES:
            lo, hi = RANGES[key]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                rng = f"[{lo}, {hi if hi is not None else '∞'}]"
                raise UserError(f"{key} must be in {rng}, got {value!r}")
    ks = flat.get("physics.kernel_size")
    if isinstance(ks, int) and ks % 2 == 0:
        raise UserError(f"physics.kernel_size must be odd (the PSF centre is a pixel), got {ks}")
    return cfg


def check_finite(name: str, value) -> None:
    """NaN passes every comparison and inf passes every lower bound: a number must be finite."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(float(value)):
        raise UserError(f"{name} must be a finite number, got {value}")  # numpy scalars too


def save_yaml(path: str, data: dict) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    The EigenPSF operator's batched temporaries are tens of MB; by default glibc serves each from a
    fresh mmap and unmaps it on free, so every call pays page faults for zeroed pages (seen here as
    1.5-2x slower, erratic CPU timings and most of the run in the kernel). Serving them from the
    heap (no mmap) and not trimming it removes that. A no-op where glibc is absent. Returns True
    if applied.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------
# 2. Images
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
    if x.shape[-1] in (2, 4):  # drop alpha
        x = x[..., :-1]
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
# 3. Metrics on the fixed [0, 1] range
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
# 4. Run folders and plots
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


def plot_psf_grid(path, grid, max_side=16):
    """The PSF field as a mosaic (each PSF scaled to its own max); large grids are subsampled."""
    Gy, Gx, k, _ = grid.shape
    sy, sx = max(1, math.ceil(Gy / max_side)), max(1, math.ceil(Gx / max_side))
    g = np.asarray(grid[::sy, ::sx] if isinstance(grid, np.ndarray) else grid[::sy, ::sx].cpu())
    g = g / np.maximum(g.max(axis=(-2, -1), keepdims=True), 1e-12)
    ny, nx = g.shape[:2]
    tiles = np.ones((ny, k + 1, nx, k + 1))          # each PSF with a 1-pixel white gutter
    tiles[:, :k, :, :k] = g.transpose(0, 2, 1, 3)
    mosaic = np.pad(tiles.reshape(ny * (k + 1), nx * (k + 1)), ((1, 0), (1, 0)), constant_values=1)
    sub = f" (every {sy}th row / {sx}th column)" if sy > 1 or sx > 1 else ""
    _image_with_colorbar(path, mosaic, f"PSF grid {Gy}x{Gx}, {k}x{k} kernels{sub}", 10,
                         "PSF value / that PSF's maximum", 6.0, 1.5, cmap="gray", interpolation="nearest", vmin=0, vmax=1)


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
    # plain "0.0201" labels, 3 significant digits (the default's mathtext costs ~70 ms, and
    # LogFormatter labels every tick of a curve within one decade alike, "2e-02")
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_xlabel("step", labelpad=1)
    _title(ax, "‖y − A(x̂₀)‖ / ‖y‖", 9)
    _save(fig, path)


# ----------------------------------------------------------------------------
# 5. Measured PSF grids (.npy / .npz) and noise estimation
# ----------------------------------------------------------------------------

def load_psf_grid(path: str):
    """Reads (G, G, k, k) PSFs and optional (G, G, 2) [row, col] pixel positions.

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
                    raise UserError(f"{path}: .npz must contain an array 'psfs' (G, G, k, k); found {list(z.keys())}")
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
    if psfs.ndim != 4 or psfs.shape[0] < 1 or psfs.shape[1] < 1 or psfs.shape[2] != psfs.shape[3]:
        raise UserError(f"{path}: PSF grid must have shape (G, G, k, k), got {psfs.shape}")
    if psfs.shape[2] % 2 == 0:
        raise UserError(f"{path}: PSF size must be odd (the centre is a pixel), got {psfs.shape[2]}; pad each PSF "
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
    sides = len(shape) == 4 and (max(shape[:2]) > MAX_PSF_GRID or max(shape[2:]) > MAX_PSF_SIZE)
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
