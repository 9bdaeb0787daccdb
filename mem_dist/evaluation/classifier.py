"""The classifier victim (``victim.kind: classifier``): a torchvision classifier from scratch.

The threat the unlearnable-examples papers measure: a classifier (ResNet-18 by default,
any torchvision classification model by name, from its own random init) trained on a
condition's images with the labels in their json (or the attacker's own k-means labels),
then scored by top-1 on the clean validation images after every epoch. As those papers
train it: SGD with momentum, cosine learning rate over the steps, random crop (zero
padding) and horizontal flip. The image defences and ``reencode_jpeg`` apply as for the
CLIP victims; the text defences do not (no captions).

Per batch: canvas -> image defence -> crop + flip -> [0, 1], normalised (mean 0.5, std
0.25 per channel) -> the model. Shapes: N images, B batch, K classes, H/W canvas side, C = 3.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from mem_dist.evaluation import cifar_nets, defences
from mem_dist.pipeline import surrogate
from mem_dist.pipeline.augment import crop_flip
from mem_dist.pipeline.config import seed_of
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.evaluation.eval_config import ClassifierConfig, Condition, EvalConfig, resolve_device
from mem_dist.evaluation.pairs import Pairs, load_condition
from mem_dist.pipeline.schedule import cosine_lr
from mem_dist.evaluation.scores import match_clusters, pack_correct, top1

Log = Callable[[str], None]
MEAN, STD = 0.5, 0.25


def create_classifier(cfg: ClassifierConfig, n_classes: int, device: torch.device, seed: int) -> torch.nn.Module:
    """A CIFAR-style victim (:mod:`mem_dist.evaluation.cifar_nets`) or a torchvision classifier by name,
    random init seeded from (seed, "classifier")."""
    torch.manual_seed(seed_of(seed, "classifier"))
    if cfg.model in cifar_nets.MODELS:  # channels-last: the layout oneDNN prefers (1.2x here), the same values
        return cifar_nets.build(cfg.model, n_classes, cfg.width).to(device, memory_format=torch.channels_last)
    try:
        model = torchvision.models.get_model(cfg.model, weights=None, num_classes=n_classes)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"config key 'classifier.model': torchvision cannot build classifier '{cfg.model}' "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); see torchvision.models.list_models()") from None
    return model.to(device)


def to_input(pixels_BCHW: torch.Tensor) -> torch.Tensor:
    """[0, 255] pixels -> the classifier's normalised input."""
    return (pixels_BCHW / 255.0 - MEAN) / STD


