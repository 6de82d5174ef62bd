"""Where the samplers' ε-models come from.

- The analytic Gaussian prior (`AnalyticPrior`): training-free, exact MMSE denoiser, any size,
  offline. dps.gaussian_posterior gives the exact posterior it implies.
- diffusers DDPMs: a hub id (read from the huggingface_hub cache layout) or a local directory.
- A resumable downloader for hub repositories (`download_model`), with `--download_only` on
  login nodes and HF_HUB_OFFLINE on compute nodes.

- ADM (guided-diffusion) checkpoints, the DPS and DiffPIR papers' FFHQ and ImageNet priors: by
  short name (adm-ffhq-256, adm-imagenet-256) or as a local .pt, converted once into diffusers'
  UNet2DModel (safetensors, beside the download) so that everything downstream is unchanged.

Every loader returns (unet, scheduler): a module with `unet(x_t, t).sample` and its
`config.in_channels`, and a diffusers DDPMScheduler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from types import SimpleNamespace

import torch

import physics

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "google/ddpm-celebahq-256"

# ----------------------------------------------------------------------------
# 1. Analytic Gaussian prior (exact MMSE denoiser, any size, offline)
# ----------------------------------------------------------------------------

# Fitted once by `fit_analytic_prior` on scikit-image's chelsea, coffee and rocket photographs
# (not the astronaut used as the sample), in the model's [−1, 1] space. Refit with
#   python -c "import priors; print(priors.fit_analytic_prior())"
ANALYTIC_PRIOR = {
    "mean": [-0.0593, -0.3354, -0.4354],
    "channel_cov": [[0.26059, 0.14739, 0.04427], [0.14739, 0.14435, 0.1039], [0.04427, 0.1039, 0.12423]],
    "f0": 0.00391,
}
ANALYTIC_REF_SIZE = 256  # the per-pixel channel covariance above holds at 256×256


def _spectrum_shape(H, W, f0, device, dtype):
    """s(f) ∝ 1/(|f|² + f0²) on the rfft grid, normalised to mean 1 at ANALYTIC_REF_SIZE."""
    def raw(h, w):
        fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)[None, :]
        return 1.0 / (fy ** 2 + fx ** 2 + f0 ** 2)
    ref = 1.0 / (torch.fft.fftfreq(ANALYTIC_REF_SIZE, dtype=torch.float64)[:, None] ** 2
                 + torch.fft.fftfreq(ANALYTIC_REF_SIZE, dtype=torch.float64)[None, :] ** 2 + f0 ** 2)
    return (raw(H, W) / ref.mean().to(device)).to(dtype)


def fit_analytic_prior(images=None):
    """Fits mean, channel covariance and the spectral knee f0 to natural RGB images in [0, 1].

    The prior is x₀ = μ + Q diag(√λ) s with Σ_c = Q diag(λ) Qᵀ and each s-channel stationary with
    power spectrum ∝ 1/(|f|² + f0²) (unit variance at 256²). f0 is found by a log-space least-squares
    fit of the radially averaged periodogram.
    """
    import numpy as np
    from skimage import data
    from skimage.transform import resize
    if images is None:
        images = [data.chelsea(), data.coffee(), data.rocket()]
    crops, n = [], ANALYTIC_REF_SIZE
    for img in images:
        img = np.asarray(img, dtype=np.float64) / (255.0 if np.asarray(img).dtype == np.uint8 else 1.0)
        s = min(img.shape[:2])
        img = img[(img.shape[0] - s) // 2:(img.shape[0] - s) // 2 + s, (img.shape[1] - s) // 2:(img.shape[1] - s) // 2 + s]
        crops.append(resize(img, (n, n), anti_aliasing=True) * 2 - 1)
    X = np.stack(crops)                                   # (N, n, n, 3) in [−1, 1]
    mean = X.reshape(-1, 3).mean(0)
    Z = (X - mean).reshape(-1, 3)
    cov = Z.T @ Z / len(Z)
    # Periodogram of luminance-like first principal channel, radially binned.
    lam, Q = np.linalg.eigh(cov)
    lead = ((X - mean) @ Q[:, -1]) / np.sqrt(lam[-1])     # (N, n, n), unit variance
    P = (np.abs(np.fft.fft2(lead, norm="ortho")) ** 2).mean(0)
    f = np.fft.fftfreq(n)
    rad = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    bins = np.linspace(0, 0.5, 40)
    idx = np.digitize(rad.ravel(), bins)
    fr = np.array([rad.ravel()[idx == b].mean() for b in range(1, 40)])
    pr = np.array([P.ravel()[idx == b].mean() for b in range(1, 40)])
    best = None
    for f0 in np.geomspace(1.0 / n, 0.2, 200):  # below the lowest resolvable frequency f0 is unidentifiable
        model = 1.0 / (fr ** 2 + f0 ** 2)
        c = np.mean(np.log(pr) - np.log(model))
        err = np.mean((np.log(pr) - np.log(model) - c) ** 2)
        if best is None or err < best[0]:
            best = (err, f0)
    return {"mean": [round(float(m), 4) for m in mean], "channel_cov": [[round(float(v), 5) for v in row] for row in cov],
            "f0": round(float(best[1]), 5)}


class AnalyticPrior(torch.nn.Module):
    """Stationary Gaussian image prior with the exact MMSE ε-predictor at every t.

    With x_t = √ᾱ x₀ + √(1−ᾱ) ε and x₀ ~ N(μ, Σ_c ⊗ S), in the channel eigenbasis and Fourier
    (orthonormal DFT), everything is diagonal:

        ε̂(f) = √(1−ᾱ) · (x̂_t(f) − √ᾱ μ̂(f)) / (ᾱ λ_c s(f) + 1 − ᾱ)

    Same call shape as UNet2DModel: `model(x_t, t).sample` is ε̂. Works at any size.
    """

    def __init__(self, alphas_cumprod, mean=None, channel_cov=None, f0=None):
        super().__init__()
        p = ANALYTIC_PRIOR
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.register_buffer("mu", torch.tensor(p["mean"] if mean is None else mean, dtype=torch.float64))
        cov = torch.tensor(p["channel_cov"] if channel_cov is None else channel_cov, dtype=torch.float64)
        lam, Q = torch.linalg.eigh(cov)
        self.register_buffer("lam", lam)
        self.register_buffer("Q", Q)
        self.f0 = p["f0"] if f0 is None else f0
        self.config = SimpleNamespace(in_channels=len(lam), out_channels=len(lam), sample_size=None)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return self.mu.device

    def _rotate(self, x, M):  # apply a (C, C) channel matrix to (B, C, H, W)
        return torch.einsum("dc,bchw->bdhw", M.to(x.dtype), x)

    def prior_variance(self, H, W, dtype=torch.float64):
        """(C, H, W//2+1): variance of each rotated channel's orthonormal rFFT coefficient."""
        return self.lam.to(dtype)[:, None, None] * _spectrum_shape(H, W, self.f0, self.mu.device, dtype)[None]

    def forward(self, x_t, t):
        with torch.autocast(x_t.device.type, enabled=False):  # exact in float64 whatever the caller's dtype
            return self._eps(x_t, t)

    def _eps(self, x_t, t):
        x = x_t.to(torch.float64)
        H, W = x.shape[-2:]
        a = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device).long()].to(x.device)
        z = self._rotate(x - a.sqrt() * self.mu.view(1, -1, 1, 1), self.Q.T)       # channel eigenbasis
        Z = torch.fft.rfft2(z, norm="ortho")
        E = (1 - a).sqrt() * Z / (a * self.prior_variance(H, W) + (1 - a))
        eps = self._rotate(torch.fft.irfft2(E, s=(H, W), norm="ortho"), self.Q)
        return SimpleNamespace(sample=eps.to(x_t.dtype))

    def sample_prior(self, shape, generator=None):
        """Draws x₀ ~ N(μ, Σ) of shape (B, C, H, W) in [−1, 1]-space units (not clipped)."""
        B, C, H, W = shape
        w = torch.randn(shape, generator=generator, dtype=torch.float64, device=self.mu.device)
        Wf = torch.fft.rfft2(w, norm="ortho") * self.prior_variance(H, W).sqrt()
        s = torch.fft.irfft2(Wf, s=(H, W), norm="ortho")
        return (self._rotate(s, self.Q) + self.mu.view(1, -1, 1, 1)).float()

    def apply_covariance(self, x, power=1.0):
        """Σ^power · (x − 0) for (B, C, H, W) x; power may be negative or fractional."""
        return self.filter(x, self.prior_variance(*x.shape[-2:]) ** power)

    def filter(self, x, gain):
        """Q F⁻¹(gain · F(Qᵀ x)): a (C, H, W//2+1) gain per channel of the prior's eigenbasis and per
        frequency (orthonormal rFFT), in float64; the operators diagonal where Σ is."""
        H, W = x.shape[-2:]
        Z = torch.fft.rfft2(self._rotate(x.to(torch.float64), self.Q.T), norm="ortho") * gain
        return self._rotate(torch.fft.irfft2(Z, s=(H, W), norm="ortho"), self.Q).to(x.dtype)


