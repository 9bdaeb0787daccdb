"""How every command ends on a bad configuration: one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from mem_dist import storage
from mem_dist.config_io import ConfigError


def one_line_errors(body: Callable[[], int], *expected: type[Exception]) -> int:
    """Run a command's body and return its exit code. A bad configuration (ConfigError and
    the command's ``expected`` errors: a bad launch, a refused resume) or storage that
    refuses access is one line on stderr and exit 2; anything else propagates."""
    try:
        return body()
    except (ConfigError, *expected) as e:
        message = str(e)
    except Exception as e:
        message = storage.access_problem(e)
        if message is None:
            raise
    print(f"mem-dist: error: {message}", file=sys.stderr)
    return 2
