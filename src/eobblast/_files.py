"""Files shared by the processes of one machine: a lock, and whole writes with their mode.

Workers start together and create secrets, key rings, DKIM keys and test certificates in
shared directories. `file_lock` lets one of them create what the others then read;
`write_whole` makes sure a reader sees the old file or the new one, never a part, and that
a private file is never, even for a moment, readable by others.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_whole(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True) -> bool:
    """Write `data` to `path` through a temporary file in its directory, synced, then moved
    into place; the file has `mode` from its first byte. With `replace=False` a file
    already at `path` stays as it is and False is returned."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    _sync_directory(path.parent)  # the new name survives a power loss too
    return True


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
