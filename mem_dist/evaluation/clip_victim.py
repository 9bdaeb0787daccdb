"""The CLIP victim: a CLIP trained on a condition's pairs, scored on clean validation data.

From scratch (its own init, never the surrogate's) or fine-tuned from a local checkpoint;
or a victim trained elsewhere, evaluated as it is. Per training batch: canvas (uint8, as
decoded, optionally re-encoded as JPEG once at load) -> image defence -> random resized crop
(scale 0.9-1.0, as open_clip's trainer; square) -> resize + normalise to the model's input
(:func:`mem_dist.pipeline.surrogate.to_model_input`) -> adversarial PGD if ``defence.image: adv``.
Captions go through the text defence, then the victim's tokenizer. After every epoch:
retrieval both ways and, on labelled val shards, zero-shot top-1 (:mod:`mem_dist.evaluation.scores`).

Shapes: N samples, B batch, E embedding dim, H/W canvas side, C = 3, L context length.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mem_dist.pipeline import augment, surrogate
from mem_dist.evaluation import defences
from mem_dist.pipeline.config import seed_of
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.evaluation.eval_config import Condition, EvalConfig, VictimConfig, resolve_device
from mem_dist.evaluation.pairs import Pairs, load_condition
from mem_dist.pipeline.schedule import cosine_lr
from mem_dist.evaluation.scores import (class_embeddings, pack_correct, retrieval_hits, retrieval_metrics, zero_shot_predictions,
                             zero_shot_top1)

Log = Callable[[str], None]


def create_victim(cfg: VictimConfig, device: torch.device, seed: int):
    """(model, tokenizer, pixel spec) of the victim; config errors name the victim's keys.

    The init is seeded from ``(seed, "victim")``, never from ``seed`` alone as generation
    seeds the surrogate: a victim of the surrogate's architecture would otherwise start from
    the surrogate's exact weights and measure a shortcut no attacker gets."""
    torch.manual_seed(seed_of(seed, "victim"))
    return surrogate.create_surrogate(cfg.model, cfg.pretrained, device, key="victim")


def batch_loss(model, spec: surrogate.PixelSpec, pixels_BCHW: torch.Tensor, tokens_BL: torch.Tensor, targets_BB: torch.Tensor | None) -> torch.Tensor:
    """The victim's contrastive loss on a batch (soft targets for mixup)."""
    image_BE = model.encode_image(surrogate.to_model_input(pixels_BCHW, spec))
    text_BE = model.encode_text(tokens_BL)
    if targets_BB is None:
        return surrogate.clip_loss(image_BE, text_BE, model.logit_scale).mean()
    return defences.soft_clip_loss(image_BE, text_BE, model.logit_scale, targets_BB)


