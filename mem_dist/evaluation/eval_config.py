"""The evaluation's configuration: victims, conditions, defences (``mem-dist evaluate --config E``).

Every key, its default and its meaning is documented on its field; ``configs/eval-demo.yaml``
lists them with the demo's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from mem_dist.pipeline.config_io import ConfigError, build, check
from mem_dist.evaluation.defences import DefenceConfig
from mem_dist.tools.importers import CAPTION_TEMPLATES


@dataclass(frozen=True)
class VictimConfig:
    kind: Literal["clip", "classifier"] = "clip"
    """clip: a CLIP trained on the image-caption pairs (retrieval and zero-shot metrics).
    classifier: a torchvision classifier (``classifier.model``) trained on the images and the
    labels in their json (``label``), top-1 on the clean val set; the keys below that are
    CLIP's (model, pretrained, lr, weight_decay, warmup_steps, crop*, precision) then do not apply."""
    model: str = "RN50"
    """open_clip model name or model-config JSON path (configs/models/tiny-vit.json)."""
    pretrained: Optional[str] = None
    """null = train from scratch (the paper); or a local checkpoint to fine-tune."""
    epochs: int = 10
    """Training epochs (the paper's code: 32)."""
    batch_size: int = 128
    """Training batch size (also used for encoding the validation set)."""
    lr: float = 5.0e-4
    """Peak AdamW learning rate (the paper: 5e-4 from scratch, 1e-5 to fine-tune)."""
    weight_decay: float = 0.2
    """AdamW weight decay (not on biases, norms, logit_scale)."""
    warmup_steps: int = 100
    """Linear warm-up steps, then cosine decay to 0 at the last step (open_clip's
    cosine_lr). The paper's 10,000 never ends on Flickr8K-sized data."""
    crop: bool = True
    """Random resized crop of each training image (open_clip's trainer); off = resize only."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Area fraction range of the random resized crop."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision on CUDA (CPU runs fp32 always)."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "victim.epochs", "must be at least 1")
        check(self.batch_size >= 2, "victim.batch_size", "must be at least 2 (the loss contrasts pairs in a batch)")
        check(self.lr > 0, "victim.lr", "must be positive")
        check(self.warmup_steps >= 0, "victim.warmup_steps", "must be 0 or more")
        check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "victim.crop_scale", "must be [low, high] with 0 < low <= high <= 1")


@dataclass(frozen=True)
class ClassifierConfig:
    model: str = "cifar_resnet18"
    """cifar_resnet18 | cifar_vgg11 (:mod:`mem_dist.evaluation.cifar_nets`: 3x3 stride-1 stem, no
    max-pool, so a 32-px image keeps its resolution, as the unlearnable-examples papers train
    them), or any torchvision classification model by name (resnet18, vgg11_bn,
    mobilenet_v3_small, ...: ImageNet stems, which reduce 32 px to 8x8 before the first
    block); from its own random init, with as many outputs as labels."""
    width: int = 16
    """Channels of the CIFAR-style victims' first stage. 64 is the papers'; 16 (the default,
    the width the calibration in docs/efficacy.md used) costs about what torchvision's
    resnet18 does at 32 px. Ignored by torchvision models."""
    lr: float = 0.1
    """SGD learning rate, cosine-annealed to 0 over the epochs (the unlearnable-examples papers)."""
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    crop_padding: int = 4
    """Random crop after zero-padding this many pixels on each side (0 = no crop)."""
    flip: bool = True
    """Random horizontal flip."""
    labels: Literal["json", "kmeans"] = "json"
    """json: the labels in the training samples' json (``label``). kmeans: labels of the
    attacker's own, seeded k-means clusters of the training images' pixels, as many as the
    val set's classes; top-1 on the val set is then read after matching clusters to classes
    one-to-one on the training set (Hungarian), as clustering accuracy is measured."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "classifier.lr", "must be positive")
        check(0 <= self.momentum < 1, "classifier.momentum", "must be in [0, 1)")
        check(self.crop_padding >= 0, "classifier.crop_padding", "must be 0 or more")
        check(self.width >= 1, "classifier.width", "must be at least 1")