def analytic_prior(alphas_cumprod, channels=3):
    """The fitted AnalyticPrior in RGB (channels=3), or for gray images (channels=1): the
    luminance of the RGB prior, with mean w·μ and variance wᵀΣw (Rec. 709 weights w)."""
    if channels == 3:
        return AnalyticPrior(alphas_cumprod)
    if channels != 1:
        raise ValueError(f"the analytic prior has 1 or 3 channels, got {channels}")
    w = torch.tensor(physics.LUMINANCE_WEIGHTS, dtype=torch.float64)
    mean = torch.tensor(ANALYTIC_PRIOR["mean"], dtype=torch.float64)
    cov = torch.tensor(ANALYTIC_PRIOR["channel_cov"], dtype=torch.float64)
    return AnalyticPrior(alphas_cumprod, mean=[float(w @ mean)], channel_cov=[[float(w @ cov @ w)]])


def linear_alphas_cumprod(n_train=1000, beta_start=1e-4, beta_end=0.02):
    """ᾱ_t of the linear-β DDPM schedule, computed as diffusers' DDPMScheduler computes it (float32
    linspace, cumprod; a test holds them equal): what the exact posterior needs of the schedule,
    without importing diffusers (1.2 s of a run's start here)."""
    return torch.cumprod(1.0 - torch.linspace(beta_start, beta_end, n_train, dtype=torch.float32), dim=0)


