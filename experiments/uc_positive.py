"""A diagnostic for docs/efficacy.md's UC colour rows: does a colour that never darkens read better?

Copies a finished UC run's private side (run.json, state) to a new run directory and makes
every cluster's perturbation non-negative (|delta|, the same bound). A random colour per
cluster has negative channels, which clip to 0 on Fashion-MNIST's black background (38% of
its pixels): there only the garment carries the code. With |delta| every pixel does. The
clusters and who gets which perturbation are the run's own; only the signs change.

    python experiments/uc_positive.py runs/fm-uc-captions-tint-random runs/fm-uc-captions-tint-positive
    mem-dist merge runs/fm-uc-captions-tint-positive 'merge.keep_fields=[label, class]'
"""

from __future__ import annotations

import numpy as np

from mem_dist.methods.uc import store as uc
from shards import copy_uc_run, seal_uc_run, uc_copy_parser  # experiments/shards.py, beside this script


def main(argv: list[str] | None = None) -> None:
    ap = uc_copy_parser(__doc__)
    args = ap.parse_args(argv)
    run, _ = copy_uc_run(args.src, args.dst)
    pert = uc.read_perturbations(args.dst)
    positive = np.abs(pert.astype(np.int16)).astype(np.int8)
    print(f"uc_positive: {int((pert < 0).sum())} of {pert.size} perturbation values were negative; now none is")
    uc.write_npy(uc.perturbations_url(args.dst), positive)
    seal_uc_run(run, args.dst)


if __name__ == "__main__":
    main()
