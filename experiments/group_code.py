"""Experiment, not a package option: the most learnable image code we know, class-wise.

As in the unlearnable-examples work on classifiers: samples fall into G groups (a seeded
hash of the key); every sample of a group gets the same delta, one +-eps sign pattern on
BLOCK x BLOCK pixel blocks, and the caption starts with the group's word (from the trigger
vocabulary), then --unique-words random words of its own. So delta predicts a caption word
perfectly for N / G samples each, with nothing optimised. --random-delta gives every sample
uniform noise in [-eps, eps] instead, with the same captions: the control. If a victim reads
the code, its training loss falls below the control's. Numbers: docs/efficacy.md, "Even
there, a victim reads a code in δ only at several times the budget".

    python experiments/group_code.py --shards "data/nocol/train/{00000..00003}.tar" --out runs/group8/protected
"""
import argparse
import zlib

import numpy as np
import open_clip

from mem_dist.pipeline import text
from mem_dist.evaluation.baselines import write_perturbed
from shards import read_shards  # experiments/shards.py, beside this script

p = argparse.ArgumentParser()
p.add_argument("--shards", required=True)
p.add_argument("--out", required=True)
p.add_argument("--size", type=int, default=32, help="canvas side (data.image_size)")
p.add_argument("--groups", type=int, default=16)
p.add_argument("--block", type=int, default=8, help="side of the blocks the sign pattern is constant on, in pixels")
p.add_argument("--eps", type=int, default=8)
p.add_argument("--unique-words", type=int, default=0, help="random words of its own after each sample's group word")
p.add_argument("--random-delta", action="store_true", help="the control: uniform noise per sample, same captions")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

shards = read_shards(a.shards, a.size)
keys = [k for s in shards for k in s.keys]
canvases = np.concatenate([s.canvases for s in shards])
captions = [c for s in shards for c in s.captions]
rng = np.random.default_rng(a.seed)
tokenizer = open_clip.get_tokenizer("RN50")
vocab = text.trigger_vocabulary(tokenizer, 1000, a.seed)  # alphabetic words
group_words = rng.choice(vocab, a.groups, replace=False)
cells = -(-a.size // a.block)
patterns = rng.choice([-a.eps, a.eps], size=(a.groups, cells, cells, 3))
patterns = patterns.repeat(a.block, 1).repeat(a.block, 2)[:, : a.size, : a.size]
group = np.array([zlib.crc32(f"{a.seed}:{k}".encode()) % a.groups for k in keys])
if a.random_delta:
    delta = rng.integers(-a.eps, a.eps + 1, size=canvases.shape)
else:
    delta = patterns[group]
delta = (np.clip(canvases.astype(np.int16) + delta, 0, 255) - canvases).astype(np.int8)
unique = text.initial_triggers(keys, vocab, a.unique_words, a.seed + 1)
trigger = np.concatenate([group_words[group][:, None], unique], axis=1)
protected = [text.protected_caption(text.trigger_text(tokenizer, t), c) for t, c in zip(trigger, captions)]
print("group sizes", np.bincount(group, minlength=a.groups).tolist())
print("wrote", a.out, write_perturbed(shards, delta, a.out, protected))
