"""Batch augmentations for training on images held as tensors (no PIL round trips)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfkd.config import AUGMENTATIONS as CHOICES  # +mix: blend pairs (mix_pairs) after the rest
from dfkd.errors import require_one_of

FLIP_DATASETS = {"cifar10", "cifar100", "folder"}  # natural images: mirror images stay in class


def shift_flip(x: torch.Tensor, gen: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """Random translation by up to `shift` pixels (zero fill) and optional horizontal flip.

    One gather for the whole batch: every sample gets its own offset without a Python loop.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx, dy = torch.randint(0, 2 * shift + 1, (2, n, 1, 1, 1), generator=gen)
    rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(n, c, h, w)
    cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(n, c, h, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    return random_flip(out, gen) if flip else out


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch horizontally (in place on x)."""
    mask = torch.rand(x.shape[0], generator=gen) < 0.5
    x[mask] = x[mask].flip(3)
    return x


def random_affine(x: torch.Tensor, gen: torch.Generator, shift: int, degrees: float = 15.0,
                  scale: tuple[float, float] = (0.9, 1.1),
                  fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Random rotation, scale and translation per sample, filled with `fill`: the pen-stroke
    variation of handwriting that shifted synthetic images lack. One affine_grid + grid_sample
    call, differentiable in x (inversion optimizes through it; see `inversion_view`)."""
    n, _, h, w = x.shape
    u = torch.rand((4, n), generator=gen, device=gen.device).to(x.device)
    angle = torch.deg2rad((2 * u[0] - 1) * degrees)
    s = scale[0] + (scale[1] - scale[0]) * u[1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    tx, ty = (2 * u[2] - 1) * 2 * shift / w, (2 * u[3] - 1) * 2 * shift / h  # grid units
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, padding_mode="zeros", align_corners=False)
    return out + fill


def mix_pairs(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blend each sample with another of the batch, by a weight drawn uniformly per sample.
    The teacher relabels the blend, so the student sees soft targets between classes: points
    near the teacher's decision boundaries, which synthetic sets lack (mixup, KD-style)."""
    return blend(x, *pair_weights(x.shape[0], gen, x.dtype))


def pair_weights(n: int, gen: torch.Generator, dtype=torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's partner (a permutation) and its own weight, uniform in [0, 1)."""
    other = torch.randperm(n, generator=gen)
    return other, torch.rand(n, generator=gen, dtype=dtype)


def blend(t: torch.Tensor, other: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    lam = lam.view(-1, *[1] * (t.dim() - 1)).to(t.device)
    return lam * t + (1 - lam) * t[other.to(t.device)]


def blend_targets(logits: torch.Tensor, other: torch.Tensor, lam: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the blend of the pair's softmaxes: mixup's
    label for a blended pair, written for losses that soften logits themselves."""
    probs = blend(torch.softmax(logits.float() / temperature, 1), other, lam)
    return temperature * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def random_roll(z: torch.Tensor, jitter: int, gen: torch.Generator) -> torch.Tensor:
    """The whole batch rolled by one random offset of up to `jitter` pixels: the jitter that
    inversion methods apply at every optimization step (0: unchanged)."""
    if not jitter:
        return z
    dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=gen, device=gen.device).tolist()
    return torch.roll(z, shifts=(dx, dy), dims=(2, 3))


def _view(x: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor, shift_x: torch.Tensor,
          shift_y: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """Per-sample axis-aligned resampling (grid units: the image spans [-1, 1]), differentiable
    in x. Outside the image: `fill`, or the nearest edge pixel when fill is None (resizing a
    crop then reads no further than the crop's border, as an image resize does)."""
    zero = torch.zeros_like(scale_x)
    theta = torch.stack([torch.stack([scale_x, zero, shift_x], 1),
                         torch.stack([zero, scale_y, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return F.grid_sample(x - fill, grid, padding_mode="zeros", align_corners=False) + fill


def _signs(n: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    if not flip:
        return torch.ones(n, device=gen.device)
    return torch.where(torch.rand(n, generator=gen, device=gen.device) < 0.5, -1.0, 1.0)


def global_view(x: torch.Tensor, gen: torch.Generator, padding: int, flip: bool,
                fill: torch.Tensor) -> torch.Tensor:
    """Random crop of the image padded by `padding` pixels of `fill` (a whole-pixel shift), and
    an optional horizontal flip, per sample."""
    n, _, h, w = x.shape
    shift = torch.randint(-padding, padding + 1, (2, n), generator=gen, device=gen.device)
    ones = torch.ones(n, device=gen.device)
    return _view(x, _signs(n, flip, gen), ones, 2 * shift[0] / w, 2 * shift[1] / h, fill)


def local_view(x: torch.Tensor, gen: torch.Generator, min_scale: float,
               flip: bool) -> torch.Tensor:
    """Random resized crop per sample: area fraction in [min_scale, 1], aspect ratio in
    [3/4, 4/3], resized back to the full size (bilinear), optional horizontal flip."""
    n = x.shape[0]
    u = torch.rand((4, n), generator=gen, device=gen.device)
    area = min_scale + (1 - min_scale) * u[0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[1])
    cw, ch = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx, cy = (2 * u[2] - 1) * (1 - cw), (2 * u[3] - 1) * (1 - ch)
    return _view(x, cw * _signs(n, flip, gen), ch, cx, cy, None)


INVERSION_VIEWS = ("affine", "roll", "crop", "none")


def inversion_view(z: torch.Tensor, view: str, jitter: int, gen: torch.Generator,
                   fill: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """What the teacher sees of inputs z at one step of pixel inversion. `roll`: the batch
    rolled by one random offset (DeepInversion's jitter); `affine`: every sample rotated (up to
    15 degrees), scaled (up to 10%) and shifted (up to `jitter` pixels) on its own, the border
    filled with `fill` (the normalized black pixel, per channel). Optimizing through `affine`
    makes inputs whose class survives small pen-like deformations: smooth, centred strokes
    instead of high-frequency patterns (BENCHMARKS.md, "Per-sample affine views"). With `flip`,
    the whole batch is then mirrored with probability 1/2. `crop`: CMI's global view, every
    sample shifted by up to `jitter` whole pixels over a `fill` border and, with `flip`, mirrored
    on its own (a random crop with padding, as IDEAL's reference code sees its samples)."""
    check_view(view)
    if view == "crop":
        return global_view(z, gen, jitter, flip, fill)
    if view == "affine":
        z = random_affine(z, gen, jitter, fill=fill)
    elif view == "roll":
        z = random_roll(z, jitter, gen)
    if flip and torch.rand((), generator=gen, device=gen.device) < 0.5:
        z = torch.flip(z, dims=(3,))
    return z


def check_view(view: str) -> None:
    """The `view` option of the inversion methods, checked when the method is built."""
    require_one_of("view", view, INVERSION_VIEWS)


def cut_mix(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste one random box from a shuffled copy of the batch into every sample (CutMix).
    Returns the mixed batch, the permutation and the pasted share of the area, by which the
    caller mixes the labels. Differentiable in x, so inversion can optimize through it."""
    n, _, h, w = x.shape
    dev = gen.device
    share = float(torch.rand((), generator=gen, device=dev))
    bh, bw = max(1, round(h * share ** 0.5)), max(1, round(w * share ** 0.5))
    top = int(torch.randint(0, h - bh + 1, (), generator=gen, device=dev))
    left = int(torch.randint(0, w - bw + 1, (), generator=gen, device=dev))
    perm = torch.randperm(n, generator=gen, device=dev).to(x.device)
    mask = torch.zeros((1, 1, h, w), device=x.device, dtype=x.dtype)
    mask[..., top:top + bh, left:left + bw] = 1
    return x * (1 - mask) + x[perm] * mask, perm, bh * bw / (h * w)


def jitter_pixels(option: int, height: int, divisor: int = 16) -> int:
    """The `jitter` option of the inversion methods: -1 means default_shift(height, divisor)."""
    return option if option >= 0 else default_shift(height, divisor)


def default_shift(height: int, divisor: int = 16) -> int:
    """1 pixel for 8x8 inputs, 2 for 28-32 pixels, ~1/16 of the side in general (or
    1/`divisor`)."""
    return max(1, height // divisor)


def check(name: str) -> None:
    """Fail before any work, not at the first student step after a synthesis round."""
    require_one_of("augmentation", name, CHOICES)


def apply(name: str, x: torch.Tensor, gen: torch.Generator,
          logits: torch.Tensor | None = None, temperature: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The augmented batch, and with the stored samples' teacher `logits` their targets for
    it (`--relabel stored`): unchanged by shifts, flips and affine views, which keep the
    class; for +mix, blended as probabilities at `temperature` by the pairs' own weights."""
    check(name)
    if name == "none":
        return x, logits
    base, mixed = name.removesuffix("+mix"), name.endswith("+mix")
    shift = default_shift(x.shape[2])
    if base.startswith("affine"):
        out = random_affine(x, gen, shift)
        out = random_flip(out, gen) if base == "affine+flip" else out
    else:
        out = shift_flip(x, gen, shift, flip=base == "shift+flip")
    if not mixed:
        return out, logits
    other, lam = pair_weights(x.shape[0], gen, x.dtype)
    targets = None if logits is None else blend_targets(logits, other, lam, temperature)
    return blend(out, other, lam), targets
