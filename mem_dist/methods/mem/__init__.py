"""MEM (Multi-step Error Minimization): ``method: mem``.

    config.py   its ``mem`` and ``experimental.mem`` sections (light: read with every config)
    method.py   the registered method: the steps the pipeline calls (:mod:`mem_dist.methods.base`)
    rounds.py   a round's work on one rank: the surrogate phase and the sample phase (HotFlip, PGD)

Its rounds run on the shared driver, :mod:`mem_dist.pipeline.engine`.
"""
