"""The ``mem-dist`` console script: one sub-command per pipeline stage.

    mem-dist demo-data OUT --train N --val N     LAION-style demo shards (img2dataset layout)
    mem-dist import fashion-mnist OUT            labelled photos as shards: Fashion-MNIST (Debian's
    mem-dist import folder DIR OUT                 dataset-fashion-mnist) or an ImageFolder tree
    mem-dist generate --config C [k=v ...]       MEM / UC state (one process; use accelerate launch for more)
    mem-dist merge OUTPUT [merge.k=v ...]        protected shards (public) + manifest (private)
    mem-dist verify OUTPUT                       re-check every protected sample
    mem-dist evaluate --config E [k=v ...]       train victims (CLIP or classifier), score them on clean data
    mem-dist baseline KIND SRC OUT               a published class-keyed attack (block, lsp, ar, em) on labelled
                                                   shards: the victims' calibration points
    mem-dist bench merge --config C              merge throughput vs a bare loop
    mem-dist bench generate --config C           generation cost per phase, FLOP/s, memory, run estimates
    mem-dist bench scale                         a round's cost against the number of shards (moto S3)

Details: docs/reference.md.
"""

from __future__ import annotations

import argparse
import sys

from mem_dist.errors import one_line_errors


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
    from mem_dist.tools.demo import make_demo_data

    urls = make_demo_data(a.out, a.train, a.val, a.size, a.per_shard, a.seed, named_colours=not a.no_colours)
    print(f"mem-dist: wrote {len(urls['train'])} train and {len(urls['val'])} val shards under {a.out}")
    return 0


def import_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mem-dist import",
                                description="Write labelled image data as shards: OUT/train, OUT/public, OUT/val, OUT/select.")
    sub = p.add_subparsers(dest="source", required=True, metavar="{fashion-mnist,folder}")
    fm = sub.add_parser("fashion-mnist", help="Fashion-MNIST's idx files (train+public from its train set, val from its test set)")
    fm.add_argument("out", metavar="OUT", help="output folder (any fsspec URL)")
    fm.add_argument("--src", default=None,
                    help="folder with the four idx files, gzipped or not (default /usr/share/datasets/fashion-mnist)")
    fo = sub.add_parser("folder", help="torchvision ImageFolder tree: DIR/<class name>/<image files>")
    fo.add_argument("src", metavar="DIR", help="folder with one sub-folder per class (any fsspec URL)")
    fo.add_argument("out", metavar="OUT", help="output folder (any fsspec URL)")
    for q in (fm, fo):
        q.add_argument("--train", type=int, default=4000, help="training pairs (default 4000)")
        q.add_argument("--val", type=int, default=1000, help="validation pairs (default 1000)")
        q.add_argument("--public", type=int, default=4000, help="public pairs, disjoint from train (default 4000)")
        q.add_argument("--select", type=int, default=None if q is fm else 0,
                       help="clean images disjoint from val on which the attacker picks its best epoch (default "
                            + ("1000, or as many test images as --val leaves)" if q is fm else "0)"))
        q.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
        q.add_argument("--per-shard", type=int, default=500, help="samples per shard (default 500)")
        q.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from mem_dist.tools import importers

    flags = dict(train=a.train, val=a.val, public=a.public, select=a.select, size=a.size, seed=a.seed, per_shard=a.per_shard)
    return one_line_errors(lambda: importers.run(a.source, a.src, a.out, **flags))


def baseline(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mem-dist baseline",
                                description="Perturb labelled shards with a published class-keyed availability attack "
                                            "(calibration points for the victims; docs/efficacy.md).")
    p.add_argument("kind", choices=("block", "lsp", "ar", "em"),
                   help="block: class-wise +-eps block code; lsp: Yu et al. synthetic noise; ar: Sandoval-Segura et al. "
                        "autoregressive; em: Huang et al. sample-wise error-minimising noise")
    p.add_argument("src", help="labelled source shards (brace-expanded; mem-dist import writes them)")
    p.add_argument("out", help="output folder (any fsspec URL): one PNG tar per source shard, same keys, captions, json")
    p.add_argument("--epsilon", type=int, default=8, help="L-inf bound in 1/255 units (default 8)")
    p.add_argument("--size", type=int, default=32, help="canvas side the source decodes to (default 32)")
    p.add_argument("--grid", type=int, default=8, help="block: blocks per side (default 8: 4-px blocks at 32 px)")
    p.add_argument("--em-width", type=int, default=16, help="em: width of the CIFAR ResNet-18 it minimises against (default 16)")
    p.add_argument("--em-rounds", type=int, default=15, help="em: at most this many train + PGD rounds (default 15)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from mem_dist.evaluation import baselines

    return one_line_errors(lambda: baselines.run(a.kind, a.src, a.out, a.epsilon, a.size, a.seed, a.grid, a.em_width, a.em_rounds))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo-data": demo_data,
        "import": import_data,
        "generate": lambda a: __import__("mem_dist.pipeline.generate", fromlist=["main"]).main(a),
        "merge": lambda a: __import__("mem_dist.publishing.merge", fromlist=["main"]).main(a),
        "verify": lambda a: __import__("mem_dist.publishing.verify", fromlist=["main"]).main(a),
        "evaluate": lambda a: __import__("mem_dist.evaluation.evaluate", fromlist=["main"]).main(a),
        "bench": lambda a: __import__("mem_dist.tools.bench", fromlist=["main"]).main(a),
        "baseline": baseline,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
