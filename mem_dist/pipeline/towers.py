"""Exact shortcuts through open_clip's towers: the features and gradients open_clip's own
forward gives, up to float rounding, for less work. Each is used only where it is exact
(checked per model); any other model runs as open_clip built it.

    text   use_length_aware_text   encode_text runs each caption only up to its end token, and
                                   the last block for the pooled row alone
    image  use_first_query_pool    ModifiedResNet's attention pool computes only the query it
                                   returns (the feature map's mean)
           fold_batchnorm          a copy of a ModifiedResNet with its eval-mode BatchNorms
                                   folded into the convolutions: what the sample phase
                                   (PGD, HotFlip, the round's losses) runs
           use_channels_last       ModifiedResNet's convolution weights (and so its
                                   activations) in channels-last memory order

All take bare open_clip models (no DDP wrapper). Shapes: B batch, L context length, D width.
"""

from __future__ import annotations

import copy

import open_clip.model
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# --------------------------------------------------------------------------------------
# Text: only up to the end token
# --------------------------------------------------------------------------------------


LENGTH_BUCKET = 4
"""Sequences are run in groups padded to a multiple of this many tokens."""


def supports_length_aware_text(m: nn.Module) -> bool:
    """Whether :func:`encode_text_by_length` computes exactly what ``m.encode_text`` does:
    open_clip's CLIP with its own text tower, causal attention and pooling at the end token
    (the highest id), so no position after a sequence's end token can change its features."""
    return (type(m) is open_clip.model.CLIP and getattr(m, "text_pool_type", None) == "argmax"
            and getattr(m, "attn_mask", None) is not None and not getattr(m.transformer, "grad_checkpointing", False)
            and m.transformer.batch_first and all(type(r) is ResidualAttentionBlock for r in m.transformer.resblocks))


