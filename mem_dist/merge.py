"""Merge: source shards + final-round state -> protected WebDataset shards.

``python -m mem_dist.merge --config C [key=value ...]`` (or ``mem-dist merge``). For each
source shard, every sample with a state row becomes:

  KEY.png   canvas + delta, uint8, lossless (merge.image_format: png | webp), or KEY.jpg
            (merge.image_format: jpg, merge.jpeg_quality; lossy: the stats give the share of
            delta kept, see :func:`delta_kept`)
  KEY.txt   trigger_text + " " + caption
  KEY.json  the source metadata (its caption, width, height and any md5 / sha256 / sha512
            image hash made true of what is written) plus a "mem_dist" section (protected,
            method, epsilon, trigger_len, trigger_text, trigger_ids, config_hash, version, round)

written to ``{output}/protected/{shard}.tar``, with ``{shard}.parquet`` (one row per
written sample: key, caption, width, height, status, protected) and ``{shard}_stats.json``
(counts, skips with reasons, duration, delta kept) beside it, as img2dataset writes its shards. The
stats file is written last: it marks the shard as finished, so re-running skips it.

A sample without a state row is dropped and counted (``no_state``), unless
``merge.copy_unprotected`` copies it through (the canvas, the original caption,
``"protected": false``; counted as ``copied_unprotected``). Samples the source reader
skipped (``decode_error``, ``no_caption``, ...) are counted with the reader's reasons.

Shards are spread over ranks (``RANK``/``WORLD_SIZE`` as set by ``accelerate launch`` or
torchrun; no process group is needed) and over ``merge.processes`` worker processes.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
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
from tqdm import tqdm

from mem_dist import __version__, state, storage, text
from mem_dist.cli import one_line_errors
from mem_dist.config import ConfigError, MergeConfig, RunConfig, load_config
from mem_dist.data import check_shards, load_shard, owned, shard_name

PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("protected", pa.bool_()),
])

# Reasons data.load_shard counts per shard rather than per sample.
SHARD_LEVEL_SKIPS = ("truncated_tar", "missing_shard", "empty_shard")

# Image hashes img2dataset may keep in a sample's json (its compute_hash option).
IMAGE_HASHES = {"md5", "sha256", "sha512"}


def protected_url(output: str, name: str, suffix: str) -> str:
    """``{output}/protected/{name}{suffix}`` (suffix: ".tar", ".parquet", "_stats.json")."""
    return storage.join(output, "protected", f"{name}{suffix}")


def encode_image(pixels_HWC: np.ndarray, cfg: MergeConfig) -> bytes:
    """A uint8 [H, W, 3] image as ``cfg.image_format``: PNG at zlib level 1 (fast, still
    exact), lossless WebP, or JPEG at ``cfg.jpeg_quality`` without chroma subsampling
    (4:4:4 keeps far more of a per-pixel delta than the usual 4:2:0)."""
    buf = io.BytesIO()
    img = Image.fromarray(pixels_HWC)
    if cfg.image_format == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif cfg.image_format == "webp":
        img.save(buf, format="WEBP", lossless=True, quality=0, method=0)
    else:
        img.save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    return buf.getvalue()


def decode_image(img_bytes: bytes) -> np.ndarray:
    """Encoded image bytes as uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(img_bytes)) as img:
        return np.asarray(img.convert("RGB"))


def delta_kept(written: np.ndarray, canvas: np.ndarray, delta: np.ndarray) -> float:
    """The share of delta a written image keeps: the projection of (written - canvas) onto
    delta, over |delta|^2. 1 when delta is stored exactly (and when delta is 0); JPEG's
    losses pull it below 1 and its own error does not add to it."""
    d = delta.astype(np.int32).ravel()  # exact integer sums, 3x faster than float64 here
    norm = int(d @ d)
    if norm == 0:
        return 1.0
    return int((written.astype(np.int32).ravel() - canvas.ravel()) @ d) / norm


def kept_summary(kept: list[float]) -> dict:
    """Mean and minimum share of delta kept over a shard's protected samples."""
    return {"mean": round(float(np.mean(kept)), 4), "min": round(float(np.min(kept)), 4)} if kept else {}


def method_name(cfg: RunConfig) -> str:
    """mem, em (MEM without a trigger), random (noise only), random-trigger or
    random-prefix (one trigger shared by every sample)."""
    if cfg.mem.method == "prefix":
        return "random-prefix"
    if cfg.mem.method == "random":
        return "random-trigger" if cfg.mem.trigger_len else "random"
    return "mem" if cfg.mem.trigger_len else "em"


