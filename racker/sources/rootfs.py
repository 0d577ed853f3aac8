"""A root filesystem made by any other tool, read for `racker import NAME DIR|TARBALL`.

A directory is read as a tar stream (GNU tar, numeric owners, file
capabilities) and a tarball as it is (gzip, bzip2, xz, zstd or lz4): both go
through the one safe extractor, so an import obeys the same rules as a layer.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from racker import proc
from racker.errors import BadArchive
from racker.sources import compression, extract


def signature(path: Path) -> str:
    info = (path / ".").stat() if path.is_dir() else path.stat()
    return f"import:{path} {info.st_size} {info.st_mtime_ns} {info.st_ino}"


@contextlib.contextmanager
def tar_stream(path: Path) -> Iterator[IO[bytes]]:
    """A tar stream of a directory or of a (compressed) tarball."""
    if path.is_dir():
        argv = ["tar", "--create", "--numeric-owner", "--xattrs", "--xattrs-include=security.capability", "--directory", str(path), "."]
        with proc.spawn(argv, stdout=subprocess.PIPE) as child:
            assert child.stdout is not None
            yield child.stdout
            if child.wait() not in (0, 1):  # 1: a file changed while read, as GNU tar reports it
                raise BadArchive(f"tar could not read {path} (exit status {child.returncode})")
        return
    with compression.decompressed(path) as (_kind, stream):
        yield stream


def unpack(path: Path, rootfs: Path) -> extract.Report:
    """The root filesystem at `path` (a directory or a tarball) into the empty directory `rootfs`."""
    rootfs.mkdir()
    with tar_stream(path) as stream:
        return extract.extract(stream, rootfs, name=str(path))
