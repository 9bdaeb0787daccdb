"""How every command ends on a bad configuration: one line on stderr and exit code 2.

Under a multi-process launch the line comes from rank 0 alone. Where the launcher is
torch's elastic agent (``accelerate launch`` with several processes, ``torchrun``) the line
goes into the error file the agent reads (``TORCHELASTIC_ERROR_FILE``), and the agent prints
it once, as the root cause at the end of its failure summary; the launcher itself then exits 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Callable

from mem_dist.pipeline import storage
from mem_dist.pipeline.config_io import ConfigError

FOLLOWER_WAIT_S = 10  # how long a rank other than 0 waits, on an error every rank meets, for rank 0 to end the launch


def one_line_errors(body: Callable[[], int], *expected: type[Exception]) -> int:
    """Run a command's body and return its exit code. A bad configuration (ConfigError and
    the command's ``expected`` errors: a bad launch, a refused resume) or storage that
    refuses access is one line and exit 2; an error that says it is one line (its class has
    ``one_line = True``: an unreadable state object, a storage fault on a whole shard) is one
    line and exit 1; anything else propagates."""
    code = 2
    try:
        return body()
    except (ConfigError, *expected) as e:
        message = str(e)
    except Exception as e:
        message = storage.access_problem(e)
        if message is None and getattr(e, "one_line", False):
            message, code = str(e), 1
        if message is None:
            raise
    report(message, every_rank=code == 1)
    return code


def report(message: str, every_rank: bool = False) -> None:
    """``mem-dist: error: {message}`` once per launch: on stderr from rank 0, or, under torch's
    elastic agent with several processes, in rank 0's error file, which the agent prints last
    (the other ranks wait for the agent to stop them, and leave quietly, so that rank 0 is the
    one failure it names; one not stopped within FOLLOWER_WAIT_S says in its own file that it
    stopped with rank 0). ``every_rank``: the
    error is this rank's own (a storage fault), not one every rank meets: each rank says its own."""
    line = f"mem-dist: error: {message}"
    rank = _env_int("RANK", 0)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and _env_int("WORLD_SIZE", 1) > 1:
        text = line if rank == 0 or every_rank else f"rank {rank} stopped: the error is rank 0's"
        if rank != 0 and not every_rank:  # rank 0 ends the launch; the agent stopping this rank is no failure of its own
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            time.sleep(FOLLOWER_WAIT_S)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            os.makedirs(os.path.dirname(error_file) or ".", exist_ok=True)
            with open(error_file, "w") as f:  # torch's ErrorHandler format
                json.dump({"message": {"message": text, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}, f)
            return
        except OSError:
            pass
    if rank == 0 or every_rank:
        print(line, file=sys.stderr, flush=True)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
