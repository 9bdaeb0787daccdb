"""Generation entry point: ``accelerate launch mem_dist/generate.py --config C [key=value ...]``.

Also ``python mem_dist/generate.py ...`` (one process) and ``mem-dist generate ...``.
Exit codes: 0 done, 2 bad configuration / refused resume / bad launch, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mem_dist import distributed, engine, rundir
from mem_dist.errors import one_line_errors
from mem_dist.config import RunConfig
from mem_dist.config_io import load_config
from mem_dist.data import check_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mem-dist generate", description="Generate MEM state (delta + trigger) for every sample of the source shards.")
    p.add_argument("--config", help="YAML config (configs/demo.yaml, configs/paper.yaml, configs/laion.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mem.rounds=2 output=s3://bucket/run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = load_config(RunConfig, args.config, args.overrides)
        check_shards(cfg.data)
        dist = distributed.init(cfg.device)
        record = engine.generate(cfg, dist)
        if dist.is_main:
            print(f"mem-dist: {record['rounds_done']} rounds done; state under {cfg.output}/state, metrics in {cfg.output}/metrics.jsonl")
        return 0

    return one_line_errors(body, distributed.LaunchError, rundir.ResumeError)


if __name__ == "__main__":
    sys.exit(main())
