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


# The files that take longest (pytest --durations, 2026-12-07), first: pytest-xdist's loadfile
# hands whole files to the two workers in collection order, so starting the long ones first keeps
# one worker from finishing a long file alone at the end.
LONGEST_FIRST = ("test_efficacy.py", "test_distributed.py", "test_generate.py", "test_elastic.py",
                 "test_img2dataset.py", "test_keyed.py", "test_calibration.py", "test_uc.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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


class moto_s3:
    """moto's S3 server on 127.0.0.1 for the block, reached through the AWS variables s3fs reads
    (``self.env``). fsspec caches one S3FileSystem per constructor arguments, and the cached one
    keeps the endpoint it was made with: the cache is cleared on entry and exit, so a test never
    reaches the stopped server of a module that ran before it in the same worker; and moto keeps
    its buckets per process, so they are reset on entry."""

    def __enter__(self):
        import logging
        import urllib.request

        import s3fs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # Port 0: the server binds a free port itself. A port picked beforehand (bind, close, hand
        # over) can be taken by another process in between, and then ThreadedMotoServer.start()
        # waits forever for a server thread that died on "address in use".
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        port = self.server.get_host_and_port()[1]
        # moto's backends are per process, not per server: start from no buckets
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"),
                               timeout=60).close()
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        s3fs.S3FileSystem.clear_instance_cache()
        return s3fs.S3FileSystem(use_listings_cache=False)

    def __exit__(self, *exc):
        import s3fs

        self.server.stop()
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
