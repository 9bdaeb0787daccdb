"""The ``mem-dist`` console script: one sub-command per pipeline stage.

    mem-dist demo-data OUT --train N --val N     LAION-style demo shards (img2dataset layout)
    mem-dist generate --config C [k=v ...]       MEM state (one process; use accelerate launch for more)
    mem-dist merge --config C [k=v ...]          protected shards
    mem-dist verify OUTPUT                       re-check every protected sample
    mem-dist evaluate --config E [k=v ...]       train victims, report retrieval on clean data
    mem-dist bench merge --config C              merge throughput vs a bare loop
    mem-dist bench generate --config C           generation cost per phase, peak memory, run estimate
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from mem_dist import storage
from mem_dist.config import ConfigError


def one_line_errors(body: Callable[[], int], *expected: type[Exception]) -> int:
    """Run a command's body and return its exit code. A bad configuration (ConfigError and
    the command's ``expected`` errors: a bad launch, a refused resume) or storage that
    refuses access is one line on stderr and exit 2; anything else propagates."""
    try:
        return body()
    except (ConfigError, *expected) as e:
        message = str(e)
    except Exception as e:
        message = storage.access_problem(e)
        if message is None:
            raise
    print(f"mem-dist: error: {message}", file=sys.stderr)
    return 2


def demo_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mem-dist demo-data", description="Write LAION-style demo shards: OUT/train and OUT/val.")
    p.add_argument("out", help="output folder (any fsspec URL)")
    p.add_argument("--train", type=int, default=4000, help="training pairs (default 4000)")
    p.add_argument("--val", type=int, default=500, help="validation pairs (default 500)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--per-shard", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-colours", action="store_true",
                   help="captions never name colours (harder content: shapes, sizes, positions, background patterns)")
    a = p.parse_args(argv)
    from mem_dist.demo import make_demo_data

    urls = make_demo_data(a.out, a.train, a.val, a.size, a.per_shard, a.seed, named_colours=not a.no_colours)
    print(f"mem-dist: wrote {len(urls['train'])} train and {len(urls['val'])} val shards under {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo-data": demo_data,
        "generate": lambda a: __import__("mem_dist.generate", fromlist=["main"]).main(a),
        "merge": lambda a: __import__("mem_dist.merge", fromlist=["main"]).main(a),
        "verify": lambda a: __import__("mem_dist.verify", fromlist=["main"]).main(a),
        "evaluate": lambda a: __import__("mem_dist.evaluate", fromlist=["main"]).main(a),
        "bench": lambda a: __import__("mem_dist.bench", fromlist=["main"]).main(a),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
