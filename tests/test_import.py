"""`mem-dist import`: Fashion-MNIST (Debian's dataset-fashion-mnist) and ImageFolder trees as
img2dataset-layout shards that the pipeline reads."""

import gzip
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from mem_dist.cli import main
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.data import load_shard
from mem_dist.tools.importers import (CAPTION_TEMPLATES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist_dir,
                                fetch_debian_package, fill_template)



def idx(path):
    """An idx file read the plain way: big-endian magic (0, 0, 8, ndim), dims, uint8 data."""
    raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def samples(split_dir):
    tars = sorted(f for f in os.listdir(split_dir) if f.endswith(".tar"))
    return [s for t in tars for s in wds.WebDataset(os.path.join(split_dir, t), shardshuffle=False)]


def one_line_error(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mem-dist: error: "), err
    return err[0]


def captions_of(name):
    return {fill_template(t, name) for t in CAPTION_TEMPLATES}


def files_bytes(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs if not f.endswith("_stats.json")}


def test_fashion_mnist_from_debian_files(tmp_path, capsys):
    out = str(tmp_path / "fm")
    args = ["--train", "40", "--public", "20", "--val", "20", "--per-shard", "25"]
    assert main(["import", "fashion-mnist", out, *args]) == 0
    assert "40 train (2 shards), 20 public (1 shard), 20 val (1 shard)" in capsys.readouterr().out
    for split, shards in (("train", 2), ("public", 1), ("val", 1)):
        assert sorted(os.listdir(f"{out}/{split}")) == sorted(
            f"{i:05d}{ext}" for i in range(shards) for ext in (".tar", ".parquet", "_stats.json"))
    src = fashion_mnist_dir()  # Debian's folder, or the package fetched without root
    label_files = {part: idx(f"{src}/{part}-labels-idx1-ubyte.gz") for part in ("train", "t10k")}
    image_files = {part: idx(f"{src}/{part}-images-idx3-ubyte.gz") for part in ("train", "t10k")}
    sources = {}
    for split, n, part in (("train", 40, "train"), ("public", 20, "train"), ("val", 20, "t10k")):
        got = samples(f"{out}/{split}")
        assert len(got) == n
        assert [s["__key__"] for s in got] == [f"{i // 25 * 10000 + i % 25:09d}" for i in range(n)]
        rows = [r for f in sorted(os.listdir(f"{out}/{split}")) if f.endswith(".parquet")
                for r in pq.read_table(f"{out}/{split}/{f}").to_pylist()]
        for s, row in zip(got, rows):
            meta = json.loads(s["json"])
            i, label = meta["source_index"], meta["label"]
            assert meta["url"].endswith(f"/fashion-mnist/{part}/{i}") and meta["key"] == s["__key__"]
            assert label == label_files[part][i] and meta["class"] == FASHION_MNIST_CLASSES[label]
            assert s["txt"].decode() == meta["caption"] in captions_of(meta["class"])
            assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (32, 32, 28, 28)
            assert meta["status"] == "success" and len(meta["sha256"]) == 64
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.mode == "RGB" and img.size == (32, 32)
            small = np.asarray(img.convert("L").resize((28, 28), Image.BICUBIC), np.float32)
            assert np.abs(small - image_files[part][i]).mean() < 12  # the idx image, resized and JPEG'd
            assert row == {k: meta[k] for k in row} and row["label"] == label
        sources[split] = {json.loads(s["json"])["source_index"] for s in got}
        assert len(sources[split]) == n
    assert not sources["train"] & sources["public"]  # val comes from the other file
    assert len({json.loads(s["json"])["caption"] for s in samples(f"{out}/train")}) > 5  # varied templates
    stats = json.load(open(f"{out}/train/00001_stats.json"))
    assert stats["count"] == stats["successes"] == 15

    shard = load_shard(f"{out}/train/00000.tar", DataConfig(shards="x", image_size=32))
    assert len(shard) == 25 and shard.canvases.shape == (25, 32, 32, 3) and not shard.skipped

    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    assert main(["import", "fashion-mnist", again, *args]) == 0
    assert main(["import", "fashion-mnist", other, *args, "--seed", "1"]) == 0
    assert files_bytes(out) == files_bytes(again)
    assert files_bytes(out)["train/00000.tar"] != files_bytes(other)["train/00000.tar"]


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def test_fashion_mnist_is_fetched_without_root_when_not_installed(tmp_path):
    """README's set-up and test commands on a fresh machine: without the package (and without
    root) the importer unpacks Debian's package into a cache folder with apt-get download + dpkg -x."""
    cache = str(tmp_path / "cache")
    root = fetch_debian_package(cache=cache)
    data = root + FASHION_MNIST_DIR
    assert sorted(os.listdir(data)) == sorted(f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k")
                                              for k, d in (("images", 3), ("labels", 1)))
    assert idx(f"{data}/t10k-labels-idx1-ubyte.gz").shape == (10000,)
    assert fetch_debian_package(cache=cache) == root and not any(f.endswith(".deb") for f in os.listdir(cache))  # once


def test_fashion_mnist_src_with_plain_idx_files_and_errors(tmp_path, capsys):
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("t10k", 12)):
        write_idx(src / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{part}-labels-idx1-ubyte", np.arange(n) % 10)
    out = str(tmp_path / "out")
    assert main(["import", "fashion-mnist", out, "--src", str(src), "--train", "20", "--public", "10",
                 "--val", "0", "--select", "0", "--size", "28", "--per-shard", "8"]) == 0
    assert sorted(os.listdir(out)) == ["public", "train"]  # a split of 0 samples is not written
    got = samples(f"{out}/train") + samples(f"{out}/public")
    assert sorted(json.loads(s["json"])["source_index"] for s in got) == list(range(30))
    for s in got:
        meta = json.loads(s["json"])
        assert meta["label"] == meta["source_index"] % 10 and meta["width"] == 28
    assert fill_template("a photo of a {c}.", "ankle boot") == "a photo of an ankle boot."
    assert not any("a ankle" in c for c in captions_of("ankle boot"))

    base = ["import", "fashion-mnist", str(tmp_path / "bad"), "--src", str(src)]
    assert "exceeds" in one_line_error(capsys, base + ["--train", "25", "--public", "10", "--val", "0"])
    assert "12 test images" in one_line_error(capsys, base + ["--train", "1", "--public", "0", "--val", "13"])
    assert "--per-shard" in one_line_error(capsys, base + ["--per-shard", "0"])
    assert "--src" in one_line_error(capsys, ["import", "fashion-mnist", str(tmp_path / "o"), "--src", str(tmp_path / "nope")])
    os.remove(src / "t10k-labels-idx1-ubyte")
    assert "t10k-labels-idx1-ubyte" in one_line_error(capsys, base + ["--train", "1", "--public", "0", "--val", "1"])
    assert not os.path.exists(tmp_path / "bad")


COLOURS = {"cat": (220, 30, 30), "dog_house": (30, 170, 50), "zebra": (30, 60, 220)}


def make_folder(root):
    """3 class folders with 5 images each (PNG / JPEG, odd sizes, RGBA, greyscale, a sub-folder),
    plus one corrupt JPEG and one text file."""
    for c, (r, g, b) in COLOURS.items():
        os.makedirs(root / c / "more")
        for i in range(5):
            w, h = 40 + 10 * i, 30 + 5 * i
            img = Image.new("RGB", (w, h), (r, g, b))
            if i == 1:
                img = img.convert("RGBA")
            name = root / c / ("more" if i == 4 else "") / f"img{i}.{'png' if i % 2 else 'JPG'}"
            img.save(name, format="PNG" if i % 2 else "JPEG", quality=98)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "zebra" / "notes.txt").write_text("not an image")


