"""One restoration (restore.py): the per-sample data fit, the CPU time estimate, progress and what a stop leaves."""

import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import restore
from helpers import FAST, _Bar, cli, one_run
from helpers import call_main as main_call


def test_sample_misfits_names_the_samples_that_miss_y(caplog):
    """Three samples near the truth, one at half brightness and one empty field (a DPS sample in the
    wrong mode): the last two are named, with fits computed independently in numpy. The empty one
    inflates any mean, so only a median yardstick names the half-bright one; two samples compare."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    box = torch.full((1, 1, 5, 5), 1 / 25)
    op = lambda x: F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), box)  # noqa: E731
    x = torch.rand((1, 1, 24, 24), generator=gen)
    y = op(x) + 0.01 * torch.randn((1, 1, 24, 24), generator=gen)
    good = x + 0.02 * torch.randn((3, 1, 24, 24), generator=gen)
    samples = torch.cat([good, 0.5 * x, torch.full((1, 1, 24, 24), 0.02)])
    fits, bad = restore.sample_misfits(y, op, samples)
    blur = lambda a: np.stack([np.pad(a, 2, mode="reflect")[i:i + 24, j:j + 24]  # noqa: E731
                               for i in range(5) for j in range(5)]).mean(0)
    y_np = y[0, 0].numpy()
    expected = [np.linalg.norm(y_np - blur(s[0].numpy())) / np.linalg.norm(y_np) for s in samples]
    np.testing.assert_allclose(fits, expected, rtol=1e-5)
    assert bad == [3, 4] and fits[3] < 2 * np.mean(fits[:3] + fits[4:])   # a mean of the others would miss it
    assert restore.sample_misfits(y, op, good)[1] == []
    assert restore.sample_misfits(y, op, samples[[0, 4]])[1] == [1]      # two samples: the empty one
    m = {}
    with caplog.at_level("WARNING", logger="eigenpsf_dps"):
        restore.report_misfits(m, y, op, samples, "cpu", "run_x")
    assert m["samples_misfit"] == [3, 4] and "run_x: 2 of 5 samples fit y more than 2 times worse" in caplog.text
    assert "--gradient_clip 1" in caplog.text


def test_cpu_estimate_uses_the_steady_rate_and_says_nothing_when_no_steps_are_left(monkeypatch):
    """90 s of warm-up before the first mark, then 1 s a step: 20 steps left are 20 s, not the
    (90 + 10) / 20 * 20 = 100 s that the time since the start gives."""
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(restore.time, "time", lambda: next(clock))
    bar, marks = _Bar(), {}
    cpu = torch.device("cpu")
    restore.cpu_estimate(marks, 10, 30, 10, cpu, bar, "dps")
    restore.cpu_estimate(marks, 20, 20, 10, cpu, bar, "dps")
    assert bar.lines == ["INFO CPU run: about 20 s left for 20 more steps (dps)"]
    bar, marks, clock = _Bar(), {}, iter([100.0, 110.0])
    restore.cpu_estimate(marks, 10, 10, 10, cpu, bar, "dps")
    restore.cpu_estimate(marks, 20, 0, 10, cpu, bar, "dps")
    assert bar.lines == []


def test_progress_shows_one_named_relative_residual_every_log_every_steps(tmp_path, capsys, monkeypatch, caplog):
    r = cli(["--model_id", "analytic", *FAST, "--num_inference_steps", "50", "--set", "sampler.intermediate_freq=50",
             "--no_baseline", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "‖y−A(x̂₀)‖/‖y‖ " in r.stderr and "residual=" not in r.stderr
    assert "data residual ‖y − A(x)‖/‖y‖: restored " in r.stderr
    m = json.loads(open(os.path.join(one_run(tmp_path), "metrics.json")).read())
    curve = m["residual_relative_curve"]
    assert curve["steps"] == [9, 19, 29, 39, 49] and all(0 < v < 2 for v in curve["values"])
    # the last point is the final x̂₀'s relative residual, which the run's last line reports too
    assert curve["values"][-1] == pytest.approx(m["data_residual_relative"], rel=0.05)


def test_a_second_ctrl_c_names_what_is_on_disk(tmp_path, capsys, monkeypatch):
    """A first Ctrl-C after step 3 checkpoints the run; a second one arriving while the outputs are
    written (50 ms later, say) used to print 'no checkpoint written' over an existing checkpoint."""
    import signal
    original = restore.progress_callback

    def patched(views, cfg, device, bar, name, y_norms):
        inner = original(views, cfg, device, bar, name, y_norms)

        def callback(i, t, x_t, x0_hat, res):
            if i == 3:
                checkpoint.STOP["signal"] = signal.SIGINT
            return inner(i, t, x_t, x0_hat, res)
        return callback

    def second_ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(restore, "progress_callback", patched)
    monkeypatch.setattr(restore, "write_outputs", second_ctrl_c)
    code, out = main_call(["--model_id", "analytic", *FAST, "--num_inference_steps", "8", "--save_dir", str(tmp_path)],
                          capsys, monkeypatch)
    run = one_run(tmp_path)
    assert code == 130 and os.path.isfile(os.path.join(run, "checkpoint.pt"))
    assert out.out.strip() == run
    assert f"the checkpoint in {run} was written before it: continue with --resume {run}" in out.err
    assert "no checkpoint" not in out.err


@pytest.mark.parametrize("method, rules, named", [
    ("diffpir", ["discrepancy", "cap"], "the last data step hit its CG cap (raise --set sampler.diffpir.cg_max_iter)"),
    ("daps", ["tolerance", "cap"], "the last data step hit its CG cap (raise --set sampler.daps.cg_max_iter)"),
    ("dps", [], "DPS has not reached the data"),
    ("diffpir", ["discrepancy", "tolerance"], "the noise is larger than σ_y (try --sigma_noise auto)"),
])
def test_a_poor_fit_names_its_likely_cause(method, rules, named):
    """What the fit check's warning blames follows what the run recorded: a data step stopped by its
    cap, a DPS run, else the noise level or the PSFs."""
    assert restore.fit_cause({"cg_stop_rule_per_step": rules}, {"sampler": {"method": method}}).startswith(named)
