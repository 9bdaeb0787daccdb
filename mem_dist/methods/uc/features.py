"""UC's surrogate: the image features (or caption embedding) k-means clusters and the
perturbations are optimised against. Shapes: N images, B batch, E feature dim, H/W canvas side, C = 3."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from mem_dist.pipeline import storage, surrogate
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import Shard

CHUNK = 256  # images per forward when embedding (the same on any rank, so features are too)



class FeatureNet:
    """The surrogate's image features of canvas pixels (float [B, C, H, W] in [0, 255]),
    differentiable: an open_clip image tower (UC-CLIP) or a torchvision classifier's
    penultimate layer (UC); and for an open_clip surrogate, its text tower's embedding of
    captions (:meth:`captions`). Frozen, in eval mode."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        name, weights = cfg.surrogate.model, cfg.surrogate.pretrained
        if cfg.surrogate.ensemble:
            raise ConfigError("config key 'surrogate.ensemble': method uc uses one surrogate")
        torch.manual_seed(cfg.seed)
        self.device, self.clip, self.tokenizer = device, None, None
        if name.startswith("torchvision:"):
            if cfg.uc.cluster_on == "caption":
                raise ConfigError("config key 'uc.cluster_on': caption needs an open_clip surrogate (its text tower); "
                                  f"{name} has none")
            self.model, self.spec = torchvision_features(name.split(":", 1)[1], weights, cfg.data.image_size, device)
            self.encode = self.model
        else:
            self.clip, self.tokenizer, self.spec = surrogate.create_surrogate(name, weights, device)
            self.clip.eval().requires_grad_(False)
            self.model = self.clip.visual
            self.encode = self.clip.encode_image
        self.model.eval().requires_grad_(False)

    def __call__(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        return self.encode(surrogate.to_model_input(pixels_BCHW, self.spec)).float()

    @torch.no_grad()
    def captions(self, texts: list[str]) -> torch.Tensor:
        """The text tower's embedding [N, E] of captions, in fixed chunks."""
        out = [self.clip.encode_text(self.tokenizer(texts[s:s + CHUNK]).to(self.device)).float()
               for s in range(0, len(texts), CHUNK)]
        return torch.cat(out) if out else torch.zeros(0, 0, device=self.device)



def torchvision_features(arch: str, weights: str | None, size: int, device) -> tuple[nn.Module, surrogate.PixelSpec]:
    """A torchvision classifier (a checkpoint of ``mem-dist evaluate``'s classifier victim, or
    any state dict of that architecture) with its last layer removed; the classifier victim's
    normalisation (mean 0.5, std 0.25), no resize."""
    import torchvision

    state_dict = None
    if weights is not None:
        try:
            with storage.open_file(weights, "rb") as f:
                state_dict = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"config key 'surrogate.pretrained': checkpoint not found: {weights}") from None
    n_classes = next((v.shape[0] for k, v in (state_dict or {}).items() if k.endswith(("fc.weight", "classifier.weight"))), 1000)
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=n_classes)
        if state_dict is not None:
            model.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"config key 'surrogate.model': torchvision classifier '{arch}' with {weights}: "
                          f"{str(e).splitlines()[0][:160]}") from None
    if hasattr(model, "fc"):
        model.fc = nn.Identity()
    elif isinstance(getattr(model, "classifier", None), nn.Sequential):
        model.classifier[-1] = nn.Identity()
    else:
        raise ConfigError(f"config key 'surrogate.model': cannot find the last layer of torchvision '{arch}' (fc or classifier)")
    return model.to(device), surrogate.PixelSpec(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))



@torch.no_grad()
def embed(net: FeatureNet, canvases_NHWC: np.ndarray, device) -> torch.Tensor:
    """Features [N, E] of uint8 canvases, in fixed chunks."""
    out = [net(torch.from_numpy(canvases_NHWC[s:s + CHUNK]).to(device).permute(0, 3, 1, 2).float())
           for s in range(0, len(canvases_NHWC), CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, 0, device=device)



def cluster_features(cfg: RunConfig, net: FeatureNet, shard: Shard, rows: np.ndarray | slice = slice(None)) -> torch.Tensor:
    """What k-means clusters, of ``shard``'s samples at ``rows`` (default all, without a copy of
    the canvases): their images' features, or (``uc.cluster_on: caption``) their captions' embedding."""
    if cfg.uc.cluster_on == "caption":
        return net.captions(np.asarray(shard.captions, dtype=object)[rows].tolist())
    return embed(net, shard.canvases[rows], net.device)

