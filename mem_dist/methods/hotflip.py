"""HotFlip on the text trigger: gradient-ranked candidates, then exact per-sample choice.

Shapes: B batch, k trigger length, D token-embedding width, V vocabulary, n candidates,
E joint embedding dim.

The paper's code ranks candidates by the first-order loss change -(grad . e_v) and then
applies the same candidate *rank* to the whole batch, judged by the batch loss. Here each
sample keeps whichever of {its current token, its n candidates} gives its own pair the
lowest loss (the rest of the batch held as it was), so a flip never raises the loss of
the sample it changes. The image features do not change during HotFlip, so they are
computed once and only the text tower runs, all n candidates of a position in one batched
forward. With an ensemble of surrogates
(``surrogate.ensemble``) candidates are ranked and chosen by the members' mean loss.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mem_dist.pipeline.surrogate import LOGIT_SCALE_MAX


def candidate_tokens(grads: Sequence[torch.Tensor], embeds: Sequence[torch.Tensor], allowed_V: torch.Tensor, n: int) -> torch.Tensor:
    """Top-``n`` replacement tokens per (sample, position) by first-order loss decrease.

    Args:
        grads: per surrogate, d(loss)/d(token embedding) at the trigger positions [B, k, D].
        embeds: per surrogate, its token-embedding matrix [V, D].
        allowed_V: ids that may be used (round-trip tokens, never special ones).
        n: candidates per position.

    Returns:
        Token ids [B, k, n], best first: by the sum of the surrogates' first-order changes
        (the change of their summed loss).
    """
    dots = None  # [B, k, |allowed|]: the first-order change is -dots
    for g, e in zip(grads, embeds):
        # one [B*k, D] x [D, |allowed|] product (a strided [B, k, D] would run as B small ones)
        d = (g.reshape(-1, g.shape[-1]).float() @ e[allowed_V].float().t()).view(*g.shape[:-1], -1)
        dots = d if dots is None else dots.add_(d)
    top = dots.topk(min(n, len(allowed_V)), dim=-1, largest=False).indices
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


def mean_pair_losses(images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor], logit_scales: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`pair_losses` averaged over the surrogates (one feature pair per surrogate)."""
    return torch.stack([pair_losses(i, t, s) for i, t, s in zip(images, texts, logit_scales)]).mean(0)


@torch.no_grad()
def select_triggers(
    text_features: Callable[[torch.Tensor], list[torch.Tensor]],
    images: Sequence[torch.Tensor],
    trigger_Bk: torch.Tensor,
    candidates_Bkn: torch.Tensor,
    logit_scales: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy left-to-right choice among the candidates, per sample, by the surrogates'
    mean loss.

    Args:
        text_features: triggers [r*B, k] (r blocks of the batch's B samples) -> per
            surrogate, normalised text features [r*B, E] of (trigger + the sample's own
            caption). A position's n candidates are scored in one call (r = n).
        images: per surrogate, normalised image features (fixed during HotFlip).
        trigger_Bk: current trigger ids.
        candidates_Bkn: from :func:`candidate_tokens`.
        logit_scales: per surrogate, its (log) temperature.

    Returns:
        (new trigger [B, k], per-sample mean loss after the last position [B]).
    """
    trigger = trigger_Bk.clone()
    B, k = trigger.shape
    n = candidates_Bkn.shape[2]
    text = text_features(trigger)
    for j in range(k):
        base_text = text
        best = mean_pair_losses(images, base_text, logit_scales)
        best_tok = trigger[:, j].clone()
        best_text = [t.clone() for t in base_text]
        trials = trigger.unsqueeze(0).repeat(n, 1, 1)  # [n, B, k]: candidate c at position j
        trials[:, :, j] = candidates_Bkn[:, j, :].t()
        all_text = text_features(trials.reshape(n * B, k))
        for c in range(n):
            trial_text = [t[c * B:(c + 1) * B] for t in all_text]
            loss = torch.stack([swapped_pair_losses(i, b, t, s) for i, b, t, s
                                in zip(images, base_text, trial_text, logit_scales)]).mean(0)
            better = loss < best
            best = torch.where(better, loss, best)
            best_tok = torch.where(better, candidates_Bkn[:, j, c], best_tok)
            for bt, tt in zip(best_text, trial_text):
                bt.copy_(torch.where(better[:, None], tt, bt))  # not bt[better] = ...: no device sync
        trigger[:, j] = best_tok
        text = best_text
    return trigger, mean_pair_losses(images, text, logit_scales)
