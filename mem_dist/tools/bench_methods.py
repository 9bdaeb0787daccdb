"""``mem-dist bench methods``: what each method costs end to end on the same data and CPU.

    mem-dist bench methods --config A --config B [...] [key=value ...]

Each config (a whole run config: its method and that method's settings; the overrides apply
to every one, e.g. the same ``data.shards``) is generated and merged for real, one process,
into a temporary folder, one after the other: the table gives the seconds of generate and of
merge, the samples/s of the two together (what protecting a sample costs), each against the
first config's, and the bytes of private state per sample that generate leaves (the run
folder without the manifest and the published side) and that merge's manifest adds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import load_config


def folder_bytes(root: str, skip: tuple[str, ...] = ()) -> int:
    """Bytes of every file under ``root``, except under its top-level folders in ``skip``."""
    total = 0
    for d, dirs, files in os.walk(root):
        if d == root:
            dirs[:] = [x for x in dirs if x not in skip]
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def run_one(config: str, overrides: list[str], scratch: str) -> dict:
    """Generate + merge ``config`` into ``scratch``; seconds, samples and private bytes."""
    from mem_dist.pipeline import generate
    from mem_dist.publishing import merge

    out = os.path.join(scratch, "run")
    args = ["--config", config, *overrides, f"output={out}", "progress=false"]
    cfg = load_config(RunConfig, config, args[2:])
    t0 = time.perf_counter()
    if generate.main(args) != 0:
        raise RuntimeError(f"generate failed for {config}")
    t1 = time.perf_counter()
    if merge.main([out, "progress=false"]) != 0:
        raise RuntimeError(f"merge failed for {config}")
    t2 = time.perf_counter()
    import json

    n = sum(json.load(open(os.path.join(out, "manifest", f)))["protected"]
            for f in os.listdir(os.path.join(out, "manifest")) if f.endswith("_stats.json"))
    return {"config": config, "method": cfg.method, "generate_s": t1 - t0, "merge_s": t2 - t1, "samples": n,
            "state_bytes": folder_bytes(out, skip=("manifest", "protected")) - os.path.getsize(os.path.join(out, "run.json")),
            "manifest_bytes": folder_bytes(os.path.join(out, "manifest"))}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mem-dist bench methods", description=__doc__.split("\n\n")[2])
    p.add_argument("--config", action="append", required=True, help="a run config; give two or more")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every config")
    a = p.parse_intermixed_args(argv)
    rows = []
    for config in a.config:
        with tempfile.TemporaryDirectory(prefix="mem-dist-bench-") as scratch:
            rows.append(run_one(config, a.overrides, scratch))
    base = rows[0]
    rate = lambda r: r["samples"] / (r["generate_s"] + r["merge_s"])  # noqa: E731
    print(f"{'config (method)':<40} {'samples':>7} {'generate s':>10} {'merge s':>8} {'samples/s':>9} {'vs first':>8} "
          f"{'state B/sample':>14} {'manifest B/sample':>17}")
    for r in rows:
        print(f"{os.path.basename(r['config']) + ' (' + r['method'] + ')':<40} {r['samples']:>7} {r['generate_s']:>10.1f} "
              f"{r['merge_s']:>8.1f} {rate(r):>9.1f} {rate(r) / rate(base):>7.1f}x {r['state_bytes'] / r['samples']:>14.1f} "
              f"{r['manifest_bytes'] / r['samples']:>17.1f}")
    print("state: the run folder generate leaves, without run.json (per-sample state, checkpoints, keys); "
          "manifest: merge's private record")
    return 0
