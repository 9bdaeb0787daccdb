"""img2dataset in, img2dataset out, and nothing for the attacker.

The real img2dataset (from the registry) downloads images served by http.server on 127.0.0.1,
with a 404, a file that is not an image and two empty captions among them, and writes the
source shards. generate -> merge -> verify runs on them; then the test plays the attacker,
who holds every published byte: it reads every tar member, json, parquet cell and stats
field, and finds no trigger word or id, no sign of the method, and no original caption of a
protected sample; the published parquet and stats keep img2dataset's schema and rows.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mem_dist.publishing import manifest, merge, verify
from mem_dist.pipeline import state
from mem_dist.tools.demo import render_scene
from mem_dist.pipeline.generate import main as generate
from tests.conftest import tiny_overrides

N_IMAGES = 26  # served; plus a 404 and a non-image
PER_SHARD = 15
FORBIDDEN_KEYS = ("mem_dist", "trigger", "method", "epsilon", "config_hash", "protected", "delta", "round", "outcome")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """img2dataset's shards of images served on 127.0.0.1 (two shards of up to 15 rows)."""
    root = tmp_path_factory.mktemp("i2d")
    served = root / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        img, caption, _ = render_scene(rng, 40 + i % 7)
        img.save(served / f"{i}.jpg", quality=95)
        rows.append((f"{i}.jpg", "" if i in (4, 17) else caption, f"CC-BY {i}"))
    (served / "broken.jpg").write_bytes(b"this is not an image")
    rows.insert(9, ("missing.jpg", "a photo that is gone", "CC0"))
    rows.insert(20, ("broken.jpg", "a file that is not a photo", "CC0"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pq.write_table(pa.table({"url": [f"{base}/{u}" for u, _, _ in rows], "caption": [c for _, c, _ in rows],
                             "license": [lic for _, _, lic in rows]}), root / "urls.parquet")
    out = root / "shards"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    try:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "img2dataset"), "--url_list", str(root / "urls.parquet"),
                        "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
                        "--save_additional_columns", "['license']", "--output_format", "webdataset",
                        "--output_folder", str(out), "--image_size", "32", "--resize_mode", "border",
                        "--processes_count", "1", "--thread_count", "4", "--number_sample_per_shard", str(PER_SHARD),
                        "--enable_wandb", "False", "--retries", "0", "--timeout", "5"],
                       env=env, check=True, capture_output=True, timeout=300)
    finally:
        server.shutdown()
    return str(out)


def tar_samples(path: str) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, straight from the tar (no webdataset)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def run(source, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("run") / "run")
    assert generate(tiny_overrides(f"{source}/{{00000..00001}}.tar", out, **{"mem.rounds": 1, "data.resize_mode": "border"})) == 0
    assert merge.main([out, "merge.image_format=jpg", "merge.keep_fields=[license]", "progress=false"]) == 0
    return out


def test_img2dataset_wrote_what_the_test_expects(source):
    stats = [json.load(open(f"{source}/{n}_stats.json")) for n in ("00000", "00001")]
    assert sum(s["count"] for s in stats) == N_IMAGES + 2 and sum(s["successes"] for s in stats) == N_IMAGES
    assert sum(s["failed_to_download"] for s in stats) == 1 and sum(s["failed_to_resize"] for s in stats) == 1


def test_verify_is_exact_and_every_source_sample_is_accounted_for(source, run):
    report = verify.verify(run)
    assert report["mismatches"] == 0 and report["checked"] == N_IMAGES
    for name in ("00000", "00001"):
        src = tar_samples(f"{source}/{name}.tar")
        pub = tar_samples(f"{run}/protected/{name}.tar")
        assert list(pub) == list(src)  # same keys, same order
        assert all(set(pub[k]) == set(src[k]) for k in src)  # jpg / json / txt, as img2dataset writes them
        record = manifest.read_manifest(run, name)
        assert set(record) == set(src) and all(r["outcome"] == "protected" for r in record.values())


def test_the_attacker_finds_nothing(source, run):
    protected = {}  # key -> (original caption, trigger words, trigger ids)
    for name in ("00000", "00001"):
        st = state.read_state(state.state_url(run, 1, name))
        src = tar_samples(f"{source}/{name}.tar")
        for k, ids, words in zip(st.keys, st.trigger_ids, st.trigger_text):
            protected[k] = (src[k]["txt"].decode(), words, ids.tolist())
    assert sum(1 for c, _, _ in protected.values() if c == "") == 2
    published = sorted(os.listdir(f"{run}/protected"))
    assert published == sorted(f"{n}{s}" for n in ("00000", "00001") for s in (".tar", ".parquet", "_stats.json"))

    def scan(value, where: str, captions_ok: bool = False) -> None:
        """No field outside the captions holds a trigger, its ids or a protected original caption."""
        if isinstance(value, dict):
            for k, v in value.items():
                assert not any(f in k.lower() for f in FORBIDDEN_KEYS), (where, k)
                scan(v, f"{where}.{k}", captions_ok=k == "caption")
        elif isinstance(value, list):
            for i, ids in protected.items():
                assert value != ids[2], (where, value)
            for v in value:
                scan(v, where)
        elif isinstance(value, str) and not captions_ok:
            for original, words, _ in protected.values():
                assert not (original and value == original), (where, value)
                assert words not in value, (where, words, value)

    for name in ("00000", "00001"):
        pub = tar_samples(f"{run}/protected/{name}.tar")
        src = tar_samples(f"{source}/{name}.tar")
        for key, members in pub.items():
            original, words, _ = protected[key]
            caption = members["txt"].decode()
            assert caption == (f"{words} {original}" if original else words) and caption != original
            meta = json.loads(members["json"])
            source_meta = json.loads(src[key]["json"])
            assert list(meta) == list(source_meta)  # img2dataset's fields, in its order, nothing added
            assert {k for k in meta if meta[k] != source_meta[k]} <= {"caption", "sha256"}
            scan(meta, f"{name}/{key}.json")
        table = pq.read_table(f"{run}/protected/{name}.parquet")
        source_table = pq.read_table(f"{source}/{name}.parquet")
        assert table.schema.equals(source_table.schema)
        for row, source_row in zip(table.to_pylist(), source_table.to_pylist(), strict=True):
            assert row["key"] == source_row["key"] and row["status"] == source_row["status"]
            if row["status"] != "success":
                assert row == source_row  # img2dataset's failed rows as it wrote them
            else:
                assert {k for k in row if row[k] != source_row[k]} <= {"caption", "sha256"}
            scan(row, f"{name}.parquet")
        stats = json.load(open(f"{run}/protected/{name}_stats.json"))
        assert stats == json.load(open(f"{source}/{name}_stats.json"))  # every success published: the same stats
        scan(stats, f"{name}_stats.json")
        raw = b"".join(open(f"{run}/protected/{name}{s}", "rb").read() for s in (".parquet", "_stats.json"))
        assert b"mem_dist" not in raw and b"mem-dist" not in raw


def test_open_clip_train_reads_the_published_shards(run):
    """open_clip's own trainer's data pipeline loads the published shards as they are."""
    import argparse

    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data=f"{run}/protected/{{00000..00001}}.tar", train_num_samples=N_IMAGES, train_data_upsampling_factors=None,
        dataset_resampled=False, batch_size=4, workers=0, world_size=1, seed=0, distributed=False)
    data = get_wds_dataset(args, open_clip.image_transform(32, is_train=True), is_train=True, epoch=0,
                           tokenizer=open_clip.get_tokenizer("RN50"))
    images, texts = next(iter(data.dataloader))
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 77)
