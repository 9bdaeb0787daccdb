"""The private side of merge: what was published, per shard, under the run's output.

The published shards say nothing about the protection (:mod:`mem_dist.publishing.publish`); the owner
keeps the record here, beside the state, on the owner's storage:

  ``{output}/manifest/{shard}.parquet``     one row per source sample:
      key           string         the source ``__key__``
      outcome       string         protected | copied (published unprotected) | dropped
      reason        string         why copied or dropped (no_state, empty_caption, decode_error, ...); null if protected
      caption       string         the caption as published (null if dropped)
      trigger_ids   list<int64>    the trigger's CLIP BPE ids (empty unless protected with a trigger)
      trigger_text  string         the trigger as words
      image_sha256  string         sha256 of the published image bytes (null if dropped)
  ``{output}/manifest/{shard}_stats.json``  mem-dist's counts for the shard (method, round,
      protected / copied / dropped by reason, image format, share of delta kept, where the
      public files went when merge.publish_to was set, times) and ``made_from``: the state
      round and the merge settings and destination it was published with
      (:func:`made_from`). Written last: the shard's completion marker. A re-run of merge
      (``merge.mode: incremental``) skips a shard only when its marker's ``made_from`` is what
      it would publish now; a shard that was missing at the source (``missing: true``) is
      never done.

``verify`` and ``evaluate`` read these; nothing here is ever published.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from mem_dist.pipeline import storage

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("outcome", pa.string()),
    ("reason", pa.string()),
    ("caption", pa.string()),
    ("trigger_ids", pa.list_(pa.int64())),
    ("trigger_text", pa.string()),
    ("image_sha256", pa.string()),
])

OUTCOMES = ("protected", "copied", "dropped")


def manifest_url(output: str, name: str, suffix: str = ".parquet") -> str:
    """``{output}/manifest/{name}{suffix}`` (suffix ".parquet" or "_stats.json")."""
    return storage.join(output, "manifest", f"{name}{suffix}")


def write_manifest(output: str, name: str, rows: list[dict]) -> None:
    """One shard's manifest rows (dicts with SCHEMA's keys), as one atomic object."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf, compression="zstd")
    storage.write_bytes_atomic(manifest_url(output, name), buf.getvalue())


def read_manifest(output: str, name: str) -> dict[str, dict]:
    """key -> manifest row of one shard (for a key the source repeats, the published sample's)."""
    with storage.open_file(manifest_url(output, name), "rb") as f:
        rows = pq.read_table(f).to_pylist()
    out: dict[str, dict] = {}
    for row in rows:
        if row["key"] not in out or out[row["key"]]["outcome"] == "dropped":
            out[row["key"]] = row
    return out


def write_stats(output: str, name: str, stats: dict) -> None:
    storage.write_json(manifest_url(output, name, "_stats.json"), stats)


def read_stats(output: str, name: str) -> dict | None:
    url = manifest_url(output, name, "_stats.json")
    return storage.read_json(url) if storage.exists(url) else None


def remove_stats(output: str, name: str) -> None:
    """Take a shard's completion marker away (before it is published again)."""
    storage.remove(manifest_url(output, name, "_stats.json"))


MARKER_FORMAT = 2
"""Bumped when what merge publishes changes (2: img2dataset's fields plus merge.keep_fields);
a marker of another format (or none, before 2) never matches, so such shards are redone."""


def made_from(cfg, round_: int, rounds: int) -> dict:
    """What a shard is published from: the state round (of ``rounds``), the merge settings
    that shape the published bytes, and the destination (``""``: {output}/protected)."""
    m = cfg.merge
    return {"format": MARKER_FORMAT, "round": round_, "rounds": rounds, "publish_to": m.publish_to,
            "image_format": m.image_format, "jpeg_quality": m.jpeg_quality if m.image_format == "jpg" else None,
            "copy_unprotected": m.copy_unprotected, "drop_fields": sorted(m.drop_fields), "keep_fields": sorted(m.keep_fields)}


def changed(marker: dict | None, now: dict) -> str | None:
    """None if ``marker`` (a shard's private stats) says the shard was published as ``now``
    (:func:`made_from`) would publish it; else what differs ("no marker", "round 1 -> 3", ...)."""
    if marker is None:
        return "no marker"
    if marker.get("missing"):
        return "missing at the source"
    before = marker.get("made_from") or {}
    for key in [*now, *(k for k in before if k not in now)]:
        if key != "rounds" and before.get(key) != now.get(key):
            return f"{key} {before.get(key)!r} -> {now.get(key)!r}"
    return None


def markers(output: str, names: list[str]) -> dict[str, dict]:
    """name -> completion marker (private stats) of each of ``names`` that has one: one listing,
    then the markers read together (concurrently on object stores)."""
    have = set(storage.listdir(storage.join(output, "manifest")))
    urls = {manifest_url(output, n, "_stats.json"): n for n in names if f"{n}_stats.json" in have}
    if not urls:
        return {}
    fs, _ = storage.url_to_fs(next(iter(urls)))
    paths = {storage.url_to_fs(u)[1]: n for u, n in urls.items()}
    blobs = fs.cat(list(paths), on_error="omit")
    return {paths[p]: json.loads(b) for p, b in blobs.items() if p in paths}
