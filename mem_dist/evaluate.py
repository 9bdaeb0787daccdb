"""Victim evaluation: ``python -m mem_dist.evaluate --config configs/eval-demo.yaml [key=value ...]``.

For every *condition* (a set of training shards: clean, protected, or a mix with a
protected fraction p) a victim CLIP is trained (from scratch, or from a local checkpoint)
and evaluated on clean validation shards at epoch 0 and after every epoch: image->text and
text->image R@1/5/10, median and mean rank. The paper's protocol (reference section 5)
with one caption per validation image. A condition may instead name a victim trained
elsewhere (``checkpoint``: open_clip_train's, or any pipeline's, for ``victim.model``),
which is evaluated as it is. Outputs under ``output``: ``metrics.json``,
``loss.png``, ``median_rank.png``, ``grid.png`` and ``report.md`` (see :mod:`mem_dist.report`).

The victim's input pipeline per training batch: canvas (uint8, as decoded, optionally
re-encoded as JPEG once at load) -> image defence -> random resized crop (scale 0.9-1.0,
as open_clip's trainer; square) -> resize + normalise to the model's input
(:func:`mem_dist.surrogate.to_model_input`) -> adversarial PGD if ``defence.image: adv``.
Captions go through the text defence, then the victim's tokenizer. The whole training set
is held in memory as one uint8 tensor.

Exit codes: 0 done, 2 bad configuration (one line naming the key), 1 anything else.
Shapes: N samples, B batch, E embedding dim, H/W canvas side, C = 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mem_dist import defences, report, storage, surrogate
from mem_dist.errors import one_line_errors
from mem_dist.config import ConfigError, DataConfig, build, check, load_config, seed_of, to_dict
from mem_dist.data import expand_shards, load_shard
from mem_dist.defences import DefenceConfig

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VictimConfig:
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
class Condition:
    """One training set for a victim."""

    shards: str = ""
    """Train shard spec: brace-expanded fsspec URLs, several joined with "::"."""
    clean_shards: Optional[str] = None
    """For a mix: clean shards holding the same keys. A seeded ``fraction`` of the clean
    keys is taken from ``shards`` (the protected version), the rest stays clean."""
    fraction: float = 1.0
    """Protected fraction p of a mix (needs ``clean_shards`` when below 1)."""
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
    """Clean validation shards (one caption per image)."""
    image_size: int = 64
    """Canvas side the shards are decoded to (protected shards: their own size, so
    decoding is lossless); the victim then resizes to its model's input size."""
    resize_mode: Literal["center_crop", "border", "no"] = "center_crop"
    """How a decoded image becomes the canvas (as data.resize_mode)."""
    reencode_jpeg: Optional[int] = None
    """null = off; q = re-encode every training image once as JPEG at quality q on load
    (protected images that were re-encoded on their way to the victim)."""
    victim: VictimConfig = field(default_factory=VictimConfig)
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
            raise ConfigError(f"config key '{key}' must be a shard spec or a mapping with shards / clean_shards / fraction / checkpoint")
        check(bool(value.shards) or value.checkpoint is not None, f"{key}.shards", "is required (or a checkpoint to evaluate)")
        check(value.checkpoint is None or (value.clean_shards is None and value.fraction == 1), f"{key}.checkpoint",
              "is a victim trained elsewhere: clean_shards and fraction do not apply to it")
        check(0 <= value.fraction <= 1, f"{key}.fraction", "must be between 0 and 1")
        check(value.fraction == 1 or bool(value.clean_shards), f"{key}.clean_shards", "is required when fraction is below 1")
        out[str(name)] = value
    return out