def analytic_scheduler():
    """The standard linear-β DDPM schedule, with no clipping: the Gaussian prior is unbounded."""
    from diffusers import DDPMScheduler   # imported when a sampler needs it
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, variance_type="fixed_small", prediction_type="epsilon")


# ----------------------------------------------------------------------------
# 2. ADM (guided-diffusion) checkpoints, converted once into diffusers' UNet2DModel
# ----------------------------------------------------------------------------

# The two networks of the DPS and DiffPIR papers (DPS's configs/model_config*.yaml). attention_ds:
# the downsampling factors with attention (256 // the resolutions "16" and "32,16,8" the configs
# name). Both: learned σ (2·3 output channels), scale-shift norm, resblock up/down, heads of 64.
ADM_ARCHITECTURES = {
    "ffhq-256": {"model_channels": 128, "num_res_blocks": 1, "attention_ds": (16,), "channel_mult": (1, 1, 2, 2, 4, 4)},
    "imagenet-256": {"model_channels": 256, "num_res_blocks": 2, "attention_ds": (8, 16, 32),
                     "channel_mult": (1, 1, 2, 2, 4, 4)},
}
ADM_HEAD_CHANNELS = 64

# short name -> (hub repository, file, architecture, size): the checkpoints as DeepInverse hosts them
# (the original ffhq_10m.pt and OpenAI's 256x256_diffusion_uncond.pt, guided-diffusion's key names).
ADM_MODELS = {
    "adm-ffhq-256": ("deepinv/diffunet", "diffusion_ffhq_10m.pt", "ffhq-256", "about 360 MB"),
    "adm-imagenet-256": ("deepinv/diffunet", "diffusion_openai.pt", "imagenet-256", "about 2.1 GB"),
}
SHORT_NAMES = ("analytic",) + tuple(ADM_MODELS)


