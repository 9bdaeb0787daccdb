"""Scores of a victim on clean validation data: retrieval, zero-shot and classifier top-1.

Shapes: N samples, E embedding dim, K classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from mem_dist.tools.importers import fill_template


def retrieval_metrics(image_NE: torch.Tensor, text_NE: torch.Tensor) -> dict[str, dict[str, float]]:
    """Retrieval of pair i's partner among all N candidates, in both directions.

    Features are L2-normalised; pair i is (image i, caption i). The rank is 1-based; ties
    take the mean rank of the tied block, so identical features score as chance.

    Args:
        image_NE: image features.
        text_NE: text features of the matching captions, in the same order.

    Returns:
        {"i2t": m, "t2i": m}, m = {"r1", "r5", "r10": fraction with rank <= K (0..1),
        "median_rank": floor(median rank), "mean_rank": mean rank}. With 1-based ranks
        floor(median) equals the paper's floor(median of 0-based ranks) + 1.
    """
    image_NE = F.normalize(image_NE.float(), dim=-1)
    text_NE = F.normalize(text_NE.float(), dim=-1)
    return {"i2t": _rank_summary(_true_ranks(image_NE, text_NE)), "t2i": _rank_summary(_true_ranks(text_NE, image_NE))}


def retrieval_hits(image_NE: torch.Tensor, text_NE: torch.Tensor, k: int = 10) -> np.ndarray:
    """Which pairs' image finds its caption among the first ``k`` (image->text R@k per pair)."""
    return _true_ranks(F.normalize(image_NE.float(), dim=-1), F.normalize(text_NE.float(), dim=-1)) <= k


def _true_ranks(query_NE: torch.Tensor, target_NE: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """1-based rank of target i among all targets for query i (mean rank over ties)."""
    ranks = []
    for start in range(0, len(query_NE), chunk):
        sim = query_NE[start : start + chunk] @ target_NE.t()
        rows = torch.arange(len(sim), device=sim.device)
        true = sim[rows, rows + start].unsqueeze(1)
        greater = (sim > true).sum(1)
        ties = (sim == true).sum(1) - 1
        ranks.append((1 + greater + ties / 2).double().cpu())
    return torch.cat(ranks).numpy()


def _rank_summary(ranks: np.ndarray) -> dict[str, float]:
    out = {f"r{k}": float((ranks <= k).mean()) for k in (1, 5, 10)}
    out["median_rank"] = float(math.floor(np.median(ranks)))
    out["mean_rank"] = float(ranks.mean())
    return out


def chance_metrics(n: int) -> dict[str, float]:
    """Random guessing among n candidates: R@K = K/n, median rank floor((n+1)/2)."""
    out = {f"r{k}": min(1.0, k / n) for k in (1, 5, 10)}
    out["median_rank"] = float(math.floor((n + 1) / 2))
    out["mean_rank"] = (n + 1) / 2
    return out


@torch.no_grad()
def class_embeddings(encode_text, tokenizer, classes: dict[int, str], templates, device) -> tuple[list[int], torch.Tensor]:
    """Zero-shot classifier weights as clip_benchmark builds them: every template filled with
    each class name, encoded, normalised, averaged per class and normalised again.

    Returns:
        (the labels in order, class embeddings [K, E]).
    """
    labels = sorted(classes)
    out = []
    for label in labels:
        prompts = [fill_template(t, classes[label]) for t in templates]
        emb = F.normalize(encode_text(tokenizer(prompts).to(device)).float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return labels, torch.stack(out)


def zero_shot_predictions(image_NE: torch.Tensor, class_KE: torch.Tensor, order: list[int]) -> np.ndarray:
    """Each image's class: the one whose embedding is closest."""
    return np.asarray(order)[(F.normalize(image_NE.float(), dim=-1) @ class_KE.t()).argmax(1).cpu().numpy()]


def zero_shot_top1(image_NE: torch.Tensor, class_KE: torch.Tensor, order: list[int], labels_N: np.ndarray) -> float:
    """Top-1 of assigning each image the class whose embedding is closest (samples without a
    label, -1, are left out)."""
    return top1(zero_shot_predictions(image_NE, class_KE, order), labels_N)


def top1(pred_N: np.ndarray, labels_N: np.ndarray) -> float:
    known = labels_N >= 0
    return float((pred_N[known] == labels_N[known]).mean()) if known.any() else float("nan")


def match_clusters(clusters_N: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
    """A one-to-one map cluster -> label maximising agreement on (clusters, labels) (Hungarian),
    as clustering accuracy is measured; an array m with m[cluster] = label."""
    counts = np.zeros((k, k), np.int64)
    for c, y in zip(clusters_N, labels_N):
        if 0 <= c < k and 0 <= y < k:
            counts[c, y] += 1
    rows, cols = linear_sum_assignment(-counts)
    mapping = np.arange(k)
    mapping[rows] = cols
    return mapping


# --------------------------------------------------------------------------------------
# Evaluation hygiene: per-image correctness, bootstrap intervals, the attacker's epoch
# --------------------------------------------------------------------------------------


def pack_correct(correct_N: np.ndarray) -> str:
    """Which val images were classified right, as a compact string (hex of the packed bits)
    that an epoch record can carry, so that intervals can be computed after the run."""
    return np.packbits(np.asarray(correct_N, bool)).tobytes().hex()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))[:n].astype(bool)


def bootstrap_interval(correct_SN: np.ndarray, level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean accuracy over S victim seeds, by resampling the N val images
    (the same resample for every seed: the seeds' mean is one number per image)."""
    per_image = np.asarray(correct_SN, np.float64).reshape(-1, np.shape(correct_SN)[-1]).mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_image), (draws, len(per_image)))
    means = per_image[idx].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def attacker_epoch(epochs: list[dict], select_key: str) -> dict:
    """The epoch record an attacker keeps: the best ``select_key`` (its score on clean images
    disjoint from val), the earliest on ties; epoch 0 (nothing trained) is not a choice."""
    trained = [e for e in epochs if e["epoch"] > 0 and select_key in e] or epochs
    return max(trained, key=lambda e: (e.get(select_key, float("-inf")), -e["epoch"]))
