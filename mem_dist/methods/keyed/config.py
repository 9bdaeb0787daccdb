"""The ``keyed`` section (``method: keyed``). Light on purpose (no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mem_dist.pipeline.config_io import check


@dataclass(frozen=True)
class KeyedConfig:
    """Caption-keyed codes (``method: keyed``): δ = ±epsilon on a grid x grid code whose signs
    are a secret projection of the caption's embedding by the surrogate's text tower
    (``surrogate.model`` / ``surrogate.pretrained``; a public checkpoint in practice). Nothing
    is stored per sample: merge and verify compute δ from each caption and the run's key."""

    epsilon: int = 16
    """L-inf bound of delta, in 1/255 units (every cell of the code is +epsilon or -epsilon)."""
    grid: int = 2
    """Cells per side of the code, upsampled (nearest) to the canvas: 2 at 32 px = blocks of
    16 px, 12 signs per code. The coarser the grid, the earlier a victim learns the code
    (measured at 8, 4 and 2: docs/efficacy.md, "Caption-keyed codes")."""
    centre_samples: int = 10_000
    """The code projects each embedding minus the mean embedding of this many captions (the
    first of the shards, in order; computed once by generate and kept with the key): centred,
    the code spends its cells on what tells captions apart, not on what they share (without
    it, a random-init text tower gives two unrelated captions 80% of their cells alike). 0 =
    no centring."""
    generator: Literal["projection", "trained"] = "projection"
    """projection: the signs of the key's seeded ±1 projection of the embedding (no training).
    trained: that projection is the start; generate trains it (:mod:`mem_dist.methods.keyed.train`,
    gradients averaged across ranks) so that a CLIP learns the code fast, and keeps it, quantized,
    in key.json: merge and verify still compute δ from each caption, exactly."""
    train_objective: Literal["minmin", "surrogate"] = "minmin"
    """trained: what the code is trained to make easy. minmin: a fresh CLIP of the surrogate's
    architecture (its own random init) trained jointly with the code, both minimising its
    contrastive loss on (canvas + code, caption) (error-minimising noise from scratch: the code a
    new model picks up first); surrogate: the frozen surrogate's loss (T2UE's objective)."""
    train_steps: int = 300
    """trained: optimiser steps (gradients averaged across ranks)."""
    train_batch_size: int = 128
    """trained: pairs per rank per step (one contrastive batch on each rank, as DDP)."""
    key: str = ""
    """"": generate draws a secret key (32 random bytes) and keeps it in the run's private
    {output}/keyed/key.json. 64 hex digits: use that key (to publish several collections
    under one key). Anyone holding the key and a text encoder can subtract the code: keep it
    private like the rest of the run folder."""

    def __post_init__(self) -> None:
        check(1 <= self.epsilon <= 127, "keyed.epsilon", "must be between 1 and 127 (delta is int8)")
        check(self.grid >= 1, "keyed.grid", "must be at least 1")
        check(self.train_steps >= 1, "keyed.train_steps", "must be at least 1")
        check(self.train_batch_size >= 2, "keyed.train_batch_size", "must be at least 2 (a contrastive batch)")
        check(self.centre_samples >= 0, "keyed.centre_samples", "must be 0 (no centring) or more")
        check(self.key == "" or re.fullmatch(r"[0-9a-fA-F]{64}", self.key) is not None, "keyed.key",
              "must be empty (a new secret key) or 64 hex digits")


@dataclass(frozen=True)
class KeyedExperimental:
    """``experimental.keyed``: code shapes measured not to help (docs/efficacy.md, "Caption-keyed
    codes"), kept for the experiments that measured them."""

    mirror: bool = False
    """true: the code's right half mirrors its left half, so a horizontal flip (a classifier's
    usual augmentation) leaves it unchanged; a g x g code then has g * ceil(g/2) * 3 cells."""
    luminance: bool = False
    """true: one sign per cell for all three channels (g x g signs), so the code survives a
    grayscale copy, which undoes the default colour code."""
    train_lr: float = 1e-2
    """generator: trained: Adam's learning rate for the generator (its projection scaled so
    that W e starts at unit spread)."""
    train_model_lr: float = 5e-4
    """generator: trained, objective minmin: Adam's learning rate for the fresh CLIP."""
    train_tau: float = 0.3
    """generator: trained: the soft code trained in place of the signs is epsilon * tanh(W e / tau)."""
    train_crop_scale: tuple[float, float] = (0.9, 1.0)
    """generator: trained: the code is trained through random resized crops of this area
    fraction (open_clip's training crop is 0.9-1)."""
