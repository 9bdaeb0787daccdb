"""The private side of merge: what was published, per shard, under the run's output.

The published shards say nothing about the protection (:mod:`mem_dist.publish`); the owner
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
      public files went when merge.publish_to was set, times). Written last: the shard's completion marker for merge.

``verify`` and ``evaluate`` read these; nothing here is ever published.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from mem_dist import storage

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


def finished(output: str) -> set[str]:
    """Names of the shards merge has finished (their private stats exist)."""
    return {n[: -len("_stats.json")] for n in storage.listdir(storage.join(output, "manifest")) if n.endswith("_stats.json")}