def check_shards(spec: str, key: str) -> list[str]:
    """The shard URLs of ``spec``; a missing shard is a ConfigError naming ``key``."""
    urls = expand_shards(spec)
    for url in urls:
        if not storage.exists(url):
            raise ConfigError(f"config key '{key}': shard not found: {url}")
    return urls


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Image-caption pairs held in memory."""

    keys: list[str]
    canvases: np.ndarray  # uint8 [N, H, W, C]
    captions: list[str]
    protected_mask: Optional[np.ndarray] = None  # mixes: bool [N], the pairs taken from the protected shards
    clean: Optional["Pairs"] = None  # mixes: the clean pairs the mix was made from, in the same order

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def protected(self) -> Optional[int]:
        """Mixes: how many pairs come from the protected shards (None otherwise)."""
        return None if self.protected_mask is None else int(self.protected_mask.sum())


def data_config(spec: str, cfg: EvalConfig) -> DataConfig:
    """How the shards of ``spec`` decode: canvases of side ``cfg.image_size``."""
    return DataConfig(shards=spec, image_size=cfg.image_size, resize_mode=cfg.resize_mode)


def load_pairs(spec: str, cfg: EvalConfig) -> Pairs:
    """Decode every shard of ``spec`` into memory."""
    shards = [load_shard(url, data_config(spec, cfg)) for url in expand_shards(spec)]
    return Pairs(
        keys=[k for s in shards for k in s.keys],
        canvases=np.concatenate([s.canvases for s in shards]),
        captions=[c for s in shards for c in s.captions],
    )


def load_condition(cond: Condition, cfg: EvalConfig) -> Pairs:
    """The training pairs of a condition: its shards, or a keyed mix with clean shards."""
    protected = load_pairs(cond.shards, cfg)
    if cond.clean_shards is None:
        return protected
    clean = load_pairs(cond.clean_shards, cfg)
    chosen = np.random.default_rng(cfg.seed).permutation(len(clean))[: round(cond.fraction * len(clean))]
    where = {k: i for i, k in enumerate(protected.keys)}
    canvases, captions, mask = clean.canvases.copy(), list(clean.captions), np.zeros(len(clean), bool)
    for i in chosen:
        j = where.get(clean.keys[i])
        if j is not None:  # a key the protected shards lack (dropped at merge) stays clean
            canvases[i], captions[i], mask[i] = protected.canvases[j], protected.captions[j], True
    return Pairs(clean.keys, canvases, captions, protected_mask=mask, clean=clean)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def retrieval_metrics(image_NE: torch.Tensor, text_NE: torch.Tensor) -> dict[str, dict[str, float]]:
    """Retrieval of pair i's partner among all N candidates, in both directions.

    Features are L2-normalised; pair i is (image i, caption i). The rank is 1-based; ties
    take the mean rank of the tied block, so identical features score as chance.

    Args:
        image_NE: image features.
        text_NE: text features of the matching captions, in the same order.

    Returns:
        {"i2t": m, "t2i": m}, m = {"r1", "r5", "r10": fraction with rank <= K (0..1),
        "median_rank": floor(median rank), "mean_rank": mean rank}. With 1-based ranks
        floor(median) equals the paper's floor(median of 0-based ranks) + 1.
    """
    image_NE = F.normalize(image_NE.float(), dim=-1)
    text_NE = F.normalize(text_NE.float(), dim=-1)
    return {"i2t": _rank_summary(_true_ranks(image_NE, text_NE)), "t2i": _rank_summary(_true_ranks(text_NE, image_NE))}


def _true_ranks(query_NE: torch.Tensor, target_NE: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """1-based rank of target i among all targets for query i (mean rank over ties)."""
    ranks = []
    for start in range(0, len(query_NE), chunk):
        sim = query_NE[start : start + chunk] @ target_NE.t()
        rows = torch.arange(len(sim), device=sim.device)
        true = sim[rows, rows + start].unsqueeze(1)
        greater = (sim > true).sum(1)
        ties = (sim == true).sum(1) - 1
        ranks.append((1 + greater + ties / 2).double().cpu())
    return torch.cat(ranks).numpy()


def _rank_summary(ranks: np.ndarray) -> dict[str, float]:
    out = {f"r{k}": float((ranks <= k).mean()) for k in (1, 5, 10)}
    out["median_rank"] = float(math.floor(np.median(ranks)))
    out["mean_rank"] = float(ranks.mean())
    return out


def chance_metrics(n: int) -> dict[str, float]:
    """Random guessing among n candidates: R@K = K/n, median rank floor((n+1)/2)."""
    out = {f"r{k}": min(1.0, k / n) for k in (1, 5, 10)}
    out["median_rank"] = float(math.floor((n + 1) / 2))
    out["mean_rank"] = (n + 1) / 2
    return out


# --------------------------------------------------------------------------------------
# The victim
# --------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but no CUDA device is available")
    return torch.device(device)


def create_victim(cfg: VictimConfig, device: torch.device, seed: int):
    """(model, tokenizer, pixel spec) of the victim; config errors name the victim's keys.

    The init is seeded from ``(seed, "victim")``, never from ``seed`` alone as generation
    seeds the surrogate: a victim of the surrogate's architecture would otherwise start from
    the surrogate's exact weights and measure a shortcut no attacker gets."""
    torch.manual_seed(seed_of(seed, "victim"))
    return surrogate.create_surrogate(cfg.model, cfg.pretrained, device, key="victim")


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warm-up to ``base_lr``, then cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base_lr


