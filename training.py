"""Train, or fine-tune, a diffusion prior on a folder of clean images.

The model is diffusers' UNet2DModel with its DDPMScheduler (linear β 1e-4…0.02, 1000 steps), the
ε-prediction loss of Ho et al. 2020 (Eq. 14, "L_simple"):

    L = E_{x₀, t, ε} ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖²,

with diffusers' own pieces for the rest: `DDPMScheduler.add_noise`, `EMAModel`, the
constant-with-warm-up learning rate of `diffusers.optimization`, AdamW and gradient clipping from
torch, bf16 autocast on CUDA, and DistributedDataParallel under `torchrun` for several devices.

One torch.Generator draws everything random (which images, crops, flips, rotations, t and ε), for
the whole global batch on every process; process r trains on its slice. So a checkpoint (model,
EMA, optimiser, learning-rate schedule, generator state, step) resumes bit-identically, and 2
processes give the loss of 1 with the same global batch. The output folder's `model/` is a
diffusers folder (`save_pretrained`, EMA weights) that `--model_id` loads unchanged.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
import os
import sys
import time

import numpy as np
import torch

import checkpoint
import config
import device as device_setup
import plots
import utils

log = logging.getLogger(__name__)

GRID_SAMPLE_PX = 128   # the least width of one sample in the training's sample grids

# Named UNet sizes (diffusers UNet2DModel), smallest first. base is google/ddpm-celebahq-256's layout.
SIZES = {
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8),
    "small": dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "base": dict(block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
}
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "eigenpsf-dps training checkpoint", 1


# ----------------------------------------------------------------------------
# 1. Data: a folder of clean images, random crops
# ----------------------------------------------------------------------------

def load_folder(path: str, channels, crop: int, val_fraction: float, seed: int):
    """(train images, validation images, skipped [(file, why)], channels): float32 (C, H, W) arrays
    in [0, 1]. Unreadable files are skipped and listed; an empty folder, or no image as large as
    the crop, is a UserError. channels 'auto' follows the first image (gray stays gray)."""
    if not os.path.isdir(path):
        raise utils.UserError(f"train_dir {path!r} is not a folder")
    files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(utils.IMAGE_EXTS))
    if not files:
        raise utils.UserError(f"train_dir {path!r} holds no PNG, JPEG or TIFF images")
    images, skipped = [], []
    for f in files:
        try:
            img = utils.read_image(f)
        except (utils.UserError, OSError, ValueError) as e:
            skipped.append((os.path.basename(f), str(e).splitlines()[0]))
            continue
        if min(img.shape[:2]) < crop:
            skipped.append((os.path.basename(f), f"{img.shape[1]}x{img.shape[0]} is smaller than the {crop}-pixel crop"))
            continue
        images.append((os.path.basename(f), img))
    if not images:
        why = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise utils.UserError(f"train_dir {path!r}: no usable image ({len(skipped)} skipped{why})")
    if channels == "auto":
        channels = images[0][1].shape[-1]
    arrays = [np.ascontiguousarray(np.moveaxis(_to_channels(img, channels), -1, 0), dtype=np.float32)
              for _, img in images]
    order = np.random.default_rng(seed).permutation(len(arrays))
    n_val = int(round(val_fraction * len(arrays))) if len(arrays) > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(arrays) > 1 else 0), len(arrays) - 1)
    val = [arrays[i] for i in order[:n_val]]
    return [arrays[i] for i in order[n_val:]], val, skipped, channels


def _to_channels(img, channels):
    if img.shape[-1] == channels:
        return img
    if channels == 1:   # Rec. 709 luminance, as gray measurements are compared elsewhere
        import physics
        return (img * np.asarray(physics.LUMINANCE_WEIGHTS)).sum(-1, keepdims=True)
    return np.repeat(img, 3, axis=-1)


def random_crops(images, n: int, crop: int, rotate90: bool, generator):
    """(n, C, crop, crop) in [−1, 1]: n images drawn with replacement, each a random crop, flipped
    left-right and up-down at random, and turned by a random multiple of 90° if rotate90."""
    idx = torch.randint(len(images), (n,), generator=generator).tolist()
    draws = torch.rand(n, 5, generator=generator)          # y, x, flip lr, flip ud, rotation
    out = []
    for k, i in enumerate(idx):
        img = torch.from_numpy(images[i])
        H, W = img.shape[-2:]
        y0, x0 = int(draws[k, 0] * (H - crop + 1)), int(draws[k, 1] * (W - crop + 1))
        c = img[:, y0:y0 + crop, x0:x0 + crop]
        if draws[k, 2] < 0.5:
            c = c.flip(-1)
        if draws[k, 3] < 0.5:
            c = c.flip(-2)
        if rotate90:
            c = torch.rot90(c, int(draws[k, 4] * 4) % 4, (-2, -1))
        out.append(c)
    return torch.stack(out) * 2 - 1


# ----------------------------------------------------------------------------
# 2. Model, loss, one step
# ----------------------------------------------------------------------------

def build_model(tc, channels: int, seed: int):
    """(unet, scheduler): a fresh UNet2DModel of size tc['size'], or the model tc['init'] (any
    --model_id a diffusers UNet can come from) to fine-tune."""
    from diffusers import DDPMScheduler, UNet2DModel
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=True, variance_type="fixed_small", prediction_type="epsilon")
    if tc["init"]:
        import priors
        unet, init_sched = priors.load_model(tc["init"])
        if not isinstance(unet, UNet2DModel):
            raise utils.UserError(f"train.init {tc['init']!r} is not a diffusers UNet2DModel (the analytic prior "
                                  f"has nothing to fine-tune)")
        if unet.config.in_channels != channels:
            raise utils.UserError(f"train.init {tc['init']!r} has {unet.config.in_channels} channel(s), the images "
                                  f"{channels}")
        learned = unet.config.out_channels == 2 * channels
        if learned and init_sched.config.variance_type != "learned_range":
            raise utils.UserError(f"train.init {tc['init']!r} has a learned variance of type "
                                  f"{init_sched.config.variance_type!r}; only learned_range (ADM's) can be trained")
        return unet.float().train().requires_grad_(True), DDPMScheduler.from_config(init_sched.config)
    torch.manual_seed(seed)   # the same initial weights in every process and every run
    unet = UNet2DModel(sample_size=tc["crop"], in_channels=channels, out_channels=channels, **SIZES[tc["size"]])
    return unet.train(), scheduler


def diffusion_loss(unet, scheduler, x0, t, noise):
    """Ho et al. 2020, Eq. 14: mean ‖ε − ε_θ(x_t, t)‖² over the batch's pixels. A learned-range
    model (2C outputs: ε and the variance interpolation v) is trained with Nichol & Dhariwal's
    hybrid loss (2021, Eq. 16), L_simple + λ L_vlb with λ = 0.001, as guided-diffusion sums it: the
    variational bound's term L_t (bits per dimension) of each image's t, with ε frozen, so that the
    bound trains v alone (Sec. 3.1)."""
    x_t = scheduler.add_noise(x0, noise, t)
    out = unet(x_t, t).sample.float()
    C = x0.shape[1]
    loss = torch.nn.functional.mse_loss(out[:, :C], noise)
    if out.shape[1] == 2 * C:
        loss = loss + variational_bound_term(scheduler, x0.float(), x_t.float(), t, out[:, :C].detach(), out[:, C:]).mean()
    return loss


def _gather(v, t):
    return v.to(t.device)[t].view(-1, 1, 1, 1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data x in [−1, 1] under N(means, e^(2·log_scales)), integrated over each
    pixel's bin (Ho et al. 2020, Eq. 13), with guided-diffusion's tanh approximation of Φ."""
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv = torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv * (x - means + 1 / 255)), cdf(inv * (x - means - 1 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus_min, log_delta))


