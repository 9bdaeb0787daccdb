"""``mem-dist import``: labelled image data as img2dataset-layout shards (real photos for the pipeline).

Two sources:

  fashion-mnist  Fashion-MNIST's idx files (Debian's ``dataset-fashion-mnist`` puts them in
                 /usr/share/datasets/fashion-mnist, gzipped; plain files work too): 28x28
                 greyscale, 10 classes (:data:`FASHION_MNIST_CLASSES`). ``train`` and
                 ``public`` come from the 60,000 training images, ``val`` and ``select`` from the 10,000 test ones. Without the
                 package and without root, the package is fetched (``apt-get download``)
                 and unpacked into ~/.cache/mem-dist (:func:`fashion_mnist_dir`).
  folder         torchvision's ImageFolder layout, ``DIR/<class name>/**/<image>``; class
                 index = position in the sorted class-folder names, as torchvision. All
                 three splits come from the folder's images.

Each image becomes an RGB square of ``size`` pixels (shorter side to ``size``, bicubic,
centre crop: :func:`mem_dist.pipeline.data.to_canvas`), stored as JPEG 95 by
:func:`mem_dist.tools.shards.write_shards` under ``OUT/train``, ``OUT/public``, ``OUT/val`` and ``OUT/select`` (a
split of 0 samples is not written; select: clean images disjoint from val, for the attacker's
choice of its best epoch). Splits are seeded and disjoint; the same seed gives
byte-identical shards. The caption names the class through a template of
:data:`CAPTION_TEMPLATES` chosen per sample by a seeded RNG. Each sample's json holds
img2dataset's fields (``url`` is a made-up ``https://import.mem-dist.invalid/...`` naming
the source image), plus ``label`` (int), ``class`` (the class name) and ``source_index``
(fashion-mnist: index in the idx file) or ``source_path`` (folder: path under DIR).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from typing import Iterator

import numpy as np
from PIL import Image

from mem_dist.pipeline import storage
from mem_dist.pipeline.config import MAX_PIXELS
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import to_canvas
from mem_dist.tools.shards import write_shards

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
"""Fashion-MNIST's class names by label 0..9."""

CAPTION_TEMPLATES = (
    "a photo of a {c}.",
    "a product photo of the {c}",
    "a black and white photo of a {c}.",
    "a close-up photo of a {c}.",
    "a low resolution photo of the {c}.",
    "a cropped photo of a {c}.",
    "a photo of the {c}, for sale",
    "a bright photo of a {c}.",
    "a photo of a small {c}.",
    "a good photo of the {c}.",
)
"""Caption templates, clip_benchmark style; ``{c}`` is the class name (fill with :func:`fill_template`)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Image file extensions the folder import reads (torchvision's, any case)."""
FOLDER_FORMATS = ["JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP"]
"""The only Pillow decoders the folder import tries (those extensions' formats: never EPS and the like)."""
FOLDER_MAX_PIXELS = MAX_PIXELS
"""A larger image is skipped from its header (``data.max_pixels``' default)."""

SPLITS = ("train", "public", "val", "select")
"""The splits, disjoint: train (to protect), public (stand-in public checkpoints), val (the
test images victims are scored on), select (clean images disjoint from val, on which the
attacker picks its best epoch)."""
URL_BASE = "https://import.mem-dist.invalid"


def fill_template(template: str, name: str) -> str:
    """A template with ``{c}`` replaced by ``name`` ("a {c}" becomes "an ankle boot")."""
    if name[:1].lower() in "aeiou":
        template = re.sub(r"\ba \{c\}", "an {c}", template)
    return template.format(c=name)


