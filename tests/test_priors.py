"""ADM (guided-diffusion) checkpoints: conversion against an independent implementation with every
weight random, the exact key sets, the learned-variance DDPM step against guided-diffusion's
formula, and loading, downloading and running them from the CLI."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import priors
from adm_reference import ADMUNet, randomize_
from fakehub import FakeHub
from helpers import cli, run_dirs, sigterm_then_resume


def architecture(arch):
    a = priors.ADM_ARCHITECTURES[arch]
    return ADMUNet(a["model_channels"], a["num_res_blocks"], set(a["attention_ds"]), a["channel_mult"])


def reference(arch, dtype=torch.float32, seed=0):
    return randomize_(architecture(arch), seed).to(dtype).eval()


def converted(state_dict, arch, dtype):
    unet = UNet2DModel(**priors.adm_unet_config(arch))
    unet.load_state_dict(priors.convert_adm_state_dict(state_dict, arch), strict=True)
    return unet.to(dtype).eval()


def relative_error(arch, dtype, shapes, seed=0):
    ref = reference(arch, dtype, seed)
    unet = converted(ref.state_dict(), arch, dtype)
    g = torch.Generator().manual_seed(seed)
    errs = []
    with torch.no_grad():
        for shape, t in shapes:
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            r, d = ref(x, torch.tensor(t)), unet(x, torch.tensor(t)).sample
            assert d.shape == (shape[0], 6) + shape[2:]
            errs.append(float((r - d).norm() / r.norm()))
    return errs


# ---------------------------------------------------------------- the key sets


@pytest.mark.parametrize("arch, tensors, params", [("ffhq-256", 362, 93.56e6), ("imagenet-256", 566, 552.81e6)])
def test_converter_consumes_exactly_the_checkpoint_keys(arch, tensors, params):
    """The independent implementation's state dict has the original checkpoints' 362 tensors and
    93.6 M parameters (FFHQ) and 552.8 M (ImageNet); the converter reads each of its keys once and
    fills every key of the diffusers model, with matching shapes (built on the meta device)."""
    with torch.device("meta"):
        ref, unet = architecture(arch), UNet2DModel(**priors.adm_unet_config(arch))
    sd = ref.state_dict()
    assert len(sd) == tensors and abs(sum(v.numel() for v in sd.values()) - params) < 0.01e6
    assert priors.adm_expected_keys(arch) == list(sd)          # same keys, in guided-diffusion's order
    out = priors.convert_adm_state_dict(sd, arch)
    want = unet.state_dict()
    assert set(out) == set(want)
    assert all(out[k].shape == want[k].shape for k in want)
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    assert priors.adm_architecture(sd) == arch


def test_a_checkpoint_that_does_not_match_names_the_first_wrong_key(tmp_path):
    with torch.device("meta"):
        sd = architecture("ffhq-256").state_dict()
    missing = dict(sd)
    del missing["input_blocks.9.1.qkv.weight"]
    with pytest.raises(priors.ModelUnavailableError, match="against ffhq-256, missing key 'input_blocks.9.1.qkv.weight'"):
        priors.adm_architecture(missing)
    extra = dict(sd, **{"label_emb.weight": sd["out.2.bias"]})
    with pytest.raises(priors.ModelUnavailableError, match="unexpected key 'label_emb.weight'"):
        priors.adm_architecture(extra)
    with pytest.raises(priors.ModelUnavailableError, match="missing key"):
        priors.convert_adm_state_dict(missing, "ffhq-256")


# ---------------------------------------------------------------- the conversion, every weight random


def test_ffhq_conversion_matches_the_reference_in_float64_and_float32():
    shapes = [((2, 3, 64, 96), [10, 700]), ((1, 3, 64, 64), [999])]   # non-square and square
    assert max(relative_error("ffhq-256", torch.float64, shapes)) < 1e-12
    assert max(relative_error("ffhq-256", torch.float32, shapes, seed=1)) < 1e-5


@pytest.mark.slow
def test_imagenet_conversion_matches_the_reference():
    """552.8 M parameters: float32 (5 GB), one non-square input."""
    assert relative_error("imagenet-256", torch.float32, [((1, 3, 32, 64), [500])])[0] < 1e-5


def test_chunked_qkv_split_is_caught(monkeypatch):
    """Negative control: splitting qkv as [Q; K; V] (chunk(3)), as a converter for newer attention
    would, is wrong for the legacy head-by-head layout, and the comparison sees it."""
    monkeypatch.setattr(priors, "_split_qkv", lambda qkv, channels: tuple(qkv.chunk(3, dim=0)))
    assert relative_error("ffhq-256", torch.float64, [((1, 3, 64, 96), [300])])[0] > 0.05


# ---------------------------------------------------------------- the learned-variance step


def guided_diffusion_mean_log_variance(x, model_output, v, S, i):
    """guided-diffusion's p_mean_variance for LEARNED_RANGE (clip_denoised=True), in float64 numpy,
    on the respaced schedule of the kept timesteps S (ascending): β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}}."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab_all = np.cumprod(1 - betas)[S]
    ab_prev_all = np.append(1.0, ab_all[:-1])
    beta = 1 - ab_all / ab_prev_all
    post_var = beta * (1 - ab_prev_all) / (1 - ab_all)
    log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    ab, ab_prev = ab_all[i], ab_prev_all[i]
    x0 = np.clip(np.sqrt(1 / ab) * x - np.sqrt(1 / ab - 1) * model_output, -1, 1)
    mean = beta[i] * np.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * np.sqrt(1 - beta[i]) / (1 - ab) * x
    frac = (v + 1) / 2
    return mean, frac * np.log(beta[i]) + (1 - frac) * log_var_clipped[i]


