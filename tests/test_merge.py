"""Merge and verify: protected shards hold exactly canvas + delta and trigger + caption.

The generation state is fabricated here (random delta within epsilon, random round-trip
triggers) with state.write_state, so these tests exercise merge and verify alone, on real
webdataset tars, Parquet files and the local fsspec filesystem.
"""

from __future__ import annotations

import argparse
import io
import hashlib
import json
import os
import shutil
import tarfile

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from mem_dist.tools import bench
from mem_dist.publishing import manifest, merge, verify
from mem_dist.pipeline import state, storage, text
from mem_dist.cli import main as cli_main
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import load_config, to_dict
from mem_dist.pipeline.data import check_shards, load_shard
from mem_dist.tools.demo import make_demo_data
from mem_dist.pipeline.surrogate import resolve_model_name

TINY_RN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models", "tiny-rn.json")
NAMES = ("00000", "00001", "00002")  # 25 + 25 + 10 samples


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("demo"))
    make_demo_data(out, train=60, val=10, size=32, per_shard=25, seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(resolve_model_name(TINY_RN))


@pytest.fixture(scope="module")
def vocab(tokenizer) -> np.ndarray:
    return text.trigger_vocabulary(tokenizer)


def make_run(output: str, shards: str, tokenizer, vocab, drop: int = 0, extra: tuple[str, ...] = ()) -> RunConfig:
    """A run folder as generate leaves it after round 1: state for every shard (the
    first ``drop`` samples of shard 00000 left out) and run.json."""
    cfg = load_config(RunConfig, None, [f"data.shards={shards}", f"output={output}", f"surrogate.model={TINY_RN}",
                                        "data.image_size=32", "progress=false", "device=cpu", "mem.rounds=1", *extra])
    for url in check_shards(cfg.data):
        src = load_shard(url, cfg.data)
        rng = np.random.default_rng([0, int(src.name)])
        noise = rng.integers(-8, 9, src.canvases.shape)
        delta = (np.clip(src.canvases.astype(np.int16) + noise, 0, 255) - src.canvases).astype(np.int8)
        ids = rng.choice(vocab, (len(src), cfg.mem.trigger_len))
        keep = slice(drop if src.name == "00000" else 0, None)
        st = state.ShardState(src.keys[keep], delta[keep], ids[keep], [text.trigger_text(tokenizer, t) for t in ids][keep],
                              np.zeros(len(src), np.float32)[keep], np.zeros(len(src), np.float32)[keep], dict(src.skipped))
        state.write_state(state.state_url(output, 1, src.name), st)
    storage.write_json(storage.join(output, "run.json"), {"config": to_dict(cfg), "config_hash": cfg.config_hash(),
                                                         "rounds": 1, "rounds_done": 1})
    return cfg


@pytest.fixture(scope="module")
def run(demo, tokenizer, vocab, tmp_path_factory) -> RunConfig:
    cfg = make_run(str(tmp_path_factory.mktemp("run")), f"{demo}/train/{{00000..00002}}.tar", tokenizer, vocab)
    merge.merge(cfg)
    return cfg


def tar_members(path: str) -> list[tuple[str, bytes, float]]:  # (name, bytes, mtime), in order
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read(), m.mtime) for m in tf.getmembers()]


def read_tar(path: str) -> list[dict]:
    return list(wds.WebDataset(path, shardshuffle=False))


def pixels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def rewrite_sample(tar: str, index: int, change) -> None:
    """Rewrite a protected tar with ``change(sample)`` applied to its index-th sample."""
    samples = read_tar(tar)
    with wds.TarWriter(tar) as tw:
        for i, s in enumerate(samples):
            s = {k: v for k, v in s.items() if k in ("__key__", "png", "jpg", "txt", "json")}
            tw.write(change(s) if i == index else s)


