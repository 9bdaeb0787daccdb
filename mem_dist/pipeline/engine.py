"""Generation: the configured method's (:mod:`mem_dist.methods`), and the rounds driver that
MEM and its random / prefix controls run on, on every rank.

    for r in rounds:
        before the samples: the method's (MEM: M DDP steps of the surrogate(s) -> parameter
                         checksum compared across ranks -> checkpoint r; the controls: nothing)
        sample phase:    the shards whose round-r state is missing, dealt out round-robin
                         over this launch's ranks
                         -> state/round-r/{shard}.parquet, atomic     (the method's process_shard)
        all ranks:       the round's loss sums reduced across ranks; rank 0 writes the
                         metrics.jsonl line and run.json, prunes old rounds

The driver asks the method (a :class:`mem_dist.methods.base.StoredRounds`) for: setup(job,
dist, ranks) -> a run (urls, ranks, streams, cache), resume_round(job), before_samples(run,
round, bar) -> (train loss, checksum), process_shard(run, round, url) -> ShardState,
round_metrics(job, run, round, surrogate_s) and round_line(metrics, surrogate_s).

The surrogate is checkpointed after every surrogate phase and every random stream is a
function of (seed, round, shard, batch) or (seed, surrogate rank, step), so a resumed run
computes exactly what an uninterrupted one would have, on any number of processes (the
surrogate's batches stay laid out for the first launch's G ranks; with G > 2 a launch of
another size sums their gradients in another float order). Each rank reads only its own
shards' state.
"""

from __future__ import annotations

import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from mem_dist.methods import get_method
from mem_dist.pipeline import data, rundir, state, storage
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.data import shard_name


def generate(cfg: RunConfig, dist, log=print) -> dict:
    """Run (or resume) the configured method's generation; returns the final run record."""
    method = get_method(cfg.method)
    return method.generate(method.job(cfg), dist, log)


def run_rounds(cfg: RunConfig, dist, method, log=print) -> dict:
    """Run (or resume) ``method``'s rounds; returns the final run record."""
    job = method.job(cfg)
    old = rundir.check_resume(cfg, dist.world)
    run = method.setup(job, dist, rundir.surrogate_ranks(old, dist.world))
    dist.barrier()  # every rank has checked run.json before rank 0 rewrites it
    done = old.get("rounds_done", 0) if old else 0
    if dist.is_main:
        storage.write_json(storage.join(cfg.output, "run.json"),
                           rundir.run_record(cfg, run.urls, dist.world, old, done, (old or {}).get("skipped", {}), launch=True))
    dist.barrier()
    last = method.rounds(job)
    first = resume_point(method, job, run.urls)
    if old is not None and first <= last and dist.is_main:
        n = len(state.completed(cfg.output, first))
        log(f"mem-dist: resuming {cfg.output} at round {first} ({done} rounds done, {n} shards of round {first} committed) "
            f"on {dist.world} processes" + (f" for the surrogate's {run.ranks} ranks" if run.ranks != dist.world else ""))
    record = None
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
        for round_ in range(first, last + 1):
            record = one_round(method, run, round_, bar=cfg.progress and dist.is_main, log=log, decoder=decoder)
    if record is None:
        record = storage.read_json(storage.join(cfg.output, "run.json"))
        log(f"mem-dist: {cfg.output} already has {record['rounds_done']} rounds; nothing to do")
    return record


def resume_point(method, job, urls: list[str]) -> int:
    """The round to continue with: the method's resume round if its state is not complete
    yet (its sample phase resumes), else the one after it."""
    all_shards = {shard_name(u) for u in urls}
    ck = method.resume_round(job)
    if ck and state.completed(job.output, ck) != all_shards:
        return ck
    return ck + 1


