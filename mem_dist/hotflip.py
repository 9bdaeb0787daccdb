"""HotFlip on the text trigger: gradient-ranked candidates, then exact per-sample choice.

Shapes: B batch, k trigger length, D token-embedding width, V vocabulary, n candidates,
E joint embedding dim.

The paper's code ranks candidates by the first-order loss change -(grad . e_v) and then
applies the same candidate *rank* to the whole batch, judged by the batch loss. Here each
sample keeps whichever of {its current token, its n candidates} gives its own pair the
lowest loss (the rest of the batch held as it was), so a flip never raises the loss of
the sample it changes. The image features do not change during HotFlip, so they are
computed once and only the text tower runs per candidate.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mem_dist.surrogate import LOGIT_SCALE_MAX


def candidate_tokens(grad_BkD: torch.Tensor, embed_VD: torch.Tensor, allowed_V: torch.Tensor, n: int) -> torch.Tensor:
    """Top-``n`` replacement tokens per (sample, position) by first-order loss decrease.

    Args:
        grad_BkD: d(loss)/d(token embedding) at the trigger positions.
        embed_VD: the token-embedding matrix.
        allowed_V: ids that may be used (round-trip tokens, never special ones).
        n: candidates per position.

    Returns:
        Token ids [B, k, n], best first.
    """
    scores = -(grad_BkD.float() @ embed_VD[allowed_V].float().t())  # [B, k, |allowed|]
    top = scores.topk(min(n, len(allowed_V)), dim=-1).indices
    return allowed_V[top]


def pair_losses(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE of normalised features (as surrogate.clip_loss)."""
    scale = logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp()
    logits = scale * image_BE @ text_BE.t()
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none")) / 2


def swapped_pair_losses(image_BE: torch.Tensor, text_BE: torch.Tensor, new_text_BE: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Loss of pair i if only text i were replaced by ``new_text_BE[i]`` (vectorised over i).

    Row i (image i against all texts) changes in its diagonal entry; column i (text i
    against all images) is replaced as a whole.
    """
    scale = logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp()
    logits = scale * image_BE @ text_BE.t()  # [B, B]: image b vs text c
    new_pos = scale * (image_BE * new_text_BE).sum(-1)  # [B]
    row = logits.clone()
    row.diagonal().copy_(new_pos)
    i2t = torch.logsumexp(row, dim=1) - new_pos
    new_col = scale * new_text_BE @ image_BE.t()  # [B(text), B(image)]
    t2i = torch.logsumexp(new_col, dim=1) - new_pos
    return (i2t + t2i) / 2


@torch.no_grad()
def select_triggers(
    text_features: Callable[[torch.Tensor], torch.Tensor],
    image_BE: torch.Tensor,
    trigger_Bk: torch.Tensor,
    candidates_Bkn: torch.Tensor,
    logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy left-to-right choice among the candidates, per sample.

    Args:
        text_features: trigger [B, k] -> normalised text features [B, E] of
            (trigger + the sample's own caption).
        image_BE: normalised image features (fixed during HotFlip).
        trigger_Bk: current trigger ids.
        candidates_Bkn: from :func:`candidate_tokens`.
        logit_scale: the surrogate's (log) temperature.

    Returns:
        (new trigger [B, k], per-sample loss after the last position [B]).
    """
    trigger = trigger_Bk.clone()
    text = text_features(trigger)
    best = pair_losses(image_BE, text, logit_scale)
    for j in range(trigger.shape[1]):
        base_text = text
        best = pair_losses(image_BE, base_text, logit_scale)
        best_tok = trigger[:, j].clone()
        best_text = base_text.clone()
        for c in range(candidates_Bkn.shape[2]):
            trial = trigger.clone()
            trial[:, j] = candidates_Bkn[:, j, c]
            trial_text = text_features(trial)
            loss = swapped_pair_losses(image_BE, base_text, trial_text, logit_scale)
            better = loss < best
            best = torch.where(better, loss, best)
            best_tok = torch.where(better, candidates_Bkn[:, j, c], best_tok)
            best_text[better] = trial_text[better]
        trigger[:, j] = best_tok
        text = best_text
    return trigger, pair_losses(image_BE, text, logit_scale)