def test_protected_shards_are_canvas_plus_delta(run, demo, tokenizer):
    for name in NAMES:
        src = load_shard(f"{demo}/train/{name}.tar", run.data)
        st = state.read_state(state.state_url(run.output, 1, name))
        samples = read_tar(f"{run.output}/protected/{name}.tar")
        assert [s["__key__"] for s in samples] == src.keys == st.keys
        for i, s in enumerate(samples):
            assert np.array_equal(pixels_of(s["png"]).astype(np.int16) - src.canvases[i], st.delta[i])
            caption = s["txt"].decode()
            assert caption == st.trigger_text[i] + " " + src.captions[i]
            # what docs/layout.md says it reveals: cutting the first k words gives caption and trigger back
            assert caption.split(" ", 3)[3] == src.captions[i] and " ".join(caption.split(" ")[:3]) == st.trigger_text[i]
            assert tokenizer([caption])[0][1:4].tolist() == st.trigger_ids[i].tolist()
            meta = json.loads(s["json"])
            source = json.loads(src.meta[i])
            # the source's json, made true, with img2dataset's fields only (the demo's "scene" is not one)
            assert list(meta) == [k for k in source if k != "scene"] and "scene" in source
            assert meta["key"] == src.keys[i] and meta["url"] == source["url"]
            assert meta["caption"] == caption and meta["width"] == meta["height"] == 32
            assert meta["sha256"] == hashlib.sha256(s["png"]).hexdigest()
        # the private side records what was written
        record = manifest.read_manifest(run.output, name)
        assert list(record) == src.keys
        for i, s in enumerate(samples):
            row = record[s["__key__"]]
            assert row["outcome"] == "protected" and row["reason"] is None and row["caption"] == s["txt"].decode()
            assert row["trigger_ids"] == st.trigger_ids[i].tolist() and row["trigger_text"] == st.trigger_text[i]
            assert row["image_sha256"] == hashlib.sha256(s["png"]).hexdigest()
        # the public parquet and stats are the source's, made true of what is written
        source_rows = pq.read_table(f"{demo}/train/{name}.parquet").to_pylist()
        rows = pq.read_table(f"{run.output}/protected/{name}.parquet").to_pylist()
        assert [list(r) for r in rows] == [list(r) for r in source_rows] and [r["key"] for r in rows] == src.keys
        for r, source_row, s in zip(rows, source_rows, samples):
            assert r == dict(source_row, caption=s["txt"].decode(), width=32, height=32)
        stats = json.load(open(f"{run.output}/protected/{name}_stats.json"))
        source_stats = json.load(open(f"{demo}/train/{name}_stats.json"))
        assert stats == source_stats
        private = manifest.read_stats(run.output, name)
        assert private["published"] == private["protected"] == private["source_samples"] == len(src)
        assert private["skipped"] == {} and private["copied_unprotected"] == 0 and private["method"] == "mem"
        assert private["round"] == 1 and private["end_time"] >= private["start_time"]
        assert private["made_from"] == {**manifest.made_from(run, 1, 1)}
        # tar members carry the time they were written, as img2dataset's TarWriter leaves them (not 0)
        times = [m for _, _, m in tar_members(f"{run.output}/protected/{name}.tar")]
        assert all(private["start_time"] - 1 <= m <= private["end_time"] + 1 for m in times)


