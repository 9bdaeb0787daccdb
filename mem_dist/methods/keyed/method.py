"""Keyed codes as the pipeline sees it (``method: keyed``).

generate: check the text encoder, then (rank 0) draw the run's secret key and the centre
(the mean embedding of ``keyed.centre_samples`` captions); with ``keyed.generator: trained``
every rank then trains the generator (:mod:`mem_dist.methods.keyed.train`); rank 0 writes it all
to ``{output}/keyed/key.json``, once; a resumed or repeated generate keeps it. That is all the
state: no per-shard objects. merge and verify compute each sample's δ from its caption
(:func:`mem_dist.methods.keyed.code.delta`), and verify recomputes it for every published
byte. A sample with an empty caption (``data.empty_captions: protect``) gets the code of the
empty caption, the same for all of them; with ``copy`` it is copied through unprotected.
"""

from __future__ import annotations

import json
import secrets

from mem_dist.methods.base import Job, Method, Source
from mem_dist.pipeline.config_io import ConfigError, check

def key_url(output: str) -> str:
    from mem_dist.pipeline import storage

    return storage.join(output, "keyed", "key.json")


def read_key(output: str) -> tuple[bytes, list[int], list | None]:
    """The run's key, centre (quantized; [] = none) and trained generator's weights (None: the
    key's projection); ConfigError naming the file when there is none or it is not one."""
    from mem_dist.pipeline import storage

    url = key_url(output)
    if not storage.exists(url):
        raise ConfigError(f"no generation state: {url} does not exist; run generate first")
    try:
        record = json.loads(storage.read_bytes(url))
        return bytes.fromhex(record["key"]), [int(v) for v in record["centre"]], record.get("weights")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{url} is not a mem-dist key file ({e})") from e


def centre(job: Job, urls: list[str], log=print) -> list[int]:
    """The quantized mean embedding of the first ``keyed.centre_samples`` captions of the
    shards, in order ([] when 0)."""
    from mem_dist.pipeline.data import generation_view, load_shard

    want, captions = job.section.centre_samples, []
    for url in urls:
        if len(captions) >= want:
            break
        captions += list(generation_view(load_shard(url, job.data), job.data).captions)[:want - len(captions)]
    if not captions:
        return []
    clip, tokenizer = _code().text_encoder(job)
    log(f"mem-dist: keyed: the code is centred on the mean embedding of {len(captions)} captions")
    return _code().quantize(_code().embed(clip, tokenizer, captions).mean(0)).tolist()


