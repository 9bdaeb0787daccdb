"""UC's config sections: ``uc`` (what a user sets) and ``experimental.uc`` (ablations and the
control). Light on purpose (no torch), as :mod:`mem_dist.methods.mem.config`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from mem_dist.pipeline.config_io import check


@dataclass(frozen=True)
class UCConfig:
    """Unlearnable Clusters (``method: uc``): k-means on the surrogate's image features (or
    the captions'), one perturbation per cluster pulling images toward the next cluster's centroid."""

    clusters: int = 10
    """p: k-means clusters, one perturbation each."""
    kmeans_samples: int = 100_000
    """Images k-means is fitted on (a seeded subset, the same share of every shard); every
    image is then assigned to its nearest centroid."""
    cluster_on: Literal["image", "caption"] = "image"
    """What k-means clusters: image (UC's: the surrogate's image features) or caption (the CLIP
    surrogate's text-tower embedding of each caption; each cluster's perturbation still pulls
    its images toward the next cluster's mean image feature). An open_clip surrogate only."""
    train_samples: int = 20_000
    """Images the perturbations are optimised on (a seeded subset, the same share of every
    shard, held in memory across the ranks)."""
    augment: Literal["none", "images", "published"] = "none"
    """What the optimisation sees of the classifier victim's random crop and horizontal flip
    (experimental.uc.crop_padding, experimental.uc.flip): none; images: each training image
    cropped and flipped, the perturbation added after at its place (the authors' loader);
    published: the perturbed image cropped and flipped, as a victim's loader sees a published
    image (an expectation over the victim's augmentation; the best measured, docs/efficacy.md)."""
    epochs: int = 50
    """Passes over the train_samples (the authors': 50)."""
    batch_size: int = 128
    """Images per optimisation step, over all ranks (each shard contributes its share)."""
    epsilon: int = 16
    """L-inf bound of delta, in 1/255 units (UC's)."""

    def __post_init__(self) -> None:
        check(self.clusters >= 2, "uc.clusters", "must be at least 2")
        for key in ("kmeans_samples", "train_samples", "epochs", "batch_size", "epsilon"):
            check(getattr(self, key) >= 1, f"uc.{key}", "must be at least 1")
        check(self.epsilon <= 127, "uc.epsilon", "must be at most 127 (delta is int8)")


@dataclass(frozen=True)
class UCExperimental:
    """UC's ablations and its control, which only experiments/ and docs/efficacy.md set."""

    perturbation: Literal["generator", "direct", "random"] = "generator"
    """generator: the authors' per-cluster ResNet generator from one fixed noise input, its
    output clamped to epsilon; direct: the p perturbations themselves, projected to epsilon;
    random: the control, seeded uniform noise per cluster, nothing optimised."""
    train_on: Literal["all", "cluster"] = "all"
    """all: every image is pushed by every cluster's perturbation toward that cluster's
    target (the authors' code: universal perturbations); cluster: each image only by its
    own cluster's (p times cheaper)."""
    crop_padding: int = 4
    """uc.augment's random crop: zero padding in canvas pixels (the classifier victim's
    classifier.crop_padding; 4 at 32 px is the papers' CIFAR crop); 0 = no crop."""
    flip: bool = True
    """uc.augment's random horizontal flip (the classifier victim's classifier.flip)."""
    lr: Optional[float] = None
    """Adam learning rate (cosine to 0); null = the perturbation's default: 1e-4 for the
    generator (the authors'), 0.5 for direct perturbations (they move in 1/255 units)."""
    weight_decay: Optional[float] = None
    """Adam's L2 weight decay; null = the perturbation's default: 5e-4 for the generator's
    weights (the authors'), 0 for direct perturbations (in 1/255 units, a decay of 5e-4 * delta
    outweighs their mean-normalised gradient a hundredfold and holds them at 0)."""
    grid: int = 0
    """0: a perturbation holds one value per canvas pixel (the authors'); g > 0: a g x g grid of
    values per channel (the generator's output, the direct tensor, the random noise), upsampled
    bilinearly to the canvas: a smooth, low-frequency code."""
    generator_width: int = 64
    """The generator's ngf (64: the authors')."""
    generator_blocks: int = 6
    """Residual blocks of the generator (6: the authors')."""

    def __post_init__(self) -> None:
        key = "experimental.uc."
        if self.lr is None:
            object.__setattr__(self, "lr", 1.0e-4 if self.perturbation == "generator" else 0.5)
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", 5.0e-4 if self.perturbation == "generator" else 0.0)
        check(self.generator_width >= 1, key + "generator_width", "must be at least 1")
        check(self.generator_blocks >= 0, key + "generator_blocks", "must be 0 or more")
        check(self.grid >= 0, key + "grid", "must be 0 (one value per canvas pixel) or a grid side")
        check(self.grid == 0 or self.grid >= 8 or self.perturbation != "generator", key + "grid",
              "must be at least 8 for the generator (its two stride-2 downs and reflection padding)")
        check(self.crop_padding >= 0, key + "crop_padding", "must be 0 or more")
        check(self.lr > 0, key + "lr", "must be positive")
        check(self.weight_decay >= 0, key + "weight_decay", "must be 0 or more")


def uc_fingerprint(uc: UCConfig, experimental: UCExperimental) -> dict[str, Any]:
    """The ``uc`` part of a run's fingerprint, in the layout UC runs so far recorded (one ``uc``
    section; epsilon lived in ``mem``). The augmentation's keys are left out when it is off (they
    change nothing then), and cluster_on when it is UC's image and grid when 0, so UC runs started
    before those keys existed still resume."""
    out = {**dataclasses.asdict(uc), **dataclasses.asdict(experimental)}
    out.pop("epsilon")
    if out["augment"] == "none":
        for key in ("augment", "crop_padding", "flip"):
            out.pop(key)
    if out["cluster_on"] == "image":
        out.pop("cluster_on")
    if out["grid"] == 0:
        out.pop("grid")
    return out
