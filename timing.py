"""Where a run's time goes: seconds per stage, for metrics.json's `timings` and the run's last log line.

A Stopwatch records each stage's *own* time: a stage entered inside another is subtracted from its
parent, so the stages add up to the time they cover, and a share is a plain ratio. The run's
stages (main.py, restore.py) and the samplers' (dps.py: the UNet, the data step, its
preconditioner) use the process's stopwatch, RUN; the benches read the same names.

    with timing.RUN("baselines"):
        ...
"""

from __future__ import annotations

import contextlib
import time

# The stages in the order a run meets them; a stage not listed here is reported after these.
ORDER = ("startup", "imports", "setup", "operator", "model", "sampler", "unet", "data_step", "preconditioner",
         "exact_solve", "baselines", "outputs")
# What each stage holds, for the docs and the log line's readers.
MEANING = {
    "startup": "Python's imports of the command line and the config's parsing and checks",
    "imports": "torch and the modules built on it (diffusers only when the prior needs it)",
    "setup": "device, inputs (image, PSF grid, noise estimate) and run folder, less what follows",
    "operator": "the EigenPSF decomposition and operator build",
    "model": "loading the prior",
    "sampler": "the sampler's own work: schedule, noise, re-noising, progress, checks",
    "unet": "the prior's network (forward; DPS: with its backward)",
    "data_step": "the data-consistency solves (DiffPIR's and DAPS's CG), less the preconditioner",
    "preconditioner": "DiffPIR's region preconditioner inside the data step",
    "exact_solve": "the analytic prior's exact posterior (CG)",
    "baselines": "Richardson-Lucy and Tikhonov",
    "outputs": "images, metrics, figures, LPIPS",
}


class Stopwatch:
    """Seconds of each named stage, accumulated over its entries, each stage's own (exclusive) time.

    sync: called at both ends of every stage when given (torch.cuda.synchronize on a GPU), so that
    work launched asynchronously is counted in the stage that launched it."""

    def __init__(self, sync=None):
        self.seconds, self.sync, self._stack = {}, sync, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync:
            self.sync()
        now = time.perf_counter()
        if self._stack:                      # the parent stops counting while this stage runs
            parent, since = self._stack[-1]
            self.seconds[parent] = self.seconds.get(parent, 0.0) + now - since
        self._stack.append([name, now])
        try:
            yield
        finally:
            try:
                if self.sync:
                    self.sync()
            finally:   # a failed sync (an asynchronous CUDA error surfaces there) still closes the stage
                now = time.perf_counter()
                _, since = self._stack.pop()
                self.seconds[name] = self.seconds.get(name, 0.0) + now - since
                if self._stack:
                    self._stack[-1][1] = now

    def add(self, name: str, seconds: float) -> None:
        """Time measured elsewhere (before this stopwatch existed: the process's start-up)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self) -> dict:
        """{stage: seconds} in ORDER, then 'total', rounded to milliseconds; the stage running now
        (a run's metrics are written inside its setup stage) counts up to now."""
        seconds = dict(self.seconds)
        if self._stack:
            name, since = self._stack[-1]
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - since
        names = [n for n in ORDER if n in seconds] + sorted(set(seconds) - set(ORDER))
        out = {n: round(seconds[n], 3) for n in names}
        out["total"] = round(sum(seconds.values()), 3)
        return out


def summary_line(report: dict) -> str:
    """'time 7.9 s: imports 3.1 s (39%), ...' for the stages of a report that took at least 1% of it."""
    total = report.get("total", 0.0)
    parts = [f"{n.replace('_', ' ')} {s:.1f} s ({100 * s / total:.0f}%)" for n, s in report.items()
             if n != "total" and total > 0 and s >= 0.01 * total]
    return f"time {total:.1f} s: " + ", ".join(parts)


RUN = Stopwatch()   # the process's stopwatch; main.run starts a fresh one for each run
