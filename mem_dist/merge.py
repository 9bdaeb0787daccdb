"""Merge: source shards + final-round state -> protected WebDataset shards.

``python -m mem_dist.merge --config C [key=value ...]`` (or ``mem-dist merge``). For each
source shard, every sample with state becomes:

  KEY.png   canvas + delta, uint8, lossless (merge.image_format png | webp)
  KEY.txt   trigger_text + " " + caption
  KEY.json  the source metadata plus a "mem_dist" section (method, epsilon, trigger,
            config hash, package version, round)

written to ``{output}/protected/{shard}.tar`` with a ``{shard}.parquet`` (one row per
written sample) and ``{shard}_stats.json`` (counts, skips with reasons, duration) beside
it. The stats file is written last: it marks the shard as finished, so re-running skips
it. A sample without state is dropped and counted (``no_state``) unless
``merge.copy_unprotected`` copies it through unprotected (counted too).

Shards are spread over ranks (``RANK``/``WORLD_SIZE`` from the launcher, no process group
needed) and over ``merge.processes`` worker processes per rank.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mem_dist import __version__, state, storage, text
from mem_dist.config import ConfigError, RunConfig, load_config
from mem_dist.data import check_shards, load_shard, owned, shard_name


def protected_url(output: str, name: str, ext: str) -> str:
    return storage.join(output, "protected", f"{name}{ext}")


def encode_image(pixels_HWC: np.ndarray, fmt: str) -> bytes:
    """Lossless encoding of a uint8 image (PNG at zlib level 1: fast, still exact)."""
    buf = io.BytesIO()
    img = Image.fromarray(pixels_HWC)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def protection_meta(cfg: RunConfig, round_: int, trigger_ids, trigger_text: str, protected: bool) -> dict:
    method = "random" if cfg.mem.method == "random" else ("mem" if cfg.mem.trigger_len else "em")
    return {"protected": protected, "method": method, "epsilon": cfg.mem.epsilon, "trigger_len": cfg.mem.trigger_len,
            "trigger_text": trigger_text, "trigger_ids": [int(i) for i in trigger_ids], "config_hash": cfg.config_hash(),
            "version": __version__, "round": round_}


def merge_shard(cfg: RunConfig, url: str, round_: int, dest: str | None = None) -> dict:
    """Write one protected shard under ``dest`` (default: the run's output); returns its stats."""
    dest = cfg.output if dest is None else dest
    start = time.time()
    name = shard_name(url)
    src = load_shard(url, cfg.data)
    st = state.read_state(state.state_url(cfg.output, round_, name))
    row_of = st.by_key()
    counts = collections.Counter()
    rows = []
    ext = cfg.merge.image_format
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as tw:
        for i, key in enumerate(src.keys):
            j = row_of.get(key)
            if j is None and not cfg.merge.copy_unprotected:
                counts["no_state"] += 1
                continue
            if j is None:
                pixels, caption = src.canvases[i], src.captions[i]
                meta = protection_meta(cfg, round_, [], "", protected=False)
                counts["copied_unprotected"] += 1
            else:
                pixels = (src.canvases[i].astype(np.int16) + st.delta[j]).astype(np.uint8)
                caption = text.protected_caption(st.trigger_text[j], src.captions[i])
                meta = protection_meta(cfg, round_, st.trigger_ids[j], st.trigger_text[j], protected=True)
            record = dict(source_meta(src.meta[i]), key=key, caption=caption, mem_dist=meta)
            tw.write({"__key__": key, ext: encode_image(pixels, ext), "txt": caption, "json": json.dumps(record).encode()})
            rows.append({"key": key, "caption": caption, "status": "success", "width": int(pixels.shape[1]),
                         "height": int(pixels.shape[0]), "protected": j is not None})
    storage.write_bytes_atomic(protected_url(dest, name, ".tar"), buf.getvalue())
    pbuf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("caption", pa.string()), ("status", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("protected", pa.bool_())])), pbuf)
    storage.write_bytes_atomic(protected_url(dest, name, ".parquet"), pbuf.getvalue())
    skipped = dict(src.skipped)
    if counts["no_state"]:
        skipped["no_state"] = counts["no_state"]
    end = time.time()
    stats = {"count": len(src) + sum(src.skipped.values()), "successes": len(rows),
             "protected": len(rows) - counts["copied_unprotected"], "copied_unprotected": counts["copied_unprotected"],
             "skipped": skipped, "round": round_, "duration": round(end - start, 3), "start_time": start, "end_time": end}
    storage.write_json(protected_url(dest, name, "_stats.json"), stats)  # last: the completion marker
    return stats


def source_meta(raw: bytes | None) -> dict:
    """A source sample's json metadata ({} when missing or invalid)."""
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _merge_one(args) -> tuple[str, dict]:
    cfg, url, round_ = args
    return shard_name(url), merge_shard(cfg, url, round_)


def merge(cfg: RunConfig, rank: int | None = None, world: int | None = None, log=print) -> dict:
    """Merge this rank's shards (all of them on one process); returns a summary."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    urls = check_shards(cfg.data)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {cfg.output}/state; run generate first")
    missing = sorted({shard_name(u) for u in urls} - state.completed(cfg.output, round_))
    if missing:
        raise ConfigError(f"round {round_} state is incomplete under {cfg.output} (missing {missing[0]} and "
                          f"{len(missing) - 1} more); finish generate first")
    todo = [u for u in owned(urls, rank, world) if not storage.exists(protected_url(cfg.output, shard_name(u), "_stats.json"))]
    start = time.time()
    jobs = [(cfg, u, round_) for u in todo]
    if cfg.merge.processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(cfg.merge.processes, len(jobs))) as pool:
            results = dict(pool.imap_unordered(_merge_one, jobs))
    else:
        results = dict(map(_merge_one, jobs))
    total = collections.Counter()
    for stats in results.values():
        total["samples"] += stats["successes"]
        total["copied_unprotected"] += stats["copied_unprotected"]
        for reason, c in stats["skipped"].items():
            total[f"skipped_{reason}"] += c
    secs = time.time() - start
    log(f"mem-dist merge: {len(results)} shards written, {len(urls) - len(todo)} already done on this run "
        f"(rank {rank}/{world}); {total['samples']} samples in {secs:.1f}s; {dict(total)}")
    return {"shards": len(results), "seconds": secs, **total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist merge", description="Write protected shards from source shards + final state.")
    p.add_argument("--config", help="the generation config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)
    try:
        merge(load_config(RunConfig, args.config, args.overrides))
    except ConfigError as e:
        print(f"mem-dist: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