def test_verify_passes_then_catches_tampering(run, tmp_path, capsys):
    assert verify.main([run.output]) == 0
    assert "OK: 60 samples checked, 0 mismatches" in capsys.readouterr().out
    report = verify.verify(run.output)
    assert report["checked"] == 60 and report["mismatches"] == 0
    assert 30 < report["psnr_min"] <= report["psnr_mean"] < 60
    assert 0 < report["ssim_min"] <= report["ssim_mean"] < 1

    def one_pixel(s):
        px = pixels_of(s["png"]).copy()
        px[3, 4, 1] = px[3, 4, 1] + 1 if px[3, 4, 1] < 255 else 254
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        return dict(s, png=buf.getvalue())

    def one_caption(s):
        return dict(s, txt=s["txt"] + b" too")

    def one_hash(s):
        meta = json.loads(s["json"])
        meta["sha256"] = hashlib.sha256(b"another image").hexdigest()
        return dict(s, json=json.dumps(meta).encode())

    # a changed image or caption no longer matches its json either
    for kind, change, errors in (("pixels", one_pixel, {"pixels": 1, "json": 1, "meta": 1}),
                                 ("caption", one_caption, {"caption": 1, "json": 1}), ("json", one_hash, {"json": 1})):
        copy = str(tmp_path / kind)
        shutil.copytree(run.output, copy)
        rewrite_sample(f"{copy}/protected/00001.tar", 7, change)
        assert verify.main([copy]) == 1
        report = verify.verify(copy)
        assert report["errors"] == errors and report["first_error"][kind].startswith("00001/")


def test_jpg_output_keeps_most_of_delta_and_says_how_much(run, demo, tokenizer, vocab, tmp_path, capsys):
    """merge.image_format=jpg (img2dataset's format) writes KEY.jpg and reports the share
    of delta kept; verify follows the format merge recorded (run.json says png here) and
    still catches a changed pixel."""
    cfg = make_run(str(tmp_path / "run"), f"{demo}/train/{{00000..00002}}.tar", tokenizer, vocab)
    jpg = load_config(RunConfig, None, [f"{k}={v}" for k, v in (("data.shards", cfg.data.shards), ("output", cfg.output),
                      ("surrogate.model", TINY_RN), ("data.image_size", 32), ("progress", "false"), ("device", "cpu"),
                      ("merge.image_format", "jpg"), ("merge.jpeg_quality", 90))])
    summary = merge.merge(jpg)
    assert 0.3 < summary["delta_kept"]["min"] <= summary["delta_kept"]["mean"] < 1
    assert "delta kept: mean" in capsys.readouterr().out
    src = load_shard(f"{demo}/train/00001.tar", cfg.data)
    st = state.read_state(state.state_url(cfg.output, 1, "00001"))
    samples = read_tar(f"{cfg.output}/protected/00001.tar")
    assert all("jpg" in s and "png" not in s for s in samples)
    kept = [merge.delta_kept(pixels_of(s["jpg"]), src.canvases[i], st.delta[i]) for i, s in enumerate(samples)]
    stats = manifest.read_stats(cfg.output, "00001")
    assert stats["image_format"] == "jpg" and stats["jpeg_quality"] == 90
    assert stats["delta_kept"] == {"mean": round(float(np.mean(kept)), 4), "min": round(float(np.min(kept)), 4)}
    report = verify.verify(cfg.output)
    assert report["checked"] == 60 and report["mismatches"] == 0, report
    assert report["delta_kept"]["mean"] == summary["delta_kept"]["mean"]

    def one_pixel(s):
        px = pixels_of(s["jpg"]).copy()
        px[3:6, 3:6] = 255 - px[3:6, 3:6]
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="JPEG", quality=90, subsampling=0)
        return dict(s, jpg=buf.getvalue())

    rewrite_sample(f"{cfg.output}/protected/00001.tar", 7, one_pixel)
    assert verify.verify(cfg.output)["errors"] == {"pixels": 1, "json": 1, "meta": 1}
    # a lossless run keeps all of delta by construction
    assert manifest.read_stats(run.output, "00001")["delta_kept"] == {"mean": 1.0, "min": 1.0}


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_verify_catches_a_delta_that_leaves_the_pixel_range(fmt, demo, tokenizer, vocab, tmp_path):
    """A state whose canvas + delta leaves [0, 255] (merge's uint8 cast wraps it) is a
    pixels mismatch, in either format, though the written image is what merge made of it."""
    cfg = make_run(str(tmp_path / "run"), f"{demo}/train/00002.tar", tokenizer, vocab, extra=(f"merge.image_format={fmt}",))
    url = state.state_url(cfg.output, 1, "00002")
    st = state.read_state(url)
    canvases = load_shard(f"{demo}/train/00002.tar", cfg.data).canvases
    i, y, x, c = np.argwhere((canvases >= 248) | (canvases <= 7))[0]
    st.delta[i, y, x, c] = 8 if canvases[i, y, x, c] >= 248 else -8  # within epsilon, outside [0, 255]
    state.write_state(url, st)
    merge.merge(cfg)
    assert verify.verify(cfg.output)["errors"] == {"pixels": 1}