@torch.no_grad()
def encode_pairs(model, spec: surrogate.PixelSpec, canvases_NHWC: torch.Tensor, tokens_NL: torch.Tensor,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of pairs (no crop, no defence), [N, E] each."""
    model.eval()
    device = next(model.parameters()).device
    images, texts = [], []
    for start in range(0, len(tokens_NL), batch_size):
        pixels = canvases_NHWC[start : start + batch_size].to(device).permute(0, 3, 1, 2).float()
        images.append(model.encode_image(surrogate.to_model_input(pixels, spec)).float())
        texts.append(model.encode_text(tokens_NL[start : start + batch_size].to(device)).float())
    return torch.cat(images), torch.cat(texts)


def evaluate_retrieval(model, spec: surrogate.PixelSpec, canvases_NHWC: torch.Tensor, tokens_NL: torch.Tensor, batch_size: int) -> dict:
    """Encode the pairs and score retrieval (:func:`mem_dist.evaluation.scores.retrieval_metrics`)."""
    return retrieval_metrics(*encode_pairs(model, spec, canvases_NHWC, tokens_NL, batch_size))


@dataclass
class ValSet:
    """The clean validation pairs as a CLIP victim reads them, encoded once."""

    canvases: torch.Tensor  # uint8 [N, H, W, C]
    tokens: torch.Tensor  # [N, L]
    labels: np.ndarray | None  # int64 [N] or None: no zero-shot metric
    classes: dict[int, str]
    templates: tuple[str, ...]

    @classmethod
    def of(cls, val: Pairs, tokenizer, cfg: EvalConfig) -> "ValSet":
        labels = val.labels if val.labels is not None and val.classes else None
        return cls(torch.from_numpy(val.canvases), tokenizer(val.captions), labels, val.classes, cfg.zero_shot_templates)


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


def epoch_record(model, spec: surrogate.PixelSpec, tokenizer, val: ValSet, batch_size: int,
                 epoch: int, loss: float | None, lr: float | None, seconds: float, select: ValSet | None = None) -> dict:
    """One entry of a history's "epochs": the epoch's training numbers, val retrieval and,
    when the val samples carry labels, zero-shot top-1 (``zero_shot_top1``), which val images
    it got right (``correct``) and, given the attacker's ``select`` images, zero-shot top-1
    on them (``select_zero_shot_top1``)."""
    record = {"epoch": epoch, "train_loss": loss, "lr": lr, "seconds": round(seconds, 3)}
    images, texts = encode_pairs(model, spec, val.canvases, val.tokens, batch_size)
    record.update(retrieval_metrics(images, texts))
    record["i2t_r10"], record["i2t_hits"] = record["i2t"]["r10"], pack_correct(retrieval_hits(images, texts))
    if select is not None:  # the attacker's own clean pairs: retrieval among them
        select_images, select_texts = encode_pairs(model, spec, select.canvases, select.tokens, batch_size)
        record["select_i2t_r10"] = float(retrieval_hits(select_images, select_texts).mean())
    if val.labels is not None:
        order, classes = class_embeddings(model.encode_text, tokenizer, val.classes, val.templates, images.device)
        record["zero_shot_top1"] = zero_shot_top1(images, classes, order, val.labels)
        record["correct"] = pack_correct(zero_shot_predictions(images, classes, order) == val.labels)
        if select is not None and select.labels is not None:
            record["select_zero_shot_top1"] = zero_shot_top1(select_images, classes, order, select.labels)
    return record


def victim_autocast(device: torch.device, vcfg: VictimConfig):
    """bf16 autocast on CUDA when ``victim.precision`` asks for it; otherwise a no-op."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and vcfg.precision == "bf16")


def train_victim(train_shards: str | Condition, val: Pairs, cfg: EvalConfig, log: Log = print,
                 save_to: str | None = None, select: Pairs | None = None) -> dict:
    """Train a victim CLIP on ``train_shards``, evaluating on ``val`` every epoch.

    Args:
        train_shards: a train shard spec, or a :class:`Condition` (a mix).
        val: the clean validation pairs (:func:`load_pairs`, decoded once for every condition).
        cfg: the evaluation config (``victim``, ``defence``, ``reencode_jpeg``, data keys).
        log: where progress lines go.
        save_to: if given, the URL the trained victim's state dict is written to.
        select: the attacker's clean images, disjoint from ``val``, on which it picks its best
            epoch (zero-shot top-1 on them in each record, when both carry labels).

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
    optimizer = surrogate.adamw(model, vcfg.lr, vcfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    augment_gen = torch.Generator().manual_seed(cfg.seed + 1)
    text_rng = random.Random(cfg.seed)
    autocast = victim_autocast(device, vcfg)

    canvases_NHWC = torch.from_numpy(train.canvases).to(device)
    tokens_NL = tokenizer(train.captions)  # once; re-tokenised per batch only under a text defence
    val_set = ValSet.of(val, tokenizer, cfg)
    select_set = ValSet.of(select, tokenizer, cfg) if select is not None else None
    batch = min(vcfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch  # drop_last, as open_clip's trainer
    total_steps = vcfg.epochs * steps_per_epoch

    def validate(epoch: int, loss: float | None, lr: float | None, seconds: float) -> dict:
        with autocast:
            record = epoch_record(model, spec, tokenizer, val_set, vcfg.batch_size, epoch, loss, lr, seconds, select_set)
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
        record = epoch_record(model, spec, tokenizer, ValSet.of(val, tokenizer, cfg), vcfg.batch_size, 0, None, None, 0.0)
    log(f"mem-dist: evaluate: condition '{name}': checkpoint {checkpoint} evaluated as it is, {len(val)} val pairs | {_brief(record)}")
    return {"n_train": None, "n_protected": None, "n_val": len(val), "epochs": [record], "final": record, "leakage": None}


def train_step(model, optimizer, spec: surrogate.PixelSpec, pixels_BCHW: torch.Tensor, tokens_BL: torch.Tensor, cfg: EvalConfig, generator: torch.Generator) -> float:
    """One AdamW step: image defence -> crop -> (adversarial PGD) -> loss; returns the loss."""
    pixels_BCHW, targets_BB = defences.defend_images(pixels_BCHW, cfg.defence, generator)
    if cfg.victim.crop:
        pixels_BCHW = augment.random_resized_crop(pixels_BCHW, generator, cfg.victim.crop_scale)
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
    zero_shot = f" | zero-shot top-1 {record['zero_shot_top1']:.3f}" if "zero_shot_top1" in record else ""
    return (f"i2t R@1/5/10 {i['r1']:.3f}/{i['r5']:.3f}/{i['r10']:.3f} medR {i['median_rank']:g}"
            f" | t2i R@1/5/10 {t['r1']:.3f}/{t['r5']:.3f}/{t['r10']:.3f} medR {t['median_rank']:g}{zero_shot}")
