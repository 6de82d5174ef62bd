"""The configuration: the one place that knows config keys, their types, ranges and names.

config.yaml holds every default; this module holds the schema around it (types, alternatives,
ranges), the name registries (samplers, blur modes, forms, boundaries), the command-line flags and
their parser, the first version's key aliases, the checks of inputs that exclude each other, and
the late resolution of `auto` values (form, step count, grid size).

Precedence: config.yaml < --config FILE < --set section.key=value < explicit flags. Unknown keys
and bad values raise utils.UserError (one line, exit 2). It imports no torch: --help and a config
error are answered before that multi-second import.
"""

from __future__ import annotations

import argparse
import logging
import math
import numbers
import os
import re

import yaml

from utils import EXIT_BAD_INPUT, UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "config.yaml")

log = logging.getLogger("eigenpsf_dps")

# ----------------------------------------------------------------------------
# 1. Name registries: physics.py and dps.py hold the code, these the names a config may give
# ----------------------------------------------------------------------------

SAMPLER_METHODS = ("dps", "diffpir", "daps")             # dps.SAMPLERS maps each to its step function
EXACT = "exact"        # not a sampler: the analytic prior's posterior in closed form (dps.exact_posterior)
METHODS = SAMPLER_METHODS + (EXACT,)                     # sampler.method's values
DEFAULT_STEPS = {"dps": 1000, "diffpir": 100, "daps": 200}      # sampler.num_inference_steps: auto
BLUR_MODES = ("motion", "defocus", "mixed", "correlated", "random_iid", "lens")
FORMS = ("gather", "scatter")
BOUNDARIES = ("reflect", "zeros", "circular")
INTERPOLATIONS = ("bilinear", "nearest")
DEFAULT_GRID_SIZE = {"random_iid": 64}  # physics.grid_size: auto; every other mode: 8


def defaults() -> dict:
    """config.yaml as a nested dict: every key with its default (the schema's values)."""
    return load_config(DEFAULT_CONFIG)


def mode_defaults() -> dict:
    """Each blur mode's parameters as config.yaml sets them (mixed reads motion and defocus)."""
    pc = defaults()["physics"]
    out = {mode: dict(pc[mode]) for mode in BLUR_MODES if mode != "mixed"}
    out["mixed"] = {**out["motion"], **out["defocus"]}
    return out


def sampler_defaults() -> dict:
    """Each sampler's own settings (sampler.<method>) as config.yaml sets them."""
    sc = defaults()["sampler"]
    return {method: dict(sc[method]) for method in SAMPLER_METHODS}


def resolve_grid_size(physics_config: dict) -> int:
    """physics.grid_size with 'auto' resolved: 64 for random_iid, else 8."""
    g = physics_config.get("grid_size", "auto")
    return DEFAULT_GRID_SIZE.get(physics_config["blur_mode"], 8) if g in (None, "auto") else g


def resolve_form(physics_config: dict, measured: bool = False) -> str:
    """physics.form, with 'auto' resolved: gather (PSF indexed by the output pixel) for simulated
    motion blur, scatter (PSF indexed by the source point) for everything else: defocus,
    correlated, mixed and random_iid fields, and measured PSF grids, since lens aberration and a
    calibration target both describe how each source point spreads."""
    form = physics_config.get("form", "auto")
    if form == "auto":
        return "gather" if physics_config.get("blur_mode") == "motion" and not measured else "scatter"
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    return form


def resolve_late(cfg: dict) -> None:
    """The `auto` values that depend on the whole run, resolved once and saved resolved: the
    operator's form (measured grids are scatter) and the step count of the chosen sampler."""
    cfg["physics"]["form"] = resolve_form(cfg["physics"], measured=bool(cfg["data"]["psf_grid"]))
    if cfg["sampler"]["method"] == EXACT:   # one solve, whatever was asked (a warning says so)
        cfg["sampler"]["num_inference_steps"] = 1
    elif cfg["sampler"]["num_inference_steps"] == "auto":
        cfg["sampler"]["num_inference_steps"] = DEFAULT_STEPS[cfg["sampler"]["method"]]