def variational_bound_term(scheduler, x0, x_t, t, eps, v):
    """L_t of the variational bound in bits per dimension, per image (B,) (Nichol & Dhariwal 2021,
    Eqs. 4-6 and 15): KL(q(x_{t−1} | x_t, x₀) ‖ p_θ(x_{t−1} | x_t)) for t > 0, the discretized
    decoder's −log p_θ(x₀ | x₁) at t = 0. p_θ's mean comes from ε (unclipped x̂₀), its log variance
    is v's interpolation (v + 1)/2 · log β_t + (1 − v)/2 · log β̃_t (β̃ clipped at t = 0)."""
    betas = scheduler.betas.to(torch.float64)
    ab = scheduler.alphas_cumprod.to(torch.float64)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef_x0, coef_xt = betas * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
    c0, ct, a, lp, lb = (_gather(w, t).float() for w in (coef_x0, coef_xt, ab, log_post, torch.log(betas)))
    true_mean = c0 * x0 + ct * x_t
    x0_hat = (1 / a).sqrt() * x_t - (1 / a - 1).sqrt() * eps
    model_mean = c0 * x0_hat + ct * x_t
    frac = (v + 1) / 2
    model_log_var = frac * lb + (1 - frac) * lp
    dims = tuple(range(1, x0.ndim))
    kl = _normal_kl(true_mean, lp, model_mean, model_log_var).mean(dims) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dims) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)


