"""`train` with a fault injected: SIGKILL in the middle of the Nth atomic file write.

Run as `python fault_runner.py`, with KILL_ON_WRITE=N in the environment. The partial file
is complete on disk but never renamed into place: the worst moment for a checkpoint.
"""

import os
import signal
import sys

from species_classifier import atomic
from species_classifier.train import main

_kill_on = int(os.environ["KILL_ON_WRITE"])
_writes = 0
_replace = os.replace


def _replace_or_die(source, destination):
    global _writes
    _writes += 1
    if _writes == _kill_on:
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(source, destination)


atomic.os.replace = _replace_or_die

if __name__ == "__main__":
    sys.exit(main())
