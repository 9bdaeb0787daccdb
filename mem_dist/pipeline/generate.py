"""Generation entry point: ``accelerate launch mem_dist/generate.py --config C [key=value ...]``.

Also ``python mem_dist/generate.py ...`` (one process) and ``mem-dist generate ...``.
Exit codes: 0 done, 2 bad configuration / missing shard / refused resume / bad launch, 1
anything else (an unreadable state object and a storage fault on a whole shard are one line
too). Under ``accelerate launch`` the line comes once, from rank 0, at the end of
accelerate's failure summary, and accelerate exits 1 (:mod:`mem_dist.errors`).
``--check`` stops after the configuration and the shard list (what the launch/ scripts run
first, in one process, so that a bad command gives the one line and exit 2 before any launch).
"""

from __future__ import annotations

import argparse
import sys

from mem_dist.pipeline import state, storage
from mem_dist.errors import one_line_errors
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import load_config
from mem_dist.pipeline.data import check_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mem-dist generate", description="Generate the configured method's state (MEM: delta + trigger) for every sample of the source shards.")
    p.add_argument("--config", help="YAML config (configs/demo.yaml, configs/paper.yaml, configs/laion.yaml)")
    p.add_argument("--check", action="store_true", help="only check the configuration and that the shards exist (exit 0 or 2)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mem.rounds=2 output=s3://bucket/run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def check() -> int:
        urls = check_shards(load_config(RunConfig, args.config, args.overrides).data)
        print(f"mem-dist: configuration and {len(urls)} shards OK")
        return 0

    if args.check:  # without torch: quick enough to run before every launch
        return one_line_errors(check)
    from mem_dist.methods import get_method
    from mem_dist.pipeline import distributed, engine, rundir

    def body() -> int:
        cfg = load_config(RunConfig, args.config, args.overrides)
        urls = check_shards(cfg.data)
        dist = distributed.init(cfg.device)
        method = get_method(cfg.method)
        if storage.exists(storage.join(cfg.output, "run.json")):
            rundir.check_resume(cfg, dist.world)  # a run this command may not continue is left as it is
            method.repair(method.job(cfg), dist, urls)
        try:
            record = engine.generate(cfg, dist)
        except state.StateError as e:  # a data page that the footer check could not see
            if e.url.startswith(storage.join(cfg.output, "state") + "/"):
                storage.remove(e.url)  # so that the next run redoes it
            raise
        if dist.is_main:
            print(f"mem-dist: {record['rounds_done']} of {record['rounds']} rounds done; the run (private) is under {cfg.output}")
        return 0

    return one_line_errors(body, distributed.LaunchError, rundir.ResumeError)


if __name__ == "__main__":
    sys.exit(main())