# ----------------------------------------------------------------------------
# 2. Schema: types, alternatives and ranges around config.yaml's defaults
# ----------------------------------------------------------------------------

# Keys whose config.yaml default is a keyword: the type of their other values.
TYPES = {"physics.grid_size": int, "physics.n_eigen_psfs": int, "run.threads": int, "data.sigma_noise": float, "data.saturation": float, "sampler.clip_denoised": bool,
         "sampler.num_inference_steps": int, "sampler.tile": int, "train.channels": int}


# Values a key may take besides the type of its default in config.yaml.
ALTERNATIVES = {
    "physics.grid_size": ("auto",),
    "physics.n_eigen_psfs": ("auto", "all"),
    "run.threads": ("auto",),
    "data.sigma_noise": ("auto",),
    "data.saturation": ("auto",),
    "sampler.clip_denoised": ("auto", True, False),
    "sampler.num_inference_steps": ("auto",),
    "sampler.tile": ("off", "auto"),
    "train.channels": ("auto", 1, 3),
}


def choices() -> dict:
    """The values keyword-valued keys may take."""
    return {
        "physics.blur_mode": BLUR_MODES,
        "physics.form": ("auto",) + FORMS,
        "physics.boundary": BOUNDARIES,
        "physics.interpolation": INTERPOLATIONS,
        "sampler.method": METHODS,
        "sampler.daps.conditional": ("cg", "langevin"),
        "sampler.daps.final": ("draw", "mean"),
        "run.dtype": ("auto", "float32", "bfloat16", "float16"),
        "run.compile": ("off", "default", "reduce-overhead", "max-autotune"),
        "run.lpips": ("vgg", "alex", "off"),
        "train.size": ("tiny", "small", "base"),
    }


# (low, high) inclusive; None = unbounded.
RANGES = {
    "data.img_size": (8, 4096), "data.sigma_noise": (0.0, 1.0), "data.saturation": (0.0, None),
    "physics.kernel_size": (1, 255), "physics.grid_size": (1, 256), "physics.n_eigen_psfs": (1, None), "run.threads": (1, 4096),
    "model.max_retries": (1, 100),
    "sampler.dps.step_size": (0.0, None), "sampler.dps.gradient_clip": (0.0, None),
    "sampler.diffpir.lambda": (1e-6, None), "sampler.diffpir.zeta": (0.0, 1.0),
    "sampler.diffpir.cg_max_iter": (1, 10000), "sampler.diffpir.cg_tol": (0.0, 1.0),
    "sampler.diffpir.discrepancy": (0.0, None), "sampler.diffpir.precondition": (False, True),
    "sampler.daps.ode_steps": (1, 100), "sampler.daps.cg_tol": (0.0, 1.0), "sampler.daps.cg_max_iter": (1, 10000),
    "sampler.daps.langevin_steps": (1, 10000), "sampler.daps.langevin_step": (0.0, 2.0),
    "sampler.daps.lr_min_ratio": (0.0, 1.0),
    "sampler.exact.cg_tol": (0.0, 1.0), "sampler.exact.cg_max_iter": (1, 100000), "sampler.exact.evidence": (False, True),
    "sampler.num_samples": (1, 1024), "sampler.intermediate_freq": (0, None), "sampler.log_every": (1, None),
    "sampler.tile": (8, 8192), "sampler.tile_overlap": (0, 8192), "sampler.tile_batch": (1, 4096),
    "train.crop": (8, 4096), "train.val_fraction": (0.0, 0.9), "train.batch_size": (1, 65536), "train.steps": (1, None),
    "train.lr": (0.0, 1.0), "train.warmup_steps": (0, None), "train.weight_decay": (0.0, None),
    "train.grad_clip": (0.0, None), "train.ema_decay": (0.0, 1.0), "train.eval_every": (1, None),
    "train.sample_every": (1, None), "train.checkpoint_every": (1, None),
    "run.seed": (0, 2 ** 63 - 1), "run.batch_size": (1, 4096),
    "physics.lens.f_number": (0.3, 100.0), "physics.lens.pixel_pitch_um": (0.05, 100.0),
    "physics.lens.reference_wavelength_nm": (100.0, 20000.0), "physics.lens.pupil_samples": (16, 2048),
    "physics.lens.oversample": (1, 16), "physics.lens.truth_grid_factor": (1, 16),
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


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-8 as a float, as YAML 1.2 and Python do (YAML 1.1, PyYAML's, wants a
    dot: 1.0e-8, and read `--set sampler.exact.cg_tol=1e-8` as the string '1e-8')."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))


def load_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=YamlLoader)
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
        value = yaml.load(raw, Loader=YamlLoader) if raw.strip() else ""
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
        if isinstance(value, list) and not all(_type_ok(v, float) and math.isfinite(v) for v in value):
            raise UserError(f"{key} must be a list of finite numbers, got {value!r}")
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