def adm_unet_config(arch: str) -> dict:
    """UNet2DModel's config for an ADM architecture: the same layers in diffusers' blocks."""
    a = ADM_ARCHITECTURES[arch]
    n = len(a["channel_mult"])
    attn = [2 ** level in a["attention_ds"] for level in range(n)]   # level L downsamples by 2^L
    return {"sample_size": 256, "in_channels": 3, "out_channels": 6, "flip_sin_to_cos": True, "freq_shift": 0,
            "block_out_channels": [m * a["model_channels"] for m in a["channel_mult"]],
            "layers_per_block": a["num_res_blocks"],
            "down_block_types": ["AttnDownBlock2D" if x else "ResnetDownsampleBlock2D" for x in attn],
            "up_block_types": ["AttnUpBlock2D" if x else "ResnetUpsampleBlock2D" for x in attn[::-1]],
            "downsample_type": "resnet", "upsample_type": "resnet", "resnet_time_scale_shift": "scale_shift",
            "attention_head_dim": ADM_HEAD_CHANNELS, "norm_num_groups": 32, "norm_eps": 1e-5,
            # diffusers drops the mid block's attention GroupNorm under scale_shift unless it is named
            "attn_norm_num_groups": 32}


def adm_scheduler():
    """The ADM checkpoints' schedule: linear β 1e-4…0.02 over 1000 steps, learned-range variance
    (guided-diffusion's LEARNED_RANGE), x̂₀ clipped to [−1, 1] as DPS's configs do."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         variance_type="learned_range", clip_sample=True, prediction_type="epsilon")


def _adm_modules(arch: str):
    """(diffusers module, ADM module, kind) for every layer, in guided-diffusion's order; kind is
    'plain' (weight, bias), 'resnet', 'resnet+shortcut' or 'attention'."""
    a = ADM_ARCHITECTURES[arch]
    mc, nrb, mult = a["model_channels"], a["num_res_blocks"], a["channel_mult"]
    out = [("time_embedding.linear_1", "time_embed.0", "plain"), ("time_embedding.linear_2", "time_embed.2", "plain"),
           ("conv_in", "input_blocks.0.0", "plain")]
    k, ch, ds, skips = 1, mc, 1, [mc]
    for level, m in enumerate(mult):
        for j in range(nrb):
            out.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0",
                        "resnet+shortcut" if ch != m * mc else "resnet"))
            ch = m * mc
            if ds in a["attention_ds"]:
                out.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1", "attention"))
            skips, k = skips + [ch], k + 1
        if level != len(mult) - 1:
            out.append((f"down_blocks.{level}.downsamplers.0", f"input_blocks.{k}.0", "resnet"))
            skips, k, ds = skips + [ch], k + 1, ds * 2
    out += [("mid_block.resnets.0", "middle_block.0", "resnet"), ("mid_block.attentions.0", "middle_block.1", "attention"),
            ("mid_block.resnets.1", "middle_block.2", "resnet")]
    k = 0
    for u, (level, m) in enumerate(list(enumerate(mult))[::-1]):
        for j in range(nrb + 1):
            out.append((f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0", "resnet+shortcut"
                        if ch + skips.pop() != m * mc else "resnet"))
            ch, sub = m * mc, 1
            if ds in a["attention_ds"]:
                out.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", "attention"))
                sub = 2
            if level and j == nrb:
                out.append((f"up_blocks.{u}.upsamplers.0", f"output_blocks.{k}.{sub}", "resnet"))
                ds //= 2
            k += 1
    return out + [("conv_norm_out", "out.0", "plain"), ("conv_out", "out.2", "plain")]


# diffusers ResnetBlock2D layer <- guided-diffusion ResBlock layer
_RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3"}


def _split_qkv(qkv, channels):
    """ADM's legacy attention stores the 3C rows of its qkv projection head by head — (q, k, v) of
    head 0, then of head 1, … — not as [Q; K; V]; a plain chunk(3) mixes heads (about 15% output
    error on the real checkpoints). Returns (q, k, v), each with C rows."""
    heads = channels // ADM_HEAD_CHANNELS
    per_head = qkv.reshape(heads, 3, ADM_HEAD_CHANNELS, *qkv.shape[1:])
    return tuple(per_head[:, i].reshape(channels, *qkv.shape[1:]) for i in range(3))


def _adm_pairs(arch: str):
    """(diffusers key, ADM key or (ADM qkv key, index)) for every tensor."""
    pairs = []
    for dst, src, kind in _adm_modules(arch):
        if kind == "plain":
            layers = {"": ""}
        elif kind == "attention":
            layers = {"group_norm": "norm", "qkv": "qkv", "to_out.0": "proj_out"}
        else:
            layers = dict(_RESNET_LAYERS, **({"conv_shortcut": "skip_connection"} if kind == "resnet+shortcut" else {}))
        for d, s_ in layers.items():
            for p in ("weight", "bias"):
                if d == "qkv":   # one ADM tensor, three diffusers ones
                    pairs += [(f"{dst}.{name}.{p}", (f"{src}.qkv.{p}", i)) for i, name in enumerate(("to_q", "to_k", "to_v"))]
                else:
                    pairs.append((".".join(x for x in (dst, d, p) if x), ".".join(x for x in (src, s_, p) if x)))
    return pairs


def adm_expected_keys(arch: str) -> list:
    """The keys of an original checkpoint of `arch`, in guided-diffusion's module order."""
    keys = []
    for _, src in _adm_pairs(arch):
        k = src[0] if isinstance(src, tuple) else src
        if k not in keys:
            keys.append(k)
    return keys


