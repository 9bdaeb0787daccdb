"""Benchmarks that print tables (tests check correctness; numbers come from here).

    python -m mem_dist.bench merge --config C [--repeats 3] [key=value ...]
    python -m mem_dist.bench generate --config C [--steps 3] [key=value ...]

merge: samples/s of the real merge of the config's shards (one process, into a temp
folder) next to a bare loop on the same data and state: decode the source image ->
canvas -> add delta -> encode (``merge.image_format``) -> append to an in-memory tar (for
jpg the merge also decodes each image again to measure the share of delta kept, which
the bare loop does not). The merge should reach at least 80% of the bare loop (lossless
formats; with jpg the extra decode puts it near 55%, still twice PNG's merge at 256 px).
The config's output must hold generated state; for a quick
one, generate with ``mem.method=random mem.rounds=1`` (no surrogate, same shapes).

generate: what one process of the config's generation costs on this machine, measured on
its first shard with the real engine (nothing is written): a surrogate step, a sample
batch with HotFlip + PGD and one with PGD alone, each as seconds per batch, samples/s and
peak memory (GPU memory on CUDA, the process's peak RSS on the CPU); then the whole
run's time estimated from them, for sizing a cluster job before starting it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mem_dist import distributed, mem, state, text
from mem_dist.errors import one_line_errors
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
            tw.write({"__key__": s["__key__"], cfg.merge.image_format: encode_image(pixels, cfg.merge), "txt": caption})
            written += 1
    return written


def bench_merge(cfg: RunConfig, repeats: int = 3) -> list[tuple[str, float]]:
    """[(label, samples/s)] for the bare loop and the merge, best of ``repeats`` each
    (interleaved, so neither gets all the warm caches)."""
    urls = check_shards(cfg.data)
    round_ = state.latest_round(cfg.output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {cfg.output}; run generate first (mem.method=random mem.rounds=1 is quick)")
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


def _peak_memory(device: torch.device) -> float:
    """GiB: CUDA's peak allocation since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _timed(device: torch.device, fn) -> tuple[float, float]:
    """(seconds, peak GiB) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, _peak_memory(device)


def bench_generate(cfg: RunConfig, steps: int = 3) -> tuple[list[tuple[str, float, float, float]], dict]:
    """[(phase, seconds per batch, samples/s, peak GiB)] for one process of ``cfg``'s
    generation on its first shard, after one untimed warm-up, and the estimated run
    (if every shard holds as many samples as the first): {"device", "samples", "shards",
    "run_s", "surrogate_run_s", "sample_run_s"}."""
    if cfg.mem.method != "mem":
        raise ConfigError("config key 'mem.method': bench generate measures MEM (the random baselines cost only their I/O)")
    dist = distributed.init(cfg.device)
    if dist.world > 1:
        raise ConfigError("bench generate runs as one process (python -m mem_dist.bench ...), not under a launcher")
    run = mem.setup(dataclasses.replace(cfg, mem=dataclasses.replace(cfg.mem, surrogate_steps=1)), dist)
    shard = run.cache.get(run.stream[0])
    if len(shard) == 0:
        raise ConfigError(f"config key 'data.shards': the first shard ({run.stream[0]}) holds no usable samples")
    rows = np.arange(min(cfg.mem.batch_size, len(shard)))
    delta, trig = mem.start_state(run, shard, 1)
    hotflip = cfg.mem.trigger_len > 0 and cfg.mem.hotflip_rounds > 0

    def sample_batch(round_: int):
        return lambda: mem.process_batch(run, round_, shard, rows, delta[rows], trig[rows], 0)

    mem.surrogate_phase(run, 1, bar=False)  # warm-up: kernels, allocator, autotuning
    sample_batch(cfg.mem.hotflip_rounds + 1)()
    run.cfg = dataclasses.replace(run.cfg, mem=dataclasses.replace(cfg.mem, surrogate_steps=steps))
    bs = min(cfg.mem.batch_size, len(shard))
    surrogate_s, surrogate_mem = _timed(dist.device, lambda: mem.surrogate_phase(run, 1, bar=False))
    table = [(f"surrogate step ({len(run.ensemble)} model{'s' * (len(run.ensemble) > 1)}: forward, backward, AdamW)",
              surrogate_s / steps, bs * steps / surrogate_s, surrogate_mem)]
    pgd_s, pgd_mem = _timed(dist.device, sample_batch(cfg.mem.hotflip_rounds + 1))
    hf_s = 0.0
    if hotflip:
        hf_s, hf_mem = _timed(dist.device, sample_batch(1))
        table.append((f"sample batch: HotFlip ({cfg.mem.hotflip_candidates} candidates) + {cfg.mem.pgd_steps} PGD steps",
                      hf_s, len(rows) / hf_s, hf_mem))
    table.append((f"sample batch: {cfg.mem.pgd_steps} PGD steps", pgd_s, len(rows) / pgd_s, pgd_mem))
    n = len(shard) * len(run.urls)
    hf_rounds = min(cfg.mem.hotflip_rounds, cfg.mem.rounds) if hotflip else 0
    surrogate_run = cfg.mem.rounds * cfg.mem.surrogate_steps * surrogate_s / steps
    sample_run = n / len(rows) * (hf_rounds * hf_s + (cfg.mem.rounds - hf_rounds) * pgd_s)
    return table, {"device": dist.device.type, "samples": n, "shards": len(run.urls), "run_s": surrogate_run + sample_run,
                   "surrogate_run_s": surrogate_run, "sample_run_s": sample_run}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scale"]:
        from mem_dist import bench_scale

        return one_line_errors(lambda: bench_scale.main(argv[1:]))
    p = argparse.ArgumentParser(prog="mem-dist bench", description="Benchmarks that print a table (also: mem-dist bench scale).")
    p.add_argument("what", choices=["merge", "generate"])
    p.add_argument("--config", help="the generation config (merge: its output must hold generated state)")
    p.add_argument("--repeats", type=int, default=3, help="merge: best of this many runs")
    p.add_argument("--steps", type=int, default=3, help="generate: timed surrogate steps")
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


def print_generate(cfg: RunConfig, table, est: dict) -> int:
    memory = "peak GPU GiB" if est["device"] == "cuda" else "peak RSS GiB"
    print(f"mem-dist bench generate: {cfg.surrogate.model}, canvas {cfg.data.image_size} px, batch {cfg.mem.batch_size}, "
          f"{est['device']}, {cfg.surrogate.precision}, one process")
    print(f"{'phase':<62} {'s/batch':>8} {'samples/s':>10} {memory:>13}")
    for label, sec, rate, mem in table:
        print(f"{label:<62} {sec:>8.3f} {rate:>10.1f} {mem:>13.2f}")
    m = cfg.mem
    print(f"estimate for the config ({est['samples']:,} samples if every one of the {est['shards']} shards holds as many as "
          f"the first; T={m.rounds}, M={m.surrogate_steps}, HotFlip in {min(m.hotflip_rounds, m.rounds) if m.trigger_len else 0} rounds): "
          f"{_hours(est['run_s'])} on one process (surrogate {_hours(est['surrogate_run_s'])}, "
          f"samples {_hours(est['sample_run_s'])}); with N processes the sample phase takes 1/N of that")
    return 0


if __name__ == "__main__":
    sys.exit(main())