def encode_text_by_length(m: nn.Module, ids_BL: torch.Tensor, emb_BLD: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's encode_text with each sequence run only up to its end token: sequences are
    grouped by length (rounded up to LENGTH_BUCKET), each group cut to its length, the
    causal mask and positional embeddings with it, and the last block computed for the
    pooled row alone (:func:`last_block_at`). Equal to ``m.encode_text(ids_BL)`` up to
    float rounding (the padding after the end token never reaches the pooled token, nor
    does any other row of the last block), at a fraction of the cost when captions are
    shorter than the context (CLIP's is 77).

    Args:
        m: a model for which :func:`supports_length_aware_text` holds.
        ids_BL: token ids; the end token is the highest id of each row (CLIP BPE's EOT).
        emb_BLD: token embeddings to use instead of looking ids up (HotFlip's gradient path).
    """
    cast = m.transformer.get_cast_dtype()
    ends = ids_BL.argmax(dim=-1)  # the pooled position
    padded = ((ends + LENGTH_BUCKET) // LENGTH_BUCKET * LENGTH_BUCKET).clamp(max=ids_BL.shape[1])
    order = torch.argsort(padded, stable=True)
    # one lookup for all groups: its backward writes one dense [V, D] gradient, not one per group
    emb_BLD = m.token_embedding(ids_BL[:, :int(padded.max())]) if emb_BLD is None else emb_BLD
    pieces = []
    for length in torch.unique_consecutive(padded[order]).tolist():
        idx = order[padded[order] == length]
        x = emb_BLD[idx, :length]
        x = x.to(cast) + m.positional_embedding[:length].to(cast)
        for block in m.transformer.resblocks[:-1]:
            x = block(x, attn_mask=m.attn_mask[:length, :length])
        pieces.append(m.ln_final(last_block_at(m.transformer.resblocks[-1], x, ends[idx])))
    x = torch.cat(pieces)[torch.argsort(order)]
    if m.text_projection is not None:
        x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
    return x


def last_block_at(block: nn.Module, x_BLD: torch.Tensor, rows_B: torch.Tensor) -> torch.Tensor:
    """A causal ResidualAttentionBlock's output at one position per sequence, [B, D]: that
    row's query against the keys and values up to it, then its MLP. Equal to
    ``block(x, causal mask)[arange(B), rows_B]``; the other rows' queries, output
    projections and MLPs (most of a block's cost) are not computed."""
    at = torch.arange(len(x_BLD), device=x_BLD.device)
    h = block.ln_1(x_BLD)
    after = torch.arange(x_BLD.shape[1], device=x_BLD.device) > rows_B[:, None]  # the causal mask's row
    a = block.attn(h[at, rows_B].unsqueeze(1), h, h, need_weights=False, key_padding_mask=after)[0][:, 0]
    x = x_BLD[at, rows_B] + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def use_length_aware_text(m: nn.Module) -> bool:
    """Make ``m.encode_text`` (and so its forward, under DDP too) length-aware where that
    is exact (:func:`supports_length_aware_text`); returns whether it did."""
    if not supports_length_aware_text(m):
        return False

    def encode_text(text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = encode_text_by_length(m, text)
        return F.normalize(x, dim=-1) if normalize else x

    m.encode_text = encode_text  # an instance attribute: CLIP.forward calls self.encode_text
    m._length_aware = True
    return True


# --------------------------------------------------------------------------------------
# Image: ModifiedResNet (the RN surrogates)
# --------------------------------------------------------------------------------------


class FirstQueryAttentionPool2d(AttentionPool2d):
    """open_clip's AttentionPool2d computing only the row it returns. The pool attends from
    the feature map's mean and from every position, then keeps the mean's row; attention rows
    are independent (no mask), so the other rows' queries and output projections (49 of 50
    rows for RN50 at 224 px: 5% of its forward FLOPs, 12.2 -> 11.6 GFLOP an image) change
    nothing and are skipped.
    Installed as the pool's class by :func:`use_first_query_pool` (same parameters, same
    state-dict keys)."""

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False)
        return out[0]


def use_first_query_pool(model: nn.Module) -> bool:
    """Make a ModifiedResNet image tower's attention pool a :class:`FirstQueryAttentionPool2d`
    (in place); returns whether the model has such a pool."""
    pool = getattr(getattr(model, "visual", None), "attnpool", None)
    if type(pool) is not AttentionPool2d:
        return False
    pool.__class__ = FirstQueryAttentionPool2d
    return True


def use_channels_last(model: nn.Module) -> bool:
    """Store a ModifiedResNet image tower's 4-D weights channels-last (in place), so that its
    convolutions, and the activations between them, run in the memory order oneDNN prefers
    (cuDNN too, with tensor cores; not measured here): the same values, only their layout.
    The tiny RN's forward and backward on this CPU: 29-31 -> 22-24 ms (to the pixels,
    folded), 52-59 -> 40 ms (training). Returns whether the model has such a tower."""
    visual = getattr(model, "visual", None)
    if type(visual) is not ModifiedResNet:
        return False
    visual.to(memory_format=torch.channels_last)
    return True


def fold_batchnorm(visual: nn.Module) -> nn.Module | None:
    """A copy of a ModifiedResNet image tower in eval mode with each BatchNorm folded into
    the convolution before it (eval-mode BatchNorm is a per-channel affine map), no parameter
    requiring a gradient: the tower's function up to float rounding, without BatchNorm's
    forward and backward passes (about a fifth of the tiny RN's forward + backward, which PGD
    runs in every step). A copy (the tower's size again in memory: 150 MB for RN50), so it
    must be made again whenever the tower's weights or running statistics change. None for
    any other tower."""
    if type(visual) is not ModifiedResNet:
        return None
    folded = copy.deepcopy(visual).eval().requires_grad_(False)
    pairs = [(folded, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]  # the stem
    for block in folded.modules():
        if type(block) is Bottleneck:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))  # (avg pool "-1"), conv "0", BatchNorm "1"
    for parent, conv, bn in pairs:
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())
    return folded  # in the tower's memory order (use_channels_last): the fused weights keep it
