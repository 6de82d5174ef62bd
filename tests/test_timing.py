"""Stage timings: the stopwatch's exclusive accounting (on a fake clock), and a run's metrics.json
`timings` and last log line."""

import json
import time

import pytest

import timing
from helpers import cli, only_run


class FakeClock:
    """perf_counter that advances only when told to: stage times become exact numbers."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_nested_stages_count_their_own_time_and_add_up(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    watch = timing.Stopwatch()
    with watch("sampler"):
        clock.now += 1.0
        with watch("unet"):
            clock.now += 2.0
        with watch("data_step"):
            clock.now += 3.0
            with watch("preconditioner"):
                clock.now += 0.5
        clock.now += 0.25
        with watch("unet"):                       # a second entry accumulates
            clock.now += 2.0
    watch.add("startup", 0.125)
    r = watch.report()
    assert r == {"startup": 0.125, "sampler": 1.25, "unet": 4.0, "data_step": 3.0, "preconditioner": 0.5,
                 "total": 8.875}
    assert list(r) == ["startup", "sampler", "unet", "data_step", "preconditioner", "total"]   # a run's order


def test_a_stage_left_by_an_exception_is_still_counted(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    watch = timing.Stopwatch()
    with pytest.raises(RuntimeError):
        with watch("outputs"):
            with watch("baselines"):
                clock.now += 1.0
                raise RuntimeError
    with watch("outputs"):
        clock.now += 2.0
    assert watch.report() == {"baselines": 1.0, "outputs": 2.0, "total": 3.0}


def test_the_stage_running_now_counts_up_to_now(monkeypatch):
    """A run's metrics are written while its setup stage is still open: that stage's time so far counts."""
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    watch = timing.Stopwatch()
    with watch("setup"):
        clock.now += 1.0
        with watch("outputs"):
            clock.now += 2.0
        clock.now += 0.5
        assert watch.report() == {"setup": 1.5, "outputs": 2.0, "total": 3.5}


def test_a_failed_sync_still_closes_the_stage(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = []

    def sync():
        calls.append(1)
        if len(calls) == 2:       # the closing sync of the first stage fails (an asynchronous error)
            raise RuntimeError("device error")
    watch = timing.Stopwatch(sync)
    with pytest.raises(RuntimeError):
        with watch("unet"):
            clock.now += 1.0
    with watch("outputs"):
        clock.now += 2.0
    assert watch.report() == {"unet": 1.0, "outputs": 2.0, "total": 3.0}


def test_summary_line_names_the_stages_above_one_percent():
    line = timing.summary_line({"imports": 2.0, "setup": 0.01, "exact_solve": 6.0, "total": 8.01})
    assert line == "time 8.0 s: imports 2.0 s (25%), exact solve 6.0 s (75%)"


@pytest.mark.parametrize("sampler, inner", [("diffpir", {"data_step", "preconditioner"}), ("exact", {"exact_solve"})])
def test_a_run_writes_its_stage_timings_and_says_them_last(tmp_path, capsys, monkeypatch, caplog, sampler, inner):
    t0 = time.perf_counter()
    r = cli(["--model_id", "analytic", "--image", "sample", "--img_size", "32", "--blur_mode", "defocus",
             "--kernel_size", "5", "--grid_size", "2", "--sampler", sampler, "--num_inference_steps", "3",
             "--no_intermediates", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((only_run(tmp_path) / "metrics.json").read_text())["timings"]
    assert {"startup", "imports", "setup", "operator", "model", "baselines", "outputs"} | inner <= set(t)
    # The stages cover the run: their total is its wall time, less the calls around it here and
    # plus main.py's own imports (counted in startup once per process).
    assert 0.7 * wall <= t["total"] <= wall + t["startup"], (t["total"], wall)
    assert all(v >= 0 for v in t.values())
    last_info = [ln for ln in r.stderr.splitlines() if ln.startswith("INFO ")][-1]
    assert last_info.startswith(f"INFO time {t['total']:.1f} s: "), last_info
