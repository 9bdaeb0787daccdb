"""Merge: source shards + final-round state -> protected shards (public) + manifest (private).

``mem-dist merge OUTPUT [merge.key=value ...]`` (or ``python -m mem_dist.merge OUTPUT``)
takes the run's config from ``OUTPUT/run.json``; ``--config C [key=value ...]`` works too,
and then only ``merge.*`` (and ``progress``) may differ from the run's. For each source shard,
every sample with a state row becomes:

  KEY.png   canvas + delta, uint8, lossless (merge.image_format: png | webp), or KEY.jpg
            (merge.image_format: jpg, merge.jpeg_quality; lossy: the private stats give the
            share of delta kept, see :func:`delta_kept`)
  KEY.txt   trigger_text + " " + caption (the trigger alone for an empty caption)
  KEY.json  the source json made true of what is written (:mod:`mem_dist.publish`)

written to ``{publish}/{shard}.tar`` with ``{shard}.parquet`` and ``{shard}_stats.json`` in
img2dataset's schema beside it (``publish`` = ``merge.publish_to``, default
``{output}/protected``). Nothing published reveals the trigger, the method or its settings;
what mem-dist knows about each sample goes to ``{output}/manifest/`` (:mod:`mem_dist.manifest`),
whose stats file is written last and marks the shard as finished, so re-running skips it.

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

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mem_dist import manifest, publish, state, storage, text
from mem_dist.config import MergeConfig, RunConfig
from mem_dist.config_io import ConfigError, build, load_config, parse_overrides, read_yaml, to_dict
from mem_dist.data import Shard, check_shards, load_shard, owned, shard_name
from mem_dist.errors import one_line_errors

# Reasons data.load_shard counts per shard rather than per sample.
SHARD_LEVEL_SKIPS = ("truncated_tar", "missing_shard", "empty_shard")


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
    """mem, em (MEM without a trigger), random (noise only), random-trigger or
    random-prefix (one trigger shared by every sample)."""
    if cfg.mem.method == "prefix":
        return "random-prefix"
    if cfg.mem.method == "random":
        return "random-trigger" if cfg.mem.trigger_len else "random"
    return "mem" if cfg.mem.trigger_len else "em"


def final_state(cfg: RunConfig, output: str, round_: int, src: Shard) -> state.ShardState:
    """A shard's final state: MEM's and the baselines' as stored, UC's composed from each key's
    cluster and the cluster's perturbation (:func:`mem_dist.uc.shard_state`)."""
    if cfg.mem.method == "uc":
        from mem_dist import uc

        return uc.shard_state(output, src, uc.read_perturbations(output))
    return state.read_state(state.state_url(output, round_, src.name))


