"""Folder runs (--image_dir, --blurred_dir): one sub-folder per image and summary.csv, up to
run.batch_size measurements of one shape per sampler call.

Each image draws from its own generator, seeded from (seed, file name), so that its result is
the same at any batch size and in any shard of the folder. A stop request checkpoints the batch
in flight (or, between batches, the images done); --resume finishes that batch, then the rest.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import sys
from dataclasses import dataclass

import torch

import checkpoint
import physics
import problem
import restore
import timing
import utils

log = logging.getLogger("eigenpsf_dps")


SUMMARY_KEYS = ("status", "psnr_blurred", "psnr_restored", "ssim_blurred", "ssim_restored", "lpips_blurred",
                "lpips_restored", "psnr_richardson_lucy", "psnr_tikhonov", "lpips_richardson_lucy", "lpips_tikhonov",
                "data_residual_relative",
                "operator_relative_error", "sigma_noise_estimated", "runtime_s", "batch_size", "error")


@dataclass
class Item:
    """One measurement of a folder run on its way through a batch."""
    index: int                     # its place in the sorted input list (and in summary.csv)
    p: problem.Problem
    gen: object                    # its own generator: PSFs, noise and sampling
    folder: str = ""               # its run folder, once made
    progress: dict = None          # a checkpoint's progress to continue from
    view: restore.RunView = None


def image_generator(seed: int, name: str, device):
    """Each image of a folder run draws from its own generator, seeded from (seed, file name), so
    that its result is the same at any batch size, beside any neighbours, and in any shard of the
    folder (a Slurm array task, a re-run of the failures)."""

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def folder_groups(inputs, todo, cfg, device, measured, pipes, rows):
    """Yields lists of up to run.batch_size prepared Items of one measurement shape (y's channels
    and size, hence one sampling size after the UNet padding rule), as they fill, then the
    partial ones. Only one partial list per shape is held. A file that cannot be prepared becomes
    an error row. A measured grid's operators are built once per image size (problem.operators)."""
    n, pending, built = cfg["run"]["batch_size"], {}, {}
    for i in todo:
        path = inputs[i]
        gen = image_generator(cfg["run"]["seed"], os.path.basename(path), device)
        try:
            p = problem.prepare(path, cfg, device, gen, measured, built)
            pipe, _ = restore.load_pipeline(cfg, device, p.y.shape[1], pipes)
            restore.check_channels(pipe, p)
        except (utils.UserError, ValueError) as e:  # a bad file is reported, not fatal
            log.warning("skipping %s: %s", path, e)
            rows[i] = {"file": os.path.basename(path), "status": "error", "error": str(e)}
            continue
        group = pending.setdefault(tuple(p.y.shape), [])
        group.append(Item(i, p, gen))
        if len(group) == n:
            yield pending.pop(tuple(p.y.shape))
    yield from pending.values()


def restore_group(items, batch_dir, cfg, device, dtype, pipes, extra, shared, save, start=None) -> int:
    """Restores a batch of Items in one sampler call and writes each image's folder and summary
    row (save.rows). shared: one PSF grid for all (the operator is used as it is, not stacked).
    start: (x_t, next index) of a resumed batch. If any image diverges, the batch is re-run one
    image at a time from where it started, so that the others get their batch-of-one result."""

    S = cfg["sampler"]["num_samples"]
    pipe, multiple = restore.load_pipeline(cfg, device, items[0].p.y.shape[1], pipes)
    for it in items:
        it.folder = it.folder or utils.make_run_dir(batch_dir, prefix=it.p.name)
        with timing.RUN("outputs"):
            it.view = restore.restore_inputs(it.p, it.folder, cfg, device, pipe, multiple, extra, it.progress)
    pipe.operator = items[0].view.op if shared else physics.stack_operators([it.view.op for it in items])
    before = [(it.gen.get_state(), copy.deepcopy(it.view.state)) for it in items]
    save_state = lambda x_t, nxt: checkpoint.save_folder_checkpoint(save.path, items, x_t, nxt, save.inputs,  # noqa: E731
                                                                     save.rows)
    out, code, error, partial = restore.sample([it.p for it in items], [it.view for it in items], cfg, device, dtype,
                                       [it.gen for it in items for _ in range(S)], pipe, start, save_state, batch_dir)
    if code == utils.EXIT_DIVERGED and len(items) > 1:
        log.warning("%s; restoring these %d images one at a time so that the others are unaffected",
                    error, len(items))
        for b, (it, (gen_state, progress)) in enumerate(zip(items, before)):
            it.gen.set_state(gen_state)
            it.progress = progress
            one = None if start is None else (start[0][b * S:(b + 1) * S], start[1])
            code_b = restore_group([it], batch_dir, cfg, device, dtype, pipes, extra, shared, save, one)
            code = code_b if code_b in (utils.EXIT_INTERRUPTED, utils.EXIT_PREEMPTED, utils.EXIT_BAD_INPUT) or code == utils.EXIT_DIVERGED \
                else code
            if code_b in (utils.EXIT_INTERRUPTED, utils.EXIT_PREEMPTED, utils.EXIT_BAD_INPUT):
                break
        return code
    for b, it in enumerate(items):
        with timing.RUN("outputs"):
            restore.write_outputs(it.p, it.view, it.folder, cfg, device, image_output(out, b, S),
                                  None if partial is None else partial[b * S:b * S + 1])
        restore.finish(it.view, it.folder, error)
        m = it.view.metrics
        save.rows[it.index] = {"file": os.path.basename(save.inputs[it.index]), "folder": os.path.basename(it.folder),
                               **summary_row(m)}
        if m.get("status") == "complete":
            for line in restore.summary_lines(m):
                log.info("%s: %s", os.path.basename(save.inputs[it.index]), line)
    return code


