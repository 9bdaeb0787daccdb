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

from mem_dist.pipeline import data, state, storage
from mem_dist.errors import one_line_errors
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import load_config
from mem_dist.pipeline.data import check_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mem-dist generate", description="Generate MEM state (delta + trigger) for every sample of the source shards.")
    p.add_argument("--config", help="YAML config (configs/demo.yaml, configs/paper.yaml, configs/laion.yaml)")
    p.add_argument("--check", action="store_true", help="only check the configuration and that the shards exist (exit 0 or 2)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mem.rounds=2 output=s3://bucket/run")
    return p.parse_args(argv)


def repair(cfg: RunConfig, dist, urls: list[str], log=print) -> None:
    """Before a run resumes: unreadable state objects (zero bytes, not Parquet, a damaged page
    in the final round's) of the round it continues are removed, each named in one line, so that it redoes them. If one of
    them was the input of a shard the round has still to do (the previous round's state),
    the latest surrogate checkpoint goes too: the run goes back one round, redoes those
    shards from the checkpoint before, and recomputes the same surrogate. Each rank checks
    its share of the shards."""
    from mem_dist.pipeline import rundir

    if cfg.mem.method == "uc" or not storage.exists(storage.join(cfg.output, "run.json")):
        return
    rundir.check_resume(cfg, dist.world)  # a run this command may not continue is left as it is
    names = [data.shard_name(u) for u in data.owned(urls, dist.rank, dist.world)]
    ck = rundir.latest_checkpoint(cfg.output) if cfg.mem.method == "mem" else 1
    state.sweep(cfg.output, ck, names, log, full=ck >= rundir.total_rounds(cfg))
    holes = 0
    if ck > 1:
        done = state.completed(cfg.output, ck)
        needed = [n for n in names if n not in done]
        state.sweep(cfg.output, ck - 1, needed, log)
        before = state.completed(cfg.output, ck - 1)
        holes = sum(n not in before for n in needed)
    if dist.sum([holes])[0]:
        if not storage.exists(rundir.checkpoint_url(cfg.output, ck - 1)):
            raise state.StateError(state.round_dir(cfg.output, ck - 1),
                                   f"shards of round {ck} need it, and no checkpoint of round {ck - 1} is left to redo it",
                                   "start a new run (state.checkpoint_keep of 2 or more keeps what this needs)")
        dist.barrier()  # every rank has looked at the checkpoints before one goes
        if dist.is_main:
            storage.remove(rundir.checkpoint_url(cfg.output, ck))
            log(f"mem-dist: warning: round {ck - 1}'s state is redone for those shards first, so round {ck}'s surrogate "
                f"checkpoint was removed (recomputed the same from round {ck - 1}'s)")
    dist.barrier()


def main(argv=None) -> int:
    args = parse_args(argv)

    def check() -> int:
        urls = check_shards(load_config(RunConfig, args.config, args.overrides).data)
        print(f"mem-dist: configuration and {len(urls)} shards OK")
        return 0

    if args.check:  # without torch: quick enough to run before every launch
        return one_line_errors(check)
    from mem_dist.pipeline import distributed, engine, rundir

    def body() -> int:
        cfg = load_config(RunConfig, args.config, args.overrides)
        urls = check_shards(cfg.data)
        dist = distributed.init(cfg.device)
        repair(cfg, dist, urls)
        try:
            record = engine.generate(cfg, dist)
        except state.StateError as e:  # a data page that the footer check could not see
            if e.url.startswith(storage.join(cfg.output, "state") + "/"):
                storage.remove(e.url)  # so that the next run redoes it
            raise
        if dist.is_main:
            print(f"mem-dist: {record['rounds_done']} rounds done; state under {cfg.output}/state, metrics in {cfg.output}/metrics.jsonl")
        return 0

    return one_line_errors(body, distributed.LaunchError, rundir.ResumeError)


if __name__ == "__main__":
    sys.exit(main())
