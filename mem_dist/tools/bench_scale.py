"""``mem-dist bench scale``: does a round's cost grow with the work or with the shard count?

Runs real generation (``python mem_dist/generate.py``, one process, the tiny RN surrogate)
on N tiny shards on moto's S3 server on 127.0.0.1, for several N with the same work per
round (the same surrogate steps; each shard holds a few samples), and prints per round:
wall time, shards decoded, storage requests (counted by a WSGI wrapper around moto's
server) and the process's peak RSS. Growing N 10x should grow decodes and requests with the
samples the sample phase must visit, not with the shards the surrogate phase could reach;
peak RSS should stay flat (the decoded-shard cache holds data.cache_shards + 1 shards).

    mem-dist bench scale [--shards 8,80] [--per-shard 4] [--rounds 3] [--script mem_dist/generate.py]

``--script`` runs another checkout's generate.py (an older commit, for a before/after table;
decodes and peak RSS are read from metrics.jsonl, which older commits did not write).
Needs moto[server] (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

from mem_dist.pipeline import storage
from mem_dist.pipeline.config_io import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountingServer:
    """moto's S3 server on 127.0.0.1, recording the time of every request it answers."""

    def __init__(self):
        try:
            from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
            from werkzeug.serving import make_server
        except ImportError as e:
            raise ConfigError(f"bench scale needs moto's server: pip install 'moto[server]' (the test extra) ({e})") from None
        app = DomainDispatcherApplication(create_backend_app)
        self.times: list[float] = []

        def counting(environ, start_response):
            self.times.append(time.time())
            return app(environ, start_response)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = make_server("127.0.0.1", port, counting, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.times)


def bench_scale(counts: list[int], per_shard: int, rounds: int, script: str) -> list[dict]:
    """One row per (shard count, round): {"shards", "round", "seconds", "decodes", "requests", "peak_rss_mb"},
    and one per shard count for the whole process ("round": "run": wall time and requests, start-up included)."""
    import logging

    from mem_dist.tools.demo import write_split

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = CountingServer()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_S3": server.url}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(use_listings_cache=False).mkdir("bench")
    rows = []
    for n in counts:
        src, out = f"s3://bench/src-{n}", f"s3://bench/run-{n}"
        write_split(src, n * per_shard, per_shard, 16, seed=0)
        args = [sys.executable, script, f"data.shards={src}/{{00000..{n - 1:05d}}}.tar", f"output={out}",
                "data.image_size=16", f"surrogate.model={os.path.join(ROOT, 'configs', 'models', 'tiny-rn32.json')}",
                f"mem.rounds={rounds}", "mem.surrogate_steps=4", "mem.pgd_steps=1", "mem.hotflip_rounds=0",
                "mem.batch_size=8", "data.cache_shards=4", "progress=false", "device=cpu"]
        t0 = time.time()
        proc = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"generate failed on {n} shards:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        t1 = time.time()
        lines = storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()
        metrics = [json.loads(ln) for ln in lines if ln.strip()]
        for m in metrics:
            start = m.get("start")
            rows.append({"shards": n, "round": m["round"], "seconds": round(m["surrogate_s"] + m["sample_s"], 2),
                         "decodes": m.get("decodes"), "peak_rss_mb": m.get("peak_rss_mb"),
                         "requests": server.between(start, m["end"]) if start is not None else None})
        rows.append({"shards": n, "round": "run", "seconds": round(t1 - t0, 2), "decodes": None, "peak_rss_mb": None,
                     "requests": server.between(t0, t1)})
    server.server.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="8,80", help="shard counts to compare (default 8,80)")
    p.add_argument("--per-shard", type=int, default=4, help="samples per shard (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="MEM rounds (default 3)")
    p.add_argument("--script", default=os.path.join(ROOT, "mem_dist", "generate.py"), help="the generate.py to run")
    a = p.parse_args(argv)
    rows = bench_scale([int(x) for x in a.shards.split(",")], a.per_shard, a.rounds, a.script)
    print(f"mem-dist bench scale: {a.per_shard} samples per shard, 4 surrogate steps of 8 per round, one process, moto S3 "
          f"({a.script})")
    print(f"{'shards':>7} {'round':>6} {'seconds':>8} {'decodes':>8} {'requests':>9} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['shards']:>7} {r['round']:>6} {r['seconds']:>8} {str(r['decodes']):>8} {str(r['requests']):>9} "
              f"{str(r['peak_rss_mb']):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