def _mismatch(state_dict, arch: str):
    """The first key `arch` needs that state_dict lacks, or has that arch does not know; None if none."""
    want = adm_expected_keys(arch)
    missing = [k for k in want if k not in state_dict]
    if missing:
        return f"missing key {missing[0]!r}"
    known = set(want)
    extra = [k for k in state_dict if k not in known]
    return f"unexpected key {extra[0]!r}" if extra else None


def convert_adm_state_dict(state_dict, arch: str) -> dict:
    """guided-diffusion state dict -> UNet2DModel(**adm_unet_config(arch)) state dict. Every key of
    the checkpoint is used exactly once; a missing or unexpected key raises ModelUnavailableError."""
    problem = _mismatch(state_dict, arch)
    if problem:
        raise ModelUnavailableError(f"the checkpoint does not match ADM {arch}: {problem}")
    out = {}
    for dst, src in _adm_pairs(arch):
        if isinstance(src, tuple):
            qkv = state_dict[src[0]]
            v = _split_qkv(qkv, qkv.shape[0] // 3)[src[1]]
        else:
            v = state_dict[src]
        # guided-diffusion's attention projections are 1×1 Conv1d; diffusers' are Linear
        out[dst] = v[..., 0] if ("attentions" in dst and v.ndim == 3) else v
    return out


def adm_architecture(state_dict, path="the checkpoint") -> str:
    """The ADM architecture whose key set is exactly state_dict's; otherwise an error that names
    the first missing or unexpected key against the nearest architecture (by base width)."""
    for arch in ADM_ARCHITECTURES:
        if _mismatch(state_dict, arch) is None:
            return arch
    w = state_dict.get("input_blocks.0.0.weight")
    width = w.shape[0] if torch.is_tensor(w) else None
    nearest = min(ADM_ARCHITECTURES, key=lambda a: abs(ADM_ARCHITECTURES[a]["model_channels"] - (width or 0)))
    raise ModelUnavailableError(f"{path} is not an ADM {' or '.join(ADM_ARCHITECTURES)} checkpoint: against "
                                f"{nearest}, {_mismatch(state_dict, nearest)}")


def _read_checkpoint(path):
    """A .pt state dict, read with weights_only=True: tensors only, nothing executable."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and weights_only errors alike: say which file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelUnavailableError(f"could not read {path} as a weights-only checkpoint: {first}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ModelUnavailableError(f"{path} holds no plain state dict of tensors")
    return sd


def converted_dir(path) -> str:
    """Where the diffusers copy of a checkpoint lives: beside it, <file>.diffusers/; where its
    folder is read-only (a shared model directory), under the hub cache's adm-converted/."""
    beside = os.path.splitext(os.path.abspath(path))[0] + ".diffusers"
    if os.access(os.path.dirname(beside), os.W_OK) or os.path.isdir(beside):
        return beside
    tag = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(hub_cache_dir(), "adm-converted", f"{os.path.basename(beside)}-{tag}")


def _source_stamp(path):
    st = os.stat(path)
    return {"source": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def convert_adm_checkpoint(path) -> str:
    """Converts an ADM .pt once into a diffusers folder beside it (UNet as safetensors, the
    learned-range scheduler, the source's size and mtime); later calls reuse it. Returns the folder."""
    from diffusers import UNet2DModel
    out = converted_dir(path)
    stamp_file = os.path.join(out, "converted_from.json")
    if os.path.isfile(stamp_file) and json.load(open(stamp_file)) == _source_stamp(path):
        return out
    sd = _read_checkpoint(path)
    arch = adm_architecture(sd, path)
    log.info("converting %s (ADM %s) to diffusers' UNet2DModel in %s", path, arch, out)
    unet = UNet2DModel(**adm_unet_config(arch))
    unet.load_state_dict(convert_adm_state_dict(sd, arch), strict=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    unet.save_pretrained(tmp, safe_serialization=True)
    adm_scheduler().save_pretrained(tmp)
    with open(os.path.join(tmp, "converted_from.json"), "w") as f:
        json.dump(_source_stamp(path), f)
    if os.path.isdir(out):  # a stale copy (the source changed): replace it whole
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------
# 3. Models: local directories, the hub cache, and a downloader that truly resumes
# ----------------------------------------------------------------------------

class ModelUnavailableError(RuntimeError):
    """The model is neither cached nor reachable (or the hub refused it)."""


def hub_cache_dir(cache_dir=None) -> str:
    """cache_dir, else HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _repo_dir(model_id, cache_dir):
    return os.path.join(hub_cache_dir(cache_dir), "models--" + model_id.replace("/", "--"))


def hub_source(model_id):
    """(hub repository, the one file to fetch or None for a whole diffusers repo) for a model id."""
    if model_id in ADM_MODELS:
        return ADM_MODELS[model_id][0], ADM_MODELS[model_id][1]
    return model_id, None


def cached_snapshot(model_id, cache_dir=None, revision="main"):
    """Path of a complete cached snapshot (huggingface_hub's cache layout), or None. For an ADM
    short name, the path of its cached checkpoint file."""
    repo_id, file = hub_source(model_id)
    repo = _repo_dir(repo_id, cache_dir)
    ref = os.path.join(repo, "refs", revision)
    sha = open(ref).read().strip() if os.path.isfile(ref) else revision
    snap = os.path.join(repo, "snapshots", sha)
    if file is not None:
        return os.path.join(snap, file) if os.path.isfile(os.path.join(snap, file)) else None
    ok = os.path.isfile(os.path.join(snap, "config.json")) or os.path.isfile(os.path.join(snap, "unet", "config.json"))
    return snap if ok else None


def _load_dir(path, device, dtype):
    # Imported here, not at the top: about 2 s of start-up that the analytic prior and every early
    # error exit do not need.
    from diffusers import DDPMScheduler, UNet2DModel
    unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    sched_dir = os.path.join(path, "scheduler") if os.path.isdir(os.path.join(path, "scheduler")) else path
    try:
        # low_cpu_mem_usage=False: the default needs `accelerate` and prints an install notice without it
        unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=dtype, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
    except (OSError, ValueError, EnvironmentError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelUnavailableError(f"could not load a diffusers UNet2DModel + DDPMScheduler from {path}: {first}") from e
    return unet.to(device).eval().requires_grad_(False), scheduler


def check_model_id(model_id: str) -> None:
    """A near miss of a short name (no owner/ in it, no such path) is a typo, not a hub model: say
    so before any download is tried."""
    import difflib
    if model_id in SHORT_NAMES or "/" in model_id or os.path.exists(model_id):
        return
    near = difflib.get_close_matches(model_id.lower(), SHORT_NAMES, 1, 0.75)
    if near:
        raise ModelUnavailableError(f"unknown model {model_id!r}; did you mean {near[0]}?")


def load_model(model_id=DEFAULT_MODEL_ID, cache_dir=None, device="cpu", dtype=torch.float32, local_files_only=False,
               channels=3):
    """Returns (unet, scheduler) for a hub id, a local diffusers directory, 'analytic', an ADM short
    name (ADM_MODELS) or a local ADM .pt checkpoint (converted once into diffusers' UNet2DModel).

    channels applies to the analytic prior only (1: gray, 3: RGB); a diffusers model has its own.

    Hub ids are read from the cache (cache_dir, HF_HUB_CACHE or HF_HOME). When they are missing and
    neither HF_HUB_OFFLINE nor local_files_only is set, one quick download is tried; if that fails
    the error says how to pre-download (no minutes of back-off here).
    """
    check_model_id(model_id)
    if model_id == "analytic":
        scheduler = analytic_scheduler()
        return analytic_prior(scheduler.alphas_cumprod, channels).to(device), scheduler
    if os.path.isdir(model_id):
        return _load_dir(model_id, device, dtype)
    if model_id.endswith(".pt"):
        if not os.path.isfile(model_id):
            raise ModelUnavailableError(f"checkpoint file {model_id!r} does not exist")
        return _load_dir(convert_adm_checkpoint(model_id), device, dtype)
    if model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").replace("/", "", 1):
        raise ModelUnavailableError(f"model directory {model_id!r} does not exist")
    snap = cached_snapshot(model_id, cache_dir)
    if snap is None:
        hint = (f"pre-download it on a machine with internet: python main.py --download_only --model_id {model_id}"
                f" --model_cache DIR, then run with --model_cache DIR (or pass the snapshot directory as --model_id)")
        if local_files_only or _offline():
            raise ModelUnavailableError(f"model {model_id!r} is not in the cache {hub_cache_dir(cache_dir)} and "
                                        f"offline mode is on; {hint}")
        try:
            snap = download_model(model_id, cache_dir, max_retries=1, timeout=(5, 30), progress=True)
        except ModelUnavailableError as e:
            raise ModelUnavailableError(f"model {model_id!r} is not cached and the hub could not be reached "
                                        f"({e}); {hint}") from None
    if model_id in ADM_MODELS:
        snap = convert_adm_checkpoint(snap)
    return _load_dir(snap, device, dtype)


def _endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _headers():
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


class _Retryable(Exception):
    pass


def _wanted_files(siblings, file=None):
    """Configs plus one weights format (safetensors preferred), at the root or unet/ scheduler/;
    or, for a single-file checkpoint, that file."""
    if file is not None:
        return [s for s in siblings if s["rfilename"] == file]
    names = [s["rfilename"] for s in siblings]
    keep_dirs = ("", "unet", "scheduler")
    in_scope = [s for s in siblings if os.path.dirname(s["rfilename"]) in keep_dirs]
    has_st = any(n.endswith(".safetensors") for n in names)
    weights_ext = ".safetensors" if has_st else ".bin"
    return [s for s in in_scope if s["rfilename"].endswith(".json") or s["rfilename"].endswith(weights_ext)]


def _verify(path, info):
    size = info.get("lfs", {}).get("size", info.get("size"))
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise _Retryable(f"{info['rfilename']}: size {actual} != expected {size}")
    h = hashlib.sha256() if "lfs" in info else hashlib.sha1(f"blob {actual}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    expected = info["lfs"].get("sha256") if "lfs" in info else info.get("blobId")
    if expected and h.hexdigest() != expected:
        raise _Retryable(f"{info['rfilename']}: checksum mismatch (got {h.hexdigest()[:12]}…, expected {expected[:12]}…)")


def _fetch_file(session, url, partial, info, timeout, progress):
    """Downloads url into `partial`, continuing an existing partial file with an HTTP Range request."""
    import requests
    from tqdm.auto import tqdm
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {**_headers(), **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retryable(f"cannot reach {url.split('/resolve/')[0]}: {type(e).__name__}") from None
    with resp:
        if resp.status_code == 416:  # nothing left: the partial file is already complete
            return
        if resp.status_code in (401, 403, 404):
            raise ModelUnavailableError(f"{url}: HTTP {resp.status_code} (repository missing, private or gated; "
                                        f"set HF_TOKEN for gated models)")
        if resp.status_code >= 400:
            raise _Retryable(f"{url}: HTTP {resp.status_code}")
        if have and resp.status_code != 206:
            have = 0  # server ignored the Range header: start over
        total = info.get("lfs", {}).get("size", info.get("size"))
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=info["rfilename"], disable=not progress,
                   leave=False)
        try:
            with open(partial, "ab" if have else "wb") as f:
                for chunk in resp.iter_content(1 << 16):
                    f.write(chunk)
                    f.flush()  # a killed process keeps everything written so far
                    bar.update(len(chunk))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as e:
            raise _Retryable(f"{info['rfilename']}: connection lost after {os.path.getsize(partial)} bytes "
                             f"({type(e).__name__})") from None
        finally:
            bar.close()


def download_model(model_id=DEFAULT_MODEL_ID, cache_dir=None, max_retries=5, revision="main", backoff_base=1.0,
                   timeout=(10, 60), progress=True):
    """Downloads a diffusers DDPM from the hub into the cache and returns the snapshot path; for an
    ADM short name, its checkpoint file, converted once (convert_adm_checkpoint), and its path.

    Partial files live in <repo>/.partial/<sha>/ and survive failures and killed processes; each
    attempt continues them with `Range: bytes=N-`. Sizes and checksums (sha256 for LFS files, the
    git blob id otherwise) are verified before a file is moved into place. Between attempts the
    wait is backoff_base·2^attempt seconds with ±50% jitter. Honours HF_ENDPOINT, HF_TOKEN,
    HF_HOME / HF_HUB_CACHE. HF_HUB_OFFLINE makes this an error.
    """
    import requests
    check_model_id(model_id)
    if _offline():
        raise ModelUnavailableError("HF_HUB_OFFLINE is set; unset it to download")
    if max_retries < 1:
        raise ValueError(f"max_retries must be >= 1, got {max_retries}")
    repo_id, single = hub_source(model_id)
    repo = _repo_dir(repo_id, cache_dir)
    api = f"{_endpoint()}/api/models/{repo_id}/revision/{revision}"
    last_error = None
    with requests.Session() as session:
        for attempt in range(max_retries):
            if attempt:
                delay = backoff_base * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning("download attempt %d/%d failed (%s); retrying in %.1f s", attempt, max_retries, last_error, delay)
                time.sleep(delay)
            try:
                # 1. Which files, at which commit, with which sizes and hashes.
                try:
                    resp = session.get(api, params={"blobs": "true"}, headers=_headers(), timeout=timeout)
                except (requests.ConnectionError, requests.Timeout) as e:
                    raise _Retryable(f"cannot reach {_endpoint()}: {type(e).__name__}") from None
                if resp.status_code in (401, 403, 404):
                    raise ModelUnavailableError(f"{model_id!r} at {_endpoint()}: HTTP {resp.status_code} "
                                                f"(unknown, private or gated model; set HF_TOKEN if gated)")
                if resp.status_code >= 400:
                    raise _Retryable(f"{api}: HTTP {resp.status_code}")
                meta = resp.json()
                sha = meta["sha"]
                files = _wanted_files(meta["siblings"], single)
                if single is not None and not files:
                    raise ModelUnavailableError(f"{repo_id!r} has no file {single!r}")
                if single is None and not any(f["rfilename"].endswith("config.json") for f in files):
                    raise ModelUnavailableError(f"{model_id!r} has no diffusers config.json")
                # 2. Each file: resume into .partial, verify, move into the snapshot.
                snap = os.path.join(repo, "snapshots", sha)
                for info in files:
                    final = os.path.join(snap, info["rfilename"])
                    if os.path.isfile(final):
                        continue
                    partial = os.path.join(repo, ".partial", sha, info["rfilename"] + ".incomplete")
                    os.makedirs(os.path.dirname(partial), exist_ok=True)
                    url = f"{_endpoint()}/{repo_id}/resolve/{sha}/{info['rfilename']}"
                    _fetch_file(session, url, partial, info, timeout, progress)
                    expected = info.get("lfs", {}).get("size", info.get("size"))
                    if expected is not None and os.path.getsize(partial) < expected:  # keep it: resume next time
                        raise _Retryable(f"{info['rfilename']}: incomplete ({os.path.getsize(partial)}/{expected} bytes)")
                    try:
                        _verify(partial, info)
                    except _Retryable:
                        os.remove(partial)  # corrupt: the next attempt starts this file over
                        raise
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(partial, final)
                # 3. Publish the snapshot only when complete (refs/<revision> is what loads look for).
                os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
                tmp = os.path.join(repo, "refs", f".{revision}.tmp")
                with open(tmp, "w") as f:
                    f.write(sha)
                os.replace(tmp, os.path.join(repo, "refs", revision))
                if single is not None:  # convert now, on the machine that downloads: compute nodes just load
                    convert_adm_checkpoint(os.path.join(snap, single))
                    return os.path.join(snap, single)
                return snap
            except _Retryable as e:
                last_error = str(e)
    raise ModelUnavailableError(f"download of {model_id!r} failed after {max_retries} attempt(s): {last_error}")
