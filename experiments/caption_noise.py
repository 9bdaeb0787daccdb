"""Fashion-MNIST shards whose captions disagree with the labels for a seeded share of samples.

    python experiments/caption_noise.py SRC_DIR OUT_DIR FRACTION [--seed 0]

Copies every shard of SRC_DIR (tar, parquet, _stats.json) to OUT_DIR with the same keys and
image bytes; for a seeded FRACTION of the samples the class name in the caption (txt, the json's
caption, the parquet's caption column) is replaced by another class, chosen uniformly, while
the json's label and class stay the true ones. Clusters of these captions then agree with the
labels for about 1 - FRACTION of the samples, as free-text captions agree only in part with the
classes an attacker trains on (docs/efficacy.md, UC on the captions' clusters).
"""
import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from mem_dist.pipeline.config import seed_of
from mem_dist.tools.importers import FASHION_MNIST_CLASSES


def noisy_caption(caption: str, label: int, rng: np.random.Generator) -> str:
    """The caption with its class name replaced by one of the other classes."""
    true = FASHION_MNIST_CLASSES[label]
    if caption.count(true) != 1:
        raise ValueError(f"caption {caption!r} does not name its class {true!r} exactly once")
    other = FASHION_MNIST_CLASSES[(label + 1 + rng.integers(len(FASHION_MNIST_CLASSES) - 1)) % len(FASHION_MNIST_CLASSES)]
    article = "an" if other[0] in "aeiou" else "a"  # "a photo of an ankle boot." -> "a photo of a coat."
    return re.sub(rf"(\b(?:an?) )?{re.escape(true)}", lambda m: (f"{article} " if m.group(1) else "") + other, caption, count=1)


def copy_shard(src: str, out: str, name: str, fraction: float, seed: int) -> tuple[int, int]:
    """One shard: (samples, captions changed)."""
    rng = np.random.default_rng(seed_of(seed, "caption-noise", name))
    captions, n, changed = {}, 0, 0
    with wds.TarWriter(os.path.join(out, f"{name}.tar"), mtime=0) as tw:
        for sample in wds.WebDataset(os.path.join(src, f"{name}.tar"), shardshuffle=False):
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode()
            if rng.random() < fraction:
                caption, changed = noisy_caption(caption, meta["label"], rng), changed + 1
            meta["caption"] = captions[sample["__key__"]] = caption
            tw.write({**{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")},
                      "txt": caption, "json": json.dumps(meta).encode()})
            n += 1
    table = pq.read_table(os.path.join(src, f"{name}.parquet"))
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array([captions[k] for k in table.column("key").to_pylist()]))
    pq.write_table(table, os.path.join(out, f"{name}.parquet"))
    shutil.copy(os.path.join(src, f"{name}_stats.json"), os.path.join(out, f"{name}_stats.json"))
    return n, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("fraction", type=float)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.fraction <= 1:
        print(f"caption_noise: FRACTION must be between 0 and 1, not {args.fraction}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    names = sorted(f[:-4] for f in os.listdir(args.src) if f.endswith(".tar"))
    total = changed = 0
    for name in names:
        n, c = copy_shard(args.src, args.out, name, args.fraction, args.seed)
        total, changed = total + n, changed + c
    print(f"caption_noise: {len(names)} shards, {total} samples, {changed} captions name another class ({changed / max(total, 1):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
