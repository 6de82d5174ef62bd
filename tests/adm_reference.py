"""An independent ADM (guided-diffusion) UNet, written from the architecture for the converter's tests.

It keeps guided-diffusion's parameter names (time_embed.*, input_blocks.*, middle_block.*,
output_blocks.*, out.*), so that a state dict of the original checkpoints loads into it strictly,
and its own arithmetic: the sinusoidal embedding [cos, sin], ResBlocks with scale-shift norm and
average-pool / nearest up-down sampling inside the block, and the *legacy* attention that stores
Q, K and V head by head in one 1×1 convolution. Nothing here imports diffusers.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels):
    return nn.GroupNorm(32, channels)


def sinusoid(t, dim, max_period=10000):
    """[cos, sin] of t·10000^(−i/half), in float32 as guided-diffusion computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch))
        self.out_layers = nn.Sequential(group_norm(out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)
        self.resample = "up" if up else "down" if down else None

    def _resample(self, x):
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[1](h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Legacy order: the 3C channels of qkv are (head 0: q, k, v), (head 1: q, k, v), …"""

    def __init__(self, ch, head_ch):
        super().__init__()
        self.heads = ch // head_ch
        self.norm = group_norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, h * w)
        q, k, v = qkv.split(c // self.heads, dim=1)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // self.heads), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
        return (flat + self.proj_out(a)).reshape(b, c, h, w)


class Sequential(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's UNetModel with use_scale_shift_norm and resblock_updown (the DPS/DiffPIR
    checkpoints); attention_ds: the downsampling factors with attention (image_size // resolution)."""

    def __init__(self, model_channels, num_res_blocks, attention_ds, channel_mult, head_channels=64,
                 in_channels=3, out_channels=6):
        super().__init__()
        mc, emb = model_channels, 4 * model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Sequential([nn.Conv2d(in_channels, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * mc)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(Sequential(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Sequential([ResBlock(ch, emb, ch, down=True)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Sequential([ResBlock(ch, emb, ch), AttentionBlock(ch, head_channels), ResBlock(ch, emb, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mult * mc)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, up=True))
                    ds //= 2
                self.output_blocks.append(Sequential(layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(sinusoid(t, self.model_channels).to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def randomize_(model, seed=0):
    """Every parameter random (ADM zero-initialises its output convolutions, so an untouched
    network would output zeros and prove nothing): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²),
    GroupNorm scales ~ 1 + N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda p: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)  # noqa: E731
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * rand(m.weight))
                m.bias.copy_(0.1 * rand(m.bias))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                m.weight.copy_(rand(m.weight) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(0.1 * rand(m.bias))
    return model