def one_round(method, run, round_: int, bar: bool, log, decoder: ThreadPoolExecutor) -> dict:
    cfg, dist = run.cfg, run.dist
    decodes = data.DECODES.value
    t0 = time.time()
    train_loss, checksum = method.before_samples(run, round_, bar)
    t1 = time.time()
    done = dist.broadcast(state.completed(cfg.output, round_) if dist.is_main else None)  # one listing, one split
    todo = data.owned([u for u in run.urls if shard_name(u) not in done], dist.rank, dist.world)
    mine = todo + data.owned([u for u in run.urls if shard_name(u) in done], dist.rank, dist.world)
    sums: dict[str, dict] = {}  # this rank's shards: the round's loss sums, from memory or (resumed) from storage
    for i, url in enumerate(tqdm(todo, desc=f"round {round_} samples", disable=not bar, leave=False)):
        run.cache.get(url)
        if i + 1 < len(todo):  # decode the next shard while this one is processed
            run.cache.prefetch(todo[i + 1], decoder)
        st = method.process_shard(run, round_, url)
        state.write_state(state.state_url(cfg.output, round_, shard_name(url)), st)
        sums[url] = {"n": len(st.keys), "loss_sum": float(st.loss.astype("float64").sum()),
                     "clean_sum": float(st.clean_loss.astype("float64").sum()), "skipped": dict(st.skipped)}
    t2 = time.time()
    summaries = [sums.get(u) or state.summary(state.state_url(cfg.output, round_, shard_name(u))) for u in mine]
    here = sum(s["n"] for u, s in zip(mine, summaries) if u in sums)
    totals = dist.sum([sum(s["n"] for s in summaries), sum(s["loss_sum"] for s in summaries),
                       sum(s["clean_sum"] for s in summaries), here,
                       0.0 if train_loss != train_loss else train_loss * len(run.streams), data.DECODES.value - decodes])
    skips = dist.gather([s["skipped"] for s in summaries])
    peak_rss = max(dist.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10))
    dist.barrier()  # every shard of the round is committed
    record = None
    if dist.is_main:
        skipped: dict[str, int] = {}
        for rank_skips in skips:
            for shard_skips in rank_skips:
                for reason, c in shard_skips.items():
                    skipped[reason] = skipped.get(reason, 0) + c
        n = int(totals[0])
        timing = {"surrogate_s": t1 - t0, "sample_s": t2 - t1, "start": t0, "end": time.time(), "samples_here": int(totals[3]),
                  "train_loss": totals[4] / run.ranks, "decodes": int(totals[5]), "peak_rss_mb": round(peak_rss, 1),
                  "checksum": checksum}
        record = finish_round(method, run, round_, n, totals[1] / n if n else float("nan"), totals[2] / n if n else float("nan"),
                              skipped, timing, log)
    dist.barrier()
    return record or storage.read_json(storage.join(cfg.output, "run.json"))


def finish_round(method, run, round_: int, n: int, loss: float, clean_loss: float, skipped: dict, timing: dict, log) -> dict:
    """Rank 0: the metrics.jsonl line, run.json, pruning."""
    cfg = run.cfg
    surrogate_s, sample_s = timing["surrogate_s"], timing["sample_s"]
    own = method.round_metrics(method.job(cfg), run, round_, surrogate_s)  # surrogate_samples_per_s, hotflip
    m = {
        "round": round_, "loss": loss, "clean_loss": clean_loss, "surrogate_train_loss": timing["train_loss"], "samples": n,
        "skipped": skipped, "surrogate_s": round(surrogate_s, 3), "sample_s": round(sample_s, 3),
        "surrogate_samples_per_s": own["surrogate_samples_per_s"],
        "sample_samples_per_s": round(timing["samples_here"] / sample_s, 1) if sample_s > 0 else None,
        "hotflip": own["hotflip"],
        "decodes": timing["decodes"], "peak_rss_mb": timing["peak_rss_mb"], "surrogate_checksum": timing["checksum"],
        "start": round(timing["start"], 3), "end": round(timing["end"], 3),
    }
    url = storage.join(cfg.output, "metrics.jsonl")
    lines = storage.read_bytes(url).decode().splitlines() if storage.exists(url) else []
    lines = [ln for ln in lines if ln.strip() and json.loads(ln)["round"] < round_] + [json.dumps(m)]
    storage.write_bytes_atomic(url, ("\n".join(lines) + "\n").encode())
    old = storage.read_json(storage.join(cfg.output, "run.json"))
    record = rundir.run_record(cfg, run.urls, run.dist.world, old, round_, skipped)
    storage.write_json(storage.join(cfg.output, "run.json"), record)
    state.prune(cfg.output, cfg.state.keep_rounds, round_)
    log(f"round {round_}/{record['rounds']}: {method.round_line(m, surrogate_s)} | samples {sample_s:.1f}s ({m['sample_samples_per_s']} samples/s) "
        f"| {n} samples, skipped {skipped or 0}")
    return record


def repair(cfg: RunConfig, dist, urls: list[str], ck: int, rounds: int, log=print) -> None:
    """Before a run of stored rounds resumes at round ``ck`` (of ``rounds``; the method's
    resume round): unreadable state objects (zero bytes, not Parquet, a damaged page
    in the final round's) of the round it continues are removed, each named in one line, so that it redoes them. If one of
    them was the input of a shard the round has still to do (the previous round's state),
    the latest surrogate checkpoint goes too: the run goes back one round, redoes those
    shards from the checkpoint before, and recomputes the same surrogate. Each rank checks
    its share of the shards."""
    names = [data.shard_name(u) for u in data.owned(urls, dist.rank, dist.world)]
    state.sweep(cfg.output, ck, names, log, full=ck >= rounds)
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
