"""Writing image-caption shards in img2dataset's layout: the one writer for demo and imported data.

Output under ``out``: ``00000.tar``, ``00001.tar``, ... (``per_shard`` samples each; keys
are shard id then index, 9 digits up to 10,000 samples a shard, as img2dataset), each
holding ``KEY.jpg`` (JPEG quality 95, img2dataset's default), ``KEY.txt`` (the caption)
and ``KEY.json`` (img2dataset's fields plus the sample's extras), with ``00000.parquet``
(one row per sample) and ``00000_stats.json`` beside each tar. Tar mtimes are 0, so the
same samples give byte-identical tars and parquet files; only the stats' times differ.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import time
from typing import Any, Iterable, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from mem_dist.pipeline import storage

ImageLike = Union[Image.Image, np.ndarray]
"""A PIL image, or uint8 [H, W, 3] RGB / [H, W] greyscale pixels."""

PARQUET_COLUMNS = ("url", "caption", "key", "status", "error_message",
                   "width", "height", "original_width", "original_height")
"""The parquet columns every shard has (img2dataset's, without exif)."""

_END = object()


def encode_jpeg(image: ImageLike, quality: int = 95) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of an image, stored as RGB."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.width, img.height


def write_shards(out: str, samples: Iterable[tuple[ImageLike, str, dict[str, Any]]], per_shard: int,
                 url_base: str | None = None, parquet_extra: Sequence[str] = ()) -> list[str]:
    """Write ``samples`` as img2dataset-style shards under ``out`` (any fsspec URL).

    Args:
        samples: (image, caption, extra) per sample, consumed lazily shard by shard (a
            generator may draw each shard's samples when that shard starts). ``extra`` is
            added to the sample's json after img2dataset's fields; a key that is one of
            them (``url``, ``original_width``, ...) replaces its value in place.
        per_shard: samples per shard; an empty ``samples`` still writes one empty shard.
        url_base: each sample's ``url`` is ``{url_base}/{key}.jpg`` unless ``extra`` sets
            one; None: no url unless ``extra`` sets one.
        parquet_extra: keys of ``extra`` that also become parquet columns.

    Returns:
        The URLs of the tar shards written, in order.
    """
    storage.makedirs(out)
    key_digits = max(4, math.ceil(math.log10(max(per_shard, 2))))  # 9-digit keys, as img2dataset at 10k/shard
    it = iter(samples)
    urls: list[str] = []
    for shard_id in itertools.count():
        start = time.time()
        chunk = itertools.islice(it, per_shard)
        first = next(chunk, _END)
        if first is _END and shard_id > 0:
            break
        name = f"{shard_id:05d}"
        rows = []
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=0) as tw:
            for idx, (image, caption, extra) in enumerate(itertools.chain([first], chunk) if first is not _END else ()):
                key = f"{shard_id * 10 ** key_digits + idx:0{5 + key_digits}d}"
                jpg, width, height = encode_jpeg(image)
                meta = {
                    "url": f"{url_base}/{key}.jpg" if url_base else None, "caption": caption, "key": key,
                    "status": "success", "error_message": None, "width": width, "height": height,
                    "original_width": width, "original_height": height,
                    "sha256": hashlib.sha256(jpg).hexdigest(),
                }
                meta.update(extra)
                tw.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta).encode()})
                rows.append({k: meta[k] for k in (*PARQUET_COLUMNS, *parquet_extra)})
        count = len(rows)
        tar_url = storage.join(out, f"{name}.tar")
        storage.write_bytes_atomic(tar_url, buf.getvalue())
        pbuf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), pbuf)
        storage.write_bytes_atomic(storage.join(out, f"{name}.parquet"), pbuf.getvalue())
        end = time.time()
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": end - start, "start_time": start, "end_time": end, "status_dict": {"success": count}}
        storage.write_json(storage.join(out, f"{name}_stats.json"), stats)
        urls.append(tar_url)
        if count < per_shard:
            break
    return urls
