"""Unix sockets in a machine's run directory, whatever the length of its path.

racker's control sockets (QEMU's monitors, the agent's port) are files in the run
directory, which is root's alone (0700): the directory's mode is what keeps every
other user out, since QEMU cannot check who connects. (An abstract socket, which
has no file and so no mode, lets anyone in.)

A socket's path has at most 107 bytes (sun_path), and RACKER_HOME has no length
limit. So a socket is named through a descriptor of its directory instead:
`/proc/self/fd/N/NAME` is the same file. QEMU gets the directory's descriptor as
N and binds there; a client opens the directory itself for the connect.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

SUN_PATH = 108  # bytes in sockaddr_un's sun_path, its final NUL included


def through(directory_fd: int, name: str) -> str:
    """The name of `name` in the directory open as `directory_fd`, for the process holding it."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def open_directory(path: Path) -> int:
    """An O_PATH descriptor of a directory, for a child that binds through it: give it in the
    child's pass_fds (which keeps its number there; no other child inherits it)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A name a socket call takes for `path`, valid inside the block: the path itself if it fits."""
    if len(os.fsencode(path)) < SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield through(fd, path.name)
    finally:
        os.close(fd)


def connect(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A connected unix socket to the socket file at `path`."""
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        with short_path(path) as name:
            sock.connect(name)
    except BaseException:
        sock.close()
        raise
    return sock
