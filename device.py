"""Device, dtype and accelerator setup: resolved once per run, here.

'auto' is CUDA when present, else the CPU with a warning; on the CPU glibc's allocator is tuned for
the operator's large temporaries; on CUDA TF32, channels_last and torch.compile are set up.
"""

from __future__ import annotations

import logging
import platform

import diffusers
import numpy as np
import torch

from utils import UserError

log = logging.getLogger("eigenpsf_dps")


def resolve_device(name: str):
    """Device, once, here. 'auto' is CUDA when present, else CPU with a warning. On the CPU the
    allocator is tuned for the operator's large temporaries (tune_cpu_allocator)."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cpu":
            log.warning("no CUDA device found: running on the CPU. A 256x256 pretrained run takes hours there; "
                        "an estimate follows after the first steps (the analytic prior is quick anywhere)")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"run.device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"run.device={name!r} but no CUDA device is available; use --device cpu or auto")
    if dev.type == "cpu":
        tune_cpu_allocator()
        log.info("device: CPU, %d threads", torch.get_num_threads())
    else:
        log.info("device: %s (%s)", dev, torch.cuda.get_device_name(dev))
    return dev


def setup_accelerators(cfg, device, unet):
    """TF32, channels_last and torch.compile on CUDA; on CPU the flags fall back with a warning."""
    r = cfg["run"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif r["compile"] != "off" or r["channels_last"]:
        log.warning("--compile and channels_last only pay off on CUDA; running eagerly on %s", device)
        return unet
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "conv_in"):
        return unet  # the analytic prior is a few FFTs
    if r["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
    if r["compile"] != "off":
        log.info("compiling the UNet (mode=%s); the first step includes compile time (~100 s)", r["compile"])
        unet.forward = torch.compile(unet.forward, mode=r["compile"], dynamic=False)
    return unet


def versions(device) -> dict:
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "diffusers": str(diffusers.__version__),
           "numpy": str(np.__version__), "platform": platform.platform()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


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
