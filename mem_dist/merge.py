"""``python -m mem_dist.merge``: the user-facing entry point; the code is :mod:`mem_dist.publishing.merge`."""

import sys

from mem_dist.publishing.merge import main

if __name__ == "__main__":
    sys.exit(main())
