"""One way to write a file so that a kill at any moment leaves the old file or the new one.

Checkpoints, the photo stores and the iNaturalist collector's copies all rely on it: whatever
exists under the real name is whole. The bytes go to a hidden temporary file in the same
folder (a rename is atomic only within one file system), are flushed to disk, and only then
replace the target. A write that fails removes its temporary file and re-raises.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PARTIAL_PREFIX = ".partial-"


@contextmanager
def atomic_write(target: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary handle whose contents become `target` when the block ends without error."""
    with atomic_path(target, mode) as temporary, open(temporary, "wb") as handle:
        yield handle
        handle.flush()


@contextmanager
def atomic_path(target: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path to fill in any way (a memory map, say) that becomes `target`, flushed
    to disk, when the block ends without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=PARTIAL_PREFIX)
    # mkstemp creates 0600; a container that mounts the folder may run as another user.
    os.fchmod(descriptor, mode)
    os.close(descriptor)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
