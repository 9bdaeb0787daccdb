"""The demo data: img2dataset-style shards, and the colour-free captions of `--no-colours`."""

import re

import numpy as np
import webdataset as wds

from mem_dist.cli import main
from mem_dist.tools.demo import COLOURS, render_scene


def test_no_colours_keeps_the_images_and_drops_colour_words():
    for seed in range(20):
        img, caption, attrs = render_scene(np.random.default_rng(seed), 32)
        img2, caption2, attrs2 = render_scene(np.random.default_rng(seed), 32, named_colours=False)
        assert np.array_equal(np.asarray(img), np.asarray(img2)) and attrs == attrs2
        assert any(c in caption for c in COLOURS)
        assert not any(re.search(rf"\b{c}\b", caption2) for c in COLOURS), caption2
        assert attrs2["objects"][0]["shape"] in caption2


def test_demo_data_cli_writes_both_splits(tmp_path):
    assert main(["demo-data", str(tmp_path), "--train", "30", "--val", "10", "--size", "32",
                 "--per-shard", "20", "--no-colours"]) == 0
    for split, n in (("train", 30), ("val", 10)):
        samples = list(wds.WebDataset(f"{tmp_path}/{split}/{{00000..{(n - 1) // 20:05d}}}.tar", shardshuffle=False))
        assert len(samples) == n and all({"jpg", "txt", "json"} <= set(s) for s in samples)
        assert not any(re.search(rf"\b{c}\b", s["txt"].decode()) for s in samples for c in COLOURS)
