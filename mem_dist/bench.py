"""``python -m mem_dist.bench``: the user-facing entry point; the code is :mod:`mem_dist.tools.bench`."""

import sys

from mem_dist.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