def test_verify_takes_config_when_run_json_is_missing(run, tmp_path, capsys):
    copy = str(tmp_path / "run")
    shutil.copytree(run.output, copy)
    os.remove(f"{copy}/run.json")
    assert verify.main([copy]) == 2
    assert capsys.readouterr().err.startswith("mem-dist: error: ")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(run)))
    assert verify.main([copy, "--config", str(config)]) == 0


def test_samples_without_state_are_dropped_or_copied(demo, tokenizer, vocab, tmp_path):
    # A fourth source shard with one undecodable image: the reader's skip is counted too.
    good = read_tar(f"{demo}/train/00002.tar")[:2]
    os.makedirs(tmp_path / "bad")
    with wds.TarWriter(str(tmp_path / "bad" / "00003.tar")) as tw:
        for s in good + [dict(good[0], __key__="broken", jpg=b"not a jpeg")]:
            tw.write({k: s[k] for k in ("__key__", "jpg", "txt", "json")})
    shards = f"{demo}/train/{{00000..00001}}.tar::{tmp_path}/bad/00003.tar"

    cfg = make_run(str(tmp_path / "drop"), shards, tokenizer, vocab, drop=2)
    summary = merge.merge(cfg)
    assert summary["samples"] == 23 + 25 + 2 and summary["skipped"] == {"no_state": 2, "decode_error": 1}
    private = manifest.read_stats(cfg.output, "00000")
    assert private["source_samples"] == 25 and private["published"] == 23 and private["skipped"] == {"no_state": 2}
    private = manifest.read_stats(cfg.output, "00003")
    assert private["source_samples"] == 3 and private["published"] == 2 and private["skipped"] == {"decode_error": 1}
    record = manifest.read_manifest(cfg.output, "00003")
    assert record["broken"]["outcome"] == "dropped" and record["broken"]["reason"] == "decode_error"
    # publicly: rows img2dataset would have written for samples that did not make it
    stats = json.load(open(f"{cfg.output}/protected/00000_stats.json"))
    assert (stats["count"], stats["successes"], stats["failed_to_resize"]) == (25, 23, 2)
    assert stats["status_dict"] == {"success": 23, "Image decoding error": 2}  # img2dataset's words, whatever the reason
    rows = pq.read_table(f"{cfg.output}/protected/00000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["failed_to_resize"] * 2 + ["success"] * 23
    assert rows[0]["width"] is None and rows[0]["caption"] == load_shard(f"{demo}/train/00000.tar", cfg.data).captions[0]
    # a shard from another producer (no parquet, no stats): img2dataset's minimal ones
    stats = json.load(open(f"{cfg.output}/protected/00003_stats.json"))
    assert list(stats) == ["count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                           "end_time", "status_dict"]  # img2dataset's logger.write_stats, in its order
    assert (stats["count"], stats["successes"], stats["failed_to_resize"]) == (3, 2, 1)
    assert stats["status_dict"] == {"success": 2, "Image decoding error": 1}
    assert verify.verify(cfg.output)["mismatches"] == 0

    cfg = make_run(str(tmp_path / "copy"), shards, tokenizer, vocab, drop=2, extra=("merge.copy_unprotected=true",))
    summary = merge.merge(cfg)
    assert summary["samples"] == 25 + 25 + 2 and summary["copied_unprotected"] == 2
    private = manifest.read_stats(cfg.output, "00000")
    assert private["published"] == 25 and private["protected"] == 23 and private["copied_unprotected"] == 2
    assert "no_state" not in private["skipped"]
    src = load_shard(f"{demo}/train/00000.tar", cfg.data)
    for i, s in enumerate(read_tar(f"{cfg.output}/protected/00000.tar")[:2]):  # the two without state
        assert np.array_equal(pixels_of(s["png"]), src.canvases[i]) and s["txt"].decode() == src.captions[i]
        assert "mem_dist" not in json.loads(s["json"])
    record = manifest.read_manifest(cfg.output, "00000")
    assert [r["outcome"] for r in record.values()] == ["copied"] * 2 + ["protected"] * 23
    assert json.load(open(f"{cfg.output}/protected/00000_stats.json"))["successes"] == 25
    assert verify.verify(cfg.output)["mismatches"] == 0


def test_ranks_and_processes_give_the_same_bytes(run, demo, tokenizer, vocab, tmp_path, monkeypatch):
    cfg = make_run(str(tmp_path / "run"), f"{demo}/train/{{00000..00002}}.tar", tokenizer, vocab,
                   extra=("merge.processes=2",))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert merge.merge(cfg)["shards"] == 1  # rank 1 of 2 owns shard 00001 only
    assert sorted(f for f in os.listdir(f"{cfg.output}/protected") if f.endswith(".tar")) == ["00001.tar"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    summary = merge.merge(cfg)  # one rank, two worker processes: the two shards left
    assert summary["shards"] == 2 and summary["already_done"] == 1
    for name in NAMES:  # state and config are the same as the module run's, so are the shards
        for part in ("protected/{}.parquet", "protected/{}_stats.json", "manifest/{}.parquet"):
            a, b = f"{cfg.output}/{part.format(name)}", f"{run.output}/{part.format(name)}"
            assert open(a, "rb").read() == open(b, "rb").read(), a
        a, b = (tar_members(f"{out}/protected/{name}.tar") for out in (cfg.output, run.output))
        assert [(n, data) for n, data, _ in a] == [(n, data) for n, data, _ in b]  # the tars but for member mtimes


def test_cli_errors_are_one_line_exit_2(run, demo, tmp_path, capsys):
    assert merge.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert merge.main([f"data.shards={demo}/train/00000.tar", f"output={tmp_path}/empty", "merge.processes=0"]) == 2
    assert merge.main([f"data.shards={demo}/train/00000.tar", f"output={tmp_path}/empty"]) == 2  # no state yet
    assert verify.main([str(tmp_path / "empty")]) == 2
    assert merge.main([str(tmp_path / "empty")]) == 2  # not a run folder
    assert merge.main([run.output, "mem.epsilon=4"]) == 2  # with a run folder, only merge.* may be given
    assert merge.main([]) == 2  # which run?
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(line.startswith("mem-dist: error: ") for line in err)
    assert "merge.processes" in err[1] and "run generate first" in err[2] and "run.json not found" in err[4]
    assert "'mem.epsilon'" in err[5] and "mem-dist merge OUTPUT" in err[6]


def test_merge_takes_the_run_config_from_run_json(run, demo, tmp_path, capsys):
    """mem-dist merge OUTPUT needs no repeated generate overrides; with --config, only merge.*
    may differ, and a generation key given on the command line that differs is refused."""
    copy = str(tmp_path / "run")
    shutil.copytree(run.output, copy)
    shutil.rmtree(f"{copy}/protected")
    shutil.rmtree(f"{copy}/manifest")
    assert cli_main(["merge", copy, "merge.image_format=webp", "progress=false"]) == 0
    assert manifest.read_stats(copy, "00000")["image_format"] == "webp" and verify.verify(copy)["mismatches"] == 0
    config = tmp_path / "demo.yaml"  # a config that names the run folder and none of its settings
    config.write_text(yaml.safe_dump({"output": copy, "mem": {"epsilon": 4}, "merge": {"processes": 2}}))
    assert merge.main(["--config", str(config)]) == 0  # the run's generation settings are used; all shards done
    assert "generation settings are the run's" in capsys.readouterr().out
    assert merge.main(["--config", str(config), "mem.epsilon=4"]) == 2
    assert "config key 'mem.epsilon' differs from the run" in capsys.readouterr().err
    assert merge.resolve_config(None, str(config), ["merge.jpeg_quality=80"]).merge.jpeg_quality == 80


def test_drop_fields_and_publish_to_keep_the_public_side_apart(run, demo, tmp_path, capsys):
    """merge.publish_to puts the public side elsewhere (the manifest stays with the run);
    merge.drop_fields removes json keys and parquet columns, merge.keep_fields publishes a
    source field img2dataset does not write; merge says how many published samples still
    carry a url."""
    copy = str(tmp_path / "run")
    shutil.copytree(run.output, copy)
    for part in ("protected", "manifest"):
        shutil.rmtree(f"{copy}/{part}")
    public = f"memory://mem-dist-public-{os.getpid()}/shards"
    assert merge.main([copy, f"merge.publish_to={public}", "merge.drop_fields=[url]", "merge.keep_fields=[scene]"]) == 0
    assert "still carry a 'url'" not in capsys.readouterr().out
    assert not os.path.exists(f"{copy}/protected") and sorted(os.listdir(f"{copy}/manifest"))[:2] == ["00000.parquet", "00000_stats.json"]
    from mem_dist.publishing.verify import protected_samples
    samples = list(protected_samples(f"{public}/00001.tar"))
    assert len(samples) == 25 and all("url" not in json.loads(s["json"]) and "scene" in json.loads(s["json"]) for s in samples)
    with storage.open_file(f"{public}/00001.parquet") as f:
        assert "url" not in pq.read_table(f).column_names
    assert verify.verify(copy)["mismatches"] == 0
    storage.remove(public.rsplit("/", 1)[0], recursive=True)
    # the default keeps the url and says so
    shutil.rmtree(f"{copy}/manifest")
    assert merge.main([copy]) == 0
    assert "60 of 60 published samples still carry a 'url'" in capsys.readouterr().out


def test_bench_merge_runs(run, capsys):
    rows = bench.bench_merge(run, repeats=1)
    assert [label for label, _ in rows][1] == "mem-dist merge_shard" and all(rate > 0 for _, rate in rows)


def test_open_clip_train_reads_protected_shards(run, tokenizer):
    """open_clip's own training data pipeline loads the protected shards as they are."""
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data=f"{run.output}/protected/{{00000..00002}}.tar", train_num_samples=60, train_data_upsampling_factors=None,
        dataset_resampled=False, batch_size=8, workers=0, world_size=1, seed=0, distributed=False)
    preprocess = open_clip.image_transform(64, is_train=True)
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    images, texts = next(iter(data.dataloader))
    assert images.shape == (8, 3, 64, 64) and texts.shape == (8, tokenizer.context_length)


def test_merge_and_verify_on_a_remote_filesystem(demo, tokenizer, vocab):
    """Output on fsspec's in-memory filesystem: every read and write goes through storage."""
    output = f"memory://mem-dist-test-{os.getpid()}/run"
    cfg = make_run(output, f"{demo}/train/{{00000..00001}}.tar", tokenizer, vocab)
    assert merge.merge(cfg)["samples"] == 50
    assert storage.listdir(f"{output}/protected") == sorted(f"{n}{s}" for n in NAMES[:2] for s in (".parquet", ".tar", "_stats.json"))
    assert storage.listdir(f"{output}/manifest") == sorted(f"{n}{s}" for n in NAMES[:2] for s in (".parquet", "_stats.json"))
    assert verify.verify(output)["checked"] == 50 and verify.main([output]) == 0
    storage.remove(output, recursive=True)
