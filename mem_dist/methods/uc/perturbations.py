"""UC's perturbations: p of them on the canvas, and the loss that pulls images toward a target.

The authors' generator (pix2pix's ResNet generator) turns one fixed noise input per cluster
into that cluster's perturbation, clamped to epsilon; or the perturbations are optimised
directly and projected. Shapes: B batch, p clusters, E feature dim, H/W canvas side, C = 3;
perturbations are float in 1/255 units.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mem_dist.pipeline.config import RunConfig, seed_of


class ResnetGenerator(nn.Module):
    """The authors' generator (pix2pix's ResNet generator): 7x7 conv, two stride-2 downs,
    residual blocks, two transposed-conv ups, 7x7 conv, tanh; BatchNorm, ReLU."""

    def __init__(self, width: int = 64, blocks: int = 6):
        super().__init__()
        w = width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, w, 7), nn.BatchNorm2d(w), nn.ReLU(True)]
        for m in (1, 2):
            layers += [nn.Conv2d(w * m, w * m * 2, 3, stride=2, padding=1), nn.BatchNorm2d(w * m * 2), nn.ReLU(True)]
        layers += [ResBlock(w * 4) for _ in range(blocks)]
        for m in (4, 2):
            layers += [nn.ConvTranspose2d(w * m, w * m // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(w * m // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ResBlock(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(w, w, 3), nn.BatchNorm2d(w), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(w, w, 3), nn.BatchNorm2d(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Perturbations(nn.Module):
    """p perturbations on the canvas, float [p, C, H, W] in 1/255 units within +-epsilon:
    generators from one fixed noise input each (clamped, as the authors'), free tensors
    (projected after every step), or random ones (the control: nothing optimised). With
    ``experimental.uc.grid`` g each is made at g x g and upsampled bilinearly to the canvas (which keeps it
    within +-epsilon)."""

    def __init__(self, cfg: RunConfig, size: int):
        super().__init__()
        u, x, self.eps = cfg.uc, cfg.experimental.uc, float(cfg.uc.epsilon)
        torch.manual_seed(seed_of(cfg.seed, "uc", "perturbations"))
        self.kind, self.size = x.perturbation, size
        side = x.grid or size  # where the values live
        self.grid = side
        if self.kind == "generator":
            # the side rounded up to a multiple of 4 (two stride-2 downs), cropped after
            self.side = -(-side // 4) * 4
            self.register_buffer("z", torch.rand(u.clusters, 3, self.side, self.side))
            self.generators = nn.ModuleList(ResnetGenerator(x.generator_width, x.generator_blocks) for _ in range(u.clusters))
        elif self.kind == "direct":
            self.delta = nn.Parameter(torch.zeros(u.clusters, 3, side, side))
        else:  # random: the control, uniform integers in [-eps, eps] per cluster, nothing optimised
            noise = torch.randint(-int(self.eps), int(self.eps) + 1, (u.clusters, 3, side, side)).float()
            self.delta = nn.Parameter(noise, requires_grad=False)

    def forward(self) -> torch.Tensor:
        if self.kind == "generator":
            out = torch.cat([g(self.z[k:k + 1]) for k, g in enumerate(self.generators)])[..., : self.grid, : self.grid]
            out = (255 * out).clamp(-self.eps, self.eps)
        else:
            out = self.delta
        if self.grid == self.size:
            return out
        return F.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def project(self) -> None:
        if self.kind == "direct":
            self.delta.clamp_(-self.eps, self.eps)

    def as_int8(self) -> np.ndarray:
        """The final perturbations as stored: int8 [p, H, W, C], |delta| <= epsilon (generators in
        training mode, as they were optimised: BatchNorm on their one input's statistics)."""
        with torch.no_grad():
            d = self().round().clamp(-self.eps, self.eps)
        return d.to(torch.int8).permute(0, 2, 3, 1).cpu().numpy()


def pull_loss(net: Callable[[torch.Tensor], torch.Tensor], canvas_BCHW: torch.Tensor, delta_pCHW: torch.Tensor, clusters_B: torch.Tensor | None,
              targets_pE: torch.Tensor, augment: str = "none", crop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The summed KL(softmax(target) || softmax(features(clip(canvas + delta)))) of a batch: with
    ``clusters_B`` None every image under every perturbation k against target k, else each
    image under its own cluster's perturbation against that cluster's target. ``augment``
    (``uc.augment``): "images" applies ``crop`` (a seeded random crop and flip) to the canvases
    before the perturbation is added, "published" to the perturbed images."""
    if augment not in ("none", "images", "published"):
        raise ValueError(f"augment must be none, images or published, not {augment!r}")
    if augment != "none" and crop is None:
        raise ValueError(f"augment={augment!r} needs the (seeded) crop")
    B = len(canvas_BCHW)
    if augment == "images":
        canvas_BCHW = crop(canvas_BCHW)
    if clusters_B is None:
        pix = (canvas_BCHW.unsqueeze(0) + delta_pCHW.unsqueeze(1)).clamp(0, 255).flatten(0, 1)  # [p*B, C, H, W]
        target = targets_pE.repeat_interleave(B, 0)
    else:
        pix = (canvas_BCHW + delta_pCHW[clusters_B]).clamp(0, 255)
        target = targets_pE[clusters_B]
    if augment == "published":
        pix = crop(pix)
    logp = F.log_softmax(net(pix), dim=-1)
    return F.kl_div(logp, F.softmax(target, dim=-1), reduction="sum")