def kmeans_labels(canvases_NHWC: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The attacker's own labels: seeded k-means (scikit-learn) of the images' pixels."""
    from sklearn.cluster import KMeans

    x = canvases_NHWC.reshape(len(canvases_NHWC), -1).astype(np.float32) / 255.0
    return KMeans(n_clusters=k, n_init=3, random_state=seed % 2**31).fit_predict(x).astype(np.int64)


@torch.no_grad()
def predict(model: torch.nn.Module, canvases_NHWC: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(canvases_NHWC), batch_size):
        pixels = torch.from_numpy(canvases_NHWC[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float()
        out.append(model(to_input(pixels)).argmax(1).cpu())
    return torch.cat(out).numpy()


def class_count(train: Pairs, val: Pairs) -> int:
    return int(max(val.labels.max(), train.labels.max() if train.labels is not None else -1)) + 1


def train_classifier(cond: Condition, val: Pairs, cfg: EvalConfig, name: str, log: Log = print,
                     save_to: str | None = None, select: Pairs | None = None) -> dict:
    """Train a classifier victim on a condition, scoring top-1 on ``val`` (and on the
    attacker's ``select`` images, when given) after every epoch.

    Returns:
        History: {"n_train", "n_protected", "n_val", "labels" (json | kmeans), "epochs":
        [{"epoch", "train_loss", "lr", "seconds", "top1", "correct" (which val images were
        right: :func:`mem_dist.evaluation.scores.pack_correct`), "select_top1" (with ``select``)}],
        "final", "leakage": None}.
    """
    ccfg, vcfg = cfg.classifier, cfg.victim
    device = resolve_device(cfg.device)
    train = load_condition(cond, cfg)
    if val.labels is None:
        raise ConfigError("config key 'val_shards': its samples' json carry no 'label' (victim.kind classifier needs labels; "
                          "mem-dist import writes them)")
    if train.labels is None:
        raise ConfigError(f"config key 'conditions.{name}': its samples' json carry no 'label' (victim.kind classifier needs "
                          f"them, even with classifier.labels kmeans, to match clusters to classes)")
    if cfg.reencode_jpeg is not None:
        train.canvases = defences.jpeg_roundtrip(train.canvases, cfg.reencode_jpeg)
    k = class_count(train, val)
    targets, to_class = train.labels, np.arange(k)
    if ccfg.labels == "kmeans":
        targets = kmeans_labels(train.canvases, k, seed_of(cfg.seed, "kmeans"))
        to_class = match_clusters(targets, train.labels, k)
    model = create_classifier(ccfg, k, device, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=ccfg.lr, momentum=ccfg.momentum, weight_decay=ccfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    augment_gen = torch.Generator().manual_seed(cfg.seed + 1)
    canvases_NHWC = torch.from_numpy(train.canvases).to(device)
    targets_N = torch.from_numpy(targets).to(device)
    batch = min(vcfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch
    total = vcfg.epochs * steps_per_epoch

    def validate(epoch: int, loss: float | None, lr: float | None, seconds: float) -> dict:
        pred = to_class[predict(model, val.canvases, vcfg.batch_size, device)]
        record = {"epoch": epoch, "train_loss": loss, "lr": lr, "seconds": round(seconds, 3), "top1": top1(pred, val.labels),
                  "correct": pack_correct(pred == val.labels)}
        if select is not None:
            record["select_top1"] = top1(to_class[predict(model, select.canvases, vcfg.batch_size, device)], select.labels)
        log(f"mem-dist: evaluate: epoch {epoch}/{vcfg.epochs}" + (f" loss {loss:.4f}" if loss is not None else "")
            + f" | top-1 {record['top1']:.3f}" + (f" (select {record['select_top1']:.3f})" if select is not None else "")
            + f" ({seconds:.1f} s)")
        return record

    mix = f" ({train.protected} from the protected shards)" if train.protected is not None else ""
    log(f"mem-dist: evaluate: {len(train)} train images{mix}, {len(val)} val images, {k} classes, classifier "
        f"{ccfg.model} ({ccfg.labels} labels), {steps_per_epoch} steps/epoch on {device}")
    epochs = [validate(0, None, None, 0.0)]
    for epoch in range(1, vcfg.epochs + 1):
        start, losses, lr = time.time(), [], ccfg.lr
        model.train()
        order = torch.randperm(len(train), generator=order_gen)
        for b in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + b
            lr = cosine_lr(step, ccfg.lr, 0, total)  # no warm-up: the papers' schedule
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[b * batch:(b + 1) * batch].to(device)
            pixels = canvases_NHWC[idx].permute(0, 3, 1, 2).float()
            losses.append(train_step(model, optimizer, pixels, F.one_hot(targets_N[idx], k).float(), cfg, augment_gen))
        epochs.append(validate(epoch, float(np.mean(losses)), lr, time.time() - start))
    if save_to:
        surrogate.save(model.state_dict(), save_to)
        log(f"mem-dist: evaluate: classifier weights written to {save_to}")
    return {"n_train": len(train), "n_protected": train.protected, "n_val": len(val), "labels": ccfg.labels,
            "epochs": epochs, "final": epochs[-1], "leakage": None}


def train_step(model, optimizer, pixels_BCHW: torch.Tensor, onehot_BK: torch.Tensor, cfg: EvalConfig,
               generator: torch.Generator) -> float:
    """One SGD step: image defence (mixup mixes the labels too) -> crop + flip ->
    (adversarial PGD) -> cross-entropy; returns the loss."""
    pixels_BCHW, mix_BB = defences.defend_images(pixels_BCHW, cfg.defence, generator)
    soft_BK = onehot_BK if mix_BB is None else mix_BB @ onehot_BK
    pixels_BCHW = crop_flip(pixels_BCHW, cfg.classifier.crop_padding, cfg.classifier.flip, generator)

    def loss_of(px: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(to_input(px)), soft_BK)

    if cfg.defence.image == "adv":
        pixels_BCHW = defences.adversarial_pixels(loss_of, pixels_BCHW, cfg.defence, generator)
    loss = loss_of(pixels_BCHW)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
