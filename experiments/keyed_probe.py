"""Keyed codes outside the pipeline: how the code separates the classes (labelled shards),
and protected shards for ``mem-dist evaluate`` (PNG, same keys, captions and json).

    python experiments/keyed_probe.py SRC OUT --model M --pretrained CKPT [--grid 8] [--epsilon 16]
        [--control random]    # the same budget and grid, a random code per sample (not keyed)
        [--stats]             # only print how often two captions' codes agree, same class / other class
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mem_dist.evaluation.baselines import write_perturbed
from mem_dist.methods.keyed import code
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.data import expand_shards, load_shard
from mem_dist.pipeline.surrogate import create_surrogate


def agreement(s_NC: np.ndarray, labels_N: np.ndarray) -> str:
    """How often two captions' codes agree cell by cell: same class / other class."""
    s = s_NC.astype(np.float32)
    agree = (s @ s.T / s.shape[1] + 1) / 2
    same, off = labels_N[:, None] == labels_N[None, :], ~np.eye(len(labels_N), dtype=bool)
    return f"cells agreeing: same class {agree[same & off].mean():.3f}, other class {agree[~same].mean():.3f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src"), p.add_argument("out")
    p.add_argument("--model", required=True), p.add_argument("--pretrained")
    p.add_argument("--grid", type=int, default=8), p.add_argument("--epsilon", type=int, default=16)
    p.add_argument("--size", type=int, default=32), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", choices=["keyed", "random"], default="keyed")
    p.add_argument("--mirror", action="store_true", help="a code the same after a horizontal flip")
    p.add_argument("--luminance", action="store_true", help="one sign per cell for the three channels")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--centre", action="store_true", help="subtract the mean embedding of the captions first")
    a = p.parse_args()
    cfg = DataConfig(shards=a.src, image_size=a.size)
    shards = [load_shard(u, cfg) for u in expand_shards(a.src)]
    captions = [c for s in shards for c in s.captions]
    labels = np.array([json.loads(m or "{}").get("label", -1) for s in shards for m in s.meta])  # -1: unlabelled (demo scenes)
    key = np.random.default_rng(a.seed).bytes(32)
    if a.control == "keyed":
        clip, tokenizer, _ = create_surrogate(a.model, a.pretrained, "cpu")
        e = code.embed(clip, tokenizer, captions)
        e_q = code.quantize(e - e.mean(0) if a.centre else e)
    else:  # a random unit vector per sample: the same code distribution, keyed to nothing
        e = np.random.default_rng(a.seed + 1).standard_normal((len(captions), 128))
        e_q = code.quantize(e / np.linalg.norm(e, axis=1, keepdims=True))
    s = code.signs(key, e_q, a.grid, a.mirror, a.luminance).reshape(len(captions), -1).astype(np.float32)
    print(f"{'centred: ' if a.centre else ''}{agreement(s, labels)}; "
          f"unique captions {len(set(captions))}, unique codes {len({r.tobytes() for r in s})}")
    if a.stats:
        return
    d = code.delta(key, e_q, a.grid, a.epsilon, a.size, a.size, a.mirror, a.luminance)
    print(f"wrote {write_perturbed(shards, d, a.out)} samples to {a.out}")


if __name__ == "__main__":
    main()
