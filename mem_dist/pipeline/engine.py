"""The rounds of a generation run, on every rank (MEM and the random baselines).

    for r in rounds:
        surrogate phase: M DDP steps of the surrogate(s)             (mem.surrogate_phase)
                         -> parameter checksum compared across ranks -> checkpoint r
        sample phase:    the shards whose round-r state is missing, dealt out round-robin
                         over this launch's ranks
                         -> state/round-r/{shard}.parquet, atomic      (mem.process_shard)
        all ranks:       the round's loss sums reduced across ranks; rank 0 writes the
                         metrics.jsonl line and run.json, prunes old rounds

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

from mem_dist.pipeline import data, distributed, rundir, state, storage
from mem_dist.methods import mem
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.data import shard_name


def generate(cfg: RunConfig, dist: distributed.Dist, log=print) -> dict:
    """Run (or resume) generation; returns the final run record. ``mem.method: uc`` is
    Unlearnable Clusters (:func:`mem_dist.methods.uc.generate`)."""
    if cfg.mem.method == "uc":
        from mem_dist.methods import uc

        return uc.generate(cfg, dist, log)
    old = rundir.check_resume(cfg, dist.world)
    run = mem.setup(cfg, dist, ranks=rundir.surrogate_ranks(old, dist.world))
    dist.barrier()  # every rank has checked run.json before rank 0 rewrites it
    done = old.get("rounds_done", 0) if old else 0
    if dist.is_main:
        storage.write_json(storage.join(cfg.output, "run.json"),
                           rundir.run_record(cfg, run.urls, dist.world, old, done, (old or {}).get("skipped", {}), launch=True))
    dist.barrier()
    last = rundir.total_rounds(cfg)
    first = resume_point(run)
    if old is not None and first <= last and dist.is_main:
        n = len(state.completed(cfg.output, first))
        log(f"mem-dist: resuming {cfg.output} at round {first} ({done} rounds done, {n} shards of round {first} committed) "
            f"on {dist.world} processes" + (f" for the surrogate's {run.ranks} ranks" if run.ranks != dist.world else ""))
    record = None
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
        for round_ in range(first, last + 1):
            record = one_round(run, round_, bar=cfg.progress and dist.is_main, log=log, decoder=decoder)
    if record is None:
        record = storage.read_json(storage.join(cfg.output, "run.json"))
        log(f"mem-dist: {cfg.output} already has {record['rounds_done']} rounds; nothing to do")
    return record


def resume_point(run: mem.Run) -> int:
    """The round to continue with: the newest checkpointed round if its state is not
    complete yet (its sample phase resumes), else the one after it."""
    all_shards = {shard_name(u) for u in run.urls}
    ck = rundir.latest_checkpoint(run.cfg.output) if run.cfg.mem.method == "mem" else 1
    if ck and state.completed(run.cfg.output, ck) != all_shards:
        return ck
    return ck + 1


def surrogate_round(run: mem.Run, round_: int, bar: bool) -> float:
    """Round ``round_``'s surrogate phase (or its checkpoint, when resuming its sample phase);
    returns this rank's mean training loss (NaN when loaded)."""
    cfg, dist = run.cfg, run.dist
    train_loss = float("nan")
    if rundir.latest_checkpoint(cfg.output) >= round_:  # resuming this round's sample phase
        if run.at_round != round_:
            run.ensemble.load_state_dict(rundir.load_checkpoint(cfg.output, round_))
    else:
        if round_ > 1 and run.at_round != round_ - 1:
            run.ensemble.load_state_dict(rundir.load_checkpoint(cfg.output, round_ - 1))
        train_loss = mem.surrogate_phase(run, round_, bar)
        run.ensemble.sync_and_check(dist, round_)
        if dist.is_main:
            rundir.save_checkpoint(cfg.output, round_, run.ensemble.state_dict(), cfg.state.checkpoint_keep)
        dist.barrier()
    run.at_round = round_
    return train_loss


def one_round(run: mem.Run, round_: int, bar: bool, log, decoder: ThreadPoolExecutor) -> dict:
    cfg, dist = run.cfg, run.dist
    decodes = data.DECODES.value
    t0 = time.time()
    train_loss = surrogate_round(run, round_, bar) if cfg.mem.method == "mem" else float("nan")
    checksum = [distributed.checksum(m.bare) for m in run.ensemble.members] if cfg.mem.method == "mem" else None
    t1 = time.time()
    done = dist.broadcast(state.completed(cfg.output, round_) if dist.is_main else None)  # one listing, one split
    todo = data.owned([u for u in run.urls if shard_name(u) not in done], dist.rank, dist.world)
    mine = todo + data.owned([u for u in run.urls if shard_name(u) in done], dist.rank, dist.world)
    sums: dict[str, dict] = {}  # this rank's shards: the round's loss sums, from memory or (resumed) from storage
    for i, url in enumerate(tqdm(todo, desc=f"round {round_} samples", disable=not bar, leave=False)):
        run.cache.get(url)
        if i + 1 < len(todo):  # decode the next shard while this one is processed
            run.cache.prefetch(todo[i + 1], decoder)
        st = mem.process_shard(run, round_, url) if cfg.mem.method == "mem" else mem.random_noise_shard(run, url)
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
        record = finish_round(run, round_, n, totals[1] / n if n else float("nan"), totals[2] / n if n else float("nan"),
                              skipped, timing, log)
    dist.barrier()
    return record or storage.read_json(storage.join(cfg.output, "run.json"))


def finish_round(run: mem.Run, round_: int, n: int, loss: float, clean_loss: float, skipped: dict, timing: dict, log) -> dict:
    """Rank 0: the metrics.jsonl line, run.json, pruning."""
    cfg = run.cfg
    is_mem = cfg.mem.method == "mem"
    surrogate_s, sample_s = timing["surrogate_s"], timing["sample_s"]
    m = {
        "round": round_, "loss": loss, "clean_loss": clean_loss, "surrogate_train_loss": timing["train_loss"], "samples": n,
        "skipped": skipped, "surrogate_s": round(surrogate_s, 3), "sample_s": round(sample_s, 3),
        "surrogate_samples_per_s": round(cfg.mem.surrogate_steps * cfg.mem.batch_size * run.ranks / surrogate_s, 1)
        if surrogate_s > 0 and is_mem else None,
        "sample_samples_per_s": round(timing["samples_here"] / sample_s, 1) if sample_s > 0 else None,
        "hotflip": is_mem and cfg.mem.trigger_len > 0 and round_ <= cfg.mem.hotflip_rounds,
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
    losses = (f"loss {loss:.4f} (clean pairs {clean_loss:.4f}) | surrogate {surrogate_s:.1f}s "
              f"({m['surrogate_samples_per_s']} samples/s)" if is_mem else f"{cfg.mem.method} baseline, nothing optimised")
    log(f"round {round_}/{record['rounds']}: {losses} | samples {sample_s:.1f}s ({m['sample_samples_per_s']} samples/s) "
        f"| {n} samples, skipped {skipped or 0}")
    return record
