"""UC as the pipeline sees it (``method: uc``): its own generation (:func:`mem_dist.methods.uc.run.generate`),
one round of per-shard state (each key's cluster), finished when the perturbations are
written; merge and verify apply the perturbation of each sample's cluster."""

from __future__ import annotations

from mem_dist.methods.base import Job, StoredRounds
from mem_dist.methods.mem.config import mem_fingerprint
from mem_dist.methods.uc.config import uc_fingerprint
from mem_dist.pipeline.config_io import check


class UC(StoredRounds):
    name = "uc"
    section = "uc"

    def check(self, job: Job) -> None:
        grid = job.experimental.grid
        check(grid <= job.data.image_size, "experimental.uc.grid", f"must be at most data.image_size ({job.data.image_size})")

    def fingerprint(self, job: Job) -> dict:
        # the layout UC runs recorded before methods had their own sections: the whole mem
        # section beside uc's, with UC's epsilon as mem.epsilon (existing run folders resume)
        cfg = job.config
        return {"mem": mem_fingerprint(cfg.mem, cfg.experimental.mem, self.name, job.section.epsilon),
                "uc": uc_fingerprint(job.section, job.experimental)}

    def rounds(self, job: Job) -> int:
        return 1

    def epsilon(self, job: Job) -> int:
        return job.section.epsilon

    def manifest_name(self, job: Job) -> str:
        return "uc"

    def generate(self, job: Job, dist, log=print) -> dict:
        from mem_dist.methods.uc import run

        return run.generate(job.config, dist, log)

    def repair(self, job: Job, dist, urls: list[str], log=print) -> None:
        """Nothing: UC resumes from what it finds whole (:func:`mem_dist.methods.uc.run.generate`)."""

    def source(self, job: Job, urls: list[str], allow_unfinished: bool):
        from mem_dist.methods.uc import store

        if self.state_round(job):
            store.read_perturbations(job.output)  # a ConfigError until generate has finished: nothing to publish before
        return super().source(job, urls, allow_unfinished)

    def shard_state(self, job: Job, round_: int, src):
        from mem_dist.methods.uc import store

        return store.shard_state(job.output, src, store.read_perturbations(job.output))
