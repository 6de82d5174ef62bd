"""The CLI as researchers run it: end to end, bad input, concurrency, help."""

import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import yaml
from PIL import Image

import config
from helpers import cli, FAST, ROOT, run_cli, run_dirs, run_in_process, save_tiny_model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_end_to_end_tiny_unet_writes_every_output(tmp_path, tiny_model, capsys, monkeypatch, caplog):
    save = tmp_path / "results"
    r = cli(["--model_id", tiny_model, "--img_size", "64", "--num_inference_steps", "5", "--num_samples", "2",
             "--set", "sampler.intermediate_freq=2", "--save_dir", str(save), "--seed", "7"], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr
    (run,) = run_dirs(save)
    d = save / run
    for f in ["config.yaml", "metrics.txt", "metrics.json", "images/clean.png", "images/blurred.png",
              "images/restored.png", "images/comparison.png", "images/eigenpsfs.png", "images/psf_grid.png",
              "images/progress.png", "images/mean.png", "images/std.png", "intermediates/step_0000.png",
              "intermediates/step_0002.png", "intermediates/step_0004.png"]:
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    assert Image.open(d / "images/restored.png").size == (64, 64)
    m = json.loads((d / "metrics.json").read_text())
    for key in ["status", "psnr_blurred", "ssim_blurred", "psnr_restored", "ssim_restored", "explained_variance",
                "operator_relative_error", "runtime_s", "steps_per_s", "model_id", "device"]:
        assert key in m, key
    assert m["status"] == "complete" and m["device"] == "cpu" and m["model_id"] == tiny_model
    assert 0 < m["ssim_restored"] <= 1 and m["psnr_blurred"] > 10 and m["steps_completed"] == 5
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["run"]["seed"] == 7 and saved["sampler"]["num_inference_steps"] == 5
    assert saved["resolved"]["versions"]["torch"] and saved["resolved"]["device"] == "cpu"
    assert saved["sampler"]["intermediate_freq"] == 2  # --set reached the saved config
    # The classical baselines beside the result, on the same data: their images, metrics and panels.
    for name in ("richardson_lucy", "tikhonov"):
        assert (d / f"images/baseline_{name}.png").is_file() and 5 < m[f"psnr_{name}"] < 60
    assert m["richardson_lucy"]["iterations"] >= 1 and 0 < m["tikhonov"]["alpha"] <= 10
    assert "psnr_tikhonov" in (d / "metrics.txt").read_text()
    assert Image.open(d / "images/comparison.png").size[0] > 4 * Image.open(d / "images/restored.png").size[0]
    # Each sample's data fit, and the list of misfits (none expected of two samples of a 5-step run).
    assert len(m["sample_residual_relative"]) == 2 and isinstance(m["samples_misfit"], list)
    assert all(0 < f < 1 for f in m["sample_residual_relative"])


def test_no_baseline_skips_it(tmp_path, tiny_model, capsys, monkeypatch, caplog):
    r = cli(["--model_id", "analytic", "--img_size", "32", "--kernel_size", "7", "--num_inference_steps", "3",
             "--no_baseline", "--no_figures", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr
    d = tmp_path / run_dirs(tmp_path)[0]
    m = json.loads((d / "metrics.json").read_text())
    assert "psnr_tikhonov" not in m and not (d / "images/baseline_tikhonov.png").exists()
    assert yaml.safe_load((d / "config.yaml").read_text())["run"]["baseline"] is False


def readme_quickstart():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- offline-quickstart -->\s*```bash\n(.*?)```", text, re.S).group(1)
    cmd = " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())
    assert cmd.startswith("python main.py ")
    return cmd.split()[2:]


@pytest.mark.slow
def test_offline_quickstart_from_readme_beats_blurred(tmp_path, capsys, monkeypatch, caplog):
    """Runs the README's offline command verbatim (plus --save_dir), in this process."""
    r = cli(readme_quickstart() + ["--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / run_dirs(tmp_path)[0] / "metrics.json").read_text())
    assert m["psnr_restored"] > m["psnr_blurred"], m


@pytest.mark.slow
def test_same_seed_same_result(tmp_path, capsys, monkeypatch, caplog):
    """One run in a fresh process, one in this one (after whatever ran here before): same image.
    The second draws no figures (--no_figures), which changes nothing else."""
    outs = []
    figures = ["comparison", "eigenpsfs", "psf_grid", "progress"]
    for i in range(2):
        args = ["--model_id", "analytic", *FAST, "--save_dir", str(tmp_path / str(i)), "--no_intermediates"]
        r = run_cli(args) if i == 0 else cli(args + ["--no_figures"], capsys, monkeypatch, caplog)
        assert r.returncode == 0, r.stderr
        d = tmp_path / str(i) / run_dirs(tmp_path / str(i))[0]
        outs.append(np.asarray(Image.open(d / "images/restored.png")))
        assert not (d / "intermediates").exists()
        assert [(d / "images" / f"{f}.png").is_file() for f in figures] == [i == 0] * len(figures)
        assert yaml.safe_load((d / "config.yaml").read_text())["run"]["save_figures"] == (i == 0)
    assert np.array_equal(*outs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (d / "notes.txt").write_text("hello")
    (d / "notes_as.png").write_text("hello, I am text")
    (d / "img.bmp").write_bytes(b"BM")
    (d / "afile").write_text("x")
    (d / "bad.yaml").write_text("data:\n  img_size: 32\n sampler: [1, 2\n")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "y.png")
    np.save(d / "g.npy", np.ones((2, 2, 3, 3)))
    return d


@pytest.fixture(scope="module")
def http_server(files):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(files)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


BAD = {
    "missing image": (["--image", "{files}/nope.png"], "image not found"),
    "corrupt image": (["--image", "{files}/corrupt.png"], "cannot decode image"),
    "unsupported image": (["--image", "{files}/img.bmp"], "unsupported image format"),
    "url not an image": (["--image", "{url}/notes.txt"], "not an image"),
    "url fails": (["--image", "{url}/missing.png"], "could not download"),
    "unknown blur mode": (["--blur_mode", "swirl"], "physics.blur_mode must be one of"),
    "even kernel": (["--kernel_size", "8"], "kernel_size must be odd"),
    "n_eigen too large": (["--n_eigen_psfs", "17"], r"n_eigen_psfs must be in 1\.\.16"),
    "n_eigen zero": (["--n_eigen_psfs", "0"], "n_eigen_psfs must be in"),
    "negative sigma": (["--sigma_noise", "-0.1"], "sigma_noise must be in"),
    "negative step": (["--step_size", "-1"], "step_size must be in"),
    "steps zero": (["--num_inference_steps", "0"], "num_inference_steps must be in"),
    "steps too many": (["--num_inference_steps", "5000"], r"num_inference_steps must be in 1\.\.1000"),
    "unknown set key": (["--set", "physics.blurr_mode=motion"], "unknown config key 'physics.blurr_mode'"),
    "wrong set type": (["--set", "sampler.num_samples=many"], "sampler.num_samples must be int"),
    "mistyped set key": (["--set", "sampler.step_sise=1"], "did you mean sampler.dps.step_size"),
    "bad flag value": (["--img_size", "big"], r"invalid int value: 'big' \(python main.py --help"),
    "text named png": (["--image", "{files}/notes_as.png"], "not an image"),
    "unwritable save_dir": (["--save_dir", "{files}/afile/sub"], "not writable"),
    "model unreachable": (["--model_id", "acme/not-cached"], "--download_only"),
    "missing model dir": (["--model_id", "./no/such/dir"], "does not exist"),
    "psf too big": (["--set", "physics.motion.max_length=30"], "increase kernel_size"),
    "unwritable psf export": (["--save_psf_grid", "{files}/afile/sub/g.npz"], "cannot write the PSF grid"),
    # NaN passes every comparison, inf every lower bound (a NaN step size used to run with the data term off)
    "nan step": (["--step_size", "nan"], "sampler.dps.step_size must be a finite number, got nan"),
    "nan sigma": (["--sigma_noise", "nan"], "data.sigma_noise must be a finite number"),
    "inf lambda": (["--set", "sampler.diffpir.lambda=.inf"], "sampler.diffpir.lambda must be a finite number, got inf"),
    "inf grid": (["--set", "physics.correlated.correlation_length=.inf"], "must be a finite number"),
    "analytic typo": (["--model_id", "analytc"], "unknown model 'analytc'; did you mean analytic?"),
    "analytic typo download": (["--model_id", "Analytical", "--download_only"], "did you mean analytic?"),
    "invalid yaml": (["--config", "{files}/bad.yaml"], r"not valid YAML at line 3, column 2"),
    "saturation without calibration": (["--saturation", "4095"], "--saturation applies to --calibration"),
    "nan saturation": (["--calibration", "{files}/y.png", "--saturation", "nan"], "must be a finite number"),
    "saturation above full scale": (["--calibration", "{files}/y.png", "--saturation", "4095"],
                                    r"--saturation must be in \(0, 255\] for y.png"),
    # inputs that exclude each other (one used to be dropped without a word)
    "blurred and image": (["--blurred", "{files}/y.png", "--image", "{files}/y.png"], "--image and --blurred"),
    "blurred and blurred_dir": (["--blurred", "{files}/y.png", "--blurred_dir", "{files}"],
                                "--blurred and --blurred_dir are different inputs"),
    "calibration and blurred": (["--calibration", "{files}/y.png", "--blurred", "{files}/y.png"],
                                "--blurred and --calibration"),
    "calibration and psf_grid": (["--calibration", "{files}/y.png", "--psf_grid", "{files}/g.npy"],
                                 "it does not take --psf_grid"),
    "blurred and img_size": (["--blurred", "{files}/y.png", "--psf_grid", "{files}/g.npy", "--img_size", "64"],
                             "--img_size applies to simulations"),  # FAST has --img_size too
    "blurred and blur_mode": (["--blurred", "{files}/y.png", "--psf_grid", "{files}/g.npy", "--blur_mode", "defocus"],
                              "--img_size and --blur_mode apply to simulations"),
}


# These go through a real `python main.py` process; the rest call main.main in-process (same code).
BAD_AS_PROCESS = {"bad flag value", "model unreachable", "psf too big"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_folder(case, tmp_path, files, http_server, capsys, monkeypatch):
    args, pattern = BAD[case]
    args = [a.format(files=files, url=http_server) for a in args]
    save = tmp_path / "results"
    base = ["--model_id", "analytic", *FAST]
    if "--save_dir" not in args:
        base += ["--save_dir", str(save)]
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "cache")}
    if case in BAD_AS_PROCESS:
        r = run_cli(base + args, env=env, timeout=120)
        code, err = r.returncode, r.stderr
    else:
        code, err = run_in_process(base + args, capsys, monkeypatch, env)
    assert code == 2, (code, err[-2000:])
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-2000:]
    assert "Traceback" not in err
    assert run_dirs(save) == [] and (not save.exists() or "--save_dir" in args)  # not even an empty folder


def test_divergence_keeps_partial_results_and_exits_3(tmp_path, tiny_model, capsys, monkeypatch, caplog):
    r = cli(["--model_id", tiny_model, *FAST, "--step_size", "1e38", "--set", "sampler.clip_denoised=false",
             "--set", "sampler.log_every=1", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "diverged at step" in r.stderr and "Traceback" not in r.stderr
    m = json.loads((tmp_path / run_dirs(tmp_path)[0] / "metrics.json").read_text())
    assert m["status"] == "diverged" and "step_size" in m["error"]


def test_concurrent_runs_get_distinct_folders(tmp_path):
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--model_id", "analytic", *FAST,
                               "--save_dir", str(tmp_path), "--no_intermediates"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    assert len(run_dirs(tmp_path)) == 2


def test_help_lists_every_flag(capsys, monkeypatch, caplog):
    r = cli(["--help"], capsys, monkeypatch, caplog)
    assert r.returncode == 0
    for flag in ["--config", "--set", "--no_intermediates", "--no_figures", "--download_only", *[f"--{n}" for n in config.FLAGS]]:
        assert flag in r.stdout, flag
    assert "default: 'google/ddpm-celebahq-256'" in r.stdout and "default: 'auto', sampler.num_inference_steps" in r.stdout


# --- image loading ---------------------------------------------------------------------------

@pytest.mark.slow
def test_download_only_then_offline_run(tmp_path, tiny_model, capsys, monkeypatch, caplog):
    """The login-node / compute-node workflow against a fake hub on localhost: the download in
    this process, the offline run in a fresh one, as a compute node would start it."""
    from fakehub import FakeHub, files_from_dir
    cache = tmp_path / "hf-cache"
    with FakeHub("acme/tiny-ddpm", files_from_dir(tiny_model)) as hub:
        r = cli(["--download_only", "--model_id", "acme/tiny-ddpm", "--model_cache", str(cache)], capsys, monkeypatch,
                caplog, env={"HF_ENDPOINT": hub.endpoint})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HF_HUB_OFFLINE=1" in r.stdout and str(cache) in r.stdout
    r = run_cli(["--model_id", "acme/tiny-ddpm", "--model_cache", str(cache), *FAST, "--save_dir", str(tmp_path / "res")],
                env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(run_dirs(tmp_path / "res")) == 1
