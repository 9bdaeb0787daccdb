"""Unlearnable Clusters (UC / UC-CLIP, CVPR 2023): ``method: uc``.

    config.py         its ``uc`` and ``experimental.uc`` sections (light: read with every config)
    method.py         the registered method: the steps the pipeline calls (:mod:`mem_dist.methods.base`)
    run.py            generation on every rank: k-means sample, assignment, the perturbations' optimisation
    features.py       the surrogate's image features (or caption embedding)
    perturbations.py  the per-cluster generators or direct perturbations, and their loss
    store.py          what is stored (assignments, centroids, perturbations) and the state merge applies
"""
