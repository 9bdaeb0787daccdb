"""Benchmarks that print tables (tests check correctness; numbers come from here).

    python -m mem_dist.bench merge --config C [--repeats 3] [key=value ...]

merge: samples/s of the real merge of the config's shards (one process, into a temp
folder) next to a bare loop on the same data and state: decode the source image ->
canvas -> add delta -> encode PNG -> append to an in-memory tar. The merge should reach
at least 80% of the bare loop. The config's output must hold generated state; for a quick
one, generate with ``mem.method=random mem.rounds=1`` (no surrogate, same shapes).
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import tempfile
import time

import numpy as np
import webdataset as wds
from PIL import Image

from mem_dist import state, text
from mem_dist.config import ConfigError, RunConfig, load_config
from mem_dist.data import check_shards, iter_samples, shard_name, to_canvas
from mem_dist.merge import encode_image, merge_shard


def bare_loop(cfg: RunConfig, url: str, round_: int) -> int:
    """The least a merge must do for one shard, into an in-memory tar; returns the samples written."""
    st = state.read_state(state.state_url(cfg.output, round_, shard_name(url)))
    row_of = st.by_key()
    written = 0
    with wds.TarWriter(io.BytesIO(), mtime=0) as tw:
        for s in iter_samples(url, collections.Counter()):
            j = row_of.get(s["__key__"])
            raw = next((s[k] for k in cfg.data.image_keys if k in s), None)
            if j is None or raw is None:
                continue
            with Image.open(io.BytesIO(raw)) as img:
                canvas = to_canvas(img, cfg.data.image_size, cfg.data.resize_mode)
            pixels = (canvas.astype(np.int16) + st.delta[j]).astype(np.uint8)
            caption = text.protected_caption(st.trigger_text[j], s[cfg.data.caption_key].decode().strip())
            tw.write({"__key__": s["__key__"], "png": encode_image(pixels, "png"), "txt": caption})
            written += 1
    return written


def bench_merge(cfg: RunConfig, repeats: int = 3) -> list[tuple[str, float]]:
    """[(label, samples/s)] for the bare loop and the merge, best of ``repeats`` each
    (interleaved, so neither gets all the warm caches)."""
    urls = check_shards(cfg.data)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {cfg.output}; run generate first (mem.method=random mem.rounds=1 is quick)")
    if cfg.merge.image_format != "png":
        raise ConfigError("config key 'merge.image_format': the bare loop encodes PNG; bench with png")
    runs = {
        "bare loop (decode, canvas, +delta, PNG, tar)": lambda u, dest: bare_loop(cfg, u, round_),
        "mem-dist merge_shard": lambda u, dest: merge_shard(cfg, u, round_, dest=dest)["successes"],
    }
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for label, fn in runs.items():
            with tempfile.TemporaryDirectory() as dest:
                t = time.perf_counter()
                n = sum(fn(u, dest) for u in urls)
                best[label] = max(best[label], n / (time.perf_counter() - t))
    return list(best.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist bench", description="Benchmarks that print a table.")
    p.add_argument("what", choices=["merge"])
    p.add_argument("--config", help="the generation config (its output must hold generated state)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_intermixed_args(argv)
    try:
        rows = bench_merge(load_config(RunConfig, args.config, args.overrides), args.repeats)
    except ConfigError as e:
        print(f"mem-dist: error: {e}", file=sys.stderr)
        return 2
    base = rows[0][1]
    print(f"{'one process, best of ' + str(args.repeats):<46} {'samples/s':>10} {'vs bare':>8}")
    for label, rate in rows:
        print(f"{label:<46} {rate:>10.1f} {rate / base:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