def draw_batch(data, tc, generator, scheduler):
    """The global batch: (x₀, t, ε), all from `generator`."""
    x0 = random_crops(data, tc["batch_size"], tc["crop"], tc["rotate90"], generator)
    t = torch.randint(scheduler.config.num_train_timesteps, (tc["batch_size"],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return x0, t, noise


def validation_set(val, tc, seed, scheduler, n=16):
    """Fixed validation crops, timesteps and noise (their own generator), so that the curve compares
    like with like; None without validation images."""
    if not val:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    x0 = random_crops(val, n, tc["crop"], False, g)
    return x0, torch.randint(scheduler.config.num_train_timesteps, (n,), generator=g), torch.randn(x0.shape, generator=g)


# ----------------------------------------------------------------------------
# 3. The trainer: state, one step, checkpoints
# ----------------------------------------------------------------------------

class Trainer:
    """Model, EMA, AdamW with warm-up, and the one generator, for process `rank` of `world`."""

    def __init__(self, tc, data, val, channels, device, seed=0, rank=0, world=1):
        from diffusers import UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        if tc["batch_size"] % world:
            raise utils.UserError(f"train.batch_size {tc['batch_size']} must divide among {world} processes")
        self.tc, self.data, self.channels, self.device, self.rank, self.world = tc, data, channels, device, rank, world
        unet, self.scheduler = build_model(tc, channels, seed)
        self.unet = unet.to(device)
        self.model = self.unet
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.unet)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
        self.lr = get_scheduler("constant_with_warmup", self.opt, num_warmup_steps=tc["warmup_steps"])
        self.ema = EMAModel(self.unet.parameters(), decay=tc["ema_decay"], model_cls=UNet2DModel,
                            model_config=self.unet.config)
        self.generator = torch.Generator().manual_seed(seed)
        self.val = validation_set(val, tc, seed, self.scheduler)
        self.step, self.history = 0, []          # history: [step, train loss, validation loss or nan]
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step(self) -> float:
        """One optimiser step on this process's slice of the global batch; returns the global mean loss."""
        x0, t, noise = draw_batch(self.data, self.tc, self.generator, self.scheduler)
        b = self.tc["batch_size"] // self.world
        mine = slice(self.rank * b, (self.rank + 1) * b)
        x0, t, noise = (v[mine].to(self.device) for v in (x0, t, noise))
        with self.autocast:
            loss = diffusion_loss(self.model, self.scheduler, x0, t, noise)
        loss.backward()
        if self.tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.tc["grad_clip"])
        self.opt.step()
        self.lr.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        self.step += 1
        loss = loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(loss)
            loss = loss / self.world
        return float(loss)

    def with_ema(self, fn):
        """fn() with the EMA weights in the UNet, the training weights put back after."""
        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        try:
            return fn()
        finally:
            self.ema.restore(self.unet.parameters())

    def validation_loss(self) -> float:
        if self.val is None:
            return float("nan")

        def loss():
            with torch.no_grad(), self.autocast:
                return float(diffusion_loss(self.unet, self.scheduler, *(v.to(self.device) for v in self.val)))
        return self.with_ema(loss)

    def save_model(self, path):
        """The EMA weights as a diffusers folder (UNet and scheduler) that --model_id loads."""
        self.with_ema(lambda: self.unet.save_pretrained(path, safe_serialization=True))
        self.scheduler.save_pretrained(path)

    def sample_grid(self, path, n=16, steps=50, seed=2):
        """n samples of the EMA model at the training crop's size (DDIM with η = 0, `steps` steps, a
        fixed seed: grids compare across steps). A learned-variance model's ε is its first C channels."""
        from diffusers import DDIMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        def draw():
            sched = DDIMScheduler.from_config(self.scheduler.config)
            sched.set_timesteps(steps)
            g = torch.Generator(self.device).manual_seed(seed)
            shape = (n, self.channels, self.tc["crop"], self.tc["crop"])
            x = randn_tensor(shape, generator=g, device=self.device, dtype=self.unet.dtype)
            with torch.no_grad():
                for t in sched.timesteps:
                    x = sched.step(self.unet(x, t).sample[:, :self.channels], t, x).prev_sample
            return (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        self.unet.eval()
        try:
            images = self.with_ema(draw)
        finally:
            self.unet.train()
        side = int(math.ceil(math.sqrt(n)))
        # Each sample shown at least GRID_SAMPLE_PX wide (nearest-neighbour: the pixels stay visible);
        # sixteen 32² crops were a 136-pixel grid.
        zoom = max(1, math.ceil(GRID_SAMPLE_PX / images.shape[2]))
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        h, w, c = images.shape[1:]
        grid = np.ones((side * (h + 2), side * (w + 2), c))
        for k, img in enumerate(images):
            r, q = divmod(k, side)
            grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = img
        os.makedirs(os.path.dirname(path), exist_ok=True)
        utils.save_image(path, torch.from_numpy(grid).permute(2, 0, 1)[None])

    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                "unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "lr_schedule": self.lr.state_dict(), "generator": self.generator.get_state(),
                "history": [list(map(float, h)) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        self.step, self.history = int(state["step"]), [[int(h[0]), h[1], h[2]] for h in state["history"]]


def save_checkpoint(path, trainer) -> None:
    """Atomically (a killed save leaves the previous checkpoint), in the weights-only format."""
    tmp = path + ".tmp"
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise utils.UserError(f"{path} is not a training checkpoint of this tool")
    return state


# ----------------------------------------------------------------------------
# 4. The loop
# ----------------------------------------------------------------------------

def train(trainer, out_dir, should_stop=lambda: False, progress=True) -> str:
    """Runs until train.steps, writing (process 0 only) the loss curve, sample grids and checkpoints
    every few steps and the model at the end. Returns 'complete', or 'stopped' when should_stop()
    turned true after a step (a checkpoint is then saved)."""
    from tqdm.auto import tqdm
    tc, main_process = trainer.tc, trainer.rank == 0
    bar = tqdm(total=tc["steps"], initial=trainer.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and main_process))
    status = "complete"
    try:
        while trainer.step < tc["steps"]:
            loss = trainer.train_step()
            s = trainer.step
            val = trainer.validation_loss() if s % tc["eval_every"] == 0 or s == tc["steps"] else float("nan")
            trainer.history.append([s, loss, val])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{trainer.lr.get_last_lr()[0]:.1e}")
            if main_process and (s % tc["sample_every"] == 0 or s == tc["steps"]):
                bar.set_postfix_str(f"drawing samples/step_{s:07d}.png (16 samples, 50 DDIM steps)")  # a pause
                trainer.sample_grid(os.path.join(out_dir, "samples", f"step_{s:07d}.png"))
            if main_process and (s % tc["eval_every"] == 0 or s == tc["steps"]):
                write_curve(out_dir, trainer.history)
            if main_process and s % tc["checkpoint_every"] == 0 and s < tc["steps"]:
                save_checkpoint(os.path.join(out_dir, "checkpoint.pt"), trainer)
            if s < tc["steps"] and stop_everywhere(should_stop(), trainer.world, trainer.device):
                status = "stopped"
                break
    finally:
        bar.close()
    if main_process:
        write_curve(out_dir, trainer.history)
        if status == "stopped":
            save_checkpoint(os.path.join(out_dir, "checkpoint.pt"), trainer)
        else:
            trainer.save_model(os.path.join(out_dir, "model"))
            if os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
                os.remove(os.path.join(out_dir, "checkpoint.pt"))
    return status


def stop_everywhere(stop: bool, world: int, device) -> bool:
    """True in every process when any process was asked to stop (a signal may reach only some):
    they then stop after the same step, and process 0's checkpoint is consistent."""
    if world == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)   # NCCL reduces on the GPU
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def write_curve(out_dir, history) -> None:
    """loss.csv (every step) and loss.png (train, smoothed, and validation)."""
    with open(os.path.join(out_dir, "loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", "validation_loss"])
        w.writerows([[int(s), f"{a:.6g}", "" if math.isnan(b) else f"{b:.6g}"] for s, a, b in history])
    plots.plot_loss_curve(os.path.join(out_dir, "loss.png"), history)


