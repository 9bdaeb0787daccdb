"""The victims' random crops, differentiable, which protection can be optimised through.

- :func:`random_resized_crop`: the CLIP victim's (at ``victim.crop_scale``); MEM's surrogate
  sees images through it with ``experimental.mem.augment`` (scale 0.8-1: an expectation over such crops).
- :func:`crop_flip`: the classifier victim's (zero padding, random crop, horizontal flip);
  UC's perturbations are optimised through it with ``uc.augment``.

Seeded by the caller's ``torch.Generator``, on the CPU, so the same seed gives the same crops
on any device and any rank. Shapes: B batch, C = 3, H/W side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(pixels_BCHW: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop of each image after zero padding, and a random horizontal flip."""
    B, _, H, W = pixels_BCHW.shape
    if padding:
        padded = F.pad(pixels_BCHW, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator).tolist()
        dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator).tolist()
        pixels_BCHW = torch.stack([padded[b, :, y:y + H, x:x + W] for b, (y, x) in enumerate(zip(dy, dx))])
    if flip:
        mirror = torch.rand(B, generator=generator) < 0.5
        pixels_BCHW = torch.where(mirror.view(B, 1, 1, 1).to(pixels_BCHW.device), pixels_BCHW.flip(-1), pixels_BCHW)
    return pixels_BCHW


def random_resized_crop(pixels_BCHW: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.8, 1.0)) -> torch.Tensor:
    """Differentiable random resized crop, one crop per image, back to the same side
    (expectation over the victim's crops). ``generator`` lives on the CPU."""
    B, _, H, W = pixels_BCHW.shape
    s = torch.empty(B).uniform_(scale[0], scale[1], generator=generator).sqrt()
    ox = torch.rand(B, generator=generator) * (1 - s) * 2 - (1 - s)
    oy = torch.rand(B, generator=generator) * (1 - s) * 2 - (1 - s)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, ox, oy
    grid = F.affine_grid(theta.to(pixels_BCHW), list(pixels_BCHW.shape), align_corners=False)
    return F.grid_sample(pixels_BCHW, grid, mode="bilinear", padding_mode="border", align_corners=False)