def batch_loss(model, spec: surrogate.PixelSpec, pixels_BCHW: torch.Tensor, tokens_BL: torch.Tensor, targets_BB: torch.Tensor | None) -> torch.Tensor:
    """The victim's contrastive loss on a batch (soft targets for mixup)."""
    image_BE = model.encode_image(surrogate.to_model_input(pixels_BCHW, spec))
    text_BE = model.encode_text(tokens_BL)
    if targets_BB is None:
        return surrogate.clip_loss(image_BE, text_BE, model.logit_scale).mean()
    return defences.soft_clip_loss(image_BE, text_BE, model.logit_scale, targets_BB)


@torch.no_grad()
def evaluate_retrieval(model, spec: surrogate.PixelSpec, canvases_NHWC: torch.Tensor, tokens_NL: torch.Tensor, batch_size: int) -> dict:
    """Encode the validation pairs (no crop, no defence) and score retrieval."""
    model.eval()
    device = next(model.parameters()).device
    images, texts = [], []
    for start in range(0, len(tokens_NL), batch_size):
        pixels = canvases_NHWC[start : start + batch_size].to(device).permute(0, 3, 1, 2).float()
        images.append(model.encode_image(surrogate.to_model_input(pixels, spec)).float())
        texts.append(model.encode_text(tokens_NL[start : start + batch_size].to(device)).float())
    return retrieval_metrics(torch.cat(images), torch.cat(texts))


def owner_leakage(model, spec: surrogate.PixelSpec, tokenizer, train: Pairs, batch_size: int, seed: int,
                  limit: int = 1000) -> dict | None:
    """Mixes: how well the victim retrieves the *clean* versions of the pairs it was trained
    on, among the protected ones (the owners' data, seen only protected) against as many of
    the rest (seen as they are). Equal pools of n pairs (at most ``limit``), seeded.

    Returns:
        {"n", "owners": {"i2t", "t2i"}, "others": {"i2t", "t2i"}}, or None for a condition
        that is not a mix or lacks two pairs on either side.
    """
    if train.clean is None:
        return None
    owners, others = np.flatnonzero(train.protected_mask), np.flatnonzero(~train.protected_mask)
    n = min(len(owners), len(others), limit)
    if n < 2:
        return None
    rng = np.random.default_rng(seed_of(seed, "leakage"))
    out: dict[str, Any] = {"n": n}
    for side, idx in (("owners", owners), ("others", others)):
        pick = np.sort(rng.choice(idx, n, replace=False))
        tokens = tokenizer([train.clean.captions[i] for i in pick])
        out[side] = evaluate_retrieval(model, spec, torch.from_numpy(train.clean.canvases[pick]), tokens, batch_size)
    return out


def epoch_record(model, spec: surrogate.PixelSpec, val_canvases: torch.Tensor, val_tokens: torch.Tensor, batch_size: int,
                 epoch: int, loss: float | None, lr: float | None, seconds: float) -> dict:
    """One entry of a history's "epochs": the epoch's training numbers and val retrieval."""
    record = {"epoch": epoch, "train_loss": loss, "lr": lr, "seconds": round(seconds, 3)}
    record.update(evaluate_retrieval(model, spec, val_canvases, val_tokens, batch_size))
    return record


