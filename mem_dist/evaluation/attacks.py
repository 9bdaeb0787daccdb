"""Attacks on a condition's whole training set, run once before a victim trains on it.

Unlike the per-batch defences of :mod:`mem_dist.evaluation.defences`, these see every
training pair at once, as a trainer who scraped the data and cleans it before training
would. They are aimed at protections whose perturbation is a function of the caption (the
``keyed`` method: delta = +-eps on a grid of blocks whose signs are a secret projection of
the caption's text embedding):

  ``defence.removal``    ``ridge``: embed every caption with a text encoder of the attacker's
                         own (``defence.removal_model``, ``defence.removal_pretrained``), fit a
                         ridge regression (``defence.removal_alpha``) from the embeddings to the
                         centred pixels over the whole training set, and subtract its prediction
                         from every image; ``ridge_highpass``: the same, fitted to the high-pass
                         residual (image minus a box blur of radius ``defence.removal_blur``), so
                         the caption-correlated low frequencies (the class's typical shape)
                         stay. Whatever in the pixels is linearly predictable from the caption is
                         taken out; the dataset mean image stays.
  ``defence.recaption``  ``templates``: every caption replaced by the sample's class name (json
                         ``class``) in one of :data:`RECAPTION_TEMPLATES` (a seeded choice per
                         sample), ten paraphrases that share no template with the importer's
                         captions nor with the zero-shot prompts: a caption-keyed code loses the
                         caption it was keyed on.

Removal runs first (on the captions as distributed), then recaptioning. Both act on the
training pairs that :func:`mem_dist.evaluation.pairs.load_condition` produces, so both victim
kinds get them; a mix's ``clean`` pairs (the owner's originals, for the leakage score) are
left as they are.

Shapes: N samples, H/W canvas side, C = 3 channels, P = H*W*C pixels per image, E the
attacker's embedding width, U distinct captions.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mem_dist.pipeline.config import seed_of
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.tools.importers import CAPTION_TEMPLATES, fill_template

if TYPE_CHECKING:
    from mem_dist.evaluation.eval_config import EvalConfig
    from mem_dist.evaluation.pairs import Pairs

Log = Callable[[str], None]

RECAPTION_TEMPLATES = (
    "an image showing a {c}",
    "this is a {c}",
    "a {c} on display",
    "a snapshot of one {c}",
    "here we see a {c}",
    "a {c}, photographed up close",
    "an example of a {c}",
    "a catalogue shot of the {c}",
    "someone's {c} pictured alone",
    "one {c} against a plain backdrop",
)
"""The recaptioning attacker's templates; ``{c}`` is the class name. None is one of
:data:`mem_dist.tools.importers.CAPTION_TEMPLATES` (the importer's captions and the default
zero-shot prompts), so the victim is never scored with the very sentences it trained on."""

assert not set(RECAPTION_TEMPLATES) & set(CAPTION_TEMPLATES)


def attack_pairs(pairs: "Pairs", cfg: "EvalConfig", name: str, log: Log = print) -> "Pairs":
    """The training pairs after ``cfg.defence``'s dataset-level attacks (``pairs`` itself when
    none is on). ``name`` is the condition's, for errors and the log."""
    d = cfg.defence
    if d.removal == "none" and d.recaption == "none":
        return pairs
    canvases, captions = pairs.canvases, list(pairs.captions)
    if d.removal != "none":
        from mem_dist.evaluation.eval_config import resolve_device

        device = resolve_device(cfg.device)
        features_NE = embed_captions(captions, d.removal_model, d.removal_pretrained, device, seed_of(cfg.seed, "removal"))
        canvases, explained, of_pixels = ridge_removal(canvases, features_NE, d.removal_alpha,
                                                       d.removal_blur if d.removal == "ridge_highpass" else None, device)
        target = "pixel variance" if d.removal == "ridge" else f"high-pass variance (blur radius {d.removal_blur} px)"
        also = "" if d.removal == "ridge" else f", {of_pixels:.1%} of the pixel variance"
        log(f"mem-dist: evaluate: condition '{name}': {d.removal} removal explained {explained:.1%} of the training "
            f"images' {target}{also} from the captions ({d.removal_model}, alpha {d.removal_alpha:g}, {len(captions)} images)")
    if d.recaption != "none":
        overlap = set(RECAPTION_TEMPLATES) & set(cfg.zero_shot_templates)
        if overlap:
            raise ConfigError(f"config key 'zero_shot_templates': shares the template '{sorted(overlap)[0]}' with "
                              f"defence.recaption's; the victim would be scored on its own training sentences")
        captions = recaption(captions, pairs.labels, pairs.classes, seed_of(cfg.seed, "recaption"), name)
        log(f"mem-dist: evaluate: condition '{name}': {len(captions)} captions replaced by class-name templates")
    return dataclasses.replace(pairs, canvases=canvases, captions=captions)


# --------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_captions(captions: Sequence[str], model: str, pretrained: str | None, device: torch.device | str = "cpu",
                   seed: int = 0, chunk: int = 256) -> np.ndarray:
    """Unit-normalised text embeddings float32 [N, E] of ``captions`` from the attacker's
    encoder (``model``: an open_clip name or model-config JSON; ``pretrained``: a local
    checkpoint or None for an init seeded by ``seed``). Each distinct caption is embedded once."""
    from mem_dist.pipeline.surrogate import create_surrogate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            clip, tokenizer, _ = create_surrogate(model, pretrained, device, key="defence.removal",
                                                  pretrained_key="defence.removal_pretrained")
        except ConfigError as e:  # create_surrogate names '{key}.model'
            raise ConfigError(str(e).replace("'defence.removal.model'", "'defence.removal_model'")) from None
    clip.eval()
    unique = sorted(set(captions))
    rows = []
    for start in range(0, len(unique), chunk):
        tokens = tokenizer(unique[start:start + chunk]).to(device)
        rows.append(F.normalize(clip.encode_text(tokens).float(), dim=-1).cpu())
    emb_UE = torch.cat(rows).numpy().astype(np.float32)
    where = {c: i for i, c in enumerate(unique)}
    return emb_UE[[where[c] for c in captions]]


