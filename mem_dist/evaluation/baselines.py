"""Calibration points: the literature's label-keyed perturbations, as shards for ``mem-dist evaluate``.

``mem-dist baseline KIND SRC OUT`` perturbs labelled shards (``mem-dist import`` writes the
``label`` in each json) with one of the published availability attacks, reproduced at this
scale so that a victim can first show it reads what the literature says works
(../shared/reference/literature-efficacy.md). They use the true class labels, which a
caption collection does not have: evaluation baselines, not protection methods.

  block  a class-wise code of ``grid`` x ``grid`` blocks, each +eps or -eps (the issue's
         calibration code; Yu et al.'s synthetic noise reduced to signs)
  lsp    Yu et al. (KDD 2022), synthetic noise: per class a Gaussian cluster (scikit-learn's
         make_classification, class_sep 10) in 3 x (side/8)^2 dimensions, each sample a point
         of its class's cluster, upsampled to 8x8-pixel patches, L2-normalised to an RMS of
         6/255 (the authors' setting), then clipped to eps
  ar     Sandoval-Segura et al. (NeurIPS 2022), autoregressive: per class a random 3x3
         AR filter per channel (coefficients summing to 1, kept when stable: most such
         draws explode, and the authors too search for usable ones), a fresh random start
         per sample, generated at side + 4 and cropped by 4, scaled to the authors' L2 norm
         of 1 (RMS 4.6/255 at 32 px), then clipped to eps (L-inf-normalising to eps instead
         leaves a mean |delta| of 1.3/255, which no victim reads: 0.830 against clean's 0.847)
  em     Huang et al. (ICLR 2021), sample-wise error-minimising noise: min-min against a
         CIFAR-style ResNet-18 trained on the same labels (10 SGD steps, then 20 PGD steps of
         eps/10 on every sample, until the model's training accuracy on the perturbed data
         reaches 99% or ``em_rounds`` rounds pass)

Every sample keeps its key, caption and json; images are written as PNG (lossless), so the
victim reads exactly canvas + delta, |delta| <= eps/255. Shapes: N samples, H/W side, C = 3, K classes.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from mem_dist.evaluation import cifar_nets
from mem_dist.pipeline import storage
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import expand_shards, load_shard
from mem_dist.evaluation.pairs import read_labels

Log = Callable[[str], None]
KINDS = ("block", "lsp", "ar", "em")


def block_code(labels_N: np.ndarray, side: int, eps: int, seed: int, grid: int = 8) -> np.ndarray:
    """int16 [N, side, side, 3]: per class a random sign per (block, channel), blocks of side/grid px."""
    rng = np.random.default_rng([seed, 11])
    signs = rng.choice(np.array([-1, 1], np.int16), size=(int(labels_N.max()) + 1, grid, grid, 3))
    up = np.repeat(np.repeat(signs, -(-side // grid), 1), -(-side // grid), 2)[:, :side, :side]
    return eps * up[labels_N]


def lsp(labels_N: np.ndarray, side: int, eps: int, seed: int, patch: int = 8) -> np.ndarray:
    """Yu et al.'s synthetic noise, int16 [N, side, side, 3] (module docstring)."""
    from sklearn.datasets import make_classification

    k, n, grid = int(labels_N.max()) + 1, len(labels_N), -(-side // patch)
    dim = grid * grid * 3
    x, y = make_classification(n_samples=n * 2 + 10 * k, n_features=dim, n_informative=dim, n_redundant=0, n_repeated=0,
                               n_classes=k, class_sep=10.0, flip_y=0.0, n_clusters_per_class=1, random_state=seed % 2**31)
    out = np.zeros((n, grid, grid, 3), np.float64)
    for c in range(k):
        where = np.flatnonzero(labels_N == c)
        out[where] = x[y == c][: len(where)].reshape(-1, grid, grid, 3)
    img = np.repeat(np.repeat(out, patch, 1), patch, 2)[:, :side, :side]
    rms = np.sqrt((img.reshape(n, -1) ** 2).mean(1)).reshape(n, 1, 1, 1)
    return np.clip(np.rint(img / rms * 6.0), -eps, eps).astype(np.int16)


def _ar_generate(coeffs_N333: torch.Tensor, start_NCSS: torch.Tensor) -> torch.Tensor:
    """Run each sample's AR process over its random start (float64, in place), row by row."""
    size = start_NCSS.shape[-1]
    b = coeffs_N333.double()
    for i in range(size - 2):  # every sample at once
        for j in range(size - 2):
            start_NCSS[:, :, i + 2, j + 2] = (start_NCSS[:, :, i:i + 3, j:j + 3] * b).sum((2, 3))
    return start_NCSS


def ar_coefficients(k: int, side: int, crop: int, gen: torch.Generator, candidates: int = 3000,
                    chunk: int = 64) -> torch.Tensor:
    """k stable AR processes [k, 3, 3, 3]: random coefficients summing to 1 per channel (the
    authors' draw), kept when two trial signals neither explode nor vanish (peak under 6 x
    their RMS, as a Gaussian field of this size; the authors filter their draws too)."""
    c = torch.randn(candidates, 3, 3, 3, generator=gen)
    c[:, :, 2, 2] = 0  # the pixel being generated
    c /= c.sum((2, 3), keepdim=True)
    trial = torch.randn(candidates * 2, 3, side + crop, side + crop, generator=gen, dtype=torch.float64)
    good: list[int] = []
    for s in range(0, candidates, chunk):  # in order, until k are kept: the first k stable ones, as if all were tried
        n = min(chunk, candidates - s)
        sig = _ar_generate(c[s:s + n].repeat_interleave(2, 0), trial[2 * s:2 * (s + n)])[:, :, crop:, crop:]
        ratio = (sig.abs().amax((1, 2, 3)) / sig.pow(2).mean((1, 2, 3)).sqrt()).view(n, 2).amax(1)
        good += (s + torch.nonzero(torch.isfinite(ratio) & (ratio > 2) & (ratio < 6)).flatten()).tolist()
        if len(good) >= k:
            return c[good[:k]]
    raise ConfigError(f"ar: only {len(good)} of {candidates} random AR processes are stable, {k} classes need one each")


def ar(labels_N: np.ndarray, side: int, eps: int, seed: int, crop: int = 4, l2: float = 1.0) -> np.ndarray:
    """Sandoval-Segura et al.'s AR perturbations, int16 [N, side, side, 3] (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    coeffs = ar_coefficients(int(labels_N.max()) + 1, side, crop, gen)
    start = torch.randn(len(labels_N), 3, side + crop, side + crop, generator=gen, dtype=torch.float64)
    sig = _ar_generate(coeffs[torch.from_numpy(labels_N)], start)[:, :, crop:, crop:]
    sig = sig / sig.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 255 * l2  # the authors' budget: L2 norm l2 in [0, 1] units
    return torch.round(sig).clamp(-eps, eps).permute(0, 2, 3, 1).numpy().astype(np.int16)


def em(canvases_NHWC: np.ndarray, labels_N: np.ndarray, eps: int, seed: int, width: int = 16, rounds: int = 15,
       train_steps: int = 10, pgd_steps: int = 20, batch: int = 128, log: Log = print) -> np.ndarray:
    """Huang et al.'s sample-wise error-minimising noise, int16 [N, H, W, 3] (module docstring)."""
    torch.manual_seed(seed)
    k = int(labels_N.max()) + 1
    model = cifar_nets.build("cifar_resnet18", k, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.from_numpy(canvases_NHWC).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels_N)
    delta = torch.zeros_like(x)
    e, step = eps / 255, eps / 2550
    gen = torch.Generator().manual_seed(seed)

    def logits(px: torch.Tensor) -> torch.Tensor:
        return model((px - 0.5) / 0.25)

    for r in range(1, rounds + 1):
        start = time.time()
        model.train()
        for _ in range(train_steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            loss = F.cross_entropy(logits((x[idx] + delta[idx]).clamp(0, 1)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = clean = 0
        loss_sum = clean_loss_sum = 0.0
        for s in range(0, len(x), batch):
            xb, yb, db = x[s:s + batch], y[s:s + batch], delta[s:s + batch].clone()
            for _ in range(pgd_steps):
                db.requires_grad_(True)
                grad, = torch.autograd.grad(F.cross_entropy(logits((xb + db).clamp(0, 1)), yb), db)
                db = (db.detach() - step * grad.sign()).clamp(-e, e)
            delta[s:s + batch] = db
            with torch.no_grad():
                out, out_clean = logits((xb + db).clamp(0, 1)), logits(xb)
                correct += int((out.argmax(1) == yb).sum())
                clean += int((out_clean.argmax(1) == yb).sum())
                loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
                clean_loss_sum += float(F.cross_entropy(out_clean, yb, reduction="sum"))
        acc = correct / len(x)
        log(f"mem-dist: baseline em: round {r}: training accuracy on the perturbed data {acc:.3f}, loss "
            f"{loss_sum / len(x):.3f} (clean data {clean / len(x):.3f}, {clean_loss_sum / len(x):.3f}; {time.time() - start:.0f} s)")
        if acc >= 0.99:
            break
    return torch.round(delta * 255).clamp(-eps, eps).permute(0, 2, 3, 1).numpy().astype(np.int16)


def write_perturbed(shards, delta_NHWC: np.ndarray, out: str, captions: list[str] | None = None) -> int:
    """canvas + delta (clipped to [0, 255]) as PNG with each sample's json and its own caption (or
    ``captions[i]``, in source order), one tar per source shard under ``out``; returns the count."""
    i = 0
    for shard in shards:
        buf_tar = io.BytesIO()
        with wds.TarWriter(buf_tar, mtime=0) as tw:
            for j, key in enumerate(shard.keys):
                img = (shard.canvases[j].astype(np.int16) + delta_NHWC[i]).clip(0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(img).save(png, format="PNG")
                meta = shard.meta[j] if shard.meta and shard.meta[j] else json.dumps({"key": key}).encode()
                tw.write({"__key__": key, "png": png.getvalue(), "txt": shard.captions[j] if captions is None else captions[i],
                          "json": meta})
                i += 1
        storage.write_bytes_atomic(storage.join(out, os.path.basename(shard.url)), buf_tar.getvalue())
    return i


def run(kind: str, src: str, out: str, epsilon: int = 8, size: int = 32, seed: int = 0, grid: int = 8,
        em_width: int = 16, em_rounds: int = 15, log: Log = print) -> int:
    """The body of ``mem-dist baseline``: perturb every sample of ``src``, write ``out``."""
    if kind not in KINDS:
        raise ConfigError(f"baseline kind '{kind}' is not one of {', '.join(KINDS)}")
    if not 1 <= epsilon <= 255:
        raise ConfigError(f"--epsilon must be between 1 and 255 (units of 1/255), not {epsilon}")
    cfg = DataConfig(shards=src, image_size=size, resize_mode="center_crop")
    shards = [load_shard(url, cfg) for url in expand_shards(src)]
    labels, _ = read_labels([m for s in shards for m in (s.meta or [None] * len(s))])
    if labels is None or (labels < 0).any():
        raise ConfigError(f"{src}: every sample's json needs a 'label' (mem-dist import writes them); the baselines are keyed on the true class")
    start = time.time()
    if kind == "block":
        delta = block_code(labels, size, epsilon, seed, grid)
    elif kind == "lsp":
        delta = lsp(labels, size, epsilon, seed)
    elif kind == "ar":
        delta = ar(labels, size, epsilon, seed)
    else:
        canvases = np.concatenate([s.canvases for s in shards])
        delta = em(canvases, labels, epsilon, seed, width=em_width, rounds=em_rounds, log=log)
    n = write_perturbed(shards, delta, out)
    mean = float(np.abs(delta).mean())
    log(f"mem-dist: baseline {kind}: {n} samples under {out}, |delta| <= {epsilon}/255 (mean {mean:.2f}/255), "
        f"{time.time() - start:.0f} s")
    return 0
