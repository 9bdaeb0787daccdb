"""What the experiment scripts share: decode source shards; copy a finished
UC run's private side to a new run directory whose state a script rewrites.

Not part of the package: experiments/ holds scripts behind numbers in docs/efficacy.md that
are not package options (their methods did not protect). Each writes PNG shards with the
source keys (mem_dist.evaluation.baselines.write_perturbed), for `mem-dist evaluate`.
"""
import argparse
import os
import shutil

from mem_dist.pipeline import storage
from mem_dist.pipeline.config import DataConfig, RunConfig
from mem_dist.pipeline.config_io import build
from mem_dist.pipeline.data import Shard, expand_shards, load_shard


def read_shards(spec: str, size: int) -> list[Shard]:
    """Every shard of ``spec`` decoded to canvases of side ``size`` (center crop)."""
    return [load_shard(url, DataConfig(shards=spec, image_size=size, resize_mode="center_crop")) for url in expand_shards(spec)]


def uc_copy_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a script that rewrites a copy of a UC run: src, dst (then its own options)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("src", help="a finished UC run directory (local)")
    ap.add_argument("dst", help="the new run directory, to merge afterwards")
    return ap


def copy_uc_run(src: str, dst: str) -> tuple[dict, RunConfig]:
    """A finished UC run's state copied to ``dst`` (local); returns its run record and config.
    The caller rewrites the copy's state, then :func:`seal_uc_run`."""
    run = storage.read_json(os.path.join(src, "run.json"))
    shutil.copytree(os.path.join(src, "state"), os.path.join(dst, "state"), dirs_exist_ok=True)
    return run, build(RunConfig, run["config"], "")


def seal_uc_run(run: dict, dst: str) -> None:
    """The copy's run.json, written last, naming ``dst`` as its output (then ``mem-dist merge dst``)."""
    run["config"]["output"] = dst
    storage.write_json(os.path.join(dst, "run.json"), run)
