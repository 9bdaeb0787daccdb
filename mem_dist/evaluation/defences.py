"""Defences a victim can apply to its training data (the paper's table 2).

Image defences act on a batch of canvas pixels, float [B, C, H, W] in [0, 255] units, and
draw their randomness from a CPU ``torch.Generator``, so a seeded victim is repeatable:

  ``jpeg``      JPEG round trip at quality q (PIL, 4:2:0 as PIL's default)
  ``grayscale`` luminance (ITU-R 601) in all three channels: image shortcut squeezing, the
                strongest published defence against colour perturbations
  ``bits``      bit-depth reduction to ``bits`` bits per channel (the other squeezing)
  ``gaussian``  additive Gaussian noise, sigma in 1/255 units, clipped to [0, 255]
  ``cutout``    one square per image (side = a fraction of the image side) set to grey
  ``mixup``     images mixed with a shuffled batch, lambda ~ Beta(alpha, alpha); the
                contrastive targets become soft (:func:`soft_clip_loss`)
  ``adv``       adversarial training: PGD steps that *maximise* the CLIP loss inside an
                L-inf ball (:func:`adversarial_pixels`), run by the victim's loop since it
                needs the model

Text defences are EDA's four operations (Wei & Zou, 2019) on caption strings, with a small
built-in synonym table (nothing is downloaded): random ``insert`` (a synonym of a word at a
random position), random ``delete`` (each word with probability ``rate``), random ``swap``
(two words exchange places) and ``synonym`` replacement. They draw from a
``random.Random``.

Shapes: B batch, C = 3 channels, H/W canvas side, N images.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mem_dist.pipeline.config_io import check
from mem_dist.methods.pgd import minimize_delta, project
from mem_dist.pipeline.surrogate import LOGIT_SCALE_MAX


@dataclass(frozen=True)
class DefenceConfig:
    image: Literal["none", "jpeg", "grayscale", "bits", "gaussian", "cutout", "mixup", "adv"] = "none"
    """Image defence applied to every training batch (before the victim's crop)."""
    jpeg_quality: int = 75
    """jpeg: JPEG quality (1-95)."""
    bits: int = 3
    """bits: bits kept per channel (1-7)."""
    noise_sigma: float = 8.0
    """gaussian: noise standard deviation, in 1/255 units."""
    cutout_size: float = 0.5
    """cutout: side of the square cut out, as a fraction of the image side."""
    mixup_alpha: float = 1.0
    """mixup: lambda ~ Beta(alpha, alpha)."""
    adv_epsilon: float = 8.0
    """adv: L-inf radius of the adversarial perturbation, in 1/255 units."""
    adv_steps: int = 3
    """adv: PGD steps (maximising the CLIP loss) before each training step."""
    adv_step_size: float = 4.0
    """adv: PGD step, in 1/255 units (after a uniform random start in the ball)."""
    text: Literal["none", "insert", "delete", "swap", "synonym", "drop_prefix"] = "none"
    """Text defence applied to every training caption, anew each time it is drawn: EDA's
    four (the paper's table 2), or drop_prefix, a trainer who knows that the tool puts a
    k-word trigger before each caption and cuts the first prefix_words words."""
    text_rate: float = 0.1
    """EDA's alpha: the fraction of a caption's words changed (at least one word)."""
    prefix_words: int = 3
    """drop_prefix: how many leading words to cut from every caption."""
    removal: Literal["none", "ridge", "ridge_highpass"] = "none"
    """Dataset-level removal attack, once on a condition's whole training set before training
    (:mod:`mem_dist.evaluation.attacks`; both victim kinds): every caption is embedded with
    the attacker's text encoder, a ridge regression from those embeddings to the images is
    fitted over the set and its prediction subtracted from every image, which takes out
    whatever in the pixels is linearly predictable from the caption (a caption-keyed code).
    ridge: fitted to the pixels minus their mean (the mean image stays); ridge_highpass:
    fitted to the high-pass residual (image minus a box blur of radius removal_blur)."""
    removal_model: str = "RN50"
    """removal: the attacker's text encoder (its CLIP's encode_text), an open_clip model name or
    model-config JSON path (configs/models/tiny-rn32.json)."""
    removal_pretrained: Optional[str] = None
    """removal: a local checkpoint for removal_model (weights are never downloaded); null =
    random init (seeded from ``seed``)."""
    removal_alpha: float = 1.0
    """removal: the ridge penalty, against N times a unit per-dimension variance (the
    embeddings are centred and scaled by one common factor, not standardised per dimension)."""
    removal_blur: int = 2
    """ridge_highpass: radius in pixels of the box blur whose residual is the high pass."""
    recaption: Literal["none", "templates"] = "none"
    """Dataset-level recaptioning attack, once before training (both victim kinds): every
    training caption replaced by its sample's class name (json ``class``, as mem-dist import
    writes it) in one of ten templates of the attacker's own, none of them an importer caption
    template or a zero-shot prompt (a seeded choice per sample). A sample without a class is
    an error naming the condition."""

    def __post_init__(self) -> None:
        check(1 <= self.jpeg_quality <= 95, "defence.jpeg_quality", "must be between 1 and 95")
        check(1 <= self.bits <= 7, "defence.bits", "must be between 1 and 7")
        check(self.noise_sigma >= 0, "defence.noise_sigma", "must be 0 or more")
        check(0 < self.cutout_size <= 1, "defence.cutout_size", "must be in (0, 1]")
        check(self.mixup_alpha > 0, "defence.mixup_alpha", "must be positive")
        check(self.adv_epsilon > 0 and self.adv_step_size > 0, "defence.adv_epsilon", "and defence.adv_step_size must be positive")
        check(self.adv_steps >= 1, "defence.adv_steps", "must be at least 1")
        check(0 < self.text_rate <= 1, "defence.text_rate", "must be in (0, 1]")
        check(self.prefix_words >= 1, "defence.prefix_words", "must be at least 1")
        check(self.removal_alpha > 0 and math.isfinite(self.removal_alpha), "defence.removal_alpha", "must be a positive number")
        check(self.removal_blur >= 1, "defence.removal_blur", "must be at least 1 (pixels)")
        if self.removal != "none":
            check(bool(self.removal_model.strip()), "defence.removal_model", "must name an open_clip model or a model-config .json")
            check(not self.removal_model.endswith(".json") or os.path.exists(self.removal_model), "defence.removal_model",
                  f"model-config file not found: {self.removal_model}")
            check(self.removal_pretrained is None or os.path.exists(self.removal_pretrained), "defence.removal_pretrained",
                  f"checkpoint not found: {self.removal_pretrained} (weights are never downloaded)")

    def describe(self) -> str:
        """One line naming the defences that are on, with their settings."""
        image = {
            "none": "none",
            "jpeg": f"JPEG q={self.jpeg_quality}",
            "grayscale": "grayscale",
            "bits": f"{self.bits}-bit colour depth",
            "gaussian": f"Gaussian noise sigma={self.noise_sigma:g}/255",
            "cutout": f"cutout {self.cutout_size:g} of the side",
            "mixup": f"mixup alpha={self.mixup_alpha:g}",
            "adv": f"adversarial training eps={self.adv_epsilon:g}/255, {self.adv_steps} PGD steps of {self.adv_step_size:g}/255",
        }[self.image]
        text = {"none": "none", "drop_prefix": f"first {self.prefix_words} words of every caption cut"}.get(
            self.text, f"EDA {self.text} rate={self.text_rate:g}")
        return f"image defence: {image}; text defence: {text}"

    def describe_attacks(self) -> str:
        """One line naming the dataset-level attacks that are on ("" when none is)."""
        parts = []
        if self.removal != "none":
            what = "pixels" if self.removal == "ridge" else f"high pass (blur radius {self.removal_blur} px)"
            parts.append(f"ridge removal of the caption-predictable {what}, alpha={self.removal_alpha:g}, "
                         f"text encoder {self.removal_model} ({self.removal_pretrained or 'random init'})")
        if self.recaption != "none":
            parts.append("captions replaced by class-name templates")
        return "dataset attacks: " + "; ".join(parts) if parts else ""


# --------------------------------------------------------------------------------------
# Image defences
# --------------------------------------------------------------------------------------


def jpeg_roundtrip(canvases_NHWC: np.ndarray, quality: int) -> np.ndarray:
    """Encode each uint8 image as JPEG at ``quality`` and decode it again (PIL)."""
    out = np.empty_like(canvases_NHWC)
    for i, canvas in enumerate(canvases_NHWC):
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return out


def jpeg(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> torch.Tensor:
    canvases = pixels_BCHW.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = jpeg_roundtrip(canvases, cfg.jpeg_quality)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(pixels_BCHW)


def grayscale(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> torch.Tensor:
    """ITU-R 601 luminance in every channel (what PIL's convert("L") computes, unrounded)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=pixels_BCHW.dtype, device=pixels_BCHW.device).view(1, 3, 1, 1)
    return (pixels_BCHW * weights).sum(1, keepdim=True).expand_as(pixels_BCHW).contiguous()


def bits(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> torch.Tensor:
    """Each channel quantised to 2^bits levels (the level's centre, in [0, 255])."""
    step = 256 / 2**cfg.bits
    return (torch.floor(pixels_BCHW.clamp(0, 255) / step) * step + step / 2).clamp(0, 255)


def gaussian(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(pixels_BCHW.shape, generator=generator).to(pixels_BCHW)
    return (pixels_BCHW + cfg.noise_sigma * noise).clamp(0, 255)


def cutout(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> torch.Tensor:
    """One grey square per image, centred anywhere (clipped at the border, as DeVries & Taylor)."""
    B, _, H, W = pixels_BCHW.shape
    side_y, side_x = max(1, round(cfg.cutout_size * H)), max(1, round(cfg.cutout_size * W))
    cy = torch.randint(0, H, (B,), generator=generator)
    cx = torch.randint(0, W, (B,), generator=generator)
    ys, xs = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
    top, left = (cy - side_y // 2).view(B, 1, 1), (cx - side_x // 2).view(B, 1, 1)
    hole_BHW = (ys >= top) & (ys < top + side_y) & (xs >= left) & (xs < left + side_x)
    return pixels_BCHW.masked_fill(hole_BHW.unsqueeze(1).to(pixels_BCHW.device), 127.5)


def mixup(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with another of the batch.

    Returns:
        (mixed pixels, soft targets [B, B]): row i puts lambda on caption i and
        1 - lambda on the caption of the image mixed in.
    """
    B = pixels_BCHW.shape[0]
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    lam = float(np.random.default_rng(seed).beta(cfg.mixup_alpha, cfg.mixup_alpha))
    perm = torch.randperm(B, generator=generator).to(pixels_BCHW.device)
    mixed = lam * pixels_BCHW + (1 - lam) * pixels_BCHW[perm]
    targets_BB = lam * torch.eye(B, device=pixels_BCHW.device)
    targets_BB[torch.arange(B, device=perm.device), perm] += 1 - lam
    return mixed, targets_BB


IMAGE_DEFENCES: dict[str, Callable] = {"jpeg": jpeg, "grayscale": grayscale, "bits": bits, "gaussian": gaussian,
                                       "cutout": cutout, "mixup": mixup}


def defend_images(pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the batch-transform image defence of ``cfg`` (``adv`` and ``none`` pass through).

    Returns:
        (pixels, soft targets [B, B] or None for the ordinary diagonal targets)
    """
    fn = IMAGE_DEFENCES.get(cfg.image)
    if fn is None:
        return pixels_BCHW, None
    out = fn(pixels_BCHW, cfg, generator)
    return out if isinstance(out, tuple) else (out, None)


def adversarial_pixels(loss_fn: Callable[[torch.Tensor], torch.Tensor], pixels_BCHW: torch.Tensor, cfg: DefenceConfig, generator: torch.Generator) -> torch.Tensor:
    """PGD that maximises ``loss_fn(pixels)`` (a scalar) in the ``adv_epsilon`` L-inf ball,
    from a uniform random start: the inner step of adversarial training."""
    eps = cfg.adv_epsilon
    start = (torch.rand(pixels_BCHW.shape, generator=generator).to(pixels_BCHW) * 2 - 1) * eps
    delta = project(start, pixels_BCHW, eps)
    delta = minimize_delta(lambda px, _step: -loss_fn(px), delta, pixels_BCHW, cfg.adv_steps, eps, cfg.adv_step_size)
    return (pixels_BCHW + delta).detach()


def soft_clip_loss(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor, targets_BB: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with soft targets (mixup): rows of ``targets_BB`` are the
    image->text target distributions, its columns the text->image ones. The identity
    matrix gives :func:`mem_dist.pipeline.surrogate.clip_loss`'s batch mean."""
    image_BE = F.normalize(image_BE.float(), dim=-1)
    text_BE = F.normalize(text_BE.float(), dim=-1)
    logits = logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp() * image_BE @ text_BE.t()
    return (F.cross_entropy(logits, targets_BB) + F.cross_entropy(logits.t(), targets_BB.t())) / 2


# --------------------------------------------------------------------------------------
# Text defences (EDA)
# --------------------------------------------------------------------------------------

_SYNONYM_GROUPS = (
    # the demo data's vocabulary
    ("small", "little", "tiny"), ("large", "big", "huge"), ("photo", "picture", "image", "photograph"),
    ("background", "backdrop"), ("red", "crimson", "scarlet"), ("green", "emerald"), ("blue", "azure", "navy"),
    ("yellow", "golden"), ("purple", "violet"), ("orange", "tangerine"), ("pink", "rose"),
    ("cyan", "turquoise", "aqua"), ("white", "ivory"), ("black", "ebony"), ("brown", "tan"),
    ("gray", "grey", "silver"), ("circle", "disc"), ("square", "box"), ("triangle", "wedge"),
    ("cross", "plus"), ("ring", "hoop", "loop"), ("diamond", "rhombus", "lozenge"),
    ("striped", "banded", "lined"), ("checkered", "chequered", "checked"), ("dotted", "spotted"),
    ("plain", "simple", "solid"), ("middle", "center", "centre"), ("top", "upper"), ("bottom", "lower"),
    ("corner", "angle"), ("next", "beside"),
    # common caption words
    ("man", "guy", "gentleman"), ("woman", "lady"), ("person", "individual"), ("people", "folks"),
    ("child", "kid"), ("dog", "puppy", "hound"), ("cat", "kitten"), ("car", "automobile", "vehicle"),
    ("house", "home"), ("building", "structure"), ("street", "road", "avenue"), ("sitting", "seated"),
    ("walking", "strolling"), ("running", "jogging"), ("holding", "carrying"), ("looking", "gazing"),
    ("sea", "ocean"), ("field", "meadow"), ("beautiful", "pretty", "lovely"), ("old", "aged", "vintage"),
    ("new", "modern"), ("table", "desk"), ("near", "close"),
)


def _synonym_table(groups: Sequence[tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    table: dict[str, set[str]] = {}
    for group in groups:
        for word in group:
            table.setdefault(word, set()).update(w for w in group if w != word)
    return {word: tuple(sorted(others)) for word, others in table.items()}


SYNONYMS = _synonym_table(_SYNONYM_GROUPS)
"""word -> its synonyms (lower case), from the built-in groups."""
_PUNCTUATION = ".,;:!?"


def _n_changes(words: list[str], rate: float) -> int:
    return max(1, int(rate * len(words)))


def _synonyms_of(word: str) -> tuple[str, ...]:
    """Synonyms of a caption word, ignoring case and trailing punctuation ("background,")."""
    return SYNONYMS.get(word.lower().rstrip(_PUNCTUATION), ())


def _synonyms_in(words: list[str]) -> list[int]:
    return [i for i, w in enumerate(words) if _synonyms_of(w)]


def synonym_replacement(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Replace n words that have synonyms with a random synonym each."""
    words = list(words)
    candidates = _synonyms_in(words)
    rng.shuffle(candidates)
    for i in candidates[: _n_changes(words, rate)]:
        core = words[i].rstrip(_PUNCTUATION)
        words[i] = rng.choice(_synonyms_of(core)) + words[i][len(core):]
    return words


def random_insertion(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Insert n times a synonym of a random word (that has one) at a random position."""
    words = list(words)
    for _ in range(_n_changes(words, rate)):
        candidates = _synonyms_in(words)
        if not candidates:
            break
        synonym = rng.choice(_synonyms_of(words[rng.choice(candidates)]))
        words.insert(rng.randint(0, len(words)), synonym)
    return words


def random_swap(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Swap two random words, n times."""
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(_n_changes(words, rate)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Delete each word with probability ``rate``; one random word is kept if none survive."""
    kept = [w for w in words if rng.random() >= rate]
    return kept if kept else ([rng.choice(words)] if words else [])


TEXT_DEFENCES: dict[str, Callable[[list[str], float, random.Random], list[str]]] = {
    "insert": random_insertion, "delete": random_deletion, "swap": random_swap, "synonym": synonym_replacement,
}


def defend_captions(captions: Sequence[str], cfg: DefenceConfig, rng: random.Random) -> list[str]:
    """Apply the text defence of ``cfg`` to each caption (``none`` returns them as they are)."""
    if cfg.text == "drop_prefix":
        return [" ".join(c.split()[cfg.prefix_words:]) for c in captions]
    fn = TEXT_DEFENCES.get(cfg.text)
    if fn is None:
        return list(captions)
    return [" ".join(fn(c.split(), cfg.text_rate, rng)) for c in captions]

