"""Captions, tokens and triggers.

The trigger is text: k tokens written as words before the caption. Only tokens that come
back as the same single token when written as text and tokenised again are candidates
(never SOT/EOT/pad), so tokenising ``trigger_text + " " + caption`` gives the trigger ids
at positions 1..k, exactly what the surrogate was optimised on.

Shapes: B batch, k trigger length, L context length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Sequence

import numpy as np
import torch

from mem_dist.pipeline.config_io import ConfigError


def _word(tokenizer, token_id: int) -> str | None:
    token = tokenizer.decoder[token_id]
    return token[: -len("</w>")] if token.endswith("</w>") else None


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def vocabulary_hash(tokenizer) -> str:
    """A short hash of a BPE tokenizer's vocabulary and special tokens."""
    blob = json.dumps([sorted(tokenizer.encoder.items()), tokenizer.sot_token_id, tokenizer.eot_token_id]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _round_trip_ids(tokenizer) -> tuple[int, ...]:
    """The round-trip tokens of ``tokenizer``: read from ``assets/round-trip-{hash}.npy`` when
    the package ships them for its vocabulary (CLIP's BPE: seconds saved in every process),
    else computed (:func:`compute_round_trip_ids`)."""
    shipped = os.path.join(ASSETS, f"round-trip-{vocabulary_hash(tokenizer)}.npy")
    if os.path.exists(shipped):
        return tuple(int(i) for i in np.load(shipped))
    return compute_round_trip_ids(tokenizer)


def compute_round_trip_ids(tokenizer) -> tuple[int, ...]:
    specials = {0, tokenizer.sot_token_id, tokenizer.eot_token_id}
    probe = tokenizer.encode("a")
    ids = []
    for token_id in range(len(tokenizer.encoder)):
        word = _word(tokenizer, token_id)
        if token_id in specials or word is None:
            continue
        # Alone and followed by a word: a trigger word must stay one token in context.
        if tokenizer.encode(word) == [token_id] and tokenizer.encode(word + " a") == [token_id] + probe:
            ids.append(token_id)
    return tuple(ids)


def trigger_vocabulary(tokenizer, size: int = 0, seed: int = 0) -> np.ndarray:
    """Token ids a trigger may use.

    Args:
        tokenizer: an open_clip SimpleTokenizer (CLIP BPE).
        size: 0 = every round-trip token (about 33k for CLIP BPE, the paper's full
            vocabulary minus special tokens); N = N alphabetic words (3+ letters) chosen
            by a seeded shuffle, for triggers that read as words and recur often.
        seed: the shuffle's seed.

    Returns:
        Sorted int64 array of token ids.
    """
    if not hasattr(tokenizer, "decoder"):
        raise ConfigError(f"config key 'surrogate.model': the trigger needs open_clip's CLIP BPE tokenizer (SimpleTokenizer); "
                          f"this model's tokenizer is {type(tokenizer).__name__}")
    ids = np.array(_round_trip_ids(tokenizer), dtype=np.int64)
    if size:
        words = np.array([i for i in ids if (w := _word(tokenizer, int(i))).isalpha() and len(w) >= 3], dtype=np.int64)
        if size > len(words):
            raise ConfigError(f"config key 'experimental.mem.trigger_vocab': {size} exceeds the {len(words)} word tokens available")
        ids = np.sort(np.random.default_rng(seed).permutation(words)[:size])
    return ids


def trigger_text(tokenizer, trigger_ids: Sequence[int]) -> str:
    """The trigger as the words a caption starts with."""
    return " ".join(_word(tokenizer, int(i)) for i in trigger_ids)


def protected_caption(trigger: str, caption: str) -> str:
    """The caption as published: the trigger's words, a space, the caption (either may be empty)."""
    return f"{trigger} {caption}" if trigger and caption else trigger or caption


def caption_ids(tokenizer, caption: str) -> list[int]:
    """BPE ids of a caption, without SOT/EOT (encode applies open_clip's cleaning)."""
    return tokenizer.encode(caption)


def assemble_tokens(body_ids: Sequence[Sequence[int]], trigger_BK: torch.Tensor, tokenizer) -> torch.Tensor:
    """Token matrix [B, L] of SOT + trigger + caption + EOT, truncated as open_clip does.

    Equal to ``tokenizer([protected_caption(trigger_text(t), c)])`` for round-trip triggers.
    """
    ctx = tokenizer.context_length
    B, k = trigger_BK.shape
    out = np.zeros((B, ctx), dtype=np.int64)
    out[:, 0] = tokenizer.sot_token_id
    out[:, 1:1 + k] = trigger_BK.numpy()  # k <= 20 < ctx - 1 (mem.trigger_len's bound)
    for b, body in enumerate(body_ids):
        n = min(len(body), ctx - 2 - k)  # the caption, cut so that EOT still fits
        out[b, 1 + k:1 + k + n] = body[:n]
        out[b, 1 + k + n] = tokenizer.eot_token_id
    return torch.from_numpy(out)


def with_trigger(base_BL: torch.Tensor, trigger_Nk: torch.Tensor) -> torch.Tensor:
    """Token matrix [N, L] of N = r * B triggers, each with its sample's caption, from
    ``base_BL``, the batch's :func:`assemble_tokens` with any trigger of the same length k:
    the base repeated r times, the triggers written at positions 1..k. Equal to
    ``assemble_tokens(bodies * r, trigger_Nk)``, computed where the base lives (no host
    round trip inside PGD's and HotFlip's loops)."""
    out = base_BL.repeat(len(trigger_Nk) // len(base_BL), 1)
    out[:, 1:1 + trigger_Nk.shape[1]] = trigger_Nk
    return out


def initial_triggers(keys: Sequence[str], vocab: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Random start triggers [B, k], a function of (seed, key) alone so that any rank,
    any order and any resume give the same start."""
    out = np.zeros((len(keys), k), dtype=np.int64)
    for b, key in enumerate(keys):
        rng = np.random.default_rng([seed, *key.encode()])
        out[b] = vocab[rng.integers(0, len(vocab), size=k)]
    return out
