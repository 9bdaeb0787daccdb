"""Merge and verify: protected shards are exactly what was optimised."""

import argparse
import io
import json
import os
import shutil

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mem_dist import merge, state, verify
from mem_dist.config import RunConfig, load_config
from mem_dist.data import load_shard
from mem_dist.generate import main as generate
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def merged(demo_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("merge") / "run")
    args = tiny_overrides(f"{demo_dir}/train/{{00000..00001}}.tar", out, **{"mem.rounds": 1})
    assert generate(args) == 0
    cfg = load_config(RunConfig, None, args)
    merge.merge(cfg)
    return out, cfg, args


def read_tar(path):
    return list(wds.WebDataset(path, shardshuffle=False))


def test_protected_shards_are_canvas_plus_delta(merged, demo_dir, tokenizer):
    out, cfg, _ = merged
    for name in ("00000", "00001"):
        src = load_shard(f"{demo_dir}/train/{name}.tar", cfg.data)
        st = state.read_state(state.state_url(out, 1, name))
        samples = read_tar(f"{out}/protected/{name}.tar")
        assert [s["__key__"] for s in samples] == src.keys
        for i, s in enumerate(samples):
            pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
            assert np.array_equal(pixels.astype(int) - src.canvases[i], st.delta[i])
            caption = s["txt"].decode()
            assert caption == st.trigger_text[i] + " " + src.captions[i]
            assert tokenizer([caption])[0][1:4].tolist() == st.trigger_ids[i].tolist()
            meta = json.loads(s["json"])
            assert meta["mem_dist"]["method"] == "mem" and meta["mem_dist"]["epsilon"] == 8
            assert meta["mem_dist"]["config_hash"] == cfg.config_hash() and "scene" in meta  # source metadata kept
        stats = json.load(open(f"{out}/protected/{name}_stats.json"))
        assert stats["successes"] == stats["protected"] == 40
        assert os.path.exists(f"{out}/protected/{name}.parquet")


def test_verify_passes_then_catches_tampering(merged, tmp_path):
    out, _, _ = merged
    report = verify.verify(out)
    assert report["checked"] == 80 and report["mismatches"] == 0
    assert 30 < report["psnr_mean"] < 60 and 0 < report["ssim_min"] <= report["ssim_mean"] < 1
    assert verify.main([out]) == 0
    for what in ("pixel", "caption"):
        copy = str(tmp_path / what)
        shutil.copytree(out, copy)
        samples = read_tar(f"{copy}/protected/00001.tar")
        with wds.TarWriter(f"{copy}/protected/00001.tar") as tw:
            for i, s in enumerate(samples):
                s = {k: v for k, v in s.items() if k in ("__key__", "png", "txt", "json")}
                if i == 7 and what == "pixel":
                    px = np.asarray(Image.open(io.BytesIO(s["png"]))).copy()
                    px[3, 4, 1] ^= 1
                    buf = io.BytesIO()
                    Image.fromarray(px).save(buf, format="PNG")
                    s["png"] = buf.getvalue()
                if i == 7 and what == "caption":
                    s["txt"] = s["txt"].decode().split(" ", 1)[1].encode()  # trigger removed
                tw.write(s)
        report = verify.verify(copy)
        assert report["mismatches"] >= 1 and "00001/" in str(report["first_error"])
        assert verify.main([copy]) == 1


def test_samples_without_state_are_dropped_or_copied(merged, demo_dir, tmp_path):
    out, cfg, args = merged
    copy = str(tmp_path / "run")
    shutil.copytree(out, copy)
    shutil.rmtree(f"{copy}/protected")
    st = state.read_state(state.state_url(copy, 1, "00000"))
    keep = np.arange(40) != 5
    state.write_state(state.state_url(copy, 1, "00000"), state.ShardState(
        [k for k, m in zip(st.keys, keep) if m], st.delta[keep], st.trigger_ids[keep],
        [t for t, m in zip(st.trigger_text, keep) if m], st.loss[keep], st.clean_loss[keep], st.skipped))
    cfg2 = load_config(RunConfig, None, [a.replace(out, copy) for a in args])
    merge.merge(cfg2)
    stats = json.load(open(f"{copy}/protected/00000_stats.json"))
    assert stats["successes"] == 39 and stats["skipped"] == {"no_state": 1}
    assert verify.verify(copy)["mismatches"] == 0
    first = os.path.getmtime(f"{copy}/protected/00000.tar")
    merge.merge(cfg2)  # finished shards are skipped
    assert os.path.getmtime(f"{copy}/protected/00000.tar") == first
    shutil.rmtree(f"{copy}/protected")
    merge.merge(load_config(RunConfig, None, [a.replace(out, copy) for a in args] + ["merge.copy_unprotected=true"]))
    stats = json.load(open(f"{copy}/protected/00000_stats.json"))
    assert stats["successes"] == 40 and stats["copied_unprotected"] == 1 and stats["protected"] == 39
    assert verify.verify(copy)["mismatches"] == 0  # the copied sample is marked unprotected


def test_open_clip_train_reads_protected_shards(merged):
    """open_clip's own training data pipeline loads the protected shards unchanged."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    out, _, _ = merged
    _, _, preprocess = open_clip.create_model_and_transforms("RN50", pretrained=None)
    args = argparse.Namespace(
        train_data=f"{out}/protected/{{00000..00001}}.tar", train_num_samples=80, train_data_upsampling_factors=None,
        dataset_resampled=False, batch_size=16, workers=1, world_size=1, seed=0, distributed=False)
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("RN50"))
    images, texts = next(iter(data.dataloader))
    assert images.shape == (16, 3, 224, 224) and texts.shape == (16, 77)
