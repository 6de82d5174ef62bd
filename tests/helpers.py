"""What the tests share: small models and images made locally (so no test needs the network),
the CLI run in a process or in this one, and small operators. Tests import from here, never
from another test file."""

import builtins
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

import checkpoint
import main
import physics
import restore


def tiny_unet(sample_size=16, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def tiny_scheduler(clip_sample=True):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip_sample,
                         variance_type="fixed_small")


def save_tiny_model(path, sample_size=16):
    """A diffusers directory laid out like google/ddpm-celebahq-256 (UNet and scheduler at the root)."""
    tiny_unet(sample_size).save_pretrained(path)
    tiny_scheduler().save_pretrained(path)
    return str(path)


class _Stop(Exception):
    pass


def full_and_resumed(pipe, y, device="cpu", seed=3, stop_after=5, **kw):
    """pipe(y, **kw) run straight through, and the same run stopped in its callback after step
    `stop_after` and resumed from the x_t and generator state saved there: (full, resumed)."""
    full, _ = pipe(y, generator=torch.Generator(device).manual_seed(seed), **kw)
    saved, gen = {}, torch.Generator(device).manual_seed(seed)

    def stop(i, t, x_t, x0_hat, res):
        if i == stop_after:
            saved.update(x_t=x_t.clone(), state=gen.get_state())
            raise _Stop

    try:
        pipe(y, generator=gen, callback=stop, **kw)
    except _Stop:
        pass
    assert saved, f"the run never reached step {stop_after}"
    gen = torch.Generator(device)
    gen.set_state(saved["state"])
    resumed, _ = pipe(y, generator=gen, x_T=saved["x_t"], start_index=stop_after + 1, **kw)
    return full, resumed


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAST = ["--img_size", "32", "--kernel_size", "7", "--set", "physics.motion.max_length=6", "--set",
        "physics.defocus.max_radius=3", "--grid_size", "4", "--n_eigen_psfs", "4", "--num_inference_steps", "5"]


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def call_main(args, capsys, monkeypatch, env=None):
    """main.main(args) in this process: the code `python main.py` runs, without the 6-10 s of
    interpreter and torch start-up. Returns (exit code, captured stdout/stderr). An uncaught
    exception (what the CLI would show as a traceback) propagates and fails the test."""
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        code = main.main(args)
    except SystemExit as e:  # argparse exits on a bad flag or --help, as the CLI does
        code = e.code
    return code, capsys.readouterr()


def run_in_process(args, capsys, monkeypatch, env=None):
    """(exit code, stderr) of call_main."""
    code, captured = call_main(args, capsys, monkeypatch, env)
    return code, captured.err


def cli(args, capsys, monkeypatch, caplog, env=None):
    """call_main with what run_cli returns: .returncode, .stdout, and .stderr holding both the
    stderr text and the log lines (INFO and up), as the CLI's console shows them."""
    import logging
    from types import SimpleNamespace
    caplog.set_level(logging.INFO)
    caplog.clear()
    code, out = call_main(args, capsys, monkeypatch, env)
    logs = "".join(f"{r.levelname} {r.getMessage()}\n" for r in caplog.records)
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=logs + out.err)


def run_dirs(save_dir, prefix="run"):
    return sorted(d for d in os.listdir(save_dir) if d.startswith(prefix + "_")) if os.path.isdir(save_dir) else []