# ----------------------------------------------------------------------------
# 3. Flags and their parser
# ----------------------------------------------------------------------------

def float_or_auto(text):
    return "auto" if text == "auto" else float(text)


def int_or(*keywords):
    """An argparse type that takes an int or one of `keywords` (e.g. --n_eigen_psfs auto, --grid_size auto)."""
    def parse(text):
        return text if text in keywords else int(text)
    parse.__name__ = "int or " + " or ".join(f"'{k}'" for k in keywords)
    return parse


def tile_value(text):
    """--tile: a side in pixels, auto or off."""
    return text if text in ("auto", "off") else int(text)


tile_value.__name__ = "int, 'auto' or 'off'"


# flag -> config key. Each flag's help shows the config.yaml default.
FLAGS = {
    "image": ("data.image", str, "clean image: path (PNG/JPEG/TIFF), http(s) URL, or 'sample'"),
    "img_size": ("data.img_size", int, "side of the square working image"),
    "sigma_noise": ("data.sigma_noise", float_or_auto, "measurement noise std on the [0, 1] scale, or 'auto' (real data)"),
    "image_dir": ("data.image_dir", str, "simulate and restore every image in this folder"),
    "blurred": ("data.blurred", str, "real data: an already blurred image (needs --psf_grid)"),
    "blurred_dir": ("data.blurred_dir", str, "real data: restore every image in this folder (needs --psf_grid)"),
    "psf_grid": ("data.psf_grid", str, "measured PSFs: .npy (G,G,k,k) or .npz with psfs [+ positions (G,G,2)]"),
    "save_psf_grid": ("data.save_psf_grid", str, "export the PSF grid used (.npz/.npy)"),
    "calibration": ("data.calibration", str, "measure the PSF grid from this image of point sources, write it, exit"),
    "saturation": ("data.saturation", float_or_auto, "calibration: the camera's full scale in the file's units "
                   "(4095 for 12-bit data in 16-bit files), or auto"),
    "blur_mode": ("physics.blur_mode", str, "the blur family (see config.yaml's physics.blur_mode)"),
    "kernel_size": ("physics.kernel_size", int, "odd PSF size in pixels"),
    "grid_size": ("physics.grid_size", int_or("auto"), "PSFs per image side, or auto (8, or 64 for random_iid)"),
    "n_eigen_psfs": ("physics.n_eigen_psfs", int_or("auto", "all"),
                     "number K of EigenPSFs (1..grid_size^2); auto: the fewest that explain 99%% of the PSF variance "
                     "(at most 32); all: the exact full-rank operator"),
    "model_id": ("model.model_id", str, "hub id, diffusers folder, analytic, ADM name or .pt (docs/priors.md)"),
    "model_cache": ("model.model_cache", str, "hub cache directory (share it between login and compute nodes)"),
    "max_retries": ("model.max_retries", int, "download attempts"),
    "sampler": ("sampler.method", str, " | ".join(METHODS) + " (exact: the analytic prior's exact posterior mean)"),
    "num_inference_steps": ("sampler.num_inference_steps", int_or("auto"),
                            "steps, or auto (dps 1000, diffpir 100, daps 200)"),
    "train_dir": ("train.dir", str, "train a prior on this folder of clean images instead of restoring "
                  "(docs/training.md)"),
    "init": ("train.init", str, "training: fine-tune this --model_id instead of starting from scratch"),
    "tile": ("sampler.tile", tile_value, "run the UNet on overlapping tiles of this side (pixels), auto, or off"),
    "tile_overlap": ("sampler.tile_overlap", int, "pixels shared by neighbouring tiles"),
    "step_size": ("sampler.dps.step_size", float, "DPS step size zeta"),
    "gradient_clip": ("sampler.dps.gradient_clip", float, "DPS: max per-image gradient norm (0 = off)"),
    "num_samples": ("sampler.num_samples", int, "posterior samples per measurement"),
    "seed": ("run.seed", int, "random seed (PSFs, noise, sampling)"),
    "batch_size": ("run.batch_size", int, "folder runs: measurements restored per sampler call"),
    "device": ("run.device", str, "auto | cpu | cuda | cuda:N"),
    "threads": ("run.threads", int_or("auto"), "CPU threads for torch, or auto (OMP_NUM_THREADS, else the CPUs "
                "this process may use)"),
    "dtype": ("run.dtype", str, "UNet autocast dtype: auto | float32 | bfloat16 | float16 (auto: bfloat16 for a "
              "learned prior on a CPU with native bf16, else float32)"),
    "compile": ("run.compile", str, "torch.compile mode for the UNet: off | default | reduce-overhead | max-autotune"),
    "save_dir": ("run.save_dir", str, "parent folder of run folders"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """Flag errors as one line with a hint, like every other bad input, not the usage block."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (python main.py --help lists every flag)\n")


def build_parser(defaults: dict, description: str = "") -> argparse.ArgumentParser:
    flat = flatten(defaults)
    # allow_abbrev=False: a misspelt flag (--num_sample) is an error, not silently another flag.
    p = OneLineErrorParser(description=description, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Exit codes: 0 done, 2 bad input, 3 diverged, 4 batch with failed images, 75 preempted, "
                                       "130 interrupted.")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, repeatable (default: none)")
    for name, (key, typ, text) in FLAGS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{text} (default: {flat.get(key)!r}, {key})")
    p.add_argument("--no_intermediates", action="store_true",
                   help="do not write intermediates/step_XXXX.png (default: written, run.save_intermediates)")
    p.add_argument("--no_figures", action="store_true",
                   help="do not draw a restoration's per-image matplotlib figures in images/ (default: drawn, "
                        "run.save_figures; calibration pictures are always drawn)")
    p.add_argument("--no_baseline", action="store_true",
                   help="skip the classical baselines (Richardson-Lucy and Tikhonov) written beside each restoration "
                        "(default: run, run.baseline)")
    p.add_argument("--download_only", action="store_true",
                   help="download the model into --model_cache and exit (default: off)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a preempted run (or folder run, batch_...) from RUN_DIR/checkpoint.pt with its saved config (default: off)")
    return p


def resolve_config(args, argv_flags, schema) -> tuple:
    """config.yaml (schema and defaults) <- --config file <- --set <- explicit flags, validated once.

    Returns (config, explicit): the keys the user chose (in a --config file, by --set or a flag);
    the others are defaults, which fit_defaults may adapt to the data.
    """
    user = load_config(args.config) if os.path.abspath(args.config) != DEFAULT_CONFIG else {}
    pairs = [parse_set(item) for item in args.set]
    # The run's blur mode, which decides whether the first version's physics.random_iid.grid_size applies.
    mode = args.blur_mode or dict(pairs).get("physics.blur_mode") or flatten(user).get(
        "physics.blur_mode", schema["physics"]["blur_mode"])
    user = unflatten(unalias(flatten(user), os.path.basename(args.config), mode, log))
    # A config file's key counts as chosen where it differs from config.yaml: a full copy of
    # config.yaml chooses nothing (its image: sample and saturation: auto are the defaults).
    defaults = flatten(schema)
    explicit = {k for k, v in flatten(user).items() if k not in defaults or defaults[k] != v}
    resolved = with_defaults(user, schema)
    unalias(dict(pairs), "--set", mode)  # an old key beside its new one, with another value, is an error
    for key, value in pairs:  # in order: a later --set of a key overrides an earlier one
        key = unalias_key(key, mode, "--set", log)
        if key is not None:
            set_key(resolved, key, value, schema)
            explicit.add(key)
    for name in argv_flags:
        key = FLAGS[name][0]
        set_key(resolved, key, getattr(args, name), schema)
        explicit.add(key)
    if args.no_intermediates:
        resolved["run"]["save_intermediates"] = False
    if args.no_figures:
        resolved["run"]["save_figures"] = False
    if args.no_baseline:
        resolved["run"]["baseline"] = False
    return validate_config(resolved, schema), explicit


def check_resume_alone(args, given) -> None:
    """--resume continues a run with the config saved in it: any other setting (a flag, --set,
    --config, a --no_ switch) would be ignored, and a job that meant to change it (train.steps, a
    step size) would run on without it. Refused with one line instead."""
    if not args.resume:
        return
    others = [f"--{g}" for g in given] + [f"--set {s}" for s in args.set]
    others += [f"--{s}" for s in ("no_intermediates", "no_figures", "no_baseline", "download_only") if getattr(args, s)]
    if os.path.abspath(args.config) != DEFAULT_CONFIG:
        others.append(f"--config {args.config}")
    if others:
        raise UserError(f"--resume continues {args.resume} with the config saved in it and takes no other setting "
                        f"(got {', '.join(others)}); start a new run to change settings")


# Inputs that exclude each other: (keys, why). Each pair given together is refused with one line
# rather than one of them being dropped without a word.
SIMULATION_ONLY = ("data.img_size", "physics.blur_mode")


INPUT_KEYS = ("data.image", "data.image_dir", "data.blurred", "data.blurred_dir", "data.calibration")


FLAG_OF = {key: f"--{name}" for name, (key, _, _) in FLAGS.items()}


def check_conflicts(cfg, explicit) -> None:
    """Refuses combinations of inputs that would silently ignore one of them."""
    flat = flatten(cfg)
    given = [k for k in INPUT_KEYS if flat[k] and (k != "data.image" or k in explicit)]
    name = lambda k: FLAG_OF.get(k, k)  # noqa: E731
    if len(given) > 1:
        a, b = given[:2]
        raise UserError(f"{name(a)} and {name(b)} are different inputs (one run restores one of: a clean image "
                              f"to simulate from, a folder of them, a real measurement, a folder of them, or a "
                              f"calibration image); give one")
    if "data.saturation" in explicit and not (given and given[0] == "data.calibration"):
        raise UserError("--saturation applies to --calibration (the camera's full scale in a calibration image)")
    if given and given[0] == "data.calibration" and flat["data.psf_grid"]:
        raise UserError("--calibration measures a PSF grid; it does not take --psf_grid (restore with the grid it "
                              "writes in a second run)")
    if cfg["sampler"]["method"] == EXACT and cfg["model"]["model_id"] != "analytic":
        raise UserError(f"--sampler exact is the analytic prior's closed-form posterior; {cfg['model']['model_id']} "
                        f"has none: use dps, diffpir or daps, or --model_id analytic")
    if given and given[0] in ("data.blurred", "data.blurred_dir"):
        ignored = [name(k) for k in SIMULATION_ONLY if k in explicit]
        if ignored:
            raise UserError(f"{' and '.join(ignored)} appl{'y' if len(ignored) > 1 else 'ies'} to simulations; a "
                                  f"real measurement ({name(given[0])}) is restored at its own size with its --psf_grid")


REAL_DATA_SAMPLES = 16


def sampler_chosen(explicit) -> bool:
    """Whether the user chose anything about sampling: the method, the samples, the steps or a
    sampler's own setting (sampler.<method>.<key>; the exact solve's own, sampler.exact.*, keep it)."""
    return any(k in ("sampler.method", "sampler.num_samples", "sampler.num_inference_steps")
               or (k.startswith("sampler.") and k.count(".") == 2 and not k.startswith(f"sampler.{EXACT}."))
               for k in explicit)


def real_data_defaults(cfg, explicit) -> None:
    """On a real measurement, what the user did not choose, each with an info line:
    - with the analytic prior and no sampler setting: its exact posterior mean (method exact, one
      CG solve, 10-31× less time than DiffPIR's mean of 16 samples in bench/bench_speed.py; there
      it scored 0.8-1.2 dB below that mean against the clean image, where DiffPIR's noise-level
      stops regularise this too-weak prior; docs/benchmarks.md);
    - otherwise DiffPIR (above DPS at 1000 steps in all 8 problems of the sampler benchmark,
      bench/bench_samplers.py, at a tenth of the steps), unless a DPS setting was given; and with
      the analytic prior the mean of REAL_DATA_SAMPLES samples (one sample of a Gaussian prior is
      grainy: it scored 5 dB below the blurred input on the README's real-data command).
    σ_y = 0 is refused: every camera frame has noise, and without it every data step is a deconvolution."""
    d, sc = cfg["data"], cfg["sampler"]
    if not (d["blurred"] or d["blurred_dir"]):
        return
    if d["sigma_noise"] != "auto" and d["sigma_noise"] == 0:
        raise UserError("--sigma_noise 0 on a real measurement: every camera frame has noise, and without it the "
                        "data steps amplify it; give its level (e.g. --sigma_noise 0.01) or --sigma_noise auto")
    analytic = cfg["model"]["model_id"] == "analytic"
    if analytic and not sampler_chosen(explicit):
        log.info("real data with the analytic prior: its exact posterior mean, one CG solve to a relative residual "
                 "of %g (--num_samples N or --sampler for posterior samples)", sc[EXACT]["cg_tol"])
        sc["method"] = EXACT
    elif sc["method"] != EXACT:
        if "sampler.method" not in explicit and not any(k.startswith("sampler.dps.") for k in explicit) \
                and sc["method"] != "diffpir":
            log.info("real data: sampler diffpir (the default for real measurements; --sampler dps for DPS)")
            sc["method"] = "diffpir"
        if analytic and "sampler.num_samples" not in explicit and sc["num_samples"] == 1:
            log.info("real data with the analytic prior: restoring the mean of %d posterior samples (--num_samples 1 "
                     "for one)", REAL_DATA_SAMPLES)
            sc["num_samples"] = REAL_DATA_SAMPLES
    if "data.sigma_noise" not in explicit and d["sigma_noise"] != "auto":
        log.info("real data: noise sigma %g, config.yaml's default, not measured (--sigma_noise auto estimates it "
                 "from the measurement; --sigma_noise VALUE sets it)", d["sigma_noise"])


def warn_other_sampler_settings(cfg, explicit) -> None:
    """A setting of a sampler the run does not use (--step_size with --sampler diffpir) would be
    ignored without a word: one warning each."""
    method = cfg["sampler"]["method"]
    for key in sorted(explicit):
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "sampler" and parts[1] in METHODS and parts[1] != method:
            log.warning("%s is a %s setting; the %s sampler ignores it", FLAG_OF.get(key, f"--set {key}"), parts[1],
                        method)
    if method == EXACT and "sampler.num_inference_steps" in explicit:
        log.warning("--num_inference_steps applies to the samplers; the exact posterior is one solve and ignores it")