def box_blur(pixels_NCHW: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2 radius + 1)^2 box around each pixel, per channel; edges replicated."""
    padded = F.pad(pixels_NCHW, (radius,) * 4, mode="replicate")
    return F.avg_pool2d(padded, 2 * radius + 1, stride=1)


def ridge_removal(canvases_NHWC: np.ndarray, features_NE: np.ndarray, alpha: float, blur: int | None = None,
                  device: torch.device | str = "cpu", chunk: int = 512) -> tuple[np.ndarray, float, float]:
    """Subtract from every image the ridge prediction of its pixels (``blur`` None) or of its
    high-pass residual (image minus :func:`box_blur` of radius ``blur``) from its caption's
    features, fitted over all N images in closed form.

    The features are centred (an unpenalised intercept: the prediction averages zero over the
    set, so the dataset's mean image stays) and divided by one common scale, their RMS per
    dimension, not standardised feature by feature: a unit-normalised embedding's
    dimensions already share a scale, and z-scoring would blow dimensions that barely vary
    (float noise of a random-init encoder) up to the same weight as the informative ones.
    The common scale makes ``alpha`` independent of how spread the encoder's embeddings are
    (a random-init encoder's nearly parallel ones would otherwise be shrunk to nothing):
    alpha is weighed against N times a unit per-dimension variance.

    Returns:
        (uint8 [N, H, W, C] images, clipped to [0, 255] and rounded; the share of the target's
        variance (centred pixels or centred high-pass residual) the fit explained in-sample;
        the same explained sum of squares as a share of the centred pixel variance)
    """
    N = len(canvases_NHWC)
    X = torch.from_numpy(np.asarray(features_NE, np.float64))
    X = X - X.mean(0)
    scale = float(X.pow(2).mean().sqrt())
    if N < 2 or scale == 0:  # one caption for everything: nothing is predictable from it
        return canvases_NHWC.copy(), 0.0, 0.0
    Xs_NE = (X / scale).to(device)
    E = Xs_NE.shape[1]

    def pixels(lo: int, hi: int) -> torch.Tensor:
        """Images lo..hi as float32 [n, C, H, W] on ``device`` (flattened: [n, P], channel-major)."""
        return torch.from_numpy(canvases_NHWC[lo:hi]).to(device).float().permute(0, 3, 1, 2)

    def target(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels [n, P], regression target [n, P]) of images lo..hi."""
        px = pixels(lo, hi)
        t = px if blur is None else px - box_blur(px, blur)
        return px.flatten(1), t.flatten(1)

    # one pass: X'T, the target's and the pixels' sums and sums of squares (X is centred,
    # so X'T = X'(T - mean T))
    XtT = torch.zeros(E, canvases_NHWC[0].size, dtype=torch.float64, device=device)
    t_sq, p_sq = 0.0, 0.0
    t_sum = torch.zeros(canvases_NHWC[0].size, dtype=torch.float64, device=device)
    p_sum = torch.zeros_like(t_sum)
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        px, t = target(lo, hi)
        XtT += (Xs_NE[lo:hi].float().t() @ t).double()
        t_sum += t.double().sum(0)
        p_sum += px.double().sum(0)
        t_sq += float(t.double().pow(2).sum())
        p_sq += float(px.double().pow(2).sum())
    t_total = t_sq - float(t_sum.pow(2).sum()) / N  # centred sums of squares
    p_total = p_sq - float(p_sum.pow(2).sum()) / N

    G_EE = Xs_NE.t() @ Xs_NE
    W_EP = torch.linalg.solve(G_EE + alpha * torch.eye(E, dtype=G_EE.dtype, device=device), XtT)
    # in-sample explained sum of squares: |T|^2 - |T - XW|^2 = 2 <W, X'T> - <W, X'X W>
    explained_ss = float(2 * (W_EP * XtT).sum() - (W_EP * (G_EE @ W_EP)).sum())

    W32 = W_EP.float()
    out = np.empty_like(canvases_NHWC)
    H, Wd, C = canvases_NHWC.shape[1:]
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        px = pixels(lo, hi).flatten(1)
        cleaned = (px - Xs_NE[lo:hi].float() @ W32).round().clamp(0, 255).to(torch.uint8)
        out[lo:hi] = cleaned.view(hi - lo, C, H, Wd).permute(0, 2, 3, 1).cpu().numpy()
    return out, explained_ss / t_total if t_total > 0 else 0.0, explained_ss / p_total if p_total > 0 else 0.0


# --------------------------------------------------------------------------------------
# Recaptioning
# --------------------------------------------------------------------------------------


def recaption(captions: Sequence[str], labels: np.ndarray | None, classes: dict[int, str], seed: int,
              name: str) -> list[str]:
    """Each caption replaced by its sample's class name in a seeded choice of
    :data:`RECAPTION_TEMPLATES`; a sample without a class is a ConfigError naming the condition."""
    missing = [i for i in range(len(captions)) if labels is None or int(labels[i]) not in classes]
    if missing:
        raise ConfigError(f"config key 'conditions.{name}': defence.recaption templates needs every training sample's "
                          f"class name (json 'class', as mem-dist import writes it); {len(missing)} of {len(captions)} "
                          f"have none (the first: caption {captions[missing[0]]!r})")
    rng = random.Random(seed)
    return [fill_template(rng.choice(RECAPTION_TEMPLATES), classes[int(label)]) for label in labels]
