"""Merge: source shards + final-round state -> protected shards (public) + manifest (private).

``mem-dist merge OUTPUT [merge.key=value ...]`` (or ``python -m mem_dist.merge OUTPUT``)
takes the run's config from ``OUTPUT/run.json``; ``--config C [key=value ...]`` works too,
and then only ``merge.*`` (and ``progress``) may differ from the run's. For each source shard,
every sample with a state row becomes:

  KEY.png   canvas + delta, uint8, lossless (merge.image_format: png | webp), or KEY.jpg
            (merge.image_format: jpg, merge.jpeg_quality; lossy: the private stats give the
            share of delta kept, see :func:`delta_kept`)
  KEY.txt   trigger_text + " " + caption (the trigger alone for an empty caption)
  KEY.json  the source json made true of what is written (:mod:`mem_dist.publishing.publish`)

written to ``{publish}/{shard}.tar`` with ``{shard}.parquet`` and ``{shard}_stats.json`` in
img2dataset's schema beside it (``publish`` = ``merge.publish_to``, default
``{output}/protected``), each built in a staging folder no reader lists and moved into place
whole. Nothing published reveals the trigger, the method or its settings (only img2dataset's
fields and ``merge.keep_fields``; a field holding a protected sample's source caption fails
the merge); what mem-dist knows about each sample goes to ``{output}/manifest/``
(:mod:`mem_dist.publishing.manifest`), whose stats file is written last and marks the shard as finished
with what it was made from (round, merge settings, destination): a re-run skips a shard only
when that is what it would publish now (``merge.mode: incremental``; ``overwrite`` redoes
all). An unfinished run is refused unless ``merge.allow_unfinished`` (:mod:`mem_dist.publishing.merge_config`).

A sample without a state row is dropped and counted (``no_state``), unless
``merge.copy_unprotected`` copies it through unprotected (the canvas, the original caption;
``copied`` in the manifest), as are empty captions under ``data.empty_captions: copy``.
Samples the source reader skipped (``decode_error``, ``no_image``, ...) are dropped with the
reader's reasons. Every source sample is published or dropped with a named reason.

Shards are spread over ranks (``RANK``/``WORLD_SIZE`` as set by ``accelerate launch`` or
torchrun; no process group is needed) and over ``merge.processes`` worker processes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mem_dist.methods import get_method
from mem_dist.publishing import manifest, publish
from mem_dist.pipeline import state, storage, text
from mem_dist.pipeline.config import MergeConfig, RunConfig
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import Shard, check_shards, load_shard, owned, shard_name
from mem_dist.errors import one_line_errors
from mem_dist.publishing.merge_config import publish_source, resolve_config

# Reasons data.load_shard counts per shard rather than per sample.
SHARD_LEVEL_SKIPS = ("truncated_tar", "corrupt_tar", "missing_shard", "empty_shard")


class WorkerDied(RuntimeError):
    """A merge worker process ended without its result (merge.processes > 1)."""

    one_line = True  # mem_dist.errors: one line, exit 1


def publish_dir(cfg: RunConfig) -> str:
    """Where the public side goes: ``merge.publish_to``, or ``{output}/protected``."""
    return cfg.merge.publish_to or storage.join(cfg.output, "protected")


def published_url(folder: str, name: str, suffix: str) -> str:
    """``{folder}/{name}{suffix}`` (suffix: ".tar", ".parquet", "_stats.json")."""
    return storage.join(folder, f"{name}{suffix}")


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
    """The method the private manifest records (mem, em, random, random-trigger, random-prefix, uc, ...)."""
    method = get_method(cfg.method)
    return method.manifest_name(method.job(cfg))


def final_state(cfg: RunConfig, output: str, round_: int, src: Shard) -> state.ShardState:
    """A shard's final state, as the run's method gives it: MEM's and the controls' as stored,
    UC's composed from each key's cluster and the cluster's perturbation."""
    method = get_method(cfg.method)
    return method.shard_state(dataclasses.replace(method.job(cfg), output=output), round_, src)