@dataclass(frozen=True)
class Condition:
    """One training set for a victim."""

    shards: str = ""
    """Train shard spec: brace-expanded fsspec URLs, several joined with "::"."""
    clean_shards: Optional[str] = None
    """For a mix: clean shards holding the same keys. A seeded ``fraction`` of the clean
    keys is taken from ``shards`` (the protected version), the rest stays clean."""
    fraction: float = 1.0
    """Protected fraction p of a mix (needs ``clean_shards`` when below 1)."""
    control: Optional[str] = None
    """The name of the condition this one is judged against (its control: random noise of the
    same budget, a random trigger of the same length, ...). The report's first line gives
    each condition with a control beside it, so a method that does no better than its control
    says so."""
    checkpoint: Optional[str] = None
    """A victim trained elsewhere, by any pipeline (a local checkpoint of ``victim.model``:
    open_clip_train's ``checkpoints/epoch_N.pt`` or a state dict). It is evaluated on the
    val shards as it is and nothing is trained; ``shards`` then only records (and shows in
    the grid) what it was trained on, and may be left out."""


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    """Seeds the victim's init (the same for every condition; derived so that it never equals
    a surrogate's init from the same seed), batch order and augmentations."""
    output: str = "runs/eval"
    """Report folder: any fsspec URL."""
    conditions: Any = field(default_factory=dict)
    """name -> train shard spec, or name -> {shards, clean_shards, fraction} for a mix,
    e.g. {clean: "data/demo/train/{00000..00007}.tar", mem3: "runs/demo/protected/{00000..00007}.tar"}.
    Becomes a dict of :class:`Condition`; the one named "clean" (or else the first) is
    the reference of the image grid."""
    val_shards: str = ""
    """Clean validation shards (one caption per image): the test images every score is read on."""
    select_shards: Optional[str] = None
    """Clean shards disjoint from ``val_shards`` (``mem-dist import``'s ``select`` split) on
    which the attacker chooses its best epoch; the report gives the val score at that epoch
    beside the final one. null: only the final epoch and the (optimistic) peak on val."""
    seeds: tuple[int, ...] = ()
    """Victim seeds: every condition is trained once per seed, and the report gives their mean
    with a 95% interval (bootstrap over the val images). Empty: ``seed`` alone."""
    image_size: int = 64
    """Canvas side the shards are decoded to (protected shards: their own size, so
    decoding is lossless); the victim then resizes to its model's input size."""
    resize_mode: Literal["center_crop", "border", "no"] = "center_crop"
    """How a decoded image becomes the canvas (as data.resize_mode)."""
    reencode_jpeg: Optional[int] = None
    """null = off; q = re-encode every training image once as JPEG at quality q on load
    (protected images that were re-encoded on their way to the victim)."""
    victim: VictimConfig = field(default_factory=VictimConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """The classifier victim's settings (``victim.kind: classifier``)."""
    zero_shot_templates: tuple[str, ...] = CAPTION_TEMPLATES
    """Prompts for zero-shot classification of the CLIP victims on val shards whose json
    carries ``label`` and ``class``; ``{c}`` stands for the class name (clip_benchmark's
    convention). Each class's prompts are averaged. Default: the captions' templates of
    ``mem-dist import``."""
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    num_threads: int = 0
    """torch CPU threads while training; 0 = torch's default (all cores). On a shared,
    busy machine 1 can be several times faster than oversubscribed cores."""
    save_victims: bool = False
    """Also write each trained victim's weights to {output}/victims/{condition}.pt (an
    open_clip state dict: victim.pretrained / surrogate.pretrained can load it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", parse_conditions(self.conditions))
        if not self.val_shards:
            raise ConfigError("config key 'val_shards' is required (clean validation shards, such as 'data/demo/val/00000.tar')")
        check(self.image_size >= 8, "image_size", "must be at least 8")
        check(self.reencode_jpeg is None or 1 <= self.reencode_jpeg <= 95, "reencode_jpeg", "must be null or a JPEG quality between 1 and 95")
        check(self.num_threads >= 0, "num_threads", "must be 0 or more")
        for name, cond in self.conditions.items():
            check(cond.control is None or cond.control in self.conditions, f"conditions.{name}.control",
                  f"names no condition (have: {', '.join(self.conditions)})")

    @property
    def victim_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.seed,)


def parse_conditions(raw: Any) -> dict[str, Condition]:
    """The ``conditions`` mapping as Condition objects, checked with one-line errors."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("config key 'conditions' must map condition names to train shard specs (for example clean: 'data/demo/train/{00000..00007}.tar')")
    out = {}
    for name, value in raw.items():
        key = f"conditions.{name}"
        if isinstance(value, str):
            value = Condition(shards=value)
        elif isinstance(value, dict):
            value = build(Condition, value, key + ".")
        elif not isinstance(value, Condition):
            raise ConfigError(f"config key '{key}' must be a shard spec or a mapping with shards / clean_shards / fraction / control / checkpoint")
        check(bool(value.shards) or value.checkpoint is not None, f"{key}.shards", "is required (or a checkpoint to evaluate)")
        check(value.checkpoint is None or (value.clean_shards is None and value.fraction == 1), f"{key}.checkpoint",
              "is a victim trained elsewhere: clean_shards and fraction do not apply to it")
        check(0 <= value.fraction <= 1, f"{key}.fraction", "must be between 0 and 1")
        check(value.fraction == 1 or bool(value.clean_shards), f"{key}.clean_shards", "is required when fraction is below 1")
        out[str(name)] = value
    return out


def resolve_device(device: str) -> torch.device:
    """The torch device of the ``device`` key (auto: CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but no CUDA device is available")
    return torch.device(device)
