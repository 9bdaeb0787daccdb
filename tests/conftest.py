"""Shared fixtures: small demo shards written by the project itself, tiny-model configs."""

from __future__ import annotations

import os
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the machine's cores (pyproject's addopts: -n 2): one torch thread each,
    # in this process and in every process a test starts (an OpenMP pool per process, more
    # threads than cores, makes a job many times slower).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RN = os.path.join(ROOT, "configs", "models", "tiny-rn.json")
TINY_VIT = os.path.join(ROOT, "configs", "models", "tiny-vit.json")


def tiny_overrides(shards: str, output: str, **extra) -> list[str]:
    """Overrides for a seconds-long generation run on the tiny RN surrogate."""
    base = {
        "data.shards": shards, "output": output, "data.image_size": 32, "surrogate.model": TINY_RN,
        "mem.rounds": 2, "mem.surrogate_steps": 3, "mem.pgd_steps": 2, "mem.hotflip_rounds": 1,
        "experimental.mem.hotflip_candidates": 4, "mem.batch_size": 32, "mem.lr": 5e-4, "progress": False, "device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """3 train shards of 40 samples (32 px) and 1 val shard; built once per session."""
    from mem_dist.tools.demo import make_demo_data

    out = str(tmp_path_factory.mktemp("demo"))
    make_demo_data(out, train=120, val=40, size=32, per_shard=40, seed=0)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("RN50")


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]
