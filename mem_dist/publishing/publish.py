"""The public side of merge: a protected shard in img2dataset's conventions, and nothing more.

Threat model: whoever trains on the published shards holds every byte written here. So the
published files carry img2dataset's own fields and nothing that reveals the protection
(no trigger, method, setting, delta or original caption of a protected sample); what
mem-dist knows about each sample goes to the run's private side (:mod:`mem_dist.publishing.manifest`).

  KEY.json          the source sample's json: its keys in its order (and its indentation),
                    only img2dataset's own fields (:data:`IMG2DATASET_FIELDS`) and those of
                    ``merge.keep_fields``, less ``merge.drop_fields``; caption, width, height
                    and any md5 / sha256 / sha512 image hash made true of what is written
  {shard}.parquet   the source parquet: the same columns as the json and its rows in its
                    order, img2dataset's failed rows as it wrote them; a written sample's
                    caption, width, height and hashes made true of what is written; a sample
                    img2dataset downloaded that is not published (undecodable, no state, ...)
                    becomes a failed row the way img2dataset writes one: status
                    ``failed_to_resize``, img2dataset's own message (:data:`NOT_PUBLISHED`), no
                    size and no hash (the true reason is in the private manifest)
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
import os
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mem_dist.pipeline import storage

IMAGE_HASHES = ("md5", "sha256", "sha512")
"""Image hashes img2dataset may keep (its compute_hash option), in json and parquet."""

FAILED_EMPTY = ("width", "height", "original_width", "original_height", "exif", *IMAGE_HASHES)
"""Columns img2dataset leaves empty in a failed row."""

IMG2DATASET_FIELDS = ("caption", "url", "key", "status", "error_message", "width", "height", "original_width",
                      "original_height", "exif", *IMAGE_HASHES)
"""The fields img2dataset itself writes in each json and parquet row (its downloader's meta);
any other source field is one of its ``save_additional_columns`` or another producer's."""

NOT_PUBLISHED = {"image_too_large": "image area too large"}
"""The error message of a parquet row whose sample is not published, by reason: one img2dataset
writes itself (resizer.py) for the same failure, and its "Image decoding error" for any other
reason (:data:`NOT_PUBLISHED_OTHER`), so the row says nothing of mem-dist; the reason (no_state,
duplicate_key, ...) is in the private manifest."""

NOT_PUBLISHED_OTHER = "Image decoding error"


class CaptionLeak(ValueError):
    """A field to be published holds a protected sample's source caption."""


def published(name: str, keep: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> bool:
    """Whether a source json key / parquet column is published: img2dataset's own or in
    ``keep`` (merge.keep_fields), and not in ``drop`` (merge.drop_fields)."""
    return (name in IMG2DATASET_FIELDS or name in keep) and name not in drop


def left_out(raw: bytes | None, keep: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> list[str]:
    """The keys of a source json (``raw``) that the allowlist leaves out (those of ``drop``
    are the owner's own choice and not listed)."""
    return [k for k in _json_object(raw) or {} if not published(k, keep, drop) and k not in drop]


def leaked_field(values: dict, caption: str) -> str | None:
    """The first field of ``values`` (a json object or a parquet row) whose value, or a string
    nested in it, equals ``caption``; None if none does (or the caption is empty)."""

    def holds(v) -> bool:
        if isinstance(v, str):
            return v.strip() == caption
        if isinstance(v, dict):
            return any(holds(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return any(holds(x) for x in v)
        return False

    if not caption:
        return None
    return next((name for name, v in values.items() if holds(v)), None)


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


def sample_json(raw: bytes | None, written: Written, drop_fields: tuple[str, ...] = (), keep_fields: tuple[str, ...] = (),
                source_caption: str = "") -> bytes:
    """The published KEY.json: the source's (``raw``) made true of ``written``, with only the
    fields :func:`published` lets through.

    Only keys the source has are set, in its order; a sample without a usable json gets
    img2dataset's minimal one (caption, key, status, error_message, width, height, sha256).

    Raises:
        CaptionLeak: ``source_caption`` (given for a protected sample whose published caption
            differs from it) is the value of a field to be published.
    """
    meta = _json_object(raw)
    if meta is None:
        meta = {"caption": None, "key": written.key, "status": "success", "error_message": None,
                "width": None, "height": None, "sha256": None}
    meta = {k: v for k, v in meta.items() if published(k, keep_fields, drop_fields)}
    for name, value in (("caption", written.caption), ("width", written.width), ("height", written.height)):
        if name in meta:
            meta[name] = value
    for h in IMAGE_HASHES:
        if h in meta:
            meta[h] = written.hashes[h]
    leak = leaked_field(meta, source_caption)
    if leak is not None:
        raise CaptionLeak(f"json field '{leak}' of sample {written.key} holds its source caption")
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
                  drop_fields: tuple[str, ...] = (), keep_fields: tuple[str, ...] = (),
                  captions: dict[str, str] | None = None) -> pa.Table:
    """The published parquet (see the module docstring).

    Args:
        source: the source shard's parquet, or None.
        written: the published samples, in tar order.
        not_published: key -> reason of every source sample that is not published.
        drop_fields, keep_fields: which columns are published (:func:`published`).
        captions: key -> source caption of each protected sample whose published caption
            differs from it; no published cell of its row may hold it.

    Raises:
        CaptionLeak: a published cell holds its row's protected source caption.
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
                        "error_message": NOT_PUBLISHED.get(not_published.get(key, ""), NOT_PUBLISHED_OTHER)})
            row.update({c: None for c in FAILED_EMPTY if c in names})
    for w in written:  # a published sample the source parquet does not list
        if w.key not in seen:
            rows.append({"key": w.key, "status": "success", "caption": w.caption, "width": w.width, "height": w.height,
                         **{h: w.hashes[h] for h in IMAGE_HASHES}})
    keep = [f for f in schema if published(f.name, keep_fields, drop_fields)]
    for row in rows:
        caption = (captions or {}).get(row.get("key"))
        leak = leaked_field({f.name: row.get(f.name) for f in keep}, caption) if caption else None
        if leak is not None:
            raise CaptionLeak(f"parquet column '{leak}' of sample {row.get('key')} holds its source caption")
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
    if source is None:  # img2dataset's fields in its order (logger.write_stats)
        return {**{k: recount[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")},
                "duration": end - start, "start_time": start, "end_time": end, "status_dict": recount["status_dict"]}
    return {**source, **recount}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def stats_bytes(stats: dict) -> bytes:
    """Stats as img2dataset writes them (indent 4, keys in their order)."""
    return json.dumps(stats, indent=4).encode()


# --------------------------------------------------------------------------------------
# Staging: a published file is built where no reader lists it, then moved into place
# --------------------------------------------------------------------------------------

STAGING = ".staging"
"""The hidden staging folder inside a local destination, used only when the run folder is on
another device (a rename cannot cross devices). Its name says nothing of the tool: the
destination is public."""


def staging_dir(output: str, folder: str) -> str:
    """The local folder a shard's public files are built in before they are moved to ``folder``:

    - ``{output}/tmp/merge`` (private) when the run folder is local and, for a local
      destination, on the same device (so the move is one rename);
    - a local destination on another device: ``{folder}/.staging`` (hidden, the same
      device as the destination);
    - a remote destination with a remote run folder: a folder of the system's temp dir named
      after the run. The upload is one PUT or a completed multipart upload: nothing shows
      before it is whole.
    """
    if storage.is_local(folder):
        dest = storage.url_to_fs(folder)[1]
        os.makedirs(dest, exist_ok=True)
        if storage.is_local(output):
            private = os.path.join(storage.url_to_fs(output)[1], "tmp", "merge")
            os.makedirs(private, exist_ok=True)
            if os.stat(private).st_dev == os.stat(dest).st_dev:
                return private
        return os.path.join(dest, STAGING)
    if storage.is_local(output):
        return os.path.join(storage.url_to_fs(output)[1], "tmp", "merge")
    return os.path.join(tempfile.gettempdir(), f"mem-dist-merge-{hashlib.sha256(output.encode()).hexdigest()[:12]}")


def staged(staging: str, name: str, suffix: str) -> str:
    """The staging path of one public file of shard ``name`` (one owner per shard, so the name
    needs no uniquifier and a stale one is found by its shard)."""
    os.makedirs(staging, exist_ok=True)
    return os.path.join(staging, f"{name}{suffix}.partial")


def commit(path: str, url: str) -> None:
    """Move a finished staged file to ``url``: a rename for a local destination (same device,
    :func:`staging_dir`), an upload for a remote one (the staged file is consumed)."""
    if storage.is_local(url):
        target = storage.url_to_fs(url)[1]
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.replace(path, target)
    else:
        storage.put_file_atomic(path, url)


SUFFIXES = (".tar", ".parquet", "_stats.json")
"""The public files of a shard: ``{shard}.tar``, ``{shard}.parquet``, ``{shard}_stats.json``."""


def sweep(staging: str, mine: set[str], every: set[str] | None = None, folder: str | None = None) -> int:
    """Remove stale staged files (a killed merge's) of the shards in ``mine``; with ``every``
    (the run's shard names) also those of shards outside it, and with ``folder`` the ``.tmp-*``
    files merges before this version left in a local public folder. Returns how many went."""
    gone = 0
    for f in os.listdir(staging) if os.path.isdir(staging) else []:
        stem = f[: -len(".partial")] if f.endswith(".partial") else None
        shard = next((stem[: -len(x)] for x in SUFFIXES if stem and stem.endswith(x)), None)
        if shard is not None and (shard in mine or (every is not None and shard not in every)):
            os.remove(os.path.join(staging, f))
            gone += 1
    dest = storage.url_to_fs(folder)[1] if folder is not None and storage.is_local(folder) else None
    for f in os.listdir(dest) if dest and os.path.isdir(dest) else []:
        if f.startswith(".tmp-"):
            os.remove(os.path.join(dest, f))
            gone += 1
    return gone