class Keyed(Method):
    name = "keyed"
    section = "keyed"

    def check(self, job: Job) -> None:
        check(job.section.grid <= job.data.image_size, "keyed.grid", f"must be at most data.image_size ({job.data.image_size})")
        check(job.section.generator == "projection" or not (job.experimental.mirror or job.experimental.luminance),
              "keyed.generator", "trained takes the plain code: not experimental.keyed.mirror or luminance")

    def fingerprint(self, job: Job) -> dict:
        s, x = job.section, job.experimental  # the key is not in it: it is the run's (key.json), checked by generate
        train = {"train": {"objective": s.train_objective, "steps": s.train_steps, "batch_size": s.train_batch_size,
                           "lr": x.train_lr, "model_lr": x.train_model_lr, "tau": x.train_tau,
                           "crop_scale": list(x.train_crop_scale)}} if s.generator == "trained" else {}
        return {"method": self.name, "keyed": {"epsilon": s.epsilon, "grid": s.grid, "generator": s.generator,
                                               "centre_samples": s.centre_samples}
                                     | ({"mirror": True} if x.mirror else {}) | ({"luminance": True} if x.luminance else {}) | train,
                "quantum_bits": _code().QUANTUM_BITS}

    def rounds(self, job: Job) -> int:
        return 1

    def epsilon(self, job: Job) -> int:
        return job.section.epsilon

    def manifest_name(self, job: Job) -> str:
        return "keyed"

    def state_round(self, job: Job) -> int:
        from mem_dist.pipeline import storage

        return 1 if storage.exists(key_url(job.output)) else 0

    def state_objects(self, job: Job, round_: int, name: str) -> list[str]:
        return [key_url(job.output)]

    def generate(self, job: Job, dist, log=print) -> dict:
        from mem_dist.pipeline import rundir, storage
        from mem_dist.pipeline.data import check_shards

        cfg = job.config
        old = rundir.check_resume(cfg, dist.world)
        urls = check_shards(cfg.data)
        clip, tokenizer = _code().text_encoder(job)  # a surrogate that cannot serve is a config error, before anything is written
        _code().embed(clip, tokenizer, ["a photo"])
        url = key_url(job.output)
        record = None  # rank 0's new key record; None: the run already holds one
        if dist.is_main:
            if storage.exists(url):
                key = read_key(job.output)[0]
                given = bytes.fromhex(job.section.key) if job.section.key else key
                check(given == key, "keyed.key", f"differs from the key this run already holds ({url})")
                log(f"mem-dist: keyed: {job.output} already holds its key; nothing to do")
            else:
                key = bytes.fromhex(job.section.key) if job.section.key else secrets.token_bytes(32)
                record = {"key": key.hex(), "centre": centre(job, urls, log), "generator": job.section.generator,
                          "quantum_bits": _code().QUANTUM_BITS, "grid": job.section.grid,
                          "mirror": job.experimental.mirror, "luminance": job.experimental.luminance}
        record = dist.broadcast(record)
        if record is not None and job.section.generator == "trained":  # every rank trains; nothing is written until done
            from mem_dist.methods.keyed import train

            w_q = train.weights(job, dist, urls, bytes.fromhex(record["key"]), record["centre"], log)
            record |= {"weights": w_q.tolist(), "weight_bits": train.WEIGHT_BITS, "train_ranks": dist.world}
        if dist.is_main:
            if record is not None:
                storage.write_json(url, record)
                log(f"mem-dist: keyed: wrote the run's secret key{' and generator' if 'weights' in record else ''} to {url} "
                    f"(private: with it the code can be removed)")
            storage.write_json(storage.join(job.output, "run.json"),
                               rundir.run_record(cfg, urls, dist.world, old, 1, (old or {}).get("skipped", {}), launch=True))
        dist.barrier()
        return storage.read_json(storage.join(job.output, "run.json"))

    def source(self, job: Job, urls: list[str], allow_unfinished: bool) -> Source:
        from mem_dist.pipeline import storage

        read_key(job.output)
        url = storage.join(job.output, "run.json")
        done = storage.read_json(url).get("rounds_done") if storage.exists(url) else None
        return Source(1, 1, done, True)

    def shard_state(self, job: Job, round_: int, src):
        import numpy as np

        from mem_dist.pipeline import state
        from mem_dist.pipeline.data import generation_view

        code = _code()
        view = generation_view(src, job.data)
        n = len(view.keys)
        key, mean, weights = read_key(job.output)
        d = np.zeros((0, job.data.image_size, job.data.image_size, 3), np.int8)
        if n:  # a shard whose every sample is skipped has no caption to embed
            clip, tokenizer = code.text_encoder(job)
            e_q = code.quantize(code.embed(clip, tokenizer, list(view.captions)))
            if mean:
                e_q = e_q - np.asarray(mean, np.int64)
            if weights is not None:
                weights = np.asarray(weights, np.int64)
                want = (job.section.grid * job.section.grid * 3, e_q.shape[1])
                if weights.shape != want:
                    raise ConfigError(f"{key_url(job.output)}: the generator's weights are {list(weights.shape)}, "
                                      f"not {list(want)} (keyed.grid and the text tower's width)")
            h, w = view.canvases.shape[1:3]
            d = code.apply(view.canvases, code.delta(key, e_q, job.section.grid, job.section.epsilon, h, w,
                                                     job.experimental.mirror, job.experimental.luminance, weights))
        return state.ShardState(list(view.keys), d, np.zeros((n, 0), np.int64), [""] * n, np.zeros(n, np.float32),
                                np.full(n, np.nan, np.float32), dict(view.skipped))


def _code():
    from mem_dist.methods.keyed import code

    return code