def test_folder_import_skips_the_corrupt_file(tmp_path, capsys):
    src = tmp_path / "photos"
    make_folder(src)
    out = str(tmp_path / "out")
    assert main(["import", "folder", str(src), out, "--train", "8", "--public", "4", "--val", "3", "--per-shard", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    warnings = [line for line in printed if "warning" in line]
    assert len(warnings) == 1 and "skipped 1 unreadable image" in warnings[0] and "cat/broken.jpg" in warnings[0], printed
    seen = []
    for split, n in (("train", 8), ("public", 4), ("val", 3)):
        got = samples(f"{out}/{split}")
        assert len(got) == n
        for s in got:
            meta = json.loads(s["json"])
            c = meta["class"]
            assert meta["label"] == sorted(COLOURS).index(c) and meta["source_path"].startswith(c + "/")
            assert s["txt"].decode() in captions_of(c.replace("_", " "))
            img = np.asarray(Image.open(io.BytesIO(s["jpg"])))
            assert img.shape == (32, 32, 3) and np.abs(img.mean((0, 1)) - COLOURS[c]).max() < 6
            w, h = Image.open(src / meta["source_path"]).size
            assert (meta["original_width"], meta["original_height"]) == (w, h)
            seen.append(meta["source_path"])
    assert len(seen) == len(set(seen)) == 15 and "cat/more/img4.JPG" in seen
    shard = load_shard(f"{out}/val/00000.tar", DataConfig(shards="x", image_size=32))
    assert len(shard) == 3 and not shard.skipped


def test_folder_errors(tmp_path, capsys):
    src = tmp_path / "photos"
    make_folder(src)
    out = str(tmp_path / "out")
    msg = one_line_error(capsys, ["import", "folder", str(src), out, "--train", "10", "--public", "5", "--val", "2"])
    assert "16 images" in msg and "17" in msg
    msg = one_line_error(capsys, ["import", "folder", str(src), out, "--train", "10", "--public", "5", "--val", "1"])
    assert "only 15 of its 16 images decode" in msg
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    assert "no class sub-folders" in one_line_error(capsys, ["import", "folder", str(flat), out])
    assert "no such folder" in one_line_error(capsys, ["import", "folder", str(tmp_path / "nope"), out])