def merge_shard(cfg: RunConfig, url: str, round_: int, private: str | None = None) -> dict:
    """Publish the protected version of one source shard and record it privately.

    Args:
        cfg: the run's config (data, mem and merge sections are used).
        url: the source shard.
        round_: the state round to apply (the final one).
        private: where the manifest goes, default ``cfg.output`` (the state is always read
            from ``cfg.output``; ``bench merge`` writes both sides to a scratch folder).

    Returns:
        The shard's private stats, as written to ``{output}/manifest/{shard}_stats.json``.
    """
    start = time.time()
    name, folder, fmt = shard_name(url), publish_dir(cfg), cfg.merge.image_format
    private = cfg.output if private is None else private
    src = load_shard(url, cfg.data)
    st = final_state(cfg, cfg.output, round_, src)
    row_of = st.by_key()
    written: list[publish.Written] = []
    rows: list[dict] = []  # the manifest
    dropped = {key: reason for key, reason in src.dropped}
    kept, with_url = [], 0
    tar_url = published_url(folder, name, ".tar")
    tmp = storage.local_tempfile(tar_url, ".tar")
    try:
        with wds.TarWriter(tmp, mtime=0) as tw:
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
                image = encode_image(pixels, cfg.merge)
                if j is not None:
                    kept.append(1.0 if fmt != "jpg" else delta_kept(decode_image(image), src.canvases[i], st.delta[j]))
                w = publish.Written.of(key, caption, image, pixels.shape[1], pixels.shape[0])
                meta = publish.sample_json(src.meta[i] if src.meta else None, w, cfg.merge.drop_fields)
                with_url += bool(json.loads(meta).get("url"))
                tw.write({"__key__": key, fmt: image, "txt": caption, "json": meta})
                written.append(w)
                rows.append({"key": key, "outcome": "protected" if j is not None else "copied",
                             "reason": None if j is not None else reason, "caption": caption, "trigger_ids": ids,
                             "trigger_text": trigger, "image_sha256": w.hashes["sha256"]})
        storage.put_file_atomic(tmp, tar_url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    rows += [{"key": k, "outcome": "dropped", "reason": r, "caption": None, "trigger_ids": [], "trigger_text": "",
              "image_sha256": None} for k, r in dropped.items()]
    table = publish.shard_parquet(publish.read_source_table(url, ".parquet"), written, dropped, cfg.merge.drop_fields)
    storage.write_bytes_atomic(published_url(folder, name, ".parquet"), publish.parquet_bytes(table))
    public_stats = publish.shard_stats(publish.read_source_table(url, "_stats.json"), table, start, time.time())
    storage.write_bytes_atomic(published_url(folder, name, "_stats.json"), publish.stats_bytes(public_stats))
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
        "image_format": fmt,
        **({"jpeg_quality": cfg.merge.jpeg_quality} if fmt == "jpg" else {}),
        "drop_fields": list(cfg.merge.drop_fields),
        "delta_kept": kept_summary(kept),
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


# --------------------------------------------------------------------------------------
# The run's config: run.json, with merge.* from the command line
# --------------------------------------------------------------------------------------

MERGE_KEYS = ("merge.", "progress")


def recorded_config(output: str) -> RunConfig | None:
    """The config generate recorded in ``{output}/run.json`` (with ``output`` set to where the
    run folder is now), or None if there is none."""
    url = storage.join(output, "run.json")
    if not storage.exists(url):
        return None
    return dataclasses.replace(build(RunConfig, storage.read_json(url)["config"], ""), output=output)


def resolve_config(output: str | None, config: str | None, overrides: list[str], log=print) -> RunConfig:
    """The config to merge with: the run's own (run.json) with ``merge.*`` and ``progress`` from
    ``overrides`` (and, with ``config``, from that file).

    Args:
        output: the run folder (``mem-dist merge OUTPUT``), or None with ``config``.
        config: a YAML config whose ``output`` names the run folder, or None.
        overrides: ``key=value``; with ``output`` only merge.* / progress; with ``config`` other
            keys must agree with the run's.

    Raises:
        ConfigError: neither or both of output and config, a generation key that differs
            from the run's, or no run.json with ``output``.
    """
    pairs = parse_overrides(overrides)
    if output is not None and config is not None:
        raise ConfigError("give the run folder (mem-dist merge OUTPUT [merge.key=value ...]) or --config C, not both")
    if output is None and config is None and not any(k == "output" for k, _ in pairs):
        raise ConfigError("which run? give its folder: mem-dist merge OUTPUT [merge.key=value ...] (or --config C)")
    if output is not None:
        other = [k for k, _ in pairs if not k.startswith(MERGE_KEYS)]
        if other:
            raise ConfigError(f"config key '{other[0]}': with a run folder only merge.* and progress may be given "
                              f"(the rest is the run's, from {storage.join(output, 'run.json')})")
        run = recorded_config(output)
        if run is None:
            raise ConfigError(f"{storage.join(output, 'run.json')} not found: is {output} a mem-dist run folder? (or use --config)")
        return load_config(RunConfig, None, overrides, base=to_dict(run))
    # The run is named by the output override or the file's output key; its run.json supplies
    # every key the file does not give (data.shards, say), so a merge-only config is enough.
    target = dict(pairs).get("output") or (read_yaml(config).get("output") if config else None)
    run = recorded_config(target) if target else None
    given = load_config(RunConfig, config, overrides, base=to_dict(run) if run is not None else None)
    if run is None:
        return given
    mine, theirs = to_dict(given), to_dict(run)
    for key, _ in pairs:
        if key.startswith(MERGE_KEYS) or key == "output":
            continue
        if _dotted(mine, key) != _dotted(theirs, key):
            raise ConfigError(f"config key '{key}' differs from the run in {given.output} ({_dotted(theirs, key)!r} in its "
                              f"run.json); merge uses the run's generation settings, only merge.* may differ")
    if given.config_hash() != run.config_hash():
        log(f"mem-dist merge: generation settings are the run's (run.json, config hash {run.config_hash()}); "
            f"{config}'s differ and are not used")
    return dataclasses.replace(run, merge=given.merge, progress=given.progress)


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def env_rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher (accelerate launch, torchrun) sets them; (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _merge_job(job: tuple[RunConfig, str, int]) -> dict:
    cfg, url, round_ = job
    return merge_shard(cfg, url, round_)


def merge(cfg: RunConfig, rank: int | None = None, world: int | None = None, progress: bool | None = None) -> dict:
    """Publish the protected shards this rank owns, skipping those already finished.

    Args:
        cfg: the run's config (:func:`resolve_config`); its output must hold the state.
        rank, world: shard ownership (shard i belongs to rank i % world); None reads
            ``RANK`` / ``WORLD_SIZE`` from the environment (0 and 1 without them).
        progress: a progress bar over shards; None follows ``cfg.progress``.

    Returns:
        A summary: shards written and already done, samples published, protected and
        copied unprotected, skips by reason, published samples that still carry a url, seconds.

    Raises:
        ConfigError: no state, or the final round's state is incomplete.
    """
    env_rank, env_world = env_rank_world()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    progress = cfg.progress if progress is None else progress
    urls = check_shards(cfg.data)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {storage.join(cfg.output, 'state')}; run generate first")
    missing = sorted({shard_name(u) for u in urls} - state.completed(cfg.output, round_))
    if cfg.mem.method == "uc":
        from mem_dist import uc

        uc.read_perturbations(cfg.output)  # a ConfigError until generate has finished
    if missing:
        raise ConfigError(f"the state of round {round_} under {cfg.output} lacks shard {missing[0]} "
                          f"(and {len(missing) - 1} more); finish generate first")
    mine = owned(urls, rank, world)
    done = manifest.finished(cfg.output)
    todo = [u for u in mine if shard_name(u) not in done]
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
    print(f"mem-dist merge (rank {rank}/{world}, round {round_}): {summary['shards']} shards written, "
          f"{summary['already_done']} already done; {summary['samples']} samples ({summary['protected']} protected, "
          f"{summary['copied_unprotected']} copied unprotected), skipped {summary['skipped'] or 0}{lossy}, "
          f"{summary['seconds']:.1f}s -> {publish_dir(cfg)} (public), {storage.join(cfg.output, 'manifest')} (private)",
          flush=True)
    if summary["with_url"]:
        print(f"mem-dist merge: {summary['with_url']} of {summary['samples']} published samples still carry a 'url': "
              f"while the unprotected original stays online there, protection is moot; merge.drop_fields=[url] "
              f"leaves it out of the published json and parquet", flush=True)
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
