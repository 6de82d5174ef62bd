"""Stop requests and the checkpoint format, for restorations and folder runs.

SIGTERM, SIGUSR1 and a first Ctrl-C only set STOP: the sampler's callback (restore.py) and the
training loop read it after a completed step and save a checkpoint, so that what is on disk is
consistent. A checkpoint holds tensors and plain containers only, and is read back with
torch.load(weights_only=True): no pickled object can run code. --resume continues it
bit-identically on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal

import torch

from utils import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError, jsonable


class Preempted(Exception):
    """SIGTERM/SIGUSR1 or a first Ctrl-C arrived; raised from the sampler callback after a
    completed step, so that the checkpoint holds a consistent state."""

    def __init__(self, step, x_t):
        super().__init__(f"preempted after step {step}")
        self.step, self.x_t = step, x_t


STOP = {"signal": None}  # set by the signal handler, read by the sampler callback


RUN_DIR = {"path": None}  # the run (or batch) folder in use, for what an interrupt leaves on disk


def _request_stop(signum, frame):
    """The first Ctrl-C stops like SIGTERM, at the end of the step with a checkpoint (one stray
    key press must not lose hours of CPU sampling); a second one quits at once."""
    if signum == signal.SIGINT and STOP["signal"] == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["signal"] = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_requests():
    """Within the block SIGTERM, SIGUSR1 and a first Ctrl-C only set STOP (see _request_stop);
    the previous handlers come back after it."""
    old = {sig: signal.signal(sig, _request_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def stop_outcome() -> tuple:
    """(exit code, status, why) for the stop request in STOP."""
    if STOP["signal"] == signal.SIGINT:
        return EXIT_INTERRUPTED, "interrupted", "interrupted by the user (Ctrl-C)"
    return EXIT_PREEMPTED, "preempted", f"stopped by signal {STOP['signal']}"


CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "eigenpsf-dps checkpoint", 2


def _image_entry(p, gen, state) -> dict:
    """One image's part of a checkpoint: its generator state, problem and progress so far."""
    clean = None if p.clean is None else torch.from_numpy(p.clean)
    return {"generator_state": gen.get_state(),
            "problem": {"name": p.name, "y": p.y.cpu(), "clean": clean, "grid": p.grid.cpu(),
                        "coords": [torch.as_tensor(c).cpu() for c in p.coords], "info": jsonable(p.info)},
            "progress": {"steps_done": int(state["steps_done"]), "runtime": float(state["runtime"]),
                         "steps": [int(s) for s in state["steps"]], "x0_hat": list(state["x0_hat"]),
                         "residual": list(state["residual"]),
                         "curve_steps": [int(s) for s in state.get("curve_steps", [])],
                         "curve": [float(v) for v in state.get("curve", [])]}}


def _write_checkpoint(path, body: dict) -> None:
    """Written atomically. Only tensors and plain containers (dict, list, str, int, float, bool,
    None) go in, so that load_checkpoint can read it with torch.load(weights_only=True): no
    pickled object can run code."""
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **body}, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(path, p, x_t, next_index, gen, state):
    """Everything needed to continue a single run bit-identically: x_t, the step, the generator
    state, the measurement and PSFs, and the progress so far."""
    _write_checkpoint(path, {"x_t": x_t.detach().cpu(), "next_index": int(next_index), **_image_entry(p, gen, state)})


def save_folder_checkpoint(path, items, x_t, next_index, inputs, rows):
    """A folder run's checkpoint: the batch in flight (x_t of all its samples, each image's entry
    and run folder), the input list, and the summary rows of the images already finished."""
    _write_checkpoint(path, {"kind": "folder", "x_t": x_t.detach().cpu(), "next_index": int(next_index),
                             "inputs": list(inputs), "rows": {str(i): jsonable(r) for i, r in rows.items()},
                             "images": [{**_image_entry(it.p, it.gen, it.view.state), "index": it.index,
                                         "folder": os.path.basename(it.folder)} for it in items]})


# key -> required type of a checkpoint entry (dotted keys reach into "problem" and "progress")
IMAGE_SCHEMA = {"generator_state": "tensor", "problem.name": str, "problem.y": "tensor", "problem.grid": "tensor",
                "problem.coords": list, "problem.info": dict, "progress.steps_done": int, "progress.runtime": float,
                "progress.steps": list, "progress.x0_hat": list, "progress.residual": list}


CHECKPOINT_SCHEMA = {"x_t": "tensor", "next_index": int, **IMAGE_SCHEMA}


FOLDER_SCHEMA = {"x_t": "tensor", "next_index": int, "inputs": list, "rows": dict, "images": list}


FOLDER_IMAGE_SCHEMA = {**IMAGE_SCHEMA, "index": int, "folder": str}


def _check_schema(path, ckpt, schema, where="") -> None:
    for key, typ in schema.items():
        node = ckpt
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        ok = torch.is_tensor(node) if typ == "tensor" else isinstance(node, typ) and not isinstance(node, bool)
        if not ok:
            want = "a tensor" if typ == "tensor" else typ.__name__
            raise UserError(f"checkpoint {path} is damaged: {where}{key} should be {want}, "
                                  f"got {type(node).__name__}")


def load_checkpoint(path) -> dict:
    """Reads a checkpoint written by save_checkpoint, refusing anything else with a UserError.

    torch.load(weights_only=True) unpickles tensors and plain containers only: a planted file
    with code in it is refused before any of that code can run.
    """
    not_ours = f"{path} is not a checkpoint this tool wrote"
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":  # torch.save writes a zip archive; a cut-off one still starts so
            raise UserError(f"{not_ours}: it is not a torch checkpoint archive (a text or other file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise UserError(f"{not_ours}: it holds Python objects other than tensors and plain containers; "
                                  f"refusing to load it") from None
        raise UserError(f"{not_ours}, or it is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # the restricted unpickler and the zip reader raise many types on junk
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise UserError(f"{not_ours}, or it is truncated or corrupt ({detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{not_ours} (no {CHECKPOINT_FORMAT!r} marker; checkpoints of versions before "
                              f"format {CHECKPOINT_VERSION} cannot be resumed: start the run again)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt.get('version')!r}; this version of the tool "
                              f"resumes format {CHECKPOINT_VERSION} only: start the run again")
    if ckpt.get("kind") != "folder":
        _check_schema(path, ckpt, CHECKPOINT_SCHEMA)
        return ckpt
    _check_schema(path, ckpt, FOLDER_SCHEMA)
    for n, entry in enumerate(ckpt["images"]):
        _check_schema(path, entry if isinstance(entry, dict) else {}, FOLDER_IMAGE_SCHEMA, f"images[{n}].")
    return ckpt
