"""Nothing the user did not write runs as code: checkpoints, model weights, and loads that could
exhaust memory (decompression bombs, absurd PSF grids)."""

import builtins
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import main
import utils
from helpers import tiny_scheduler, tiny_unet
from test_main import FAST, ROOT, run_cli, run_dirs


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


def test_planted_pickle_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = planted_run(tmp_path, {"x_t": torch.zeros(1), "evil": Payload(marker)})
    # The payload is live: a full pickle load runs it (so the assertion below can fail).
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    line = one_error_line(run_cli(["--resume", str(run)]))
    assert "not a checkpoint this tool wrote" in line
    assert not marker.exists()


@pytest.mark.parametrize("content,pattern", [
    ({"x_t": torch.zeros(1), "next_index": 3}, "start the run again"),        # an older or foreign dict
    ({"format": main.CHECKPOINT_FORMAT, "version": 1}, "format 1"),
    ({"format": main.CHECKPOINT_FORMAT, "version": main.CHECKPOINT_VERSION, "x_t": torch.zeros(1),
      "next_index": "3"}, "next_index should be int"),
    (b"truncated", "truncated or corrupt"),
    (b"just some text\n", "not a checkpoint this tool wrote: it is not a torch checkpoint archive"),
])
def test_foreign_or_damaged_checkpoints_name_what_is_wrong(tmp_path, content, pattern):
    run = planted_run(tmp_path, {})
    if isinstance(content, bytes):
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[:40] if content == b"truncated" else content)
    else:
        torch.save(content, run / "checkpoint.pt")
    with pytest.raises(utils.UserError, match=pattern):
        main.load_checkpoint(str(run / "checkpoint.pt"))


def test_checkpoint_round_trip_is_exact_and_plain(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.randn(5, generator=gen)
    clean = np.random.default_rng(0).random((8, 8, 3))
    p = main.Problem("img", torch.rand(1, 3, 8, 8), clean, torch.rand(2, 2, 3, 3),
                     (np.array([1.5, 5.5]), np.array([2.0, 6.0])), None, None, None,
                     {"operator_relative_error": 0.01, "psf_sums_before_normalisation": (0.9, 1.1)})
    state = {"steps_done": 4, "runtime": 1.5, "steps": [0, 2], "x0_hat": [torch.rand(1, 3, 8, 8)] * 2,
             "residual": [torch.rand(1)] * 2}
    x_t = torch.randn(1, 3, 8, 8)
    path = str(tmp_path / "checkpoint.pt")
    main.save_checkpoint(path, p, x_t, 4, gen, state)
    ck = main.load_checkpoint(path)
    assert torch.equal(ck["x_t"], x_t) and ck["next_index"] == 4
    assert np.array_equal(ck["problem"]["clean"].numpy(), clean) and ck["problem"]["clean"].dtype == torch.float64
    assert ck["problem"]["info"]["psf_sums_before_normalisation"] == [0.9, 1.1]
    g2 = torch.Generator()
    g2.set_state(ck["generator_state"])
    assert torch.equal(torch.randn(5, generator=g2), torch.randn(5, generator=gen))


def bomb_png(path, width=100_000, height=100_000):
    """A valid PNG header declaring width x height 8-bit gray pixels, with a tiny IDAT: a few
    hundred bytes that would decode to width*height bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 5000
    import imageio.v3 as iio

    def no_decode(*a, **k):
        raise AssertionError("the image was decoded")
    monkeypatch.setattr(iio, "imread", no_decode)
    with pytest.raises(utils.UserError, match="declares 10,000,000,000 pixels"):
        utils.read_image(str(bomb))
    with pytest.raises(utils.UserError, match="refusing to decode"):
        utils.decode_image(bomb.read_bytes(), "http://host/bomb.png")  # what a URL delivers
    # An image under the limit still goes through the same check and decodes.
    ok = bomb_png(tmp_path / "ok.png", 40, 30)
    monkeypatch.undo()
    assert utils.read_image(str(ok)).shape == (30, 40, 1)


def test_decompression_bomb_cli_exit_2_no_folder(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    r = run_cli(["--model_id", "analytic", *FAST, "--image", str(bomb), "--save_dir", str(tmp_path / "out")],
                timeout=120)
    assert "refusing to decode" in one_error_line(r)
    assert run_dirs(tmp_path / "out") == []


def npy_header_only(path, shape):
    """A .npy file whose header declares `shape` float64 but that holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return path


@pytest.mark.parametrize("shape", [(256, 256, 4001, 4001), (10 ** 11,), (300, 300, 3, 3)])
def test_absurd_psf_grid_refused_without_allocating(tmp_path, monkeypatch, shape):
    path = npy_header_only(tmp_path / "psfs.npy", shape)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was called"))
    with pytest.raises(utils.UserError, match="beyond the limits"):
        utils.load_psf_grid(str(path))


def test_absurd_psf_grid_in_npz_refused(tmp_path):
    inner = io.BytesIO()
    np.lib.format.write_array_header_1_0(inner, {"descr": "<f8", "fortran_order": False, "shape": (64, 64, 255, 255)})
    import zipfile
    with zipfile.ZipFile(tmp_path / "g.npz", "w") as z:
        z.writestr("psfs.npy", inner.getvalue())
    with pytest.raises(utils.UserError, match="beyond the limits"):
        utils.load_psf_grid(str(tmp_path / "g.npz"))


def test_pickled_object_array_in_psf_grid_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "g.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(utils.UserError, match="must hold numbers"):
        utils.load_psf_grid(str(tmp_path / "g.npy"))
    assert not marker.exists()


def test_bin_only_model_with_pickle_payload_does_not_run(tmp_path):
    import priors
    model = tmp_path / "model"
    tiny_unet().save_pretrained(model, safe_serialization=False)
    tiny_scheduler().save_pretrained(model)
    weights = model / "diffusion_pytorch_model.bin"
    assert weights.exists() and not list(model.glob("*.safetensors"))
    priors.load_model(str(model))  # a plain .bin state dict loads (weights_only)
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": Payload(marker)}, weights)
    with pytest.raises(priors.ModelUnavailableError):
        priors.load_model(str(model))
    assert not marker.exists()


def test_run_folder_follows_umask_and_writes_nowhere_else(tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    args = [sys.executable, os.path.join(ROOT, "main.py"), "--model_id", "analytic", *FAST, "--save_dir", str(out)]
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / run_dirs(out)[0]
    assert stat.S_IMODE(run.stat().st_mode) == 0o750
    assert stat.S_IMODE((run / "metrics.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((run / "images").stat().st_mode) == 0o750
    assert os.listdir(cwd) == [] and sorted(os.listdir(tmp_path)) == ["cwd", "out"]


def test_text_npy_is_named_not_an_array(tmp_path):
    (tmp_path / "g.npy").write_text("0 1 2\n3 4 5\n")
    with pytest.raises(utils.UserError, match="not a valid .npy array") as ei:
        utils.load_psf_grid(str(tmp_path / "g.npy"))
    assert "allow_pickle" not in str(ei.value)
