"""Training a prior on a folder of clean images: the loss falls, resume is bit-identical, the
result loads with --model_id and restores, bad input is one line, and DDP with 2 gloo processes
trains as 1 process with the same global batch."""

import gc
import glob
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import config
import training
import utils
from helpers import cli, run_dirs

TINY = {"train.crop": 16, "train.batch_size": 8, "train.warmup_steps": 5, "train.lr": 0.002, "train.eval_every": 5,
        "train.sample_every": 1000, "train.checkpoint_every": 1000, "train.ema_decay": 0.99}


def blob_images(folder, n=8, channels=1, seed=0, size=(40, 48)):
    """Fluorescence-like frames: a few Gaussian spots on a dark background, 8-bit."""
    import imageio.v3 as iio
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size[0], :size[1]]
    for i in range(n):
        img = np.zeros(size)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(1.5, 4)
            img += rng.uniform(0.5, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
        img = np.clip(img, 0, 1)
        img = np.repeat(img[..., None], 3, -1) * [1, 0.6, 0.3] if channels == 3 else img
        iio.imwrite(os.path.join(folder, f"frame{i:02d}.png"), (img * 255).astype(np.uint8))
    return str(folder)


def train_config(folder, steps, **over):
    schema = config.load_config(config.DEFAULT_CONFIG)
    cfg = config.validate_config(config.with_defaults({}, schema), schema)
    cfg["train"].update({k.split(".", 1)[1]: v for k, v in TINY.items()}, dir=folder, steps=steps)
    cfg["train"].update(over)
    return cfg


def trainer_for(cfg, rank=0, world=1):
    return training.prepare(cfg, torch.device("cpu"), rank, world)[0]


def test_loss_falls(tmp_path):
    trainer = trainer_for(train_config(blob_images(tmp_path / "imgs"), 80))
    losses = [trainer.train_step() for _ in range(80)]
    assert np.mean(losses[:10]) > 2 * np.mean(losses[-10:]), (np.mean(losses[:10]), np.mean(losses[-10:]))


def test_resume_is_bit_identical(tmp_path):
    cfg = train_config(blob_images(tmp_path / "imgs"), 12)
    straight = trainer_for(cfg)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    training.train(straight, str(tmp_path / "a"), progress=False)
    first = trainer_for(cfg)
    assert training.train(first, str(tmp_path / "b"), should_stop=lambda: first.step >= 5, progress=False) == "stopped"
    resumed = trainer_for(cfg)
    resumed.load_state_dict(training.load_checkpoint(str(tmp_path / "b" / "checkpoint.pt")))
    assert resumed.step == 5
    assert training.train(resumed, str(tmp_path / "b"), progress=False) == "complete"
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.shadow_params, resumed.ema.shadow_params))
    assert np.array_equal(np.array(straight.history), np.array(resumed.history), equal_nan=True)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def flags(over=None):
    out = []
    for k, v in {**TINY, **(over or {})}.items():
        out += ["--set", f"{k}={v}"]
    return out