# ----------------------------------------------------------------------------
# 5. A run: folder in, diffusers model out
# ----------------------------------------------------------------------------

def init_distributed(device_setting: str):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1): torch's process group, gloo on CPU
    and NCCL on CUDA, one device per local rank; otherwise (0, 1, the run's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), world, device


def prepare(cfg, device, rank=0, world=1):
    """(trainer, facts about the data) for cfg's train section; bad input raises UserError."""
    tc, seed = cfg["train"], cfg["run"]["seed"]
    data, val, skipped, channels = load_folder(tc["dir"], tc["channels"], tc["crop"], tc["val_fraction"], seed)
    for name, why in skipped:
        log.warning("skipped %s: %s", name, why)
    facts = {"train_images": len(data), "validation_images": len(val), "channels": channels,
             "skipped": [{"file": n, "why": w} for n, w in skipped]}
    return Trainer(tc, data, val, channels, device, seed, rank, world), facts


# ----------------------------------------------------------------------------
# The --train_dir run
# ----------------------------------------------------------------------------

def train_prior(cfg, run_dir=None) -> int:
    """--train_dir: train (or fine-tune) a prior into a new train_* folder, or continue run_dir from
    its checkpoint. SIGTERM, SIGUSR1 and Ctrl-C save a checkpoint and exit 75 or 130."""
    rank, world, device = init_distributed(cfg["run"]["device"])
    device = device or device_setup.resolve_device(cfg["run"]["device"], "train", cfg["run"]["threads"])
    trainer, facts = prepare(cfg, device, rank, world)   # bad input: before any folder
    if run_dir is None:
        run_dir = [utils.make_run_dir(cfg["run"]["save_dir"], prefix="train") if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(run_dir)
        run_dir = run_dir[0]
        if rank == 0:
            config.save_yaml(os.path.join(run_dir, "config.yaml"), cfg)
    else:
        trainer.load_state_dict(load_checkpoint(os.path.join(run_dir, "checkpoint.pt")))
        log.info("resuming training in %s at step %d/%d", run_dir, trainer.step, cfg["train"]["steps"])
    checkpoint.RUN_DIR["path"] = run_dir
    n_params = sum(p.numel() for p in trainer.unet.parameters()) / 1e6
    log.info("training a %s UNet (%.2f M parameters, %d channel(s)) on %d images (%d held out), %d skipped; %s",
             cfg["train"]["init"] or cfg["train"]["size"], n_params, facts["channels"], facts["train_images"],
             facts["validation_images"], len(facts["skipped"]), run_dir)
    t0 = time.time()
    with checkpoint.stop_requests():
        status = train(trainer, run_dir, lambda: checkpoint.STOP["signal"] is not None)
    if rank == 0:
        utils.write_json(os.path.join(run_dir, "metrics.json"), {
            "status": "complete" if status == "complete" else checkpoint.stop_outcome()[1], "steps_completed": trainer.step,
            "steps": cfg["train"]["steps"], "parameters_millions": n_params, "runtime_s": time.time() - t0,
            "final_train_loss": trainer.history[-1][1] if trainer.history else None, **facts,
            "model": os.path.join(run_dir, "model") if status == "complete" else None})
    if status != "complete":
        code, _, why = checkpoint.stop_outcome()
        print(f"{why} at step {trainer.step}; checkpoint saved, continue with --resume {run_dir}", file=sys.stderr)
        return code
    print(os.path.join(run_dir, "model"))
    return 0
