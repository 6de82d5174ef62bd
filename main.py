"""EigenPSF-DPS command line: simulate a spatially varying blur and restore it with DPS or DiffPIR.

    python main.py                                   # pretrained CelebA-HQ DDPM (GPU)
    python main.py --model_id analytic --device cpu  # offline, training-free prior
    python main.py --download_only                   # fetch weights on a login node

Precedence: config.yaml < --set section.key=value < explicit flags. Bad input stops the run with a
one-line error and exit code 2 before any results folder exists. Exit codes: 0 done, 2 bad input,
3 sampler diverged, 4 a batch finished but some images failed (see its summary.csv), 75 preempted
(checkpoint saved; resume with --resume), 130 interrupted (Ctrl-C; checkpoint saved).

This file is the table of contents: parse and resolve the config (config.py), then dispatch to
one handler per mode:

    --download_only   download_only          model weights and LPIPS's backbone
    --train_dir       training.train_prior   a prior for your own images
    --resume RUN_DIR  resume_run             a stopped run, folder run or training
    --calibration     calibration.calibrate  a PSF grid from an image of point sources
    (an image)        restore_images         one run folder: restore.restore
    (a folder)        restore_images         a batch folder: batch.run_folder
"""

from __future__ import annotations

import logging
import os
import sys
import time

_T0 = time.perf_counter()
import config  # noqa: E402
import timing  # noqa: E402
import utils  # noqa: E402

_IMPORT_S = time.perf_counter() - _T0    # this module's own imports: the start of 'startup'

log = logging.getLogger("eigenpsf_dps")


def load_modules() -> None:
    """The one import block after parsing: torch and the modules built on it, imported once the
    flags and config are valid, so that --help and a config error never wait for them. They are
    this module's globals from here on."""
    global torch, batch, calibration, checkpoint, device_setup, priors, problem, restore, training
    import torch

    import batch
    import calibration
    import checkpoint
    import device as device_setup
    import priors  # imported here, so that its errors count as bad input (exit 2)
    import problem
    import restore
    import training


def run(argv=None) -> int:
    """Parse, resolve, dispatch. Config, device, dtype and seed are resolved once, here."""
    timing.RUN = timing.Stopwatch()
    timing.RUN.add("startup", _IMPORT_S)
    with timing.RUN("startup"):
        schema = config.defaults()
        args = config.build_parser(schema, __doc__.split("\n\n")[0]).parse_args(argv)
        given = [n for n in config.FLAGS if getattr(args, n) is not None]
        config.check_resume_alone(args, given)
        cfg, explicit = config.resolve_config(args, given, schema)
        config.check_conflicts(cfg, explicit)
        config.real_data_defaults(cfg, explicit)
        config.warn_other_sampler_settings(cfg, explicit)
    with timing.RUN("imports"):
        load_modules()
    checkpoint.STOP["signal"], checkpoint.RUN_DIR["path"] = None, None
    config.resolve_late(cfg)

    if args.download_only:
        return download_only(cfg)
    if cfg["train"]["dir"] and not args.resume:
        return training.train_prior(cfg)
    if args.resume:
        return resume_run(args.resume, schema)
    if cfg["data"]["calibration"]:
        return calibration.calibrate(cfg)
    return restore_images(cfg, explicit, sys.argv[1:] if argv is None else list(argv))


def restore_images(cfg, explicit, argv) -> int:
    """One image into a run folder, or a folder of images into a batch folder (batch.run_folder).
    Inputs and the model are validated before any folder exists."""
    with timing.RUN("setup"):   # what its own stages (operator, model, sampler, ...) do not take
        return _restore_images(cfg, explicit, argv)


def _restore_images(cfg, explicit, argv) -> int:
    d, rc = cfg["data"], cfg["run"]
    device = device_setup.resolve_device(rc["device"], threads=rc["threads"])
    timing.RUN.sync = device_setup.synchronizer(device)
    rc["dtype"] = device_setup.resolve_dtype(rc["dtype"], device, cfg["model"]["model_id"])  # saved resolved
    dtype = getattr(torch, rc["dtype"])
    gen = torch.Generator(device=device).manual_seed(rc["seed"])
    utils.check_writable(rc["save_dir"])

    # Inputs: validated before the model loads and before any folder exists.
    real = bool(d["blurred"] or d["blurred_dir"])
    folder = bool(d["image_dir"] or d["blurred_dir"])
    if real and not d["psf_grid"]:
        raise utils.UserError("real measurements (--blurred/--blurred_dir) need the PSFs: pass --psf_grid FILE")
    measured = problem.load_measured(cfg, explicit)
    inputs = utils.list_images(d["image_dir"] or d["blurred_dir"]) if folder else [d["blurred"] if real else d["image"]]
    first = None if folder else problem.prepare(inputs[0], cfg, device, gen, measured)
    if first is not None and d["save_psf_grid"]:
        utils.save_psf_grid(d["save_psf_grid"], first.grid, first.coords)
        log.info("PSF grid saved to %s", d["save_psf_grid"])

    # The prior (a folder run loads it here too, so that a model error comes before any folder).
    pipes = {}
    pipe, multiple = restore.load_pipeline(cfg, device, first.y.shape[1] if first else 3, pipes)
    if first is not None:
        restore.check_channels(pipe, first)
    extra = {"device": str(device), "seed": rc["seed"], "argv": argv, "versions": device_setup.versions(device)}

    if folder:
        batch_dir = checkpoint.RUN_DIR["path"] = utils.make_run_dir(rc["save_dir"], prefix="batch")
        log.info("folder of %d images, up to %d per sampler call: %s", len(inputs), rc["batch_size"], batch_dir)
        config.save_yaml(os.path.join(batch_dir, "config.yaml"), {**cfg, "resolved": extra})
        return batch.run_folder(inputs, batch_dir, cfg, device, dtype, extra, pipes=pipes)
    if rc["batch_size"] > 1:
        log.warning("batch_size %d applies to folder runs (--image_dir, --blurred_dir); this run restores one "
                    "image (use --num_samples for several samples of it)", rc["batch_size"])
    run_dir = checkpoint.RUN_DIR["path"] = utils.make_run_dir(rc["save_dir"])
    log.info("results: %s", run_dir)
    code, m = restore.restore(first, run_dir, cfg, device, dtype, gen, pipe, multiple, extra)
    return report(run_dir, code, m)