def wait_for(cond, timeout, what, detail=lambda: ""):
    """Polls cond() until it is true; on timeout, fails naming `what`, with detail() (logs, queue)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{detail()}")


def wait_for_first_step(save_dir):
    """intermediates/step_0000.png is written after step 0 has completed: a signal sent then
    always finds a finished step, however loaded the machine (a fixed sleep does not)."""
    wait_for(lambda: list(save_dir.glob("run_*/intermediates/step_0000.png")), 300, "the first completed step")


def sigterm_then_resume(args, steps, tmp_path, capsys, monkeypatch, caplog, before_resume=lambda run: None):
    """main.py `args` in a real process, stopped by SIGTERM after its first step (exit 75, a
    checkpoint, 0 < steps_completed < steps); then --resume and an uninterrupted reference, both in
    this process (same code, same thread count). Returns (resumed run folder, reference folder)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args, "--save_dir", str(tmp_path / "a")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_step(tmp_path / "a")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    run = tmp_path / "a" / run_dirs(tmp_path / "a")[0]
    assert (run / "checkpoint.pt").is_file() and "--resume" in err
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "preempted" and 0 < m["steps_completed"] < steps
    before_resume(run)
    r = cli(["--resume", str(run)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (run / "checkpoint.pt").exists()
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
    assert "data residual ‖y − A(x)‖/‖y‖: restored" in r.stderr  # a resumed run ends with the same summary
    ref = cli(args + ["--save_dir", str(tmp_path / "b")], capsys, monkeypatch, caplog)
    assert ref.returncode == 0
    return run, tmp_path / "b" / run_dirs(tmp_path / "b")[0]


def write_images(folder, shapes, seed=0):
    """PNG files im0.png … of the given (H, W) or (H, W, 1) shapes; gray ones are saved as L."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(shapes):
        a = (rng.random(shape) * 255).astype(np.uint8)
        Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a).save(os.path.join(folder, f"im{i}.png"))
    return str(folder)


def stop_at(monkeypatch, batch_number, step):
    """Asks for a stop (as SIGTERM does) after `step` of the `batch_number`-th sampler call."""
    calls = {"n": 0}
    original = restore.progress_callback

    def patched(views, cfg, device, bar, name, y_norms):
        calls["n"] += 1
        inner, n = original(views, cfg, device, bar, name, y_norms), calls["n"]

        def callback(i, t, x_t, x0_hat, res):
            if n == batch_number and i == step:
                checkpoint.STOP["signal"] = signal.SIGTERM
            return inner(i, t, x_t, x0_hat, res)
        return callback
    monkeypatch.setattr(restore, "progress_callback", patched)


def dense_matrix(op, shape):
    """The operator as a dense matrix, column by column (independent of its adjoint)."""
    n = int(np.prod(shape))
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return torch.stack([op(e[None])[0].reshape(-1) for e in eye], 1)


def defocus_system(size=8, n=4):
    pc = dict(blur_mode="defocus", kernel_size=5, grid_size=2, n_eigen_psfs=n, form="scatter", boundary="reflect",
              defocus=dict(min_radius=0.5, max_radius=2.0))
    eig, _, _ = physics.create_sv_blur_system(size, size, pc, seed=0, dtype=torch.float64)
    return eig.double()


def one_run(save_dir):
    (run,) = run_dirs(save_dir)
    return os.path.join(save_dir, run)


class _Bar:
    def __init__(self):
        self.lines = []

    def write(self, text, file=None):
        self.lines.append(text)


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def planted_run(tmp_path, obj):
    run = tmp_path / "run_planted"
    run.mkdir()
    shutil.copy(os.path.join(ROOT, "config.yaml"), run / "config.yaml")
    torch.save(obj, run / "checkpoint.pt")
    return run


def one_error_line(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def bomb_png(path, width=100_000, height=100_000):
    """A valid PNG header declaring width x height 8-bit gray pixels, with a tiny IDAT: a few
    hundred bytes that would decode to width*height bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def npy_header_only(path, shape):
    """A .npy file whose header declares `shape` float64 but that holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return path


# Small PSF grids for CLI runs on real data (7×7 PSFs, 4×4 nodes, K = 6).
SMALL = ["--kernel_size", "7", "--grid_size", "4", "--n_eigen_psfs", "6", "--set", "physics.motion.max_length=6",
         "--set", "physics.defocus.max_radius=3"]


def only_run(folder):
    (d,) = run_dirs(folder)
    return folder / d


def face_under_defocus(size, kernel_size, max_radius):
    """(x, EigenPSF operator, its full-rank grid operator) in float64 for the exact-posterior checks:
    the astronaut's face at size², and a defocus grid of 3×3 PSFs kept whole (K = 9), circular boundary."""
    from skimage import data
    from skimage.transform import resize
    img = resize(data.astronaut()[10:250, 120:360] / 255.0, (size, size), anti_aliasing=True)
    x = torch.tensor(img, dtype=torch.float64).permute(2, 0, 1)[None]
    pc = dict(blur_mode="defocus", kernel_size=kernel_size, grid_size=3, n_eigen_psfs=9, form="gather",
              boundary="circular", defocus=dict(min_radius=1, max_radius=max_radius))
    field, _ = physics.create_ground_truth(size, size, pc, seed=0, dtype=torch.float64)
    eig, grid_op, _ = physics.build_operators(field.node_grid(), size, size, pc)
    return x, eig, grid_op


def brute_force_matrix(grid, H, W, form, boundary):
    """The (H·W, H·W) matrix of the grid's SV blur, entry by entry from a direct per-pixel loop
    (the PSF of each pixel interpolated bilinearly, in numpy): the independent reference for the
    grid and EigenPSF operators, forward (M x) and adjoint (Mᵀ y). grid: (G, G, k, k)."""
    G, _, k, _ = grid.shape
    r = k // 2
    P = grid.numpy() / grid.numpy().sum((-2, -1), keepdims=True)
    Wy = physics.interpolation_matrix(physics.grid_node_coords(G, H), H, "bilinear").numpy()
    Wx = physics.interpolation_matrix(physics.grid_node_coords(G, W), W, "bilinear").numpy()

    def psf(py, px):
        return np.einsum("i,j,ijab->ab", Wy[py], Wx[px], P)

    def src(i, n):  # padded coordinate -> source pixel or None (zero)
        if 0 <= i < n:
            return i
        if boundary == "circular":
            return i % n
        if boundary == "reflect":
            i = abs(i)
            return 2 * (n - 1) - i if i > n - 1 else i
        return None

    M = np.zeros((H * W, H * W))
    for py in range(H):
        for px in range(W):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    sy, sx = src(py - dy, H), src(px - dx, W)
                    if sy is None or sx is None:
                        continue
                    h = psf(py, px) if form == "gather" else psf(sy, sx)
                    M[py * W + px, sy * W + sx] += h[dy + r, dx + r]
    return M


def brute_force(grid, x, form, boundary):
    """brute_force_matrix applied to every channel of x (C, H, W)."""
    C, H, W = x.shape
    M = brute_force_matrix(grid, H, W, form, boundary)
    return (x.reshape(C, -1).numpy() @ M.T).reshape(C, H, W)