def _space_timesteps(n_train, n):
    """guided-diffusion's space_timesteps(n_train, [n]): n evenly strided, rounded, from 0 to T−1."""
    stride = (n_train - 1) / (n - 1)
    return sorted({round(i * stride) for i in range(n)})


@pytest.mark.parametrize("schedule", ["all 1000", "diffusers 100", "guided-diffusion 100"])
def test_learned_range_step_matches_guided_diffusion(schedule):
    """DDPMScheduler(variance_type="learned_range").step, as the DPS sampler calls it, against
    guided-diffusion's formula. Two noise draws n₁, n₂ give the step's mean and σ exactly
    (x = m + σn). diffusers keeps ᾱ in float32, so 1 − ᾱ_t loses digits near t = 0 (1 − ᾱ_1 =
    2.2e-4): the bound is float32's, scaled by 1/(1 − ᾱ_t) — relative 1e-7/(1 − ᾱ_t) on the
    mean (2e-7 at t = 999, 5e-4 at t = 1) and 2e-5 + 1e-6/(1 − ᾱ_t) on log σ²."""
    sched = priors.adm_scheduler()
    if schedule == "all 1000":
        sched.set_timesteps(1000)
    elif schedule == "diffusers 100":
        sched.set_timesteps(100)
    else:
        sched.set_timesteps(timesteps=_space_timesteps(1000, 100)[::-1])
    S = sorted(int(t) for t in sched.timesteps)
    g = torch.Generator().manual_seed(0)
    for t in [S[-1], S[len(S) // 2], S[2], S[1]]:
        x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
        out = torch.randn(1, 6, 8, 8, generator=g, dtype=torch.float64)
        out[:, 3:] = out[:, 3:].clamp(-1, 1)   # the network's v lies in [−1, 1]
        s1, s2 = (sched.step(out, t, x, generator=torch.Generator().manual_seed(k)).prev_sample for k in (1, 2))
        n1, n2 = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in (1, 2))
        sigma = (s1 - s2) / (n1 - n2)
        mean, log_var = guided_diffusion_mean_log_variance(x.numpy(), out[:, :3].numpy(), out[:, 3:].numpy(), S,
                                                           S.index(t))
        one_minus_ab = 1 - np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t]
        mean_err = np.abs((s1 - sigma * n1).numpy() - mean).max() / np.abs(mean).max()
        assert mean_err < 1e-7 * (1 + 1 / one_minus_ab), (schedule, t, mean_err)
        assert np.abs(np.log(sigma.numpy() ** 2) - log_var).max() < 2e-5 + 1e-6 / one_minus_ab, (schedule, t)
    last = sched.step(out, S[0], x, generator=torch.Generator().manual_seed(1)).prev_sample   # t = 0: the mean, no noise
    mean = guided_diffusion_mean_log_variance(x.numpy(), out[:, :3].numpy(), out[:, 3:].numpy(), S, 0)[0]
    assert np.abs(last.numpy() - mean).max() < 1e-7 * (1 + 1 / 1e-4)   # 1 − ᾱ_0 = β_0 = 1e-4


def test_learned_variance_changes_the_step():
    """The variance channels are used: v = +1 and v = −1 give different noise scales."""
    sched = priors.adm_scheduler()
    sched.set_timesteps(100)
    x, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    lo, hi = (sched.step(torch.cat([eps, torch.full_like(eps, v)], 1), 500, x,
                         generator=torch.Generator().manual_seed(0)).prev_sample for v in (-1.0, 1.0))
    assert not torch.allclose(lo, hi)


# ---------------------------------------------------------------- loading, download, the CLI