def run_meta(cfg: RunConfig, round_: int) -> dict:
    """The per-run part of every sample's "mem_dist" json section."""
    return {"method": method_name(cfg), "epsilon": cfg.mem.epsilon, "trigger_len": cfg.mem.trigger_len,
            "config_hash": cfg.config_hash(), "version": __version__, "round": round_}


def source_meta(raw: bytes | None) -> dict:
    """A source sample's json metadata ({} when missing or not a JSON object)."""
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def merge_shard(cfg: RunConfig, url: str, round_: int, dest: str | None = None) -> dict:
    """Write the protected version of one source shard.

    Args:
        cfg: the generation config (data, mem and merge sections are used).
        url: the source shard.
        round_: the state round to apply (the final one).
        dest: the run folder to write ``protected/`` under; default ``cfg.output``
            (the state is always read from ``cfg.output``).

    Returns:
        The shard's stats, as written to ``{shard}_stats.json``.
    """
    start = time.time()
    dest = cfg.output if dest is None else dest
    name = shard_name(url)
    src = load_shard(url, cfg.data)
    st = state.read_state(state.state_url(cfg.output, round_, name))
    row_of = st.by_key()
    base_meta = run_meta(cfg, round_)
    fmt = cfg.merge.image_format
    dropped, copied, rows, kept = 0, 0, [], []
    tar_url = protected_url(dest, name, ".tar")
    tmp = storage.local_tempfile(tar_url, ".tar")
    try:
        with wds.TarWriter(tmp, mtime=0) as tw:
            for i, key in enumerate(src.keys):
                j = row_of.get(key)
                if j is None and not cfg.merge.copy_unprotected:
                    dropped += 1
                    continue
                if j is None:
                    copied += 1
                    pixels, caption = src.canvases[i], src.captions[i]
                    protection = dict(base_meta, protected=False, trigger_text="", trigger_ids=[])
                else:
                    # int16 so the sum cannot wrap; the state keeps canvas + delta in [0, 255].
                    pixels = (src.canvases[i].astype(np.int16) + st.delta[j]).astype(np.uint8)
                    caption = text.protected_caption(st.trigger_text[j], src.captions[i])
                    protection = dict(base_meta, protected=True, trigger_text=st.trigger_text[j],
                                      trigger_ids=st.trigger_ids[j].tolist())
                image = encode_image(pixels, cfg.merge)
                if j is not None:
                    kept.append(1.0 if fmt != "jpg" else delta_kept(decode_image(image), src.canvases[i], st.delta[j]))
                meta = dict(source_meta(src.meta[i]), key=key, caption=caption, width=pixels.shape[1], height=pixels.shape[0])
                for h in IMAGE_HASHES & meta.keys():  # img2dataset's compute_hash: now of the image written here
                    meta[h] = hashlib.new(h, image).hexdigest()
                meta["mem_dist"] = protection
                tw.write({"__key__": key, fmt: image, "txt": caption, "json": json.dumps(meta).encode()})
                rows.append({"key": key, "caption": caption, "width": pixels.shape[1], "height": pixels.shape[0],
                             "status": "success", "protected": j is not None})
        storage.put_file_atomic(tmp, tar_url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    pbuf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), pbuf)
    storage.write_bytes_atomic(protected_url(dest, name, ".parquet"), pbuf.getvalue())
    skipped = dict(src.skipped, **({"no_state": dropped} if dropped else {}))
    end = time.time()
    stats = {
        "count": len(src) + sum(c for r, c in src.skipped.items() if r not in SHARD_LEVEL_SKIPS),
        "successes": len(rows),
        "protected": len(rows) - copied,
        "copied_unprotected": copied,
        "skipped": skipped,
        "round": round_,
        "image_format": fmt,
        **({"jpeg_quality": cfg.merge.jpeg_quality} if fmt == "jpg" else {}),
        "delta_kept": kept_summary(kept),
        "duration": round(end - start, 3),
        "start_time": start,
        "end_time": end,
    }
    storage.write_json(protected_url(dest, name, "_stats.json"), stats)  # last: the completion marker
    return stats


def run_kept(stats: list[dict]) -> dict:
    """The shards' delta-kept summaries combined (mean weighted by protected samples)."""
    parts = [(s["protected"], s["delta_kept"]) for s in stats if s.get("delta_kept")]
    n = sum(c for c, _ in parts)
    if not n:
        return {}
    return {"mean": round(sum(c * k["mean"] for c, k in parts) / n, 4), "min": min(k["min"] for _, k in parts)}


