"""The surrogate CLIP: open_clip model creation, the contrastive loss, the pixel path.

Shapes: B batch, L context length (77), D text width, E embedding dim, H/W canvas side,
h/w model input side, C = 3 channels. Pixel tensors are float in [0, 255] units.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mem_dist.pipeline import storage, towers
from mem_dist.pipeline.config_io import ConfigError

LOGIT_SCALE_MAX = math.log(100.0)


class _QuietRandomInit(logging.Filter):
    """open_clip warns "No pretrained weights loaded" at every random init; mem-dist means it
    (nothing is ever downloaded), so the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())


@dataclass(frozen=True)
class PixelSpec:
    """How canvas pixels reach the model: resize to ``size`` and normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def resolve_model_name(model: str, key: str = "surrogate") -> str:
    """An open_clip model name for ``model``: a registered name as is, or a model-config
    JSON path, registered under its file stem. Errors name the config key ``{key}.model``."""
    if model.endswith(".json"):
        if not os.path.exists(model):
            raise ConfigError(f"config key '{key}.model': model-config file not found: {model}")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model not in open_clip.list_models():
        raise ConfigError(f"config key '{key}.model': unknown open_clip model '{model}' (see open_clip.list_models(), or give a model-config .json path)")
    return model


def create_surrogate(model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                     key: str = "surrogate", pretrained_key: str | None = None) -> tuple[nn.Module, object, PixelSpec]:
    """Build an open_clip CLIP, its tokenizer and its pixel spec. Nothing is downloaded.

    Args:
        model: open_clip model name or model-config JSON path.
        pretrained: None for random init, or a local checkpoint file (or a folder with
            open_clip_config.json + weights, loaded as ``local-dir:``).
        device: where the model lives.
        key: the config section errors name ("victim" for evaluate's victim).
        pretrained_key: the config key errors about ``pretrained`` name (default
            ``{key}.pretrained``).

    Returns:
        (model, tokenizer, pixel spec); with open_clip's forward made cheaper where that is
        exact (:mod:`mem_dist.pipeline.towers`: a length-aware text tower, the RN attention pool's one
        query, the RN tower's weights channels-last).
    """
    name = resolve_model_name(model, key)
    pretrained_key = pretrained_key or f"{key}.pretrained"
    if pretrained is not None and not os.path.exists(pretrained):
        raise ConfigError(f"config key '{pretrained_key}': checkpoint not found: {pretrained} (weights are never downloaded)")
    try:
        if pretrained is not None and os.path.isdir(pretrained):
            clip = open_clip.create_model(f"local-dir:{pretrained}", device=device, load_weights=False)
            load_weights(clip, checkpoint_in(pretrained))
        else:
            clip = open_clip.create_model(name, device=device)
            if pretrained is not None:
                load_weights(clip, pretrained)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a checkpoint of another model, not a checkpoint at all, or a tower needing transformers
        if pretrained is None:
            raise ConfigError(f"config key '{key}.model': open_clip cannot build '{model}' here ({_first_line(e)})") from e
        raise ConfigError(f"config key '{pretrained_key}': {pretrained} does not load into model '{model}' ({_first_line(e)})") from e
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # HuggingFace tokenizers need transformers and a download
        raise ConfigError(f"config key '{key}.model': the tokenizer of '{model}' does not load ({_first_line(e)})") from e
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    towers.use_length_aware_text(clip)
    towers.use_first_query_pool(clip)
    towers.use_channels_last(clip)
    return clip, tokenizer, PixelSpec(int(size), mean, std)


def checkpoint_in(folder: str) -> str:
    """The weights file of an open_clip folder checkpoint (open_clip_config.json beside it),
    safetensors first, as open_clip picks it."""
    names = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".pth", ".pt")))
    if not names:
        raise FileNotFoundError(f"no weights file (.safetensors, .bin, .pth) in {folder}")
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "pytorch_model.bin", "model.pth"]
    names.sort(key=lambda n: (preferred.index(n) if n in preferred else len(preferred), not n.endswith(".safetensors")))
    return os.path.join(folder, names[0])


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, never unpickling code: safetensors, or torch.load with
    weights_only=True (open_clip's own loader calls torch.load without it in older versions).
    Accepts open_clip_train's checkpoints ({"state_dict": ..., "module." prefixes})."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(clip: nn.Module, path: str) -> None:
    """Load a checkpoint into an open_clip model the way open_clip.load_checkpoint does (its
    format conversions, position embeddings resized), from :func:`read_weights`."""
    from open_clip import factory, model as oc_model

    sd = read_weights(path)
    if hasattr(factory, "convert_state_dict"):
        sd = factory.convert_state_dict(clip, sd)
    if "positional_embedding" in sd and not hasattr(clip, "positional_embedding"):
        sd = oc_model.convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        mine = getattr(clip, key, None)
        if key in sd and mine is not None and sd[key].ndim != mine.ndim:
            sd[key] = sd[key].reshape(mine.shape)
    if "logit_bias" not in sd and getattr(clip, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)
    oc_model.resize_pos_embed(sd, clip)
    if hasattr(oc_model, "resize_text_pos_embed"):
        oc_model.resize_text_pos_embed(sd, clip)
    clip.load_state_dict(sd, strict=True)


def _first_line(e: Exception, limit: int = 160) -> str:
    """The informative line of a load error, shortened (state-dict errors list every key)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    elif lines and lines[0].startswith("Weights only load failed"):  # torch.load's long advice
        lines = ["not a torch checkpoint of tensors (torch.load with weights_only=True failed)"]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def same_tokenizer(a, b) -> bool:
    """Whether two open_clip tokenizers give the same ids (same kind, same context length,
    same ids for a probe sentence): ensemble members must, since the trigger is one text."""
    probe = ["a photo of 2 red cats, naïve café at the top-left"]
    return (type(a) is type(b) and getattr(a, "context_length", None) == getattr(b, "context_length", None)
            and torch.equal(a(probe), b(probe)))


def save(obj, url: str) -> None:
    """torch.save ``obj`` (a state dict, or a checkpoint dict) to any fsspec URL, atomically;
    a state dict written here loads as ``pretrained`` in :func:`create_surrogate`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes_atomic(url, buf.getvalue())


def to_model_input(pixels_BCHW: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """Differentiable canvas -> model input: [0,255] pixels, resized (bilinear, antialiased)
    to the model's side, normalised with its mean/std."""
    x = pixels_BCHW / 255.0
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    # Canvases arrive as permuted HWC (channels-last strides); on the CPU, torch 2.14's
    # backward through MobileCLIP's image tower corrupts the heap on such input.
    return ((x - mean) / std).contiguous()


def clip_loss(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE: (CE over image->text row i + CE over text->image column i) / 2.

    Features are L2-normalised here; the batch mean of the result is CLIP's loss.
    """
    image_BE = F.normalize(image_BE.float(), dim=-1)
    text_BE = F.normalize(text_BE.float(), dim=-1)
    scale = logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp()
    logits = scale * image_BE @ text_BE.t()
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none")) / 2


def unwrap(model: nn.Module) -> nn.Module:
    """The bare open_clip model under DDP / torch.compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding & co (CLIP keeps them on itself, CustomTextCLIP under .text)."""
    model = unwrap(model)
    return model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model


def token_embedding_weight(model: nn.Module) -> torch.Tensor:
    return text_tower(model).token_embedding.weight


def encode_text_from_embeds(model: nn.Module, emb_BLD: torch.Tensor, ids_BL: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text, starting from token embeddings (HotFlip needs their gradient).

    The model's own ``encode_text(ids)`` runs with its token-embedding lookup replaced by
    ``emb_BLD``, so every text tower open_clip builds (causal or padding masks, CoCa's
    appended class token, any pooling) is followed exactly; equal to ``encode_text(ids)``
    when ``emb_BLD = token_embedding(ids)``. A length-aware tower
    (:func:`towers.use_length_aware_text`) runs each sequence only up to its end token.
    """
    if getattr(unwrap(model), "_length_aware", False):
        return towers.encode_text_by_length(unwrap(model), ids_BL, emb_BLD)
    handle = text_tower(model).token_embedding.register_forward_hook(lambda module, inputs, output: emb_BLD)
    try:
        return unwrap(model).encode_text(ids_BL)
    finally:
        handle.remove()


def logit_scale(model: nn.Module) -> torch.Tensor:
    return unwrap(model).logit_scale


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the paper's code: no decay on biases, norms (ndim < 2) and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "bn" in name or "ln" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of the surrogates and the CLIP victims (:func:`param_groups`), fused (one kernel
    for all of a step's arithmetic; equal to the loop implementation up to float rounding) on
    the devices torch fuses it for."""
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type in ("cpu", "cuda"))
