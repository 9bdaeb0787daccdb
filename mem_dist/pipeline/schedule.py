"""The learning-rate schedule of UC's perturbation optimiser and of both victims (CLIP and
classifier): open_clip's cosine, with an optional linear warm-up. (MEM's surrogate keeps
a constant rate, as the authors' code does.)"""

from __future__ import annotations

import math


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base_lr
