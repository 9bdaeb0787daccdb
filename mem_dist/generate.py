"""``accelerate launch mem_dist/generate.py --config C [key=value ...]``: the generation entry point.

Kept at this path as the user-facing contract (also ``python mem_dist/generate.py``, one
process, and ``accelerate launch -m mem_dist.generate``, which needs no source checkout); the
code is :mod:`mem_dist.pipeline.generate`.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mem_dist.pipeline.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