def merge_shard(cfg: RunConfig, url: str, round_: int, private: str | None = None, made: dict | None = None) -> dict:
    """Publish the protected version of one source shard and record it privately.

    The public files are built in a staging folder no reader lists
    (:func:`mem_dist.publishing.publish.staging_dir`); once all three are whole, the shard's old completion
    marker is taken away, they are moved into place (the tar last) and the new marker is
    written last. A shard that fails before that leaves what an earlier merge published, and
    its marker, as they were. A shard missing at the source
    (``data.on_missing: skip``) publishes nothing: its marker records it as missing.

    Args:
        cfg: the run's config (data, mem and merge sections are used).
        url: the source shard.
        round_: the state round to apply (the final one).
        private: where the manifest goes, default ``cfg.output`` (the state is always read
            from ``cfg.output``; ``bench merge`` writes both sides to a scratch folder).
        made: what the marker records as the shard's origin (:func:`mem_dist.publishing.manifest.made_from`).

    Returns:
        The shard's private stats, as written to ``{output}/manifest/{shard}_stats.json``.

    Raises:
        ConfigError: a field to be published holds a protected sample's source caption
            (nothing of the shard is published).
    """
    start = time.time()
    name, folder, fmt = shard_name(url), publish_dir(cfg), cfg.merge.image_format
    private = cfg.output if private is None else private
    made = made if made is not None else manifest.made_from(cfg, round_, round_)
    src = load_shard(url, cfg.data)
    if src.skipped.get("missing_shard"):
        stats = {"source": url, "published_to": cfg.merge.publish_to, "missing": True, "published": 0, "protected": 0,
                 "copied_unprotected": 0, "source_samples": 0, "skipped": {"missing_shard": 1}, "with_url": 0,
                 "delta_kept": {}, "made_from": made, "start_time": start, "end_time": time.time()}
        manifest.write_stats(private, name, stats)
        return stats
    st = final_state(cfg, cfg.output, round_, src)
    row_of = st.by_key()
    written: list[publish.Written] = []
    rows: list[dict] = []  # the manifest
    dropped = {key: reason for key, reason in src.dropped}
    hidden: dict[str, str] = {}  # key -> source caption of each protected sample whose caption changed
    kept, with_url, left_out = [], 0, set()
    staging = publish.staging_dir(private, folder)
    paths = {suffix: publish.staged(staging, name, suffix) for suffix in publish.SUFFIXES}
    keep, drop = cfg.merge.keep_fields, cfg.merge.drop_fields
    try:
        with wds.TarWriter(paths[".tar"]) as tw:  # member mtimes: the time of writing, as img2dataset's
            for i, key in enumerate(src.keys):
                j = row_of.get(key)
                if j is None:
                    reason = "empty_caption" if not src.captions[i] and cfg.data.empty_captions == "copy" else "no_state"
                    if reason == "no_state" and not cfg.merge.copy_unprotected:
                        dropped[key] = reason
                        continue
                    pixels, caption, ids, trigger = src.canvases[i], src.captions[i], [], ""
                else:
                    # int16 so the sum cannot wrap; the state keeps canvas + delta in [0, 255].
                    pixels = (src.canvases[i].astype(np.int16) + st.delta[j]).astype(np.uint8)
                    trigger, ids = st.trigger_text[j], st.trigger_ids[j].tolist()
                    caption = text.protected_caption(trigger, src.captions[i])
                    if caption != src.captions[i]:
                        hidden[key] = src.captions[i]
                image = encode_image(pixels, cfg.merge)
                if j is not None:
                    kept.append(1.0 if fmt != "jpg" else delta_kept(decode_image(image), src.canvases[i], st.delta[j]))
                w = publish.Written.of(key, caption, image, pixels.shape[1], pixels.shape[0])
                meta = publish.sample_json(src.meta[i] if src.meta else None, w, drop, keep, hidden.get(key, ""))
                with_url += bool(json.loads(meta).get("url"))
                left_out.update(publish.left_out(src.meta[i] if src.meta else None, keep, drop))
                tw.write({"__key__": key, fmt: image, "txt": caption, "json": meta})
                written.append(w)
                rows.append({"key": key, "outcome": "protected" if j is not None else "copied",
                             "reason": None if j is not None else reason, "caption": caption, "trigger_ids": ids,
                             "trigger_text": trigger, "image_sha256": w.hashes["sha256"]})
        source_table = publish.read_source_table(url, ".parquet")
        left_out.update(c for c in (source_table.column_names if source_table is not None else [])
                        if not publish.published(c, keep, drop) and c not in drop)
        table = publish.shard_parquet(source_table, written, dropped, drop, keep, hidden)
        with open(paths[".parquet"], "wb") as f:
            f.write(publish.parquet_bytes(table))
        public_stats = publish.shard_stats(publish.read_source_table(url, "_stats.json"), table, start, time.time())
        with open(paths["_stats.json"], "wb") as f:
            f.write(publish.stats_bytes(public_stats))
        manifest.remove_stats(private, name)  # the shard is unfinished from here until its new marker
        for suffix in ("_stats.json", ".parquet", ".tar"):  # the tar last: readers list tars, then read beside them
            publish.commit(paths[suffix], published_url(folder, name, suffix))
    except publish.CaptionLeak as e:
        raise ConfigError(f"shard {name}: {e}, which would publish it beside its protected caption; nothing of the "
                          f"shard was published (leave the field out: merge.keep_fields / merge.drop_fields)") from None
    finally:
        for path in paths.values():
            if os.path.exists(path):
                os.remove(path)
    rows += [{"key": k, "outcome": "dropped", "reason": r, "caption": None, "trigger_ids": [], "trigger_text": "",
              "image_sha256": None} for k, r in dropped.items()]
    manifest.write_manifest(private, name, rows)
    outcomes = collections.Counter(r["outcome"] for r in rows)
    end = time.time()
    stats = {
        "source": url,
        "published_to": cfg.merge.publish_to,  # "": {output}/protected, wherever the run folder is now
        "method": method_name(cfg),
        "round": round_,
        "source_samples": len(src) + sum(c for r, c in src.skipped.items() if r not in SHARD_LEVEL_SKIPS),
        "published": len(written),
        "protected": outcomes["protected"],
        "copied_unprotected": outcomes["copied"],
        "skipped": dict(collections.Counter(dropped.values()),
                        **{r: c for r, c in src.skipped.items() if r in SHARD_LEVEL_SKIPS}),
        "with_url": with_url,
        "left_out": sorted(left_out),  # source fields not published: not img2dataset's, not in merge.keep_fields
        "image_format": fmt,
        **({"jpeg_quality": cfg.merge.jpeg_quality} if fmt == "jpg" else {}),
        "drop_fields": list(drop),
        "keep_fields": list(keep),
        "delta_kept": kept_summary(kept),
        "made_from": made,
        "duration": round(end - start, 3),
        "start_time": start,
        "end_time": end,
    }
    manifest.write_stats(private, name, stats)  # last: the completion marker
    return stats


