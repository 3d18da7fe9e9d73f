"""One way to write a file so that a kill at any moment leaves the old file or the new one.

Checkpoints, the photo stores and the iNaturalist collector's copies all rely on it: whatever
exists under the real name is whole. The bytes go to a hidden temporary file in the same
folder (a rename is atomic only within one file system), are flushed to disk, and only then
replace the target. A write that fails removes its temporary file and re-raises; one that
fails because its folder's file system is full raises `NoSpaceLeft`, which says so in one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PARTIAL_PREFIX = ".partial-"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceLeft(OSError):
    """A file could not be written because its file system is full: folder, bytes and fix."""

    def __str__(self) -> str:
        return self.strerror


def no_space_left(folder: Path, needed: int | None, what: str) -> NoSpaceLeft:
    """The one-line error for `what` (e.g. "checkpoint fold-1-progress.pt") that did not fit."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    size = f"{needed:,} bytes" if needed else "its bytes"
    return NoSpaceLeft(
        errno.ENOSPC,
        f"{folder} is full: writing {what} needed {size} with {free:,} bytes free; free space "
        "there or give the job a larger volume (VolumeSizeInGB)",
    )


def is_full(error: BaseException) -> bool:
    """Whether `error` says a file system is full: OSError's errno, or torch.save's own
    RuntimeError (`unexpected pos`) when its writer hits the end of the disk."""
    if isinstance(error, OSError):
        return error.errno in FULL_ERRNOS
    return isinstance(error, RuntimeError) and "unexpected pos" in str(error)


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
    except BaseException as error:
        written = Path(temporary).stat().st_size if Path(temporary).exists() else None
        Path(temporary).unlink(missing_ok=True)
        if is_full(error) and not isinstance(error, NoSpaceLeft):
            raise no_space_left(target.parent, written, target.name) from error
        raise