def victim_autocast(device: torch.device, vcfg: VictimConfig):
    """bf16 autocast on CUDA when ``victim.precision`` asks for it; otherwise a no-op."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and vcfg.precision == "bf16")


def train_victim(train_shards: str | Condition, val: Pairs, cfg: EvalConfig, log: Log = print,
                 save_to: str | None = None) -> dict:
    """Train a victim CLIP on ``train_shards``, evaluating on ``val`` every epoch.

    Args:
        train_shards: a train shard spec, or a :class:`Condition` (a mix).
        val: the clean validation pairs (:func:`load_pairs`, decoded once for every condition).
        cfg: the evaluation config (``victim``, ``defence``, ``reencode_jpeg``, data keys).
        log: where progress lines go.
        save_to: if given, the URL the trained victim's state dict is written to.

    Returns:
        History: {"n_train", "n_protected" (mixes; else None), "n_val", "epochs": [{"epoch" (0 = before
        training), "train_loss" (mean over the epoch's steps; None at 0), "lr", "seconds",
        "i2t", "t2i"}], "final": the last epoch's record, "leakage": :func:`owner_leakage` after
        the last epoch (mixes; else None)}.
    """
    cond = train_shards if isinstance(train_shards, Condition) else Condition(shards=train_shards)
    device, vcfg = resolve_device(cfg.device), cfg.victim
    train = load_condition(cond, cfg)
    if len(train) < 2 or len(val) < 2:
        raise ConfigError(f"a victim needs at least 2 training and 2 validation pairs; got {len(train)} and {len(val)}")
    if cfg.reencode_jpeg is not None:
        train.canvases = defences.jpeg_roundtrip(train.canvases, cfg.reencode_jpeg)

    model, tokenizer, spec = create_victim(vcfg, device, cfg.seed)  # the same initial victim for every condition
    optimizer = torch.optim.AdamW(surrogate.param_groups(model, vcfg.weight_decay), lr=vcfg.lr)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    augment_gen = torch.Generator().manual_seed(cfg.seed + 1)
    text_rng = random.Random(cfg.seed)
    autocast = victim_autocast(device, vcfg)

    canvases_NHWC = torch.from_numpy(train.canvases).to(device)
    tokens_NL = tokenizer(train.captions)  # once; re-tokenised per batch only under a text defence
    val_canvases, val_tokens = torch.from_numpy(val.canvases), tokenizer(val.captions)
    batch = min(vcfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch  # drop_last, as open_clip's trainer
    total_steps = vcfg.epochs * steps_per_epoch

    def validate(epoch: int, loss: float | None, lr: float | None, seconds: float) -> dict:
        with autocast:
            record = epoch_record(model, spec, val_canvases, val_tokens, vcfg.batch_size, epoch, loss, lr, seconds)
        log(f"mem-dist: evaluate: epoch {epoch}/{vcfg.epochs}" + (f" loss {loss:.4f}" if loss is not None else "")
            + f" | {_brief(record)} ({seconds:.1f} s)")
        return record

    mix = f" ({train.protected} from the protected shards)" if train.protected is not None else ""
    log(f"mem-dist: evaluate: {len(train)} train pairs{mix}, {len(val)} val pairs, "
        f"victim {vcfg.model}, {steps_per_epoch} steps/epoch on {device}")
    epochs = [validate(0, None, None, 0.0)]
    for epoch in range(1, vcfg.epochs + 1):
        start, losses, lr = time.time(), [], vcfg.lr
        model.train()
        order = torch.randperm(len(train), generator=order_gen)
        for b in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + b
            lr = cosine_lr(step, vcfg.lr, vcfg.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[b * batch : (b + 1) * batch]
            pixels = canvases_NHWC[idx.to(device)].permute(0, 3, 1, 2).float()
            if cfg.defence.text == "none":
                tokens = tokens_NL[idx]
            else:
                tokens = tokenizer(defences.defend_captions([train.captions[i] for i in idx.tolist()], cfg.defence, text_rng))
            with autocast:
                loss = train_step(model, optimizer, spec, pixels, tokens.to(device), cfg, augment_gen)
            losses.append(loss)
        epochs.append(validate(epoch, float(np.mean(losses)), lr, time.time() - start))
    with autocast:
        leakage = owner_leakage(model, spec, tokenizer, train, vcfg.batch_size, cfg.seed)
    if leakage is not None:
        log(f"mem-dist: evaluate: clean versions of its training pairs, {leakage['n']} each: i2t R@10 "
            f"{leakage['owners']['i2t']['r10']:.3f} on the protected ones, {leakage['others']['i2t']['r10']:.3f} on the rest")
    if save_to:
        surrogate.save(model.state_dict(), save_to)
        log(f"mem-dist: evaluate: victim weights written to {save_to}")
    return {"n_train": len(train), "n_protected": train.protected, "n_val": len(val), "epochs": epochs, "final": epochs[-1],
            "leakage": leakage}


def evaluate_checkpoint(name: str, checkpoint: str, val: Pairs, cfg: EvalConfig, log: Log = print) -> dict:
    """Evaluate a victim trained elsewhere (``conditions.{name}.checkpoint``, a checkpoint of
    ``victim.model``) on the clean validation pairs ``val``; nothing is trained.

    Returns:
        A history as :func:`train_victim`'s with one record (epoch 0) and no training-set
        sizes ("n_train" and "n_protected" None).
    """
    device, vcfg = resolve_device(cfg.device), cfg.victim
    model, tokenizer, spec = surrogate.create_surrogate(vcfg.model, checkpoint, device, key="victim",
                                                        pretrained_key=f"conditions.{name}.checkpoint")
    with victim_autocast(device, vcfg):
        record = epoch_record(model, spec, torch.from_numpy(val.canvases), tokenizer(val.captions), vcfg.batch_size, 0, None, None, 0.0)
    log(f"mem-dist: evaluate: condition '{name}': checkpoint {checkpoint} evaluated as it is, {len(val)} val pairs | {_brief(record)}")
    return {"n_train": None, "n_protected": None, "n_val": len(val), "epochs": [record], "final": record, "leakage": None}


def train_step(model, optimizer, spec: surrogate.PixelSpec, pixels_BCHW: torch.Tensor, tokens_BL: torch.Tensor, cfg: EvalConfig, generator: torch.Generator) -> float:
    """One AdamW step: image defence -> crop -> (adversarial PGD) -> loss; returns the loss."""
    pixels_BCHW, targets_BB = defences.defend_images(pixels_BCHW, cfg.defence, generator)
    if cfg.victim.crop:
        pixels_BCHW = surrogate.random_resized_crop(pixels_BCHW, generator, cfg.victim.crop_scale)
    if cfg.defence.image == "adv":
        pixels_BCHW = defences.adversarial_pixels(lambda px: batch_loss(model, spec, px, tokens_BL, targets_BB), pixels_BCHW, cfg.defence, generator)
    loss = batch_loss(model, spec, pixels_BCHW, tokens_BL, targets_BB)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, surrogate.LOGIT_SCALE_MAX)
    return float(loss.detach())


def _brief(record: dict) -> str:
    i, t = record["i2t"], record["t2i"]
    return (f"i2t R@1/5/10 {i['r1']:.3f}/{i['r5']:.3f}/{i['r10']:.3f} medR {i['median_rank']:g}"
            f" | t2i R@1/5/10 {t['r1']:.3f}/{t['r5']:.3f}/{t['r10']:.3f} medR {t['median_rank']:g}")


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(cfg: EvalConfig, log: Log = print) -> dict:
    """Train and evaluate a victim per condition; write metrics, plots, grid and report.

    Returns:
        The metrics.json content: {"config", "settings", "chance", "conditions": {name:
        history (see :func:`train_victim`) plus "condition"}}.
    """
    for name, cond in cfg.conditions.items():  # every shard checked before any work (checkpoints: first thing below)
        if cond.shards:
            check_shards(cond.shards, f"conditions.{name}.shards" if cond.clean_shards or cond.checkpoint else f"conditions.{name}")
        if cond.clean_shards:
            check_shards(cond.clean_shards, f"conditions.{name}.clean_shards")
    check_shards(cfg.val_shards, "val_shards")
    resolve_device(cfg.device)

    metrics: dict[str, Any] = {"config": to_dict(cfg), "settings": describe_settings(cfg), "conditions": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or threads)
    try:
        val = load_pairs(cfg.val_shards, cfg)
        # victims trained elsewhere first: quick, and a checkpoint that does not load fails before any training
        evaluated = {name: evaluate_checkpoint(name, cond.checkpoint, val, cfg, log)
                     for name, cond in cfg.conditions.items() if cond.checkpoint is not None}
        for name, cond in cfg.conditions.items():
            history = evaluated.get(name)
            if history is None:
                log(f"mem-dist: evaluate: condition '{name}'")
                save_to = storage.join(cfg.output, "victims", f"{name}.pt") if cfg.save_victims else None
                history = train_victim(cond, val, cfg, log, save_to)
            metrics["conditions"][name] = {"condition": dataclasses.asdict(cond), **history}
            metrics["chance"] = chance_metrics(history["n_val"])
            storage.write_json(storage.join(cfg.output, "metrics.json"), metrics)  # progress after each condition
    finally:
        torch.set_num_threads(threads)

    grid = grid_samples(cfg)
    table = report.write_report(cfg.output, metrics, grid)
    print(table, flush=True)
    log(f"mem-dist: evaluate: wrote metrics.json, loss.png, median_rank.png, {'grid.png, ' if grid else ''}report.md under {cfg.output}")
    return metrics


def describe_settings(cfg: EvalConfig) -> str:
    """One line on the victim and the defences that were on (for the report)."""
    v = cfg.victim
    elsewhere = [name for name, cond in cfg.conditions.items() if cond.checkpoint is not None]
    if len(elsewhere) == len(cfg.conditions):
        return f"victims {v.model} trained elsewhere (each condition's checkpoint), evaluated as they are"
    start = f"fine-tuned from {v.pretrained}" if v.pretrained else "from scratch"
    crop = f"random resized crop {v.crop_scale[0]:g}-{v.crop_scale[1]:g}" if v.crop else "no crop"
    jpeg = f"train images re-encoded as JPEG q={cfg.reencode_jpeg}" if cfg.reencode_jpeg else "no JPEG re-encoding"
    line = (f"victim {v.model} {start}, {v.epochs} epoch{'s' if v.epochs != 1 else ''}, batch {v.batch_size}, lr {v.lr:g}, "
            f"warm-up {v.warmup_steps} steps + cosine, {crop}; {cfg.defence.describe()}; {jpeg}; seed {cfg.seed}")
    return line + (f"; trained elsewhere and evaluated as they are: {', '.join(elsewhere)}" if elsewhere else "")


def grid_samples(cfg: EvalConfig, rows: int = 4) -> list[tuple[str, list[tuple[np.ndarray, str]]]]:
    """Columns for the image grid: the reference condition and every condition whose first
    shard holds the same samples as the reference's first ``rows``: the same keys, with
    captions that end with the reference's (a protected caption is trigger + caption). A
    mix shows its protected version. Empty when no condition shares samples with the
    reference."""
    names = [n for n, c in cfg.conditions.items() if c.shards]  # a checkpoint condition may name none
    if not names:
        return []
    ref = "clean" if "clean" in names else names[0]
    first = {}
    for name in [ref] + [n for n in names if n != ref]:
        spec = cfg.conditions[name].shards
        first[name] = load_shard(expand_shards(spec)[0], data_config(spec, cfg))
    keys, captions = first[ref].keys[:rows], first[ref].captions[:rows]
    columns = []
    for name, shard in first.items():
        where = {k: i for i, k in enumerate(shard.keys)}
        if all(k in where and shard.captions[where[k]].endswith(c) for k, c in zip(keys, captions)):
            columns.append((name, [(shard.canvases[where[k]], shard.captions[where[k]]) for k in keys]))
    return columns if len(columns) > 1 else []


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mem-dist evaluate", description="Train victim CLIPs on clean / protected shards and report retrieval on clean validation shards.")
    p.add_argument("--config", help="YAML config (configs/eval-demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. victim.epochs=2 defence.image=jpeg conditions.mem3=runs/x/protected/00000.tar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run(load_config(EvalConfig, args.config, args.overrides))
        return 0

    return one_line_errors(body)


if __name__ == "__main__":
    sys.exit(main())
