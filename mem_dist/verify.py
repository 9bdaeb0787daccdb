"""``python -m mem_dist.verify``: the user-facing entry point; the code is :mod:`mem_dist.publishing.verify`."""

import sys

from mem_dist.publishing.verify import main

if __name__ == "__main__":
    sys.exit(main())
