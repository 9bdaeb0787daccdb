"""Benchmarks that print tables (tests check correctness; numbers come from here).

    python -m mem_dist.bench merge --config C [--repeats 3] [key=value ...]
    python -m mem_dist.bench generate --config C [--steps 3] [key=value ...]
    python -m mem_dist.bench scale [--shards 8,80] [--per-shard 4] [--rounds 3]
    python -m mem_dist.bench methods --config A --config B [key=value ...]

merge: samples/s of the real merge of the config's shards (one process, into a temp
folder) next to a bare loop on the same data and state: decode the source image ->
canvas -> add delta -> encode (``merge.image_format``) -> append to an in-memory tar (for
jpg the merge also decodes each image again to measure the share of delta kept, which
the bare loop does not). The merge should reach at least 80% of the bare loop (lossless
formats; with jpg the extra decode puts it near 55%, still twice PNG's merge at 256 px).
The config's output must hold generated state; for a quick
one, generate with ``method=random mem.rounds=1`` (no surrogate, same shapes).

generate: what one process of the config's generation costs here, phase by phase, with
FLOP/s against the device's peak and estimates for 1M / 400M samples on N GPUs
(:mod:`mem_dist.tools.bench_generate`). scale: a round's wall time, decodes, storage requests and
peak RSS against the number of shards, on moto's S3 (:mod:`mem_dist.tools.bench_scale`).
methods: generate + merge of several configs on the same data, samples/s and private bytes
per sample side by side (:mod:`mem_dist.tools.bench_methods`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import sys
import tempfile
import time

import numpy as np
import webdataset as wds

from mem_dist.pipeline import distributed, state, text
from mem_dist.pipeline.canvas import decode
from mem_dist.tools.bench_generate import bench_generate, print_generate
from mem_dist.errors import one_line_errors
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError, load_config
from mem_dist.pipeline.data import check_shards, iter_samples, shard_name
from mem_dist.publishing.merge import encode_image, merge_shard


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
            canvas, _ = decode(raw, cfg.data)  # the formats and pixel limit generation uses
            if canvas is None:
                continue
            pixels = (canvas.astype(np.int16) + st.delta[j]).astype(np.uint8)
            caption = text.protected_caption(st.trigger_text[j], s[cfg.data.caption_key].decode().strip())
            tw.write({"__key__": s["__key__"], cfg.merge.image_format: encode_image(pixels, cfg.merge), "txt": caption})
            written += 1
    return written


def bench_merge(cfg: RunConfig, repeats: int = 3) -> list[tuple[str, float]]:
    """[(label, samples/s)] for the bare loop and the merge, best of ``repeats`` each
    (interleaved, so neither gets all the warm caches)."""
    urls = check_shards(cfg.data)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {cfg.output}; run generate first (method=random mem.rounds=1 is quick)")
    runs = {
        f"bare loop (decode, canvas, +delta, {cfg.merge.image_format.upper()}, tar)": lambda u, dest: bare_loop(cfg, u, round_),
        "mem-dist merge_shard": lambda u, dest: merge_shard(dataclasses.replace(cfg, merge=dataclasses.replace(
            cfg.merge, publish_to=dest)), u, round_, private=dest)["published"],
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scale"]:
        from mem_dist.tools import bench_scale

        return one_line_errors(lambda: bench_scale.main(argv[1:]))
    if argv[:1] == ["methods"]:
        from mem_dist.tools import bench_methods

        return one_line_errors(lambda: bench_methods.main(argv[1:]))
    p = argparse.ArgumentParser(prog="mem-dist bench", description="Benchmarks that print a table (also: mem-dist bench scale, mem-dist bench methods).")
    p.add_argument("what", choices=["merge", "generate"])
    p.add_argument("--config", help="the generation config (merge: its output must hold generated state)")
    p.add_argument("--repeats", type=int, default=3, help="merge: best of this many runs")
    p.add_argument("--steps", type=int, default=3, help="generate: timed surrogate steps, and timed runs of each sample batch (the median)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_intermixed_args(argv)

    def body() -> int:
        cfg = load_config(RunConfig, args.config, args.overrides)
        if args.what == "generate":
            return print_generate(cfg, *bench_generate(cfg, args.steps))
        rows = bench_merge(cfg, args.repeats)
        base = rows[0][1]
        print(f"{'one process, best of ' + str(args.repeats):<46} {'samples/s':>10} {'vs bare':>8}")
        for label, rate in rows:
            print(f"{label:<46} {rate:>10.1f} {rate / base:>8.0%}")
        return 0

    return one_line_errors(body, distributed.LaunchError)


if __name__ == "__main__":
    sys.exit(main())