def summary_row(m) -> dict:
    """An image's summary.csv columns: SUMMARY_KEYS, the fit check's ratio and each baseline's residual."""
    row = {k: m[k] for k in SUMMARY_KEYS if k in m}
    if "fit_check" in m:
        row["residual_over_noise"] = m["fit_check"]["residual_over_noise"]
    for name in restore.BASELINE_TITLES:
        if name in m:
            row[f"data_residual_{name}"] = m[name]["data_residual_relative"]
    return row


def image_output(out, b: int, S: int):
    """Image b's share of a batch's output (see EigenPSFDPSPipeline), or None."""
    if out is None:
        return None
    if isinstance(out, dict):
        return {k: v[b:b + 1] for k, v in out.items()}
    return out[b:b + 1]


@dataclass
class FolderSave:
    """Where a folder run keeps its state: the checkpoint path, the input list and the rows so far."""
    path: str
    inputs: list
    rows: dict


def run_folder(inputs, batch_dir, cfg, device, dtype, extra, resume=None, pipes=None) -> int:
    """4b. A folder run: one sub-folder per image and summary.csv in input order (kept current),
    up to run.batch_size images per sampler call. A stop request checkpoints the batch in flight
    (or, between batches, the images done) into BATCH_DIR/checkpoint.pt; resume (that checkpoint)
    finishes its batch first, then the rest."""
    d = cfg["data"]
    measured = utils.load_psf_grid(d["psf_grid"]) if d["psf_grid"] else None
    save = FolderSave(os.path.join(batch_dir, "checkpoint.pt"), list(inputs), {})
    first, start = [], None
    if resume is not None:
        save.rows = {int(i): r for i, r in resume["rows"].items()}
        for entry in resume["images"]:
            p, gen = problem.problem_from_entry(entry, cfg, device)
            first.append(Item(entry["index"], p, gen, os.path.join(batch_dir, entry["folder"]), entry["progress"]))
        start = (resume["x_t"], resume["next_index"]) if first else None
    # Between batches too, a signal only asks for a stop: the batch's outputs are finished first.
    with checkpoint.stop_requests():
        code, stopped = folder_loop(first, start, batch_dir, cfg, device, dtype, extra, measured,
                                    {} if pipes is None else pipes, save)
    if stopped:
        print(batch_dir)
        return code
    if os.path.exists(save.path):
        os.remove(save.path)
    n_err = sum(r["status"] != "complete" for r in save.rows.values())
    log.info("batch done: %d/%d complete; summary in %s", len(save.rows) - n_err, len(inputs), batch_dir)
    log.info("%s", timing.summary_line(timing.RUN.report()))
    print(batch_dir)
    if n_err and not code:
        print(f"error: {n_err} of {len(inputs)} images failed; see {os.path.join(batch_dir, 'summary.csv')}",
              file=sys.stderr)
        return utils.EXIT_BATCH_INCOMPLETE
    return code


def folder_loop(first, start, batch_dir, cfg, device, dtype, extra, measured, pipes, save) -> tuple:
    """The batches of a folder run, the resumed one (first, from start) before the others.
    Returns (exit code, whether the run stopped early)."""
    summary = lambda: utils.write_summary_csv(os.path.join(batch_dir, "summary.csv"),  # noqa: E731
                                              [save.rows[i] for i in sorted(save.rows)])
    busy = set(save.rows) | {it.index for it in first}
    groups = folder_groups(save.inputs, [i for i in range(len(save.inputs)) if i not in busy], cfg, device,
                           measured, pipes, save.rows)
    worst = 0
    for n, items in enumerate(itertools.chain([first] if first else [], groups)):
        if checkpoint.STOP["signal"] is not None:  # asked between batches: nothing in flight
            summary()
            checkpoint.save_folder_checkpoint(save.path, [], torch.zeros(0), 0, save.inputs, save.rows)
            code, _, why = checkpoint.stop_outcome()
            print(f"error: {why} between batches, {len(save.rows)}/{len(save.inputs)} images done; checkpoint "
                  f"saved, continue with --resume {batch_dir}", file=sys.stderr)
            return code, True
        code = restore_group(items, batch_dir, cfg, device, dtype, pipes, extra, measured is not None, save,
                             start if (first and n == 0) else None)
        worst = worst or code
        summary()
        if code in (utils.EXIT_INTERRUPTED, utils.EXIT_PREEMPTED, utils.EXIT_BAD_INPUT):  # a stop ends the run, not just this batch
            error = next(r["error"] for r in (save.rows.get(it.index, {}) for it in items) if r.get("error"))
            print(f"error: {error}", file=sys.stderr)
            return code, True
    summary()
    return worst, False