def test_cli_trains_stops_resumes_and_the_model_restores(tmp_path, capsys, monkeypatch, caplog):
    """--train_dir end to end: a stop request after step 6 saves a checkpoint (exit 75), --resume
    finishes it bit-identically to an uninterrupted run, and --model_id loads the result."""
    folder = blob_images(tmp_path / "imgs", channels=3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    args = ["--train_dir", folder, "--device", "cpu", *flags({"train.steps": 12, "train.sample_every": 6})]
    ref = cli(args + ["--save_dir", str(tmp_path / "ref")], capsys, monkeypatch, caplog)
    assert ref.returncode == 0, ref.stderr[-2000:]
    original = training.Trainer.train_step

    def stop_after_six(self):
        loss = original(self)
        if self.step == 6:
            checkpoint.STOP["signal"] = signal.SIGTERM
        return loss

    monkeypatch.setattr(training.Trainer, "train_step", stop_after_six)
    r = cli(args + ["--save_dir", str(tmp_path / "run")], capsys, monkeypatch, caplog)
    checkpoint.STOP["signal"] = None
    monkeypatch.setattr(training.Trainer, "train_step", original)
    run = tmp_path / "run" / run_dirs(tmp_path / "run", "train")[0]
    assert r.returncode == 75 and "--resume" in r.stderr and (run / "checkpoint.pt").is_file()
    r = cli(["--resume", str(run)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    ref_run = tmp_path / "ref" / run_dirs(tmp_path / "ref", "train")[0]
    from safetensors.torch import load_file
    a, b = (load_file(str(d / "model" / "diffusion_pytorch_model.safetensors")) for d in (ref_run, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "complete" and m["skipped"][0]["file"] == "broken.png" and m["channels"] == 3
    assert (run / "loss.csv").is_file() and (run / "loss.png").is_file() and (run / "config.yaml").is_file()
    assert sorted(os.listdir(run / "samples")) == ["step_0000006.png", "step_0000012.png"]
    r = cli(["--model_id", str(run / "model"), "--img_size", "32", "--num_inference_steps", "5", "--kernel_size", "7",
             "--grid_size", "4", "--n_eigen_psfs", "4", "--save_dir", str(tmp_path / "restore")], capsys, monkeypatch,
            caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    restored = np.load(glob.glob(str(tmp_path / "restore" / "run_*" / "restored.npy"))[0])
    assert restored.shape == (32, 32, 3) and np.isfinite(restored).all()


@pytest.mark.parametrize("case, why", [
    ("missing", "is not a folder"),
    ("empty", "holds no PNG, JPEG or TIFF images"),
    ("small", "no usable image (8 skipped; e.g. frame00.png: 12x10 is smaller than the 16-pixel crop)"),
])
def test_bad_training_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, caplog, case, why):
    folder = tmp_path / "imgs"
    if case == "empty":
        folder.mkdir()
    elif case == "small":
        blob_images(folder, size=(10, 12))
    r = cli(["--train_dir", str(folder), "--save_dir", str(tmp_path / "out"), *flags({"train.steps": 3})], capsys,
            monkeypatch, caplog)
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def _ddp_worker(rank, folder, store, steps, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        trainer = trainer_for(train_config(folder, steps), rank, 2)
        losses = [trainer.train_step() for _ in range(steps)]
        if rank == 0:
            torch.save({"losses": losses, "unet": trainer.unet.state_dict()}, out)
        # Free the DDP model while the process group lives, and let gloo's threads finish freeing their
        # work: freed at process exit instead, the Reducer's destructor joined a gloo thread that waited
        # for the GIL the destructor held (a deadlock seen once in CI, torch 2.13).
        del trainer
        gc.collect()
        torch.distributed.barrier()
        time.sleep(0.2)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    folder = blob_images(tmp_path / "imgs")
    steps = 4
    ctx = mp.spawn(_ddp_worker, args=(folder, str(tmp_path / "store"), steps, str(tmp_path / "ddp.pt")), nprocs=2,
                   join=False)
    deadline = time.time() + 300     # a hung worker fails this test rather than stalling the suite
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP workers did not finish within 300 s")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    one = trainer_for(train_config(folder, steps))
    losses = [one.train_step() for _ in range(steps)]
    assert np.allclose(ddp["losses"], losses, rtol=1e-5), (ddp["losses"], losses)
    ref = one.unet.state_dict()
    assert all(torch.allclose(ddp["unet"][k], ref[k], atol=1e-5) for k in ref)


# ---------------------------------------------------------------- a learned-variance init (ADM's)


def guided_diffusion_vb_bits(x0, x_t, t, eps, v):
    """guided-diffusion's _vb_terms_bpd for LEARNED_RANGE (clip_denoised=False), transcribed to
    float64 numpy from its formulas: normal_kl, discretized_gaussian_log_likelihood, q_posterior,
    p_mean_variance."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    log_post = np.log(np.append(post_var[1], post_var[1:]))
    out = []
    for i, ti in enumerate(t):
        c0, ct = betas[ti] * np.sqrt(ab_prev[ti]) / (1 - ab[ti]), (1 - ab_prev[ti]) * np.sqrt(1 - betas[ti]) / (1 - ab[ti])
        true_mean = c0 * x0[i] + ct * x_t[i]
        x0_hat = np.sqrt(1 / ab[ti]) * x_t[i] - np.sqrt(1 / ab[ti] - 1) * eps[i]
        mean = c0 * x0_hat + ct * x_t[i]
        frac = (v[i] + 1) / 2
        log_var = frac * np.log(betas[ti]) + (1 - frac) * log_post[ti]
        if ti > 0:
            kl = 0.5 * (-1 + log_var - log_post[ti] + np.exp(log_post[ti] - log_var)
                        + (true_mean - mean) ** 2 * np.exp(-log_var))
            out.append(kl.mean() / np.log(2))
            continue
        def cdf(z):
            return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
        inv = np.exp(-0.5 * log_var)
        plus, minus = cdf(inv * (x0[i] - mean + 1 / 255)), cdf(inv * (x0[i] - mean - 1 / 255))
        ll = np.where(x0[i] < -0.999, np.log(np.maximum(plus, 1e-12)),
                      np.where(x0[i] > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                               np.log(np.maximum(plus - minus, 1e-12))))
        out.append(-ll.mean() / np.log(2))
    return np.array(out)


def test_variational_bound_term_matches_guided_diffusion():
    import priors
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (5, 3, 8, 8), generator=g) / 127.5 - 1).double()   # 8-bit data: both edge bins too
    t = torch.tensor([0, 1, 10, 500, 999])
    noise, eps = torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sched = priors.adm_scheduler()
    x_t = sched.add_noise(x0, noise, t)
    eps = noise + 0.1 * eps                                       # a model close to, not at, the truth
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    got = training.variational_bound_term(sched, x0.float(), x_t.float(), t, eps.float(), v.float())
    want = guided_diffusion_vb_bits(*(a.numpy() for a in (x0, x_t.float().double(), t, eps.float().double(),
                                                          v.float().double())))
    # diffusers keeps ᾱ in float32: at t = 1, 1 − ᾱ has 3 digits fewer than float64's
    assert np.allclose(got.numpy(), want, rtol=2e-3, atol=1e-6), (got, want)
    assert got[0] > 0 and got[1:].min() > 0


@pytest.fixture
def learned_variance_init(tmp_path):
    """A tiny gray UNet with 2 output channels (ε, v) beside ADM's learned-range scheduler: the
    layout of the ADM priors that --init fine-tunes."""
    import priors
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=2, **training.SIZES["tiny"])
    folder = tmp_path / "adm_like"
    unet.save_pretrained(folder, safe_serialization=True)
    priors.adm_scheduler().save_pretrained(folder)
    return str(folder)


def test_learned_variance_init_trains_its_variance_head_and_samples(tmp_path, learned_variance_init):
    cfg = train_config(blob_images(tmp_path / "imgs"), 3, init=learned_variance_init)
    trainer = trainer_for(cfg)
    x0, t, noise = training.draw_batch(trainer.data, cfg["train"], torch.Generator().manual_seed(1), trainer.scheduler)
    training.diffusion_loss(trainer.unet, trainer.scheduler, x0, t, noise).backward()
    grad = trainer.unet.conv_out.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() > 0    # v's row and ε's row both learn
    trainer.unet.zero_grad(set_to_none=True)
    trainer.sample_grid(str(tmp_path / "grid.png"), n=4, steps=3)
    from PIL import Image
    # 2 × 2 samples, each drawn at least 128 pixels wide (before: the crop's own size, 16 + 2 pixels)
    assert min(Image.open(tmp_path / "grid.png").size) >= 2 * training.GRID_SAMPLE_PX


def test_a_learned_variance_of_another_type_is_refused(tmp_path, learned_variance_init):
    import priors
    sched = priors.adm_scheduler()
    sched.register_to_config(variance_type="learned")
    sched.save_pretrained(learned_variance_init)
    cfg = train_config(blob_images(tmp_path / "imgs"), 3, init=learned_variance_init)
    with pytest.raises(utils.UserError, match="only learned_range"):
        trainer_for(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback's warning")
def test_training_on_the_cpu_is_not_warned_about_as_a_restoration(tmp_path, capsys, monkeypatch, caplog):
    """--device auto without CUDA: the warning speaks of training, not of "a 256x256 pretrained run"."""
    r = cli(["--train_dir", blob_images(tmp_path / "imgs"), "--save_dir", str(tmp_path / "out"),
             *flags({"train.steps": 1, "train.sample_every": 1000})], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "256x256" not in r.stderr and "Training the tiny or small UNet works there" in r.stderr
