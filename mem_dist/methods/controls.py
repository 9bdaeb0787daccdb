"""The controls of MEM, methods like the others: ``method: random`` and ``method: prefix``.

Nothing is optimised and no surrogate is trained (its tokenizer gives the trigger vocabulary):
uniform integer delta in [-epsilon, epsilon] per sample and, when ``mem.trigger_len`` > 0, the
seeded random start triggers MEM would begin from. ``random`` with trigger_len 0 is the
random-noise baseline; with k > 0 it tells what MEM's optimisation adds to a unique (noise,
trigger) pair per sample. ``prefix`` gives every sample ONE trigger: what a fixed caption
prefix alone does to a victim evaluated on captions without it. They read the ``mem``
section (the trigger length and epsilon they are the controls of) and write one round of state
on the shared rounds driver (:mod:`mem_dist.pipeline.engine`).
"""

from __future__ import annotations

from mem_dist.methods.base import Job
from mem_dist.methods.mem.method import MemSection
from mem_dist.pipeline.config_io import check


class RandomNoise(MemSection):
    name = "random"

    def rounds(self, job: Job) -> int:
        return 1

    def manifest_name(self, job: Job) -> str:
        return "random-trigger" if job.section.trigger_len else "random"

    # The rounds driver's hooks (mem_dist.pipeline.engine)

    def before_samples(self, run, round_: int, bar: bool) -> tuple[float, None]:
        return float("nan"), None  # no surrogate phase

    def process_shard(self, run, round_: int, url: str):
        return noise_shard(run, url, shared_trigger=False)

    def round_metrics(self, job: Job, run, round_: int, surrogate_s: float) -> dict:
        return {"surrogate_samples_per_s": None, "hotflip": False}

    def round_line(self, metrics: dict, surrogate_s: float) -> str:
        return f"{self.name} baseline, nothing optimised"


class Prefix(RandomNoise):
    name = "prefix"

    def check(self, job: Job) -> None:
        check(job.section.trigger_len > 0, "mem.trigger_len", "must be at least 1 with method=prefix")

    def manifest_name(self, job: Job) -> str:
        return "random-prefix"

    def process_shard(self, run, round_: int, url: str):
        return noise_shard(run, url, shared_trigger=True)


def noise_shard(run, url: str, shared_trigger: bool):
    """A shard's control state: seeded uniform noise, and seeded random triggers (one per
    sample, or with ``shared_trigger`` one for every sample); loss NaN (nothing optimised)."""
    import numpy as np

    from mem_dist.methods.mem.rounds import trigger_texts
    from mem_dist.pipeline import state, text
    from mem_dist.pipeline.config import seed_of

    shard = run.cache.get(url)
    eps, k = run.cfg.mem.epsilon, run.cfg.mem.trigger_len
    rng = np.random.default_rng(seed_of(run.cfg.seed, "random", shard.name))
    noise = rng.integers(-eps, eps + 1, size=shard.canvases.shape)
    delta = (np.clip(shard.canvases.astype(np.int16) + noise, 0, 255) - shard.canvases).astype(np.int8)
    n = len(shard)
    vocab = run.vocab.cpu().numpy()
    if shared_trigger:
        trig = np.repeat(text.initial_triggers(["prefix"], vocab, k, run.cfg.seed), n, axis=0)
    else:
        trig = text.initial_triggers(shard.keys, vocab, k, run.cfg.seed)
    nan = np.full(n, np.nan, np.float32)
    return state.ShardState(shard.keys, delta, trig.reshape(n, k), trigger_texts(run, trig), nan, nan, dict(shard.skipped))
