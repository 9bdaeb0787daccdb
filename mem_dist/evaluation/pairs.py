"""The victims' data: image-caption(-label) pairs decoded from shards into memory.

A condition's training pairs are its shards, or a keyed mix of protected and clean shards
(``fraction`` of the keys protected), after the dataset-level attacks of
:mod:`mem_dist.evaluation.attacks` (``defence.removal``, ``defence.recaption``). Labels come
from each sample's json (``label``, with the class name in ``class``), as ``mem-dist
import`` writes them; shards without them give ``labels`` None (no zero-shot or classifier
metrics then).

Shapes: N samples, H/W canvas side, C = 3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from mem_dist.pipeline import storage
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import expand_shards, load_shard
from mem_dist.evaluation.attacks import attack_pairs
from mem_dist.evaluation.eval_config import Condition, EvalConfig


def check_shards(spec: str, key: str) -> list[str]:
    """The shard URLs of ``spec``; a missing shard is a ConfigError naming ``key``."""
    urls = expand_shards(spec)
    for url in urls:
        if not storage.exists(url):
            raise ConfigError(f"config key '{key}': shard not found: {url}")
    return urls




@dataclass
class Pairs:
    """Image-caption pairs held in memory."""

    keys: list[str]
    canvases: np.ndarray  # uint8 [N, H, W, C]
    captions: list[str]
    labels: Optional[np.ndarray] = None  # int64 [N] from each json's "label" (-1 where missing); None if no sample has one
    classes: dict[int, str] = field(default_factory=dict)  # label -> class name, from the json's "class"
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
    labels, classes = read_labels([m for s in shards for m in (s.meta or [None] * len(s))])
    return Pairs(
        keys=[k for s in shards for k in s.keys],
        canvases=np.concatenate([s.canvases for s in shards]),
        captions=[c for s in shards for c in s.captions],
        labels=labels, classes=classes,
    )


def read_labels(metas: list[bytes | None]) -> tuple[np.ndarray | None, dict[int, str]]:
    """(labels int64 [N] with -1 where missing, or None if no json has one; label -> class name)."""
    labels, classes = np.full(len(metas), -1, np.int64), {}
    for i, raw in enumerate(metas):
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            continue
        if isinstance(meta, dict) and isinstance(meta.get("label"), int):
            labels[i] = meta["label"]
            if isinstance(meta.get("class"), str):
                classes[meta["label"]] = meta["class"]
    return (labels if (labels >= 0).any() else None), classes


def load_condition(cond: Condition, cfg: EvalConfig, log: Callable[[str], None] = print) -> Pairs:
    """The training pairs of a condition: its shards, or a keyed mix with clean shards, after
    ``cfg.defence``'s dataset-level attacks (:mod:`mem_dist.evaluation.attacks`: removal,
    recaptioning; a mix's ``clean`` pairs stay as they were)."""
    return attack_pairs(_condition_pairs(cond, cfg), cfg, condition_name(cond, cfg), log)


def condition_name(cond: Condition, cfg: EvalConfig) -> str:
    """The name ``cfg.conditions`` gives ``cond`` (its shard spec when it has none)."""
    return next((name for name, c in cfg.conditions.items() if c == cond), cond.shards)


def _condition_pairs(cond: Condition, cfg: EvalConfig) -> Pairs:
    protected = load_pairs(cond.shards, cfg)
    if cond.clean_shards is None:
        return protected
    clean = load_pairs(cond.clean_shards, cfg)
    chosen = np.random.default_rng(cfg.seed).permutation(len(clean))[: round(cond.fraction * len(clean))]
    where = {k: i for i, k in enumerate(protected.keys)}
    canvases, captions, mask = clean.canvases.copy(), list(clean.captions), np.zeros(len(clean), bool)
    labels = None if clean.labels is None else clean.labels.copy()
    for i in chosen:
        j = where.get(clean.keys[i])
        if j is not None:  # a key the protected shards lack (dropped at merge) stays clean
            canvases[i], captions[i], mask[i] = protected.canvases[j], protected.captions[j], True
    return Pairs(clean.keys, canvases, captions, labels, clean.classes, protected_mask=mask, clean=clean)