@pytest.fixture(scope="module")
def ffhq_checkpoint(tmp_path_factory):
    """A random-weight checkpoint of the FFHQ architecture, saved as the original is (a plain
    state dict of guided-diffusion's keys, float32)."""
    path = tmp_path_factory.mktemp("adm") / "ffhq_random.pt"
    torch.save(reference("ffhq-256", seed=3).state_dict(), path)
    return str(path)


def test_local_checkpoint_converts_once_and_loads_with_learned_variance(ffhq_checkpoint):
    unet, sched = priors.load_model(ffhq_checkpoint)
    folder = priors.converted_dir(ffhq_checkpoint)
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    assert sched.config.variance_type == "learned_range" and unet.config.out_channels == 6
    stamp = os.path.getmtime(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    priors.load_model(ffhq_checkpoint)                        # the second load reuses the copy
    assert os.path.getmtime(os.path.join(folder, "diffusion_pytorch_model.safetensors")) == stamp
    ref = reference("ffhq-256", seed=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(unet(x, torch.tensor(40)).sample, ref(x, torch.tensor(40)), rtol=1e-4, atol=1e-5)


def test_checkpoint_with_a_pickle_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": Payload()}, path)
    with pytest.raises(priors.ModelUnavailableError, match="weights-only"):
        priors.load_model(str(path))
    assert not marker.exists()


def test_cli_names_a_wrong_checkpoint_and_exits_2(tmp_path, capsys, monkeypatch, caplog):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    r = cli(["--model_id", str(path), "--img_size", "64", "--save_dir", str(tmp_path / "out")], capsys, monkeypatch,
            caplog)
    assert r.returncode == 2 and "is not an ADM" in r.stderr and "missing key 'time_embed.0.weight'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    r = cli(["--model_id", "adm-ffhq", "--download_only"], capsys, monkeypatch, caplog)
    assert r.returncode == 2 and "did you mean adm-ffhq-256?" in r.stderr


@pytest.mark.slow
def test_download_only_then_offline_run_of_adm_short_name(tmp_path, ffhq_checkpoint, capsys, monkeypatch, caplog):
    """adm-ffhq-256 through the resumable downloader (the hub's copy interrupted once), converted on
    the machine that downloads; a compute node with HF_HUB_OFFLINE then runs both samplers."""
    data = open(ffhq_checkpoint, "rb").read()
    repo, file = priors.ADM_MODELS["adm-ffhq-256"][:2]
    cache = tmp_path / "cache"
    with FakeHub(repo, {file: data, "README.md": b"ADM checkpoints"}, drop_first_at={file: len(data) // 3}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        r = cli(["--model_id", "adm-ffhq-256", "--download_only", "--model_cache", str(cache), "--max_retries", "3"],
                capsys, monkeypatch, caplog)
        assert r.returncode == 0, r.stderr[-2000:]
        assert any(rng for path, rng in hub.requests if path.endswith(file))     # the second try resumed
        assert not any("README" in path for path, _ in hub.requests)
    snap = priors.cached_snapshot("adm-ffhq-256", str(cache))
    assert open(snap, "rb").read() == data and os.path.isdir(priors.converted_dir(snap))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for sampler in ("dps", "diffpir"):
        out = tmp_path / sampler
        r = cli(["--model_id", "adm-ffhq-256", "--model_cache", str(cache), "--img_size", "64", "--sampler", sampler,
                 "--num_inference_steps", "4", "--save_dir", str(out), "--no_baseline"], capsys, monkeypatch, caplog)
        assert r.returncode == 0, r.stderr[-2000:]
        run = out / run_dirs(out)[0]
        restored = np.load(run / "restored.npy")
        assert restored.shape[:2] == (64, 64) and np.isfinite(restored).all()
        assert json.loads((run / "metrics.json").read_text())["status"] == "complete"


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["dps", "diffpir"])
def test_sigterm_then_resume_with_a_converted_adm_is_bit_identical(tmp_path, ffhq_checkpoint, sampler, capsys,
                                                                    monkeypatch, caplog):
    folder = priors.convert_adm_checkpoint(ffhq_checkpoint)
    args = ["--model_id", folder, "--img_size", "64", "--num_inference_steps", "8", "--sampler", sampler,
            "--no_baseline"]
    run, full = sigterm_then_resume(args, 8, tmp_path, capsys, monkeypatch, caplog)
    assert np.array_equal(np.load(run / "restored.npy"), np.load(full / "restored.npy"))


def test_linear_schedule_without_diffusers_is_diffusers_own():
    """The exact posterior builds the analytic prior from priors.linear_alphas_cumprod, without the
    scheduler: the same ᾱ_t, bit for bit, as the sampler runs' DDPMScheduler."""
    assert torch.equal(priors.linear_alphas_cumprod(), priors.analytic_scheduler().alphas_cumprod)
    assert torch.equal(priors.linear_alphas_cumprod(), priors.adm_scheduler().alphas_cumprod)
