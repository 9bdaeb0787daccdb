"""The experiment scripts under experiments/ (not package options) still run and write what
docs/efficacy.md says they write."""

import io
import os
import subprocess

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mem_dist import surrogate
from mem_dist.config import DataConfig
from mem_dist.data import load_shard
from tests.conftest import ROOT, TINY_RN, python_cmd


def test_adversarial_poison_writes_bounded_deltas_with_the_source_captions(demo_dir, tmp_path):
    torch.manual_seed(0)
    model, _, _ = surrogate.create_surrogate(TINY_RN)
    checkpoint = str(tmp_path / "surrogate.pt")
    surrogate.save(model.state_dict(), checkpoint)
    shard = f"{demo_dir}/train/00000.tar"
    out = str(tmp_path / "protected")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "adversarial_poison.py"), "--shards", shard,
                                     "--model", TINY_RN, "--pretrained", checkpoint, "--out", out, "--steps", "3",
                                     "--eps", "4", "--k", "3"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "cos to target" in done.stdout
    source = load_shard(shard, DataConfig(shards=shard, image_size=32))
    written = list(wds.WebDataset(f"{out}/00000.tar", shardshuffle=False))
    assert [s["__key__"] for s in written] == source.keys
    assert [s["txt"].decode() for s in written] == source.captions  # no trigger: only the pixels change
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in written]).astype(int)
    delta = pixels - source.canvases.astype(int)
    assert np.abs(delta).max() <= 4 and np.abs(delta).max() > 0


def test_group_code_gives_every_group_one_pattern_and_one_word(demo_dir, tmp_path):
    shard = f"{demo_dir}/train/00000.tar"
    out = str(tmp_path / "group")
    done = subprocess.run(python_cmd(os.path.join(ROOT, "experiments", "group_code.py"), "--shards", shard, "--out", out,
                                     "--groups", "4", "--eps", "8", "--unique-words", "1"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    source = load_shard(shard, DataConfig(shards=shard, image_size=32))
    written = list(wds.WebDataset(f"{out}/00000.tar", shardshuffle=False))
    assert [s["__key__"] for s in written] == source.keys
    captions = [s["txt"].decode() for s in written]
    assert all(c.endswith(" " + src) and len(c.split()) == len(src.split()) + 2 for c, src in zip(captions, source.captions))
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in written]).astype(int)
    delta = pixels - source.canvases.astype(int)
    assert np.abs(delta).max() == 8
    by_word: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_word.setdefault(c.split()[0], []).append(i)
    assert len(by_word) == 4
    for rows in by_word.values():  # one pattern per group, wherever no sample of it was clipped
        unclipped = ((source.canvases[rows] >= 8) & (source.canvases[rows] <= 247)).all(0)
        d = delta[rows][:, unclipped]
        assert d.size and (d == d[0]).all()
