"""Device, dtype and accelerator setup: resolved once per run, here.

'auto' is CUDA when present, else the CPU with a warning; on the CPU glibc's allocator is tuned for
the operator's large temporaries; on CUDA TF32, channels_last and torch.compile are set up.
"""

from __future__ import annotations

import logging
import os
import platform

import numpy as np
import torch

from utils import UserError

log = logging.getLogger("eigenpsf_dps")


# What 'auto' falling back to the CPU means, said once: for a restoration, and for a training.
CPU_NOTES = {"restore": "A 256x256 pretrained run takes hours there; an estimate follows after the first steps "
                        "(the analytic prior is quick anywhere)",
             "train": "Training the tiny or small UNet works there (docs/training.md gives steps/s); larger ones "
                      "want a GPU"}


def resolve_threads(setting) -> tuple:
    """(threads, where the number comes from) for torch's CPU pool. 'auto': OMP_NUM_THREADS when set,
    else the CPUs this process may run on (its affinity: what a Slurm allocation or a cpuset grants,
    which torch's own default, the machine's cores, ignores). Oversubscribed, a thread pool spins:
    on a 2-core machine running another job, one operator call took 10× longer at 2 threads than at 1."""
    if setting != "auto":
        return int(setting), "--threads"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    try:
        return len(os.sched_getaffinity(0)), "the CPUs this process may use"
    except AttributeError:        # no affinity on this platform
        return os.cpu_count() or 1, "the machine's CPUs"


def set_threads(setting) -> str:
    """Sets torch's CPU threads (resolve_threads); returns what to say of them, with a hint when the
    machine is already busy (a 1-minute load at or above the threads: they will compete)."""
    n, why = resolve_threads(setting)
    torch.set_num_threads(n)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = f"; the machine is busy (1-min load {load:.1f}): --threads 1 may run faster" if n > 1 and load >= n else ""
    return f"{n} thread{'s' if n > 1 else ''} ({why}){busy}"


def resolve_device(name: str, purpose: str = "restore", threads="auto"):
    """Device and CPU threads, once, here. 'auto' is CUDA when present, else CPU with a warning
    (CPU_NOTES[purpose]). On the CPU the allocator is tuned for the operator's large temporaries
    (tune_cpu_allocator) and the threads are set (set_threads)."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cpu":
            log.warning("no CUDA device found: running on the CPU. %s", CPU_NOTES[purpose])
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"run.device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"run.device={name!r} but no CUDA device is available; use --device cpu or auto")
    if dev.type == "cpu":
        tune_cpu_allocator()
        log.info("device: CPU, %s", set_threads(threads))
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


def synchronizer(device):
    """What the stage timings call at each stage's ends: this GPU's synchronize (so asynchronous
    work is counted where it was launched), or None on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16, what oneDNN's bf16
    kernels use); elsewhere bf16 is emulated. Linux's /proc/cpuinfo; False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(name: str, device, model_id: str) -> str:
    """run.dtype with 'auto' resolved, said in an info line when it is not float32: bfloat16 for a
    learned prior on a CPU with native bf16 (bench/bench_dtype.py: a trained prior's restorations
    within 0.013 dB of float32's, the celebahq UNet 1.9× faster at 256², 1.2× at 64²), else
    float32 (the analytic prior computes in float64 whatever the dtype; a GPU keeps float32 unless
    asked: --dtype bfloat16)."""
    if name != "auto":
        return name
    if device.type == "cpu" and model_id != "analytic" and cpu_has_native_bf16():
        log.info("dtype auto: bfloat16 for the UNet (this CPU computes bf16 natively; measured within 0.02 dB of "
                 "float32 and up to 1.9x faster; --dtype float32 for float32)")
        return "bfloat16"
    return "float32"


def _version(package) -> str:
    """A package's installed version without importing it (diffusers takes 1.2 s to import)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def versions(device) -> dict:
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "diffusers": _version("diffusers"),
           "numpy": str(np.__version__), "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
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