def report(run_dir, code, m) -> int:
    """The end of a single run: its folder on stdout (on every exit), then its error or summary."""
    if code:
        print(run_dir)
        print(f"error: {m['error']} (partial results in {run_dir})", file=sys.stderr)
        return code
    for line in restore.summary_lines(m):
        log.info("%s", line)
    log.info("%s", timing.summary_line(m["timings"]))
    print(run_dir)
    return 0


def resume_run(run_dir, schema) -> int:
    """Continues RUN_DIR (a run, a folder run or a training) from its checkpoint with its own saved
    config; bit-identical on CPU."""
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(ckpt_path):
        raise utils.UserError(f"no checkpoint.pt in {run_dir}: nothing to resume")
    checkpoint.RUN_DIR["path"] = run_dir
    with timing.RUN("setup"):
        return _resume_run(run_dir, ckpt_path, schema)


def _resume_run(run_dir, ckpt_path, schema) -> int:
    saved = config.load_config(os.path.join(run_dir, "config.yaml"))
    extra = saved.pop("resolved", {})
    # Keys added since the run was written take their defaults: what that version did.
    cfg = config.validate_config(config.with_defaults(saved, schema), schema)
    if cfg["train"]["dir"]:
        return training.train_prior(cfg, run_dir)
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    device = device_setup.resolve_device(cfg["run"]["device"], threads=cfg["run"]["threads"])
    timing.RUN.sync = device_setup.synchronizer(device)
    # The run saved its resolved dtype; 'auto' resolves the same way on the same machine.
    dtype = getattr(torch, device_setup.resolve_dtype(cfg["run"]["dtype"], device, cfg["model"]["model_id"]))
    log.info("resuming %s at step %d/%d", run_dir, ckpt["next_index"], cfg["sampler"]["num_inference_steps"])
    if ckpt.get("kind") == "folder":
        return batch.run_folder(ckpt["inputs"], run_dir, cfg, device, dtype, extra, resume=ckpt)
    p, gen = problem.problem_from_entry(ckpt, cfg, device)
    pipe, multiple = restore.load_pipeline(cfg, device, p.y.shape[1])
    code, m = restore.restore(p, run_dir, cfg, device, dtype, gen, pipe, multiple, extra, resume=ckpt)
    return report(run_dir, code, m)


def download_only(cfg) -> int:
    """--download_only: the model (converted, for an ADM checkpoint) and LPIPS's backbone weights,
    so that compute nodes without internet need nothing more."""
    mc = cfg["model"]
    cache = mc["model_cache"] or None
    lpips_weights(cfg["run"]["lpips"])
    if mc["model_id"] == "analytic" or os.path.isdir(mc["model_id"]):
        print(f"{mc['model_id']} needs no download")
    elif mc["model_id"].endswith(".pt") and os.path.isfile(mc["model_id"]):
        print(f"converted once; later runs load {priors.convert_adm_checkpoint(mc['model_id'])}")
    else:
        path = priors.download_model(mc["model_id"], cache, max_retries=mc["max_retries"])
        print(f"model ready; compute nodes can load it offline with HF_HUB_OFFLINE=1 --model_id {mc['model_id']} "
              f"--model_cache {priors.hub_cache_dir(cache)}  (or --model_id {path})")
    return 0


def lpips_weights(net: str) -> None:
    """LPIPS's backbone file, when the lpips package can use it here; otherwise one line on why not."""
    if net == "off":
        return
    why = utils.lpips_unavailable(net)
    if why is None or "backbone weights" in why:
        try:
            print(f"LPIPS ({net}) backbone weights in {utils.download_lpips_weights(net)}")
        except (OSError, RuntimeError) as e:  # no network, or a hash mismatch: the model may still be wanted
            print(f"warning: LPIPS's {net} backbone weights could not be fetched ({e}); runs will say LPIPS was "
                  f"not computed", file=sys.stderr)
    else:
        print(f"LPIPS: {why.replace('not computed: ', '')}; its weights are skipped (metrics.json will say so)")


def _bad_input_errors() -> tuple:
    """Exception types reported as bad input (exit 2). priors is only consulted once imported, so
    that --help never waits for torch; an except clause evaluates this only when needed."""
    priors = sys.modules.get("priors")
    return (utils.UserError, ValueError) + ((priors.ModelUnavailableError,) if priors else ())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        return run(argv)
    except _bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return utils.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        stops = sys.modules.get("checkpoint")
        print(interrupted_message(stops.RUN_DIR["path"] if stops else None), file=sys.stderr)
        return utils.EXIT_INTERRUPTED


def interrupted_message(run_dir) -> str:
    """What a Ctrl-C outside the sampler's own stop (a second one, or one between its steps and the
    outputs) leaves on disk; the run folder goes to stdout, as on every other exit."""
    if run_dir is None:
        return "error: interrupted before any results folder was made"
    print(run_dir)
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        return f"error: interrupted; the checkpoint in {run_dir} was written before it: continue with --resume {run_dir}"
    return f"error: interrupted before a checkpoint was written; {run_dir} holds what was written so far"


if __name__ == "__main__":
    sys.exit(main())