def read_idx(url: str) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of its dims: images [N, 28, 28], labels [N]."""
    raw = storage.read_bytes(url)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\0\0\x08":
        raise ConfigError(f"{url}: not an idx file of uint8 data (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ConfigError(f"{url}: idx header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def fetch_debian_package(package: str = "dataset-fashion-mnist", cache: str | None = None) -> str:
    """Debian's package unpacked without root (``apt-get download`` + ``dpkg -x``) into a cache
    folder, once; returns the folder it was unpacked into (its ``/`` )."""
    cache = cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mem-dist", package)
    if os.path.isfile(os.path.join(cache, ".unpacked")):
        return cache
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise ConfigError(f"{package} is not installed and this machine has no apt-get / dpkg to fetch it: install it "
                          f"or pass --src a folder with Fashion-MNIST's four idx files")
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if got.returncode or not debs:
            why = (got.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise ConfigError(f"{package} is not installed and 'apt-get download {package}' failed ({why}); install it "
                              f"(apt-get install {package}) or pass --src DIR")
        subprocess.run(["dpkg", "-x", os.path.join(tmp, debs[0]), cache], check=True, capture_output=True)
    open(os.path.join(cache, ".unpacked"), "w").close()
    return cache


def fashion_mnist_dir(src: str | None = None) -> str:
    """``src``, or Debian's folder when its package is installed, or else the package fetched
    and unpacked into a cache folder without root (:func:`fetch_debian_package`)."""
    if src is not None and src != FASHION_MNIST_DIR:
        return src
    if os.path.isdir(FASHION_MNIST_DIR):
        return FASHION_MNIST_DIR
    return fetch_debian_package().rstrip("/") + FASHION_MNIST_DIR


def load_fashion_mnist(src: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of ``part`` "train" (N = 60,000) or "t10k" (10,000)."""
    fs, path = storage.url_to_fs(src)
    if not fs.isdir(path):
        raise ConfigError(f"no Fashion-MNIST folder {src}: install it (apt-get install dataset-fashion-mnist) or pass --src DIR")
    arrays = []
    for stem in (f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte"):
        url = next((storage.join(src, stem + ext) for ext in (".gz", "") if storage.exists(storage.join(src, stem + ext))), None)
        if url is None:
            raise ConfigError(f"{src} has no {stem}[.gz]: pass --src a folder with Fashion-MNIST's four idx files")
        arrays.append(read_idx(url))
    images, labels = arrays
    if images.ndim != 3 or labels.shape != images.shape[:1] or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ConfigError(f"{src}: {part} images {images.shape} and labels {labels.shape} are not Fashion-MNIST's")
    return images, labels


def scan_folder(src: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path relative to ``src``, class index)]) of an ImageFolder tree, sorted."""
    fs, root = storage.url_to_fs(src)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ConfigError(f"no such folder: {src}")
    classes = sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True) if e["type"] == "directory")
    if not classes:
        raise ConfigError(f"{src} has no class sub-folders: expected DIR/<class name>/<image files> (torchvision's ImageFolder)")
    files = []
    for idx, name in enumerate(classes):
        for path in sorted(fs.find(posixpath.join(root, name))):
            if path.lower().endswith(IMAGE_EXTENSIONS):
                files.append((path[len(root) + 1:], idx))
    return classes, files


def _check(train: int, val: int, public: int, size: int, per_shard: int, select: int = 0) -> None:
    for flag, value, least in (("--train", train, 0), ("--val", val, 0), ("--public", public, 0), ("--select", select, 0),
                               ("--size", size, 1), ("--per-shard", per_shard, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, not {value}")


def _captioned(samples: Iterator[tuple[np.ndarray, dict]], rng: np.random.Generator):
    """(canvas uint8 [S, S, 3], json extras) samples as (canvas, caption, extras): the class
    name (``extra["class"]``, underscores as spaces) in a template drawn by ``rng``."""
    for canvas, extra in samples:
        name = extra["class"].replace("_", " ")
        yield canvas, fill_template(CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))], name), extra


def _write(out: str, splits: dict[str, Iterator], per_shard: int, seed: int, counts: dict[str, int]) -> dict[str, list[str]]:
    urls = {}
    for i, split in enumerate(SPLITS):
        if counts[split]:
            samples = _captioned(splits[split], np.random.default_rng([seed, 2, i]))
            urls[split] = write_shards(storage.join(out, split), samples, per_shard, parquet_extra=("label", "class"))
    return urls


def import_fashion_mnist(out: str, src: str | None = None, train: int = 4000, val: int = 1000,
                         public: int = 4000, size: int = 32, seed: int = 0, per_shard: int = 500,
                         select: int | None = 0) -> dict[str, list[str]]:
    """Fashion-MNIST as shards under ``out``; returns the tar URLs per split written. ``src``
    None: Debian's folder, fetched without root when the package is not installed. ``select``
    None: 1000, or as many test images as ``val`` leaves."""
    src = fashion_mnist_dir(src)
    tr_images, tr_labels = load_fashion_mnist(src, "train")
    te_images, te_labels = load_fashion_mnist(src, "t10k")
    if select is None:
        select = max(0, min(1000, len(te_images) - val))
    _check(train, val, public, size, per_shard, select)
    if train + public > len(tr_images):
        raise ConfigError(f"--train {train} + --public {public} = {train + public} exceeds Fashion-MNIST's {len(tr_images)} training images")
    if val + select > len(te_images):
        raise ConfigError(f"--val {val} + --select {select} exceeds Fashion-MNIST's {len(te_images)} test images")
    tr_order = np.random.default_rng([seed, 0]).permutation(len(tr_images))
    te_order = np.random.default_rng([seed, 1]).permutation(len(te_images))
    picks = {"train": ("train", tr_order[:train]), "public": ("train", tr_order[train:train + public]),
             "val": ("t10k", te_order[:val]), "select": ("t10k", te_order[val:val + select])}

    def samples(part: str, indices: np.ndarray):
        images, labels = (tr_images, tr_labels) if part == "train" else (te_images, te_labels)
        for i in indices:
            label = int(labels[i])
            h, w = images[i].shape
            yield to_canvas(Image.fromarray(images[i]), size, "center_crop"), {
                "url": f"{URL_BASE}/fashion-mnist/{part}/{i}", "original_width": w, "original_height": h,
                "label": label, "class": FASHION_MNIST_CLASSES[label], "source_index": int(i)}

    return _write(out, {s: samples(*picks[s]) for s in SPLITS}, per_shard, seed,
                  {"train": train, "public": public, "val": val, "select": select})


def import_folder(src: str, out: str, train: int = 4000, val: int = 1000, public: int = 4000, size: int = 32,
                  seed: int = 0, per_shard: int = 500, select: int = 0) -> dict[str, list[str]]:
    """An ImageFolder tree as shards under ``out``; returns the tar URLs per split written.

    Images are taken in a seeded random order (train, then public, then val); an image
    that does not decode is skipped (one warning line at the end, with the count) and the
    next one taken."""
    _check(train, val, public, size, per_shard, select)
    classes, files = scan_folder(src)
    need = train + public + val + select
    if need > len(files):
        raise ConfigError(f"{src} holds {len(files)} images ({', '.join(IMAGE_EXTENSIONS)}) in {len(classes)} class folders, "
                          f"fewer than --train + --public + --val + --select = {need}")
    order = iter(np.random.default_rng([seed, 0]).permutation(len(files)))
    skipped: list[str] = []

    def samples(n: int):
        taken = 0
        while taken < n:
            i = next(order, None)
            if i is None:
                raise ConfigError(f"{src}: only {len(files) - len(skipped)} of its {len(files)} images decode, "
                                  f"fewer than --train + --public + --val + --select = {need} (splits written so far are incomplete)")
            rel, label = files[i]
            try:
                with Image.open(io.BytesIO(storage.read_bytes(storage.join(src, rel))), formats=FOLDER_FORMATS) as img:
                    if img.width * img.height > FOLDER_MAX_PIXELS:  # refused from the header, before decoding
                        raise ValueError(f"{img.width} x {img.height} pixels, over {FOLDER_MAX_PIXELS:,}")
                    img.load()
                    original = img.size
                    canvas = to_canvas(img, size, "center_crop")
            except Exception as e:  # PIL raises many types for bad bytes
                skipped.append(f"{rel} ({type(e).__name__}: {' '.join(str(e).split())})")
                continue
            taken += 1
            yield canvas, {
                "url": f"{URL_BASE}/folder/{urllib.parse.quote(rel)}", "original_width": original[0],
                "original_height": original[1], "label": label, "class": classes[label], "source_path": rel}

    try:
        return _write(out, {"train": samples(train), "public": samples(public), "val": samples(val),
                            "select": samples(select)}, per_shard, seed,
                      {"train": train, "public": public, "val": val, "select": select})
    finally:
        if skipped:
            print(f"mem-dist: warning: skipped {len(skipped)} unreadable image(s) under {src}, first: {skipped[0]}", flush=True)


def run(source: str, src: str | None, out: str, **flags: int) -> int:
    """The body of ``mem-dist import SOURCE``: write the shards, print one summary line."""
    if source == "fashion-mnist":
        urls = import_fashion_mnist(out, src, **flags)
    else:
        urls = import_folder(src, out, **flags)
    count = lambda s: f"{flags[s]} {s}" if flags.get(s) is not None else s  # noqa: E731 (select: its default)
    written = ", ".join(f"{count(s)} ({len(urls[s])} shard{'s' * (len(urls[s]) != 1)})" for s in SPLITS if s in urls) or "nothing"
    print(f"mem-dist: wrote {written} under {out}")
    return 0
