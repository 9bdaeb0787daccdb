"""MEM's config sections: ``mem`` (what a user sets) and ``experimental.mem`` (ablations).

Light on purpose (no torch): :mod:`mem_dist.pipeline.config` builds them when any config is
read, ``generate --check`` included. The random / prefix controls read the ``mem`` section
too: they are the controls of its trigger length and epsilon.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mem_dist.pipeline.config_io import check


@dataclass(frozen=True)
class MemConfig:
    rounds: int = 20
    """T: outer rounds (surrogate phase, then a pass over every sample)."""
    surrogate_steps: int = 200
    """M: surrogate AdamW steps per round (DDP across ranks)."""
    pgd_steps: int = 8
    """PGD steps on delta per sample per round."""
    hotflip_rounds: int = 5
    """HotFlip updates the trigger in the first H rounds."""
    trigger_len: int = 3
    """k: trigger tokens prefixed to the caption; 0 = EM (image noise only)."""
    epsilon: int = 8
    """L-inf bound of delta, in 1/255 units (MEM and its random / prefix controls)."""
    step_size: int = 1
    """PGD step, in 1/255 units."""
    batch_size: int = 128
    """Samples per batch, per rank, in both phases."""
    lr: float = 1.0e-4
    """Surrogate AdamW learning rate (constant, as in the paper's code)."""
    weight_decay: float = 0.2
    """Surrogate AdamW weight decay (not on biases, norms, logit_scale)."""

    def __post_init__(self) -> None:
        for key in ("rounds", "batch_size", "epsilon", "step_size"):
            check(getattr(self, key) >= 1, f"mem.{key}", "must be at least 1")
        for key in ("surrogate_steps", "pgd_steps", "hotflip_rounds", "trigger_len"):
            check(getattr(self, key) >= 0, f"mem.{key}", "must be 0 or more")
        check(self.epsilon <= 127, "mem.epsilon", "must be at most 127 (delta is int8)")
        check(self.trigger_len <= 20, "mem.trigger_len", "must be at most 20")
        check(self.lr > 0, "mem.lr", "must be positive")


@dataclass(frozen=True)
class MemExperimental:
    """Ablations of MEM that only experiments/ and docs/efficacy.md set."""

    hotflip_candidates: int = 16
    """Candidate tokens per trigger position tried by HotFlip."""
    trigger_vocab: int = 0
    """Size of the trigger vocabulary: 0 = every token that survives the text round trip
    (the paper); N = the first N alphabetic words of a seeded shuffle of those tokens."""
    shuffle_captions: bool = True
    """PGD pairs each image (and its own trigger) with a caption shuffled inside the
    batch, so delta can only bind to the trigger (the paper's "_shuffle" runs). Ignored
    when trigger_len is 0 (EM): delta then minimises the loss of the true pairs."""
    augment: bool = False
    """Expectation over transformation: the surrogate sees each image through a random
    resized crop (scale 0.8-1) so delta survives a victim's crops."""

    def __post_init__(self) -> None:
        check(self.hotflip_candidates >= 1, "experimental.mem.hotflip_candidates", "must be at least 1")
        check(self.trigger_vocab >= 0, "experimental.mem.trigger_vocab", "must be 0 or more")


def mem_fingerprint(mem: MemConfig, experimental: MemExperimental, method: str, epsilon: int) -> dict[str, Any]:
    """The ``mem`` part of a run's fingerprint, in the layout every run so far recorded (one
    ``mem`` section that held the method name and the experimental keys; ``rounds`` left out
    so a finished run can be extended), so that existing run folders still resume."""
    out = {**dataclasses.asdict(mem), **dataclasses.asdict(experimental), "method": method, "epsilon": epsilon}
    out.pop("rounds")
    return out
