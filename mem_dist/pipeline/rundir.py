"""The run folder's own records: run.json, resume checks, surrogate checkpoints.

``{output}/run.json`` records the run (config, its hash, versions, shards, the world size of
each launch, rounds done, skip counts); a command that would continue a run with another
generation config is refused (:class:`ResumeError`). Any world size may continue a run: the
surrogate's batches stay laid out for the first launch's ranks (``surrogate_ranks``, see
:mod:`mem_dist.methods.mem.rounds`). Checkpoints ``{output}/checkpoints/round-{r:03d}.pt`` hold the
surrogate(s) after round r's surrogate phase.
"""

from __future__ import annotations

import io
import sys
import time

import torch

from mem_dist import __version__
from mem_dist.methods import get_method
from mem_dist.pipeline import storage
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.config_io import ConfigError, build, to_dict


class ResumeError(RuntimeError):
    """The output folder holds a run that this command may not continue."""


def check_resume(cfg: RunConfig, world: int) -> dict | None:
    """The existing run.json if this command may continue it; raises ResumeError if not.
    ``world`` may differ from the earlier launches'."""
    url = storage.join(cfg.output, "run.json")
    if not storage.exists(url):
        return None
    old = storage.read_json(url)
    if old.get("config_hash") != cfg.config_hash() and recorded_hash(old) != cfg.config_hash():
        raise ResumeError(
            f"{cfg.output} holds a run with a different configuration (config hash {old.get('config_hash')} there, "
            f"{cfg.config_hash()} now); use a new output, or the same config to resume (only mem.rounds, "
            f"surrogate.precision, data.cache_shards, device, progress, state.* and merge.* may change)")
    return old


def recorded_hash(old: dict) -> str | None:
    """The config hash of the run's recorded config as this version computes it (a run.json
    written before a memory-only key left the fingerprint still resumes); None if unreadable."""
    try:
        return build(RunConfig, old.get("config"), "").config_hash()
    except (ConfigError, TypeError, ValueError):
        return None


def surrogate_ranks(old: dict | None, world: int) -> int:
    """The ranks the surrogate's batches are laid out for: the first launch's world size."""
    if old is None:
        return world
    return int(old.get("surrogate_ranks") or (old.get("world_sizes") or [old.get("world_size") or world])[0])


def run_record(cfg: RunConfig, urls: list[str], world: int, old: dict | None, rounds_done: int,
               skipped: dict[str, int], launch: bool = False) -> dict:
    """The content of run.json; ``launch``: this launch's world size is appended to
    ``world_sizes`` (once per launch, when it first writes run.json)."""
    import accelerate, open_clip, pyarrow, webdataset

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    method = get_method(cfg.method)
    sizes = list((old or {}).get("world_sizes") or ([old["world_size"]] if old and "world_size" in old else []))
    return {
        "config": to_dict(cfg),
        "config_hash": cfg.config_hash(),
        "shards": urls,
        "world_size": world,
        "world_sizes": sizes + [world] if launch or not sizes else sizes,
        "surrogate_ranks": surrogate_ranks(old, world),
        "rounds": method.rounds(method.job(cfg)),
        "rounds_done": rounds_done,
        "skipped": skipped,
        "versions": {"mem_dist": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "webdataset": webdataset.__version__, "accelerate": accelerate.__version__,
                     "pyarrow": pyarrow.__version__, "python": sys.version.split()[0]},
        "created": (old or {}).get("created", now),
        "updated": now,
    }


def checkpoint_url(output: str, round_: int, prefix: str = "round") -> str:
    """``{output}/checkpoints/{prefix}-{r:03d}.pt`` (prefix: "round" for MEM, "uc-epoch" for UC)."""
    return storage.join(output, "checkpoints", f"{prefix}-{round_:03d}.pt")


def latest_checkpoint(output: str, prefix: str = "round") -> int:
    names = storage.listdir(storage.join(output, "checkpoints"))
    head = f"{prefix}-"
    return max((int(n[len(head):-3]) for n in names if n.startswith(head) and n.endswith(".pt")), default=0)


def save_checkpoint(output: str, round_: int, obj: dict, keep: int, prefix: str = "round") -> None:
    """``obj`` as round ``round_``'s checkpoint; older ones beyond the newest ``keep`` removed."""
    buf = io.BytesIO()
    torch.save({"round": round_, **obj}, buf)
    storage.write_bytes_atomic(checkpoint_url(output, round_, prefix), buf.getvalue())
    for r in range(1, round_ - keep + 1):
        storage.remove(checkpoint_url(output, r, prefix))


def load_checkpoint(output: str, round_: int, prefix: str = "round") -> dict:
    with storage.open_file(checkpoint_url(output, round_, prefix), "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
