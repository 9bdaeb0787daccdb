"""MEM as the pipeline sees it (``method: mem``; ``mem.trigger_len: 0`` is EM): rounds of a
surrogate phase and a sample phase on the shared rounds driver (:mod:`mem_dist.pipeline.engine`),
the work of each in :mod:`mem_dist.methods.mem.rounds`; per-shard state stored per round."""

from __future__ import annotations

from mem_dist.methods.base import Job, StoredRounds
from mem_dist.methods.mem.config import mem_fingerprint


class MemSection(StoredRounds):
    """What MEM and its controls share: the ``mem`` section (its epsilon, the fingerprint's
    layout) and the rounds driver, set up by :func:`mem_dist.methods.mem.rounds.setup`."""

    section = "mem"

    def fingerprint(self, job: Job) -> dict:
        return {"mem": mem_fingerprint(job.section, job.experimental, self.name, self.epsilon(job))}

    def epsilon(self, job: Job) -> int:
        return job.section.epsilon

    def generate(self, job: Job, dist, log=print) -> dict:
        from mem_dist.pipeline import engine

        return engine.run_rounds(job.config, dist, self, log)

    def setup(self, job: Job, dist, ranks: int):
        """The rounds driver's run: shards, surrogate(s), trigger vocabulary, shard cache."""
        from mem_dist.methods.mem import rounds

        return rounds.setup(job.config, dist, ranks=ranks)


class Mem(MemSection):
    name = "mem"

    def rounds(self, job: Job) -> int:
        return job.section.rounds

    def manifest_name(self, job: Job) -> str:
        return "mem" if job.section.trigger_len else "em"

    # The rounds driver's hooks (mem_dist.pipeline.engine)

    def resume_round(self, job: Job) -> int:
        """The newest surrogate checkpoint: its round's sample phase may still be unfinished."""
        from mem_dist.pipeline import rundir

        return rundir.latest_checkpoint(job.output)

    def before_samples(self, run, round_: int, bar: bool) -> tuple[float, list | None]:
        """The round's surrogate phase: (this rank's mean training loss, the members' checksums)."""
        from mem_dist.methods.mem import rounds
        from mem_dist.pipeline import distributed

        loss = rounds.surrogate_round(run, round_, bar)
        return loss, [distributed.checksum(m.bare) for m in run.ensemble.members]

    def process_shard(self, run, round_: int, url: str):
        from mem_dist.methods.mem import rounds

        return rounds.process_shard(run, round_, url)

    def round_metrics(self, job: Job, run, round_: int, surrogate_s: float) -> dict:
        m = job.section
        return {"surrogate_samples_per_s": round(m.surrogate_steps * m.batch_size * run.ranks / surrogate_s, 1)
                if surrogate_s > 0 else None,
                "hotflip": m.trigger_len > 0 and round_ <= m.hotflip_rounds}

    def round_line(self, metrics: dict, surrogate_s: float) -> str:
        return (f"loss {metrics['loss']:.4f} (clean pairs {metrics['clean_loss']:.4f}) | surrogate {surrogate_s:.1f}s "
                f"({metrics['surrogate_samples_per_s']} samples/s)")
