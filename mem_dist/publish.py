"""The public side of merge: a protected shard in img2dataset's conventions, and nothing more.

Threat model: whoever trains on the published shards holds every byte written here. So the
published files carry img2dataset's own fields and nothing that reveals the protection
(no trigger, method, setting, delta or original caption of a protected sample); what
mem-dist knows about each sample goes to the run's private side (:mod:`mem_dist.manifest`).

  KEY.json          the source sample's json: the same keys in the same order (and the same
                    indentation), with caption, width, height and any md5 / sha256 / sha512
                    image hash made true of what is written; ``merge.drop_fields`` removed
  {shard}.parquet   the source parquet: its columns (less ``merge.drop_fields``) and its rows
                    in its order, img2dataset's failed rows as it wrote them; a written
                    sample's caption, width, height and hashes made true of what is written; a
                    sample img2dataset downloaded that is not published (undecodable, no state,
                    ...) becomes a failed row the way img2dataset writes one: status
                    ``failed_to_resize``, a plain error message, no size and no hash
  {shard}_stats.json  the source stats, with count, successes, failed_to_download,
                    failed_to_resize and status_dict recounted from that parquet

Shards from other producers (no parquet or stats beside the tar) get img2dataset's minimal
ones, built from what was written.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mem_dist import storage

IMAGE_HASHES = ("md5", "sha256", "sha512")
"""Image hashes img2dataset may keep (its compute_hash option), in json and parquet."""

FAILED_EMPTY = ("width", "height", "original_width", "original_height", "exif", *IMAGE_HASHES)
"""Columns img2dataset leaves empty in a failed row."""

NOT_PUBLISHED = {
    "decode_error": "Image decoding error",  # img2dataset's own words for the same failure
    "no_image": "no image in the sample",
    "wrong_size": "image is not the expected size",
    "duplicate_key": "duplicate key",
    "no_caption": "empty caption",
}
"""Error message of a parquet row whose sample is not published, by reason; any other reason
(``no_state``: generation made nothing for it) reads "not published"."""


@dataclass
class Written:
    """A sample as published: its key, caption, size and the hashes of its image bytes."""

    key: str
    caption: str
    width: int
    height: int
    hashes: dict[str, str] = field(default_factory=dict)  # every name of IMAGE_HASHES

    @classmethod
    def of(cls, key: str, caption: str, image: bytes, width: int, height: int) -> "Written":
        return cls(key, caption, width, height, {h: hashlib.new(h, image).hexdigest() for h in IMAGE_HASHES})


def _json_object(raw: bytes | None) -> dict | None:
    try:
        meta = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def sample_json(raw: bytes | None, written: Written, drop_fields: tuple[str, ...] = ()) -> bytes:
    """The published KEY.json: the source's (``raw``) made true of ``written``, less ``drop_fields``.

    Only keys the source has are set, in its order; a sample without a usable json gets
    img2dataset's minimal one (caption, key, status, error_message, width, height, sha256).
    """
    meta = _json_object(raw)
    if meta is None:
        meta = {"caption": None, "key": written.key, "status": "success", "error_message": None,
                "width": None, "height": None, "sha256": None}
    for name, value in (("caption", written.caption), ("width", written.width), ("height", written.height)):
        if name in meta:
            meta[name] = value
    for h in IMAGE_HASHES:
        if h in meta:
            meta[h] = written.hashes[h]
    for name in drop_fields:
        meta.pop(name, None)
    indent = 4 if raw and b"\n" in raw else None  # img2dataset writes indent=4
    return json.dumps(meta, indent=indent).encode()


def read_source_table(tar_url: str, suffix: str):
    """The ``.parquet`` (a pyarrow Table) or ``_stats.json`` (a dict) beside a source tar, or None."""
    url = tar_url[: -len(".tar")] + suffix if tar_url.endswith(".tar") else tar_url + suffix
    if not storage.exists(url):
        return None
    if suffix == ".parquet":
        with storage.open_file(url, "rb") as f:
            return pq.read_table(f)
    return storage.read_json(url)


def shard_parquet(source: pa.Table | None, written: list[Written], not_published: dict[str, str],
                  drop_fields: tuple[str, ...] = ()) -> pa.Table:
    """The published parquet (see the module docstring).

    Args:
        source: the source shard's parquet, or None.
        written: the published samples, in tar order.
        not_published: key -> reason of every source sample that is not published.
        drop_fields: columns to remove.
    """
    by_key = {w.key: w for w in written}
    if source is None:
        schema = pa.schema([("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
                            ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                            ("sha256", pa.string())])
        rows = [{"key": k} for k in [w.key for w in written] + list(not_published)]
    else:
        schema, rows = source.schema, source.to_pylist()
    names = set(schema.names)
    seen = set()
    for row in rows:
        key = row.get("key")
        seen.add(key)
        w = by_key.get(key)
        if w is not None:
            row.update({"status": "success", "error_message": None, "caption": w.caption, "width": w.width, "height": w.height,
                        **{h: w.hashes[h] for h in IMAGE_HASHES if h in names}})
        elif row.get("status", "success") == "success":  # img2dataset wrote it, mem-dist does not publish it
            row.update({"status": "failed_to_resize",
                        "error_message": NOT_PUBLISHED.get(not_published.get(key, ""), "not published")})
            row.update({c: None for c in FAILED_EMPTY if c in names})
    for w in written:  # a published sample the source parquet does not list
        if w.key not in seen:
            rows.append({"key": w.key, "status": "success", "caption": w.caption, "width": w.width, "height": w.height,
                         **{h: w.hashes[h] for h in IMAGE_HASHES}})
    keep = [f for f in schema if f.name not in drop_fields]
    # a column the source wrote only nulls in (pyarrow types it "null") may hold text now
    keep = [f.with_type(pa.string()) if pa.types.is_null(f.type) and any(r.get(f.name) is not None for r in rows) else f
            for f in keep]
    out_schema = pa.schema(keep, metadata=schema.metadata if len(keep) == len(schema) else None)
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in keep} for row in rows], schema=out_schema)


def shard_stats(source: dict | None, table: pa.Table, start: float, end: float) -> dict:
    """The published _stats.json: the source's fields, with the counts recounted from the
    published parquet ``table``; img2dataset's fields and times when there is no source."""
    status = table.column("status").to_pylist() if "status" in table.column_names else []
    messages = table.column("error_message").to_pylist() if "error_message" in table.column_names else [None] * len(status)
    counts = collections.Counter(status)
    status_dict = collections.Counter("success" if s == "success" else (m or s) for s, m in zip(status, messages))
    recount = {"count": len(status), "successes": counts["success"], "failed_to_download": counts["failed_to_download"],
               "failed_to_resize": counts["failed_to_resize"], "status_dict": dict(status_dict)}
    if source is None:
        return {**recount, "duration": end - start, "start_time": start, "end_time": end}
    return {**source, **recount}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def stats_bytes(stats: dict) -> bytes:
    """Stats as img2dataset writes them (indent 4, keys in their order)."""
    return json.dumps(stats, indent=4).encode()
