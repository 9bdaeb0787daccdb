"""Benchmarks that print tables (tests check correctness; numbers come from here).

    python -m mem_dist.bench merge --config C [key=value ...]

merge: samples/s of the real merge (one process, into a temp folder) next to a bare loop
on the same data and state: decode the source image -> canvas -> add delta -> encode PNG
-> append to an in-memory tar. The merge should reach at least 80% of the bare loop.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time

import numpy as np
import webdataset as wds
from PIL import Image

from mem_dist import state
from mem_dist.config import ConfigError, RunConfig, load_config
from mem_dist.data import check_shards, iter_samples, shard_name, to_canvas
from mem_dist.merge import encode_image, merge_shard


def bare_loop(cfg: RunConfig, url: str, round_: int) -> int:
    """The least a merge must do for one shard; returns the samples written."""
    import collections

    st = state.read_state(state.state_url(cfg.output, round_, shard_name(url)))
    row_of = st.by_key()
    n = 0
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as tw:
        for s in iter_samples(url, collections.Counter()):
            j = row_of.get(s["__key__"])
            if j is None:
                continue
            with Image.open(io.BytesIO(s["jpg"])) as img:
                canvas = to_canvas(img, cfg.data.image_size, cfg.data.resize_mode)
            pixels = (canvas.astype(np.int16) + st.delta[j]).astype(np.uint8)
            tw.write({"__key__": s["__key__"], "png": encode_image(pixels, "png"), "txt": st.trigger_text[j] + " " + s["txt"].decode()})
            n += 1
    return n


def bench_merge(cfg: RunConfig, repeats: int = 3) -> list[tuple[str, float]]:
    urls = check_shards(cfg.data)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {cfg.output}; run generate first")
    rows = []
    for label, fn in (("bare decode->add->encode loop", lambda u, d: bare_loop(cfg, u, round_)),
                      ("mem-dist merge", lambda u, d: merge_shard(cfg, u, round_, dest=d)["successes"])):
        best = 0.0
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                n = sum(fn(u, tmp) for u in urls)
                best = max(best, n / (time.perf_counter() - t))
        rows.append((label, best))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist bench", description="Benchmarks that print a table.")
    p.add_argument("what", choices=["merge"])
    p.add_argument("--config", help="the generation config (its output must hold generated state)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    try:
        rows = bench_merge(load_config(RunConfig, args.config, args.overrides), args.repeats)
    except ConfigError as e:
        print(f"mem-dist: error: {e}", file=sys.stderr)
        return 2
    base = rows[0][1]
    print(f"{'what (1 process, best of ' + str(args.repeats) + ')':<40} {'samples/s':>10} {'vs bare':>8}")
    for label, rate in rows:
        print(f"{label:<40} {rate:>10.1f} {rate / base:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
