"""What a downloaded or local file is compressed with, told by its first bytes, and its contents as a stream.

gzip and bzip2 are read in-process (gzip, bz2); xz, zstd and lz4 through the
host's `xz -dc` / `zstd -dc` / `lz4 -dc` in a pipe (all in install.sh), which
puts their decompression on another core while the extractor writes files, as
`tar -xJ` does: in-process lzma made a pull of a 66 MB rootfs.tar.xz 1.25x
`curl | tar -xJ`, mostly decompression waiting on the extractor and back. A suffix
is never trusted: a `.tar.xz` that is really gzip is read as gzip, and bytes
that are none of these are one error, not a tar error from deep inside.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from racker import proc
from racker.errors import BadArchive

TAR_MAGIC_OFFSET = 257  # "ustar" in a POSIX or GNU tar header
# name: (magic, in-process opener or None, host decompressor argv)
FORMATS: dict[str, tuple[bytes, Callable[..., IO[bytes]] | None, tuple[str, ...]]] = {
    "xz": (b"\xfd7zXZ\x00", None, ("xz", "-d", "-c", "-q", "-T0")),
    "gzip": (b"\x1f\x8b", gzip.open, ()),
    "bzip2": (b"BZh", bz2.open, ()),
    "zstd": (b"\x28\xb5\x2f\xfd", None, ("zstd", "-d", "-c", "-q")),
    "lz4": (b"\x04\x22\x4d\x18", None, ("lz4", "-d", "-c", "-q")),
}
KNOWN = "tar, " + ", ".join(FORMATS)


def detect(head: bytes) -> str | None:
    """ "tar", a FORMATS name, or None for bytes racker does not know."""
    for name, (magic, _opener, _argv) in FORMATS.items():
        if head.startswith(magic):
            return name
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    return None


def detect_file(path: Path) -> str | None:
    with open(path, "rb") as handle:
        return detect(handle.read(TAR_MAGIC_OFFSET + 8))


@contextlib.contextmanager
def decompressed(path: Path, *, name: str | None = None) -> Iterator[tuple[str, IO[bytes]]]:
    """(compression, the file's decompressed bytes as a stream); BadArchive for an unknown compression,
    or when the host decompressor fails (a truncated or corrupt file)."""
    name = name or str(path)
    kind = detect_file(path)
    if kind is None:
        raise BadArchive(f"{name} is neither a tar archive nor compressed with a known method ({KNOWN})")
    with open(path, "rb") as raw:
        if kind == "tar":
            yield kind, raw
            return
        _magic, opener, argv = FORMATS[kind]
        if opener is not None:
            with opener(raw) as stream:
                yield kind, stream
            return
        with proc.spawn([*argv, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
            assert child.stdout is not None and child.stderr is not None
            yield kind, child.stdout
            child.stdout.read()  # drain what the reader left, so the tool exits and says if the file was whole
            reason = child.stderr.read().decode(errors="replace").strip().splitlines()
            if child.wait() != 0:
                raise BadArchive(f"{name} is not a readable {kind} file" + (f": {reason[-1]}" if reason else ""))


def head(path: Path, size: int) -> bytes:
    """The first `size` decompressed bytes of a compressed file (its own first bytes if it is not),
    without decompressing the rest; b"" if it cannot be read."""
    kind = detect_file(path)
    if kind in (None, "tar"):
        with open(path, "rb") as handle:
            return handle.read(size)
    _magic, opener, argv = FORMATS[kind]
    if opener is not None:
        try:
            with open(path, "rb") as raw, opener(raw) as stream:
                return stream.read(size)
        except (OSError, EOFError, ValueError):
            return b""
    with proc.spawn([*argv, str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as child:
        assert child.stdout is not None
        data = b""
        while len(data) < size and (chunk := child.stdout.read(size - len(data))):
            data += chunk
        return data  # leaving the block stops the decompressor
