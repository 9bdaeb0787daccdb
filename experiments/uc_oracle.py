"""A diagnostic for docs/efficacy.md's UC section: would UC's perturbations protect if the
clusters *were* the classes?

Copies a finished UC run's private side (run.json, state) to a new run directory and
rewrites every sample's cluster id: the perturbation it gets is the one of the cluster its
*true* class (the json's ``label``) was matched to, each class to its own cluster by the
largest overlap (Hungarian matching; needs at least as many clusters as classes). The
perturbations are the run's own, unchanged; only who gets which changes. A victim trained
on the merge of that run sees a class-wise code made of UC's optimised perturbations: a
perfect label predictor. If it still learns the content, better clusters cannot save UC
against this victim.

    python experiments/uc_oracle.py runs/fm-uc runs/fm-uc-oracle && mem-dist merge runs/fm-uc-oracle 'merge.keep_fields=[label, class]'
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from mem_dist.methods.uc import store as uc
from mem_dist.pipeline.data import load_shard, shard_name
from mem_dist.evaluation.pairs import read_labels
from shards import copy_uc_run, seal_uc_run, uc_copy_parser  # experiments/shards.py, beside this script


def class_to_cluster(labels: np.ndarray, clusters: np.ndarray, p: int) -> dict[int, int]:
    """Each class -> its own cluster, maximising the samples whose cluster stays the same."""
    classes = int(labels.max()) + 1
    if classes > p:
        raise SystemExit(f"uc_oracle: {classes} classes but only {p} clusters; each class needs its own")
    overlap = np.zeros((classes, p), np.int64)
    np.add.at(overlap, (labels, clusters), 1)
    rows, cols = linear_sum_assignment(-overlap)
    print(f"uc_oracle: class -> cluster {dict(zip(rows.tolist(), cols.tolist()))}; "
          f"{overlap[rows, cols].sum() / len(labels):.3f} of the samples keep their cluster")
    return dict(zip(rows.tolist(), cols.tolist()))


def main(argv: list[str] | None = None) -> None:
    ap = uc_copy_parser(__doc__)
    args = ap.parse_args(argv)
    run, cfg = copy_uc_run(args.src, args.dst)
    names = [shard_name(url) for url in run["shards"]]
    assigned = {name: uc.read_assignments(args.dst, name) for name in names}
    label_of = {}
    for url in run["shards"]:
        shard = load_shard(url, cfg.data)
        labels, _ = read_labels(shard.meta or [None] * len(shard))
        if labels is None or (labels < 0).any():
            raise SystemExit(f"uc_oracle: {url} has samples without an integer json 'label'")
        label_of.update(zip(shard.keys, labels.tolist()))
    labels = np.array([label_of[k] for name in names for k in assigned[name][0]])
    to_cluster = class_to_cluster(labels, np.concatenate([assigned[n][1] for n in names]), cfg.uc.clusters)
    for name in names:
        keys, _, distances, skipped = assigned[name]
        uc.write_assignments(args.dst, name, keys, np.array([to_cluster[label_of[k]] for k in keys]), distances, skipped)
    seal_uc_run(run, args.dst)


if __name__ == "__main__":
    main()
