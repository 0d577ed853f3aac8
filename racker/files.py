"""The one atomic writer: a file appears whole, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int | None = 0o600) -> None:
    """Put a new file at `path`: written under a fresh name beside it, then renamed over.

    Readers see the old file or the new one, never half of one. What was at `path` is
    never opened: in a tree that is hard links to the store (promote's staged copy),
    writing to it would write into the store. The mode is the caller's: private unless
    said, or None for what any new file gets (0666 less the umask).
    """
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    # The fresh name is the file's own cut short: a name near NAME_MAX (a long ref's) must still fit.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".new")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
