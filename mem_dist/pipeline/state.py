"""Per-shard generation state: one Parquet object per shard per round, committed atomically.

``{output}/state/round-{r:03d}/{shard}.parquet``, one row per usable source sample:

  key            string        the source ``__key__``
  delta          binary        int8 bytes, row-major [H, W, C], in 1/255 units
  delta_shape    list<int32>   [H, W, C]
  trigger_ids    list<int64>   k CLIP BPE ids (empty for EM)
  trigger_text   string        the trigger as words; tokenises back to trigger_ids
  loss           float32       the sample's contrastive loss (trigger + caption, canvas + delta, in its batch)
  clean_loss     float32       the same without delta and trigger (the shortcut shows as loss << clean_loss)

The shard's skip counts travel in the file's metadata (``mem_dist.skipped``), so a
shard's state and its stats exist together or not at all. A state file that exists is
complete: it is written to a temp name, fsynced and moved (local) or PUT in one request (S3).
One that cannot be read all the same (zero bytes, not Parquet, columns missing: a disk that
lost it, a hand that touched it) raises :class:`StateError`, one line naming its URL; a
resumed generate finds such objects first (:func:`sweep`) and redoes them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mem_dist.pipeline import storage


class StateError(RuntimeError):
    """A state object that exists but cannot be read; ``url`` names it."""

    one_line = True  # mem_dist.errors: one line, exit 1

    def __init__(self, url: str, why: str, advice: str = "run the same generate command again to redo it"):
        super().__init__(f"state object {url} is unreadable ({why}); {advice}")
        self.url = url


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:120]}"

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("delta", pa.binary()),
    ("delta_shape", pa.list_(pa.int32())),
    ("trigger_ids", pa.list_(pa.int64())),
    ("trigger_text", pa.string()),
    ("loss", pa.float32()),
    ("clean_loss", pa.float32()),
])


@dataclass
class ShardState:
    """The state of one shard after a round (rows aligned with ``keys``)."""

    keys: list[str]
    delta: np.ndarray  # int8 [N, H, W, C]
    trigger_ids: np.ndarray  # int64 [N, k]
    trigger_text: list[str]
    loss: np.ndarray  # float32 [N]
    clean_loss: np.ndarray  # float32 [N]
    skipped: dict[str, int] = field(default_factory=dict)

    def by_key(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}


def round_dir(output: str, round_: int) -> str:
    return storage.join(output, "state", f"round-{round_:03d}")


def state_url(output: str, round_: int, shard: str) -> str:
    return storage.join(round_dir(output, round_), f"{shard}.parquet")


def write_state(url: str, state: ShardState) -> None:
    """Write a shard's state as one atomic object."""
    n = len(state.keys)
    shape = list(state.delta.shape[1:]) if n else []
    table = pa.table({
        "key": pa.array(state.keys, pa.string()),
        "delta": pa.array([d.tobytes() for d in state.delta], pa.binary()),
        "delta_shape": pa.array([shape] * n, pa.list_(pa.int32())),
        "trigger_ids": pa.array([list(map(int, t)) for t in state.trigger_ids], pa.list_(pa.int64())),
        "trigger_text": pa.array(state.trigger_text, pa.string()),
        "loss": pa.array(state.loss.astype(np.float32), pa.float32()),
        "clean_loss": pa.array(state.clean_loss.astype(np.float32), pa.float32()),
    }, schema=SCHEMA)
    table = table.replace_schema_metadata({"mem_dist.skipped": json.dumps(state.skipped, sort_keys=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)  # damaged pages are found when read
    storage.write_bytes_atomic(url, buf.getvalue())


def _read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    """The state table (or some of its columns); StateError if the object is not a state.
    The whole table is fetched first and parsed in memory, so that an error in parsing is
    the object's own, never the network's; a column subset is read from the file (a
    projection: the delta column, the bulk, is skipped)."""
    if columns is None:
        raw = storage.read_bytes(url)  # a storage error is raised as it is
        try:
            table = pq.read_table(io.BytesIO(raw), page_checksum_verification=True)
        except Exception as e:
            raise StateError(url, _why(e) if raw else "zero bytes") from e
    else:
        try:
            with storage.open_file(url, "rb") as f:
                table = pq.read_table(f, columns=columns, page_checksum_verification=True)
        except Exception as e:
            if _parquet_error(e):
                raise StateError(url, _why(e)) from e
            raise
    missing = [c for c in (columns or SCHEMA.names) if c not in table.column_names]
    if missing:
        raise StateError(url, f"no column '{missing[0]}'")
    return table


def _parquet_error(e: BaseException) -> bool:
    """Whether pyarrow raised ``e`` about the bytes (zero length, no magic, a bad footer, a
    page whose checksum fails), not the storage under it: pyarrow's own exceptions and the
    bare OSError (no errno) it raises for a damaged page."""
    return isinstance(e, pa.ArrowException) or (type(e) is OSError and e.errno is None)


def read_state(url: str) -> ShardState:
    """Read a shard's state back (delta as int8 [N, H, W, C])."""
    table = _read_table(url)
    meta = table.schema.metadata or {}
    skipped = json.loads(meta.get(b"mem_dist.skipped", b"{}"))
    cols = table.to_pydict()
    n = len(cols["key"])
    if n:
        shape = tuple(cols["delta_shape"][0])
        delta = np.stack([np.frombuffer(b, dtype=np.int8).reshape(shape) for b in cols["delta"]])
    else:
        delta = np.zeros((0, 0, 0, 3), np.int8)
    k = len(cols["trigger_ids"][0]) if n else 0
    trig = np.array(cols["trigger_ids"], dtype=np.int64).reshape(n, k)
    return ShardState(cols["key"], delta, trig, cols["trigger_text"], np.array(cols["loss"], np.float32),
                      np.array(cols["clean_loss"], np.float32), skipped)


def read_summary(url: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(loss, clean_loss, skip counts) of a shard's state, without reading delta."""
    table = _read_table(url, ["loss", "clean_loss"])
    skipped = json.loads((table.schema.metadata or {}).get(b"mem_dist.skipped", b"{}"))
    return table.column("loss").to_numpy(), table.column("clean_loss").to_numpy(), skipped


def row_count(output: str, round_: int, shard_url: str) -> int | None:
    """How many samples a shard's state of ``round_`` holds, from the Parquet footer alone;
    None if that state does not exist."""
    name = storage.basename(shard_url)
    url = state_url(output, round_, name[: -len(".tar")] if name.endswith(".tar") else name)
    if round_ < 1 or not storage.exists(url):
        return None
    try:
        return check_object(url)
    except StateError:
        return None  # the caller decodes the shard instead


def check_object(url: str) -> int:
    """The row count of a state object from its Parquet footer (the data pages are not
    read); StateError if the object is empty, not Parquet, or lacks the state's columns."""
    try:
        with storage.open_file(url, "rb") as f:
            pf = pq.ParquetFile(f)
            names, rows = pf.schema_arrow.names, pf.metadata.num_rows
    except Exception as e:
        if _parquet_error(e):
            raise StateError(url, _why(e)) from e
        raise
    missing = [c for c in SCHEMA.names if c not in names]
    if missing:
        raise StateError(url, f"no column '{missing[0]}'")
    return rows


def sweep(output: str, round_: int, shards: list[str], log=print, full: bool = False) -> list[str]:
    """Remove the unreadable state objects of round ``round_`` among ``shards`` (names),
    each named in one line, so that the run redoes them; returns the names removed. Zero
    bytes are seen in the listing; other objects have their footer read (one small read),
    or with ``full`` all of it, every page's checksum verified (the final round's: nothing
    else in generate reads it whole)."""
    folder = round_dir(output, round_)
    sizes = storage.sizes(folder) if round_ >= 1 else {}
    removed = []
    for name in shards:
        size = sizes.get(f"{name}.parquet")
        if size is None:
            continue
        url = state_url(output, round_, name)
        try:
            if size == 0:
                raise StateError(url, "zero bytes")
            read_state(url) if full else check_object(url)
        except StateError as e:
            storage.remove(url)
            removed.append(name)
            log(f"mem-dist: warning: {str(e).split('; ')[0]}; removed, and redone by this run")
    return removed


def summary(url: str) -> dict:
    """A state's loss sums for the round metrics: {"n", "loss_sum", "clean_sum", "skipped"}
    (float64 sums; NaN for the baselines, which compute no loss)."""
    loss, clean, skipped = read_summary(url)
    return {"n": len(loss), "loss_sum": float(np.sum(loss, dtype=np.float64)),
            "clean_sum": float(np.sum(clean, dtype=np.float64)), "skipped": skipped}


def completed(output: str, round_: int) -> set[str]:
    """Names of the shards whose state for ``round_`` exists (and so is complete)."""
    return {storage.basename(p)[: -len(".parquet")] for p in storage.listdir(round_dir(output, round_)) if p.endswith(".parquet")}


def latest_round(output: str) -> int:
    """The highest round with a state folder (0 if none)."""
    rounds = [int(storage.basename(p).split("-")[1]) for p in storage.listdir(storage.join(output, "state"))
              if storage.basename(p).startswith("round-")]
    return max(rounds, default=0)


def prune(output: str, keep_latest: int, upto: int) -> None:
    """Delete state rounds older than the newest ``keep_latest`` (0 = keep all)."""
    if keep_latest <= 0:
        return
    for r in range(1, upto - keep_latest + 1):
        url = round_dir(output, r)
        if storage.exists(url):
            storage.remove(url, recursive=True)