def run_kept(stats: list[dict]) -> dict:
    """The shards' delta-kept summaries combined (mean weighted by protected samples)."""
    parts = [(s["protected"], s["delta_kept"]) for s in stats if s.get("delta_kept")]
    n = sum(c for c, _ in parts)
    if not n:
        return {}
    return {"mean": round(sum(c * k["mean"] for c, k in parts) / n, 4), "min": min(k["min"] for _, k in parts)}


def env_rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher (accelerate launch, torchrun) sets them; (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _merge_job(job: tuple[RunConfig, str, int, dict]) -> dict:
    cfg, url, round_, made = job
    return merge_shard(cfg, url, round_, made=made)


def merge(cfg: RunConfig, rank: int | None = None, world: int | None = None, progress: bool | None = None) -> dict:
    """Publish the protected shards this rank owns: every shard with ``merge.mode: overwrite``;
    with ``incremental`` (the default) those whose completion marker is missing or says they
    were published from another round, with other merge settings or to another destination.

    Args:
        cfg: the run's config (:func:`resolve_config`); its output must hold the state.
        rank, world: shard ownership (shard i belongs to rank i % world); None reads
            ``RANK`` / ``WORLD_SIZE`` from the environment (0 and 1 without them).
        progress: a progress bar over shards; None follows ``cfg.progress``.

    Returns:
        A summary: shards written (of them redone because what they were made from changed)
        and already done, samples published, protected and copied unprotected, skips by
        reason (a missing source shard as ``missing_shard``), published samples that still
        carry a url, seconds.

    Raises:
        ConfigError: no state; an unfinished run without ``merge.allow_unfinished``; a field
            to be published that holds a protected sample's source caption.
    """
    env_rank, env_world = env_rank_world()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    progress = cfg.progress if progress is None else progress
    urls = check_shards(cfg.data)
    source = publish_source(cfg, urls)
    round_ = source.round
    if not source.finished:
        print(f"mem-dist merge: warning: the run is unfinished ({source.rounds_done} of {source.rounds} rounds done); "
              f"publishing round {round_} (merge.allow_unfinished), recorded in the manifest", flush=True)
    mine = owned(urls, rank, world)
    made = dict(manifest.made_from(cfg, round_, source.rounds), **({} if source.finished else {"unfinished": True}))
    names = [shard_name(u) for u in mine]
    marks = manifest.markers(cfg.output, names)
    why = {n: "merge.mode=overwrite" if cfg.merge.mode == "overwrite" else manifest.changed(marks.get(n), made) for n in names}
    todo = [u for u, n in zip(mine, names) if why[n] is not None]
    redone = {n: w for n, w in why.items() if w is not None and n in marks}
    moved = collections.Counter(marks[n].get("published_to") for n in redone
                                if marks[n].get("published_to", "") != cfg.merge.publish_to and not marks[n].get("missing"))
    folder = publish_dir(cfg)
    publish.sweep(publish.staging_dir(cfg.output, folder), set(names), {shard_name(u) for u in urls} if rank == 0 else None,
                  folder if rank == 0 else None)
    start = time.time()
    jobs = [(cfg, u, round_, made) for u in todo]
    bar = tqdm(total=len(jobs), desc="merge", unit="shard", disable=not (progress and jobs))
    stats: list[dict] = []
    if cfg.merge.processes > 1 and len(jobs) > 1:
        # spawn: the parent may hold torch threads (accelerate launch), which fork does not copy safely.
        # An executor, not multiprocessing.Pool: a worker killed from outside (the OOM killer) breaks
        # the executor, where a Pool would wait forever for that worker's shard.
        with ProcessPoolExecutor(min(cfg.merge.processes, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                for done in as_completed([pool.submit(_merge_job, job) for job in jobs]):
                    stats.append(done.result())
                    bar.update()
            except BrokenProcessPool as e:
                raise WorkerDied(f"a merge worker process died (killed, or out of memory?) after {len(stats)} of "
                                 f"{len(jobs)} shards; every shard finished is published whole: run merge again "
                                 f"for the rest") from e
    else:
        for job in jobs:
            stats.append(_merge_job(job))
            bar.update()
    bar.close()
    skipped: collections.Counter = collections.Counter()
    for s in stats:
        skipped.update(s["skipped"])
    summary = {
        "rank": rank, "world": world, "round": round_, "finished_run": source.finished,
        "shards": len(stats), "redone": len(redone), "already_done": len(mine) - len(todo),
        "samples": sum(s["published"] for s in stats),
        "protected": sum(s["protected"] for s in stats),
        "copied_unprotected": sum(s["copied_unprotected"] for s in stats),
        "skipped": dict(skipped),
        "with_url": sum(s["with_url"] for s in stats),
        "delta_kept": run_kept(stats),
        "seconds": round(time.time() - start, 3),
    }
    lossy = f", delta kept: mean {summary['delta_kept']['mean']:.3f}, min {summary['delta_kept']['min']:.3f} " \
            f"(jpg q{cfg.merge.jpeg_quality})" if cfg.merge.image_format == "jpg" and summary["delta_kept"] else ""
    again = f" ({len(redone)} again: {next(iter(redone.values()))})" if redone else ""
    print(f"mem-dist merge (rank {rank}/{world}, round {round_}): {summary['shards']} shards written{again}, "
          f"{summary['already_done']} already done; {summary['samples']} samples ({summary['protected']} protected, "
          f"{summary['copied_unprotected']} copied unprotected), skipped {summary['skipped'] or 0}{lossy}, "
          f"{summary['seconds']:.1f}s -> {publish_dir(cfg)} (public), {storage.join(cfg.output, 'manifest')} (private)",
          flush=True)
    if summary["with_url"]:
        print(f"mem-dist merge: {summary['with_url']} of {summary['samples']} published samples still carry a 'url': "
              f"while the unprotected original stays online there, protection is moot; merge.drop_fields=[url] "
              f"leaves it out of the published json and parquet", flush=True)
    left_out = sorted({f for s in stats for f in s.get("left_out", [])})
    if left_out:
        print(f"mem-dist merge: source fields left out of the published json and parquet (not img2dataset's; "
              f"merge.keep_fields=[...] publishes them): {', '.join(left_out)}", flush=True)
    for old, n in moved.items():
        print(f"mem-dist merge: {n} shards an earlier merge published to {old or storage.join(cfg.output, 'protected')} "
              f"stay there: remove them if they should not stay public", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist merge", description="Publish protected shards from the source shards and the "
                                "final state (public side), with a manifest of what was written (private side).")
    p.add_argument("output", nargs="?", help="the run folder (generate's output): its run.json gives the config")
    p.add_argument("--config", help="instead of OUTPUT: a config whose output names the run; only merge.* may differ from the run's")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. merge.processes=8 'merge.drop_fields=[url]'")
    args = p.parse_intermixed_args(argv)
    output, overrides = args.output, list(args.overrides)
    if output is not None and "=" in output:  # argparse puts a first override in OUTPUT's place
        output, overrides = None, [output] + overrides

    def body() -> int:
        merge(resolve_config(output, args.config, overrides))
        return 0

    return one_line_errors(body)


if __name__ == "__main__":
    sys.exit(main())
