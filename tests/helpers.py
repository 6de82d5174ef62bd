"""Small models and images made locally, so no test needs the network."""

import torch
from diffusers import DDPMScheduler, UNet2DModel


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
