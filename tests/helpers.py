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
