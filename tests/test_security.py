"""Nothing the user did not write runs as code: checkpoints, model weights, and loads that could
exhaust memory (decompression bombs, absurd PSF grids)."""

import os
import stat
import subprocess
import sys

import pytest
import torch
from helpers import (bomb_png, FAST, one_error_line, Payload, ROOT, run_cli, run_dirs, tiny_scheduler,
                     tiny_unet)



def test_decompression_bomb_cli_exit_2_no_folder(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    r = run_cli(["--model_id", "analytic", *FAST, "--image", str(bomb), "--save_dir", str(tmp_path / "out")],
                timeout=120)
    assert "refusing to decode" in one_error_line(r)
    assert run_dirs(tmp_path / "out") == []


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