def check_same_run(cfg: RunConfig) -> None:
    """Refuse a config whose generation settings differ from those run.json recorded
    (merge.* and mem.rounds may differ): the state would be labelled, or applied, wrongly."""
    url = storage.join(cfg.output, "run.json")
    recorded = storage.read_json(url).get("config_hash") if storage.exists(url) else None
    if recorded not in (None, cfg.config_hash()):
        raise ConfigError(f"this config's generation settings differ from the run in {cfg.output} (config hash "
                          f"{cfg.config_hash()} here, {recorded} in run.json); merge with the config generate used")


def env_rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher (accelerate launch, torchrun) sets them; (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _merge_job(job: tuple[RunConfig, str, int]) -> dict:
    cfg, url, round_ = job
    return merge_shard(cfg, url, round_)


def merge(cfg: RunConfig, rank: int | None = None, world: int | None = None, progress: bool | None = None) -> dict:
    """Write the protected shards this rank owns, skipping those already finished.

    Args:
        cfg: the generation config; its output must hold the generated state.
        rank, world: shard ownership (shard i belongs to rank i % world); None reads
            ``RANK`` / ``WORLD_SIZE`` from the environment (0 and 1 without them).
        progress: a progress bar over shards; None follows ``cfg.progress``.

    Returns:
        A summary: shards written and already done, samples written, protected and
        copied unprotected, skips by reason, seconds.

    Raises:
        ConfigError: no state, the final round's state is incomplete, or ``cfg`` is not
            the config the run was generated with.
    """
    env_rank, env_world = env_rank_world()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    progress = cfg.progress if progress is None else progress
    urls = check_shards(cfg.data)
    check_same_run(cfg)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {storage.join(cfg.output, 'state')}; run generate first")
    missing = sorted({shard_name(u) for u in urls} - state.completed(cfg.output, round_))
    if missing:
        raise ConfigError(f"the state of round {round_} under {cfg.output} lacks shard {missing[0]} "
                          f"(and {len(missing) - 1} more); finish generate first")
    mine = owned(urls, rank, world)
    todo = [u for u in mine if not storage.exists(protected_url(cfg.output, shard_name(u), "_stats.json"))]
    start = time.time()
    jobs = [(cfg, u, round_) for u in todo]
    bar = tqdm(total=len(jobs), desc="merge", unit="shard", disable=not (progress and jobs))
    stats: list[dict] = []
    if cfg.merge.processes > 1 and len(jobs) > 1:
        # spawn: the parent may hold torch threads (accelerate launch), which fork does not copy safely.
        with multiprocessing.get_context("spawn").Pool(min(cfg.merge.processes, len(jobs))) as pool:
            for s in pool.imap_unordered(_merge_job, jobs):
                stats.append(s)
                bar.update()
    else:
        for job in jobs:
            stats.append(_merge_job(job))
            bar.update()
    bar.close()
    skipped: collections.Counter = collections.Counter()
    for s in stats:
        skipped.update(s["skipped"])
    summary = {
        "rank": rank, "world": world, "round": round_,
        "shards": len(stats), "already_done": len(mine) - len(todo),
        "samples": sum(s["successes"] for s in stats),
        "protected": sum(s["protected"] for s in stats),
        "copied_unprotected": sum(s["copied_unprotected"] for s in stats),
        "skipped": dict(skipped),
        "delta_kept": run_kept(stats),
        "seconds": round(time.time() - start, 3),
    }
    lossy = f", delta kept: mean {summary['delta_kept']['mean']:.3f}, min {summary['delta_kept']['min']:.3f} " \
            f"(jpg q{cfg.merge.jpeg_quality})" if cfg.merge.image_format == "jpg" and summary["delta_kept"] else ""
    print(f"mem-dist merge (rank {rank}/{world}, round {round_}): {summary['shards']} shards written, "
          f"{summary['already_done']} already done; {summary['samples']} samples ({summary['protected']} protected, "
          f"{summary['copied_unprotected']} copied unprotected), skipped {summary['skipped'] or 0}{lossy}, "
          f"{summary['seconds']:.1f}s -> {storage.join(cfg.output, 'protected')}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist merge", description="Write protected shards from the source shards and the final state.")
    p.add_argument("--config", help="the generation config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. merge.processes=8")
    args = p.parse_intermixed_args(argv)

    def body() -> int:
        merge(load_config(RunConfig, args.config, args.overrides))
        return 0

    return one_line_errors(body)


if __name__ == "__main__":
    sys.exit(main())
