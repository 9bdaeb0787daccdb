"""How well a UC run's clusters agree with the source shards' labels.

    python experiments/cluster_agreement.py RUN_DIR SHARD_DIR

Reads each shard's cluster ids (RUN_DIR/state, private) and the json "label" of the same keys
in SHARD_DIR's tars; prints the normalised mutual information and the share of samples whose
cluster is matched to their label (clusters matched one-to-one to labels, Hungarian).
"""
import json
import os
import sys

import numpy as np
import webdataset as wds
from sklearn.metrics import normalized_mutual_info_score

from mem_dist.methods.uc import store as uc
from mem_dist.evaluation.scores import match_clusters


def main(run: str, shards: str) -> int:
    clusters, labels = [], []
    for tar in sorted(f for f in os.listdir(shards) if f.endswith(".tar")):
        keys, ids, _, _ = uc.read_assignments(run, tar[:-4])
        label = {s["__key__"]: json.loads(s["json"])["label"] for s in wds.WebDataset(os.path.join(shards, tar), shardshuffle=False)}
        clusters += ids.tolist()
        labels += [label[k] for k in keys]
    c, y = np.array(clusters), np.array(labels)
    to_label = match_clusters(c, y, int(max(c.max(), y.max())) + 1)
    print(f"cluster_agreement: {len(c)} samples, NMI {normalized_mutual_info_score(y, c):.3f}, "
          f"matched {(to_label[c] == y).mean():.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
