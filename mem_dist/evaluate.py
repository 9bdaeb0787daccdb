"""``python -m mem_dist.evaluate``: the user-facing entry point; the code is :mod:`mem_dist.evaluation.evaluate`."""

import sys

from mem_dist.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
