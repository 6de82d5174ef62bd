"""Tiled ε-model evaluation for images larger than the prior was trained on, in bounded memory.

Each step evaluates ε_θ on overlapping T×T tiles of x_t (reflect-padded at the border) and blends
them with normalised windows W_k that sum to 1 at every pixel:

    ε(x) = crop( Σ_k P_kᵀ (W_k ⊙ ε_θ(P_k pad(x))) ),   W_k = w_k / Σ_j P_j w_j,

with w_k a separable sin² ramp over the overlap (positive everywhere, so the sum never vanishes).
The grid is shifted by a pseudo-random offset at every step (seeded by the step index), so seams
do not stay in one place; a batch's images, a resumed run and a re-run all see the same grids.
Along an axis no longer than T there is one tile and no padding: with one tile covering the image,
ε is the untiled ε exactly.

DPS needs the vector–Jacobian product Jᵀv of this ε. `tiled_eps_vjp` computes it tile by tile
(forward with grad, backward, free), so peak memory follows the tile size, not the image:

    Jᵀv = padᵀ( Σ_k P_kᵀ J_θ(P_k pad x)ᵀ (W_k ⊙ P_k crop ᵀ v) ).

x_t, y and the operator stay whole-image: only the UNet call is tiled.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Offsets are drawn from torch.Generator().manual_seed(OFFSET_SEED + step): the same grids for every
# image, run and resume, without touching the sampler's generator.
OFFSET_SEED = 0x7115


@dataclass(frozen=True)
class TilePlan:
    """tile: side T of the square tiles; overlap: pixels shared by neighbours (stride T − overlap);
    batch: tiles per UNet call, the knob between speed and peak memory."""
    tile: int
    overlap: int
    batch: int = 4

    def __post_init__(self):
        if not (self.tile >= 8 and 0 <= self.overlap < self.tile and self.batch >= 1):
            raise ValueError(f"tiles need tile >= 8, 0 <= overlap < tile and batch >= 1, got {self}")


def _ramp(n: int, overlap: int, dtype, device):
    """1-D window of length n: sin² up over the first `overlap` samples, down over the last, 1 between."""
    if overlap == 0:
        return torch.ones(n, dtype=dtype, device=device)
    i = torch.arange(n, dtype=torch.float64, device=device)
    u = torch.minimum((i + 0.5) / overlap, (n - i - 0.5) / overlap).clamp(max=1.0)
    return torch.sin(0.5 * math.pi * u).square().to(dtype)


def _axis(n: int, tile: int, overlap: int, offset: int):
    """(pad before, pad after, tile starts on the padded axis, tile length) along one axis."""
    if tile >= n:
        return 0, 0, [0], n
    stride = tile - overlap
    starts = [-offset]
    while starts[-1] + tile < n:
        starts.append(starts[-1] + stride)
    return offset, starts[-1] + tile - n, [s + offset for s in starts], tile


@functools.lru_cache(maxsize=1)   # a tiled DPS step asks twice (ε, then Jᵀv); one step's weights kept
def layout(H: int, W: int, plan: TilePlan, step: int, device, dtype=torch.float32):
    """The tiles of step `step` on an H×W image: (padding (left, right, top, bottom), [(y0, x0)] on
    the padded canvas, tile (h, w), normalised weights (n_tiles, h, w) whose scatter sums to 1).
    The result is cached and shared: callers must not modify it."""
    g = torch.Generator().manual_seed(OFFSET_SEED + step)
    stride = plan.tile - plan.overlap
    oy, ox = (int(torch.randint(0, stride, (1,), generator=g)) for _ in range(2))
    top, bottom, ys, th = _axis(H, plan.tile, plan.overlap, oy)
    left, right, xs, tw = _axis(W, plan.tile, plan.overlap, ox)
    wy = _ramp(th, plan.overlap if th == plan.tile else 0, torch.float64, device)
    wx = _ramp(tw, plan.overlap if tw == plan.tile else 0, torch.float64, device)
    w = wy[:, None] * wx[None, :]
    corners = [(y0, x0) for y0 in ys for x0 in xs]
    total = torch.zeros(H + top + bottom, W + left + right, dtype=torch.float64, device=device)
    for y0, x0 in corners:
        total[y0:y0 + th, x0:x0 + tw] += w
    weights = torch.stack([w / total[y0:y0 + th, x0:x0 + tw] for y0, x0 in corners]).to(dtype)
    return (left, right, top, bottom), corners, (th, tw), weights


def n_tiles(H: int, W: int, plan: TilePlan) -> int:
    """How many tiles a step has on an H×W image (the most over offsets); 1 means untiled."""
    stride = plan.tile - plan.overlap
    return math.prod(1 if plan.tile >= n else len(_axis(n, plan.tile, plan.overlap, stride - 1)[2]) for n in (H, W))


def _pad(x, padding):
    return F.pad(x, padding, mode="reflect") if any(padding) else x


def _groups(corners, batch_images: int, per_call: int):
    """Tile indices in groups whose UNet input holds at most per_call inputs (tiles × images)."""
    per = max(1, per_call // batch_images)
    return [list(range(i, min(i + per, len(corners)))) for i in range(0, len(corners), per)]


def _stack(x_pad, corners, idx, th, tw):
    """(len(idx)·B, C, th, tw): the tiles idx of every image, tile-major."""
    return torch.cat([x_pad[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0 in (corners[k] for k in idx)])


def tiled_eps(model, x, plan: TilePlan, step: int):
    """ε of (B, C, H, W) x, tile by tile; model(tiles) -> (n, C_out, th, tw). Differentiable, but
    the samplers call it without a graph (DPS's gradient is tiled_eps_vjp)."""
    B, _, H, W = x.shape
    padding, corners, (th, tw), weights = layout(H, W, plan, step, x.device)
    left, _, top, _ = padding
    x_pad = _pad(x, padding)
    out = None
    for idx in _groups(corners, B, plan.batch):
        e = model(_stack(x_pad, corners, idx, th, tw))
        if out is None:
            out = torch.zeros(B, e.shape[1], *x_pad.shape[-2:], dtype=e.dtype, device=x.device)
        for j, k in enumerate(idx):
            y0, x0 = corners[k]
            out[:, :, y0:y0 + th, x0:x0 + tw] += weights[k].to(e.dtype) * e[j * B:(j + 1) * B]
    return out[:, :, top:top + H, left:left + W].contiguous()


def tiled_eps_vjp(model, x, plan: TilePlan, step: int, v):
    """Jᵀv for the tiled ε at x (v: (B, C_out, H, W)), one group of tiles' graph at a time."""
    B, _, H, W = x.shape
    padding, corners, (th, tw), weights = layout(H, W, plan, step, x.device)
    v_pad = F.pad(v, padding)                          # cropᵀ: zeros on the padding
    grad = torch.zeros_like(x)
    for idx in _groups(corners, B, plan.batch):
        x_leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            e = model(_stack(_pad(x_leaf, padding), corners, idx, th, tw))
            cot = torch.cat([weights[k].to(v.dtype) * v_pad[:, :, corners[k][0]:corners[k][0] + th,
                                                            corners[k][1]:corners[k][1] + tw] for k in idx])
            grad += torch.autograd.grad(e, x_leaf, grad_outputs=cot.to(e.dtype))[0]
    return grad


def resolve(tile, overlap: int, batch: int, H: int, W: int, sample_size, multiple: int, auto_factor: float = 2.0):
    """The TilePlan for config values (tile: 'off', 'auto' or a side in pixels), or None for none.

    auto tiles at the model's training size when the image's longer side exceeds auto_factor times
    it (a model without a training size, such as the analytic prior, is never tiled). A tile the
    UNet cannot take (not a multiple of `multiple`) is a ValueError."""
    if tile == "off":
        return None
    if tile == "auto":
        if not sample_size or max(H, W) <= auto_factor * sample_size:
            return None
        tile = int(sample_size)
        overlap = min(overlap, tile // 2)
    if tile % multiple:
        raise ValueError(f"tile {tile} is not a multiple of {multiple}, which the UNet needs; try "
                         f"{max(multiple, round(tile / multiple) * multiple)}")
    if overlap >= tile:
        raise ValueError(f"tile_overlap must be smaller than the tile ({tile}), got {overlap}")
    return TilePlan(int(tile), int(overlap), int(batch))


def activation_bytes(unet, tile: int, dtype=torch.float32):
    """(what a backward keeps, what a forward keeps at its peak) in bytes for one tile×tile input,
    from one forward of a copy on the meta device (no memory, no compute): the sum of every
    layer's output, and the skip connections plus the three largest maps. None if the model
    cannot be rebuilt there (not a diffusers model)."""
    base = getattr(unet, "_orig_mod", unet)
    try:
        with torch.device("meta"):
            model = type(base).from_config(base.config)
    except Exception:  # noqa: BLE001 - the analytic prior, a wrapped module: no estimate
        return None
    outputs, skips = [], []

    def leaf(_, __, out):
        if torch.is_tensor(out):
            outputs.append(out.numel())

    def down(_, __, out):
        skips.extend(t.numel() for t in out[1])

    hooks = [m.register_forward_hook(leaf) for m in model.modules() if not list(m.children())]
    hooks += [b.register_forward_hook(down) for b in getattr(model, "down_blocks", [])]
    x = torch.zeros(1, model.config.in_channels, tile, tile, device="meta")
    with torch.no_grad():
        model(x, torch.tensor(500, device="meta"))
    for h in hooks:
        h.remove()
    size = torch.finfo(dtype).bits // 8
    return sum(outputs) * size, (sum(skips) + sum(sorted(outputs)[-3:])) * size


# Whole-image buffers per pixel of an RGB float32 image (x_t, ε, x̂₀, the gradient or the CG vectors,
# the operator's coefficient maps at K = 10; an upper bound for gray): measured by
# bench/bench_tiling.py on this CPU as the slope of peak memory against pixels with a fixed small
# UNet (docs/large-images.md).
BUFFER_BYTES_PER_PIXEL = {"dps": 231, "diffpir": 259,
                          "daps": 259}   # DAPS: DiffPIR's figure (the same CG vectors), not measured on its own


def estimate_peak_bytes(unet, plan: TilePlan | None, images: int, H: int, W: int, method: str, dtype):
    """The planned peak: weights + one UNet call's activations (plan.batch inputs, or the whole
    image untiled) + the whole-image buffers. None when the UNet's activations cannot be estimated."""
    side = plan.tile if plan else max(H, W)
    act = activation_bytes(unet, side, dtype)
    if act is None:
        return None
    per_input = act[0] if method == "dps" else act[1]
    if plan is None:
        per_input *= H * W / side ** 2
    inputs = min(plan.batch, images * n_tiles(H, W, plan)) if plan else images
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return weights + inputs * per_input + BUFFER_BYTES_PER_PIXEL[method] * images * H * W
