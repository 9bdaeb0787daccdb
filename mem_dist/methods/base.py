"""The one shape of every protection method: what the pipeline asks of it.

generate, merge and verify never name a method: they look it up by the config's ``method``
key (:func:`mem_dist.methods.get_method`) and call these steps. A method is one object,
registered by one line in :mod:`mem_dist.methods`::

    check(job)                       config load: the method's own cross-section checks (no torch)
    fingerprint(job)                 the keys that decide its state, for the run's config hash
    rounds(job)                      how many rounds of state a finished run has (run.json's "rounds")
    generate(job, dist, log)         run (or resume) generation on this rank; the run record
    repair(job, dist, urls, log)     before a resumed generate: remove unreadable state so it is redone
    state_round(job)                 the newest round of state written (0: nothing yet)
    source(job, urls, unfinished)    merge: the round to publish and whether generation has finished
    state_objects(job, round, name)  what a shard's state is read from (verify names a missing one)
    shard_state(job, round, src)     a source shard's per-sample delta and trigger, as merge applies them
    manifest_name(job)               the method the private manifest records (mem, em, uc, ...)
    epsilon(job)                     the L-inf bound verify checks every delta against

Each step gets a :class:`Job`: the method's own config section (and its ``experimental``
section) with the shared handles (data, surrogate, seed, output, state). The generation code
of MEM and UC still takes the whole :class:`~mem_dist.pipeline.config.RunConfig`
(``job.config``): their rounds, ensemble and feature code, and the experiments that call it.

:class:`StoredRounds` is the part MEM, its random / prefix controls and UC share: per-shard
Parquet state under ``state/round-{r:03d}/``, a run finished when run.json's rounds are done
and the final round holds every shard. A method without per-shard state (its state computed
from the source shard at merge) implements the steps itself.

This module is imported when a config is read: keep it free of torch (import inside steps).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mem_dist.pipeline.config import DataConfig, RunConfig, StateConfig, SurrogateConfig
    from mem_dist.pipeline.data import Shard
    from mem_dist.pipeline.state import ShardState


@dataclass(frozen=True)
class Job:
    """What the pipeline hands a method: its config section and the shared handles."""

    section: Any  # the method's own section (cfg.mem, cfg.uc, ...)
    experimental: Any  # its experimental section (cfg.experimental.mem, ...), or None
    data: DataConfig
    surrogate: SurrogateConfig
    seed: int
    output: str
    state: StateConfig
    progress: bool
    config: RunConfig  # the whole config, for generation code that takes it (see the module docstring)

    @classmethod
    def of(cls, cfg: RunConfig, method: Method) -> Job:
        experimental = getattr(cfg.experimental, method.section, None)
        return cls(getattr(cfg, method.section), experimental, cfg.data, cfg.surrogate, cfg.seed, cfg.output, cfg.state,
                   cfg.progress, cfg)


@dataclass(frozen=True)
class Source:
    """The state merge publishes: ``round`` of the run's ``rounds`` (``rounds_done`` by run.json)."""

    round: int
    rounds: int
    rounds_done: int | None
    finished: bool


class Method(ABC):
    """A protection method (see the module docstring for the steps)."""

    name: str  # the config's ``method`` value
    section: str  # the config section it reads (its ``experimental`` one has the same name)

    def job(self, cfg: RunConfig) -> Job:
        return Job.of(cfg, self)

    def check(self, job: Job) -> None:
        """Checks across sections, at config load (one-line ConfigError); none by default."""

    def fingerprint(self, job: Job) -> dict[str, Any]:
        """The method's part of the run's fingerprint: its sections' keys that decide the state."""
        import dataclasses

        exp = dataclasses.asdict(job.experimental) if job.experimental is not None else {}
        return {self.section: {**dataclasses.asdict(job.section), **exp}}

    @abstractmethod
    def rounds(self, job: Job) -> int: ...

    @abstractmethod
    def generate(self, job: Job, dist, log=print) -> dict: ...

    def repair(self, job: Job, dist, urls: list[str], log=print) -> None:
        """Before a resumed generate: nothing by default."""

    @abstractmethod
    def state_round(self, job: Job) -> int: ...

    @abstractmethod
    def source(self, job: Job, urls: list[str], allow_unfinished: bool) -> Source: ...

    @abstractmethod
    def state_objects(self, job: Job, round_: int, name: str) -> list[str]: ...

    @abstractmethod
    def shard_state(self, job: Job, round_: int, src: Shard) -> ShardState: ...

    @abstractmethod
    def manifest_name(self, job: Job) -> str: ...

    @abstractmethod
    def epsilon(self, job: Job) -> int: ...


class StoredRounds(Method):
    """Per-shard state stored per round (``state/round-{r:03d}/{shard}.parquet``)."""

    def resume_round(self, job: Job) -> int:
        """The round a resumed run continues: its newest round whose inputs are all stored."""
        return 1

    def state_round(self, job: Job) -> int:
        from mem_dist.pipeline import state

        return state.latest_round(job.output)

    def state_objects(self, job: Job, round_: int, name: str) -> list[str]:
        from mem_dist.pipeline import state

        return [state.state_url(job.output, round_, name)]

    def shard_state(self, job: Job, round_: int, src: Shard) -> ShardState:
        from mem_dist.pipeline import state

        return state.read_state(state.state_url(job.output, round_, src.name))

    def repair(self, job: Job, dist, urls: list[str], log=print) -> None:
        from mem_dist.pipeline import engine

        engine.repair(job.config, dist, urls, self.resume_round(job), self.rounds(job), log)

    def source(self, job: Job, urls: list[str], allow_unfinished: bool) -> Source:
        """The round to publish, checked.

        Raises:
            ConfigError: no state; the run is unfinished and ``allow_unfinished`` is off; or,
                with it on, no round holds every shard's state.
        """
        from mem_dist.pipeline import state, storage
        from mem_dist.pipeline.config_io import ConfigError
        from mem_dist.pipeline.data import shard_name

        output = job.output
        latest = self.state_round(job)
        if latest == 0:
            raise ConfigError(f"no generation state under {storage.join(output, 'state')}; run generate first")
        url = storage.join(output, "run.json")
        record = storage.read_json(url) if storage.exists(url) else {}
        rounds = int(record.get("rounds", self.rounds(job)))
        done = record.get("rounds_done")
        names = {shard_name(u) for u in urls}

        def lacking(r: int) -> list[str]:
            return sorted(names - state.completed(output, r))

        missing = lacking(latest)
        finished = (done is None or done >= rounds) and latest >= rounds and not missing
        if finished:
            return Source(latest, rounds, done, True)
        if not allow_unfinished:
            where = (f"{done} of {rounds} rounds done (run.json)" if done is not None and done < rounds
                     else f"the state of round {latest} lacks shard {missing[0]} (and {len(missing) - 1} more)" if missing
                     else f"state up to round {latest} of {rounds}")
            raise ConfigError(f"the run in {output} is unfinished: {where}; finish generate first (the same command resumes "
                              f"it), or publish its newest complete round anyway with merge.allow_unfinished=true")
        for r in (latest, latest - 1):  # generate writes round r + 1 only once round r is whole
            if r >= 1 and not lacking(r):
                return Source(r, rounds, done, False)
        raise ConfigError(f"the run in {output} is unfinished and no round's state holds every shard "
                          f"(round {latest} lacks {missing[0]}); finish generate first")
