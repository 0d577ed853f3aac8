"""A root command channel into a VM: one `sudo python3` server per VM per process, on the VM's SSH master.

Under emulation `sudo` costs the guest most of a second (PAM, sudoers, all
emulated); a new SSH session another tenth. The channel pays both once: it is a
session on the VM's connection master running SERVER as root, which reads a
request (argv, stdin, timeout) from its stdin and answers with the exit status,
stdout and stderr, so that each command is one round trip on an open pipe.

Frames are an 8-byte big-endian length and that many bytes; argv travels as
bytes (any quotes, newlines or non-UTF-8), never through a shell. A command
past its timeout is killed in the guest (its whole process group) and the
channel stays; a channel that died is started again before the next command.
Each process has its own (a forked pytest worker too), behind a lock; it dies
with its process and ends when its VM stops. A guest without python3 or sudo
makes ChannelUnavailable, and the caller falls back to sudo per command.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from racker import proc
from racker.errors import ChannelUnavailable, MachineError, ToolTimeout, Unreachable
from racker.proc import Result

HELLO = b"racker-guest-shell 1"
# How long past a command's own timeout the host waits for the guest's answer
# before it gives the channel up (the guest kills the command at the timeout).
SLACK = 15.0
START_TIMEOUT = 60.0

# Runs a request in the guest, as root: shared by SERVER (on a pipe) and racker.vm.guest_agent's AGENT.
EXECUTE = r"""
import errno, json, os, signal, struct, subprocess, sys
def execute(request, data):
    reply, out, err = {}, b"", b""
    argv = [a.encode("latin-1") for a in request["argv"]]
    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE if request["input"] else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as error:
        reply["rc"] = 127 if error.errno == errno.ENOENT else 126
        return json.dumps(reply).encode(), b"", ("racker-guest-shell: %s\n" % error).encode()
    try:
        out, err = child.communicate(data if request["input"] else None, timeout=request["timeout"])
    except subprocess.TimeoutExpired:
        reply["timed_out"] = True
        try:
            os.killpg(child.pid, signal.SIGKILL)  # what it started too
        except OSError:
            pass
        try:
            out, err = child.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a descendant that left the group holds the pipes
            child.stdout.close()
            child.stderr.close()
            child.wait()
    reply["rc"] = child.returncode
    return json.dumps(reply).encode(), out, err
def frames(*parts):
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)
"""

# Runs in the guest (any python3 >= 3.5), as root. Its first line names it for pgrep.
SERVER = (
    "# racker-guest-shell"
    + EXECUTE
    + r"""
def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            sys.exit(0)  # the host closed the channel
        data += chunk
    return data
def frame():
    return read(struct.unpack(">Q", read(8))[0])
def send(out):
    while out:
        out = out[os.write(1, out):]
send(frames(b"racker-guest-shell 1"))
while True:
    request = json.loads(frame().decode())
    send(frames(*execute(request, frame())))
"""
)


def frame(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


class _Closed(Exception):
    """The channel's pipe ended: the server, its ssh session or the master is gone."""


class Channel:
    """One server process and the lock that keeps its requests in turn."""

    def __init__(self, argv: Sequence[str], *, cwd: str | None = None, log: Path | None = None, name: str = "the VM") -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.log = log
        self.name = name
        self.child: subprocess.Popen[bytes] | None = None
        self.pid = os.getpid()  # a fork must not share our pipes
        self.lock = threading.Lock()
        self.unavailable = False  # the guest has no python3 or sudo for it: the caller uses sudo per command
        self._buffer = bytearray()

    # -- the server ------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        self._buffer.clear()
        with open(self.log, "wb") if self.log else open(os.devnull, "wb") as log:
            # Dies with this process (kill -9 too), and then the guest's server reads EOF and exits.
            child = proc.start(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self.cwd, die_with_parent=signal.SIGKILL
            )
        self.child = child
        try:
            if self._read_frames(1, time.monotonic() + timeout) != [HELLO]:
                raise _Closed
        except (_Closed, TimeoutError) as error:
            self.close()
            why = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log and self.log.exists() else []
            detail = why[0] if why else "no answer"
            if isinstance(error, TimeoutError):  # a sick guest or link, not one without python3
                raise Unreachable(f"the root channel to {self.name} did not answer within {timeout:g}s") from None
            if child.returncode == 255:  # ssh's own failure
                raise Unreachable(f"the root channel to {self.name} could not start: {detail}") from None
            self.unavailable = True
            raise ChannelUnavailable(f"{self.name} cannot run the root channel: {detail}") from None

    def _usable(self) -> bool:
        """The server runs (an idle channel has nothing to read: else it is EOF, the server gone)."""
        child = self.child
        if child is None or child.poll() is not None:
            return False
        return not self._buffer and not select.select([self._fd()], [], [], 0)[0]

    def _send(self, data: bytes) -> None:
        assert self.child is not None and self.child.stdin is not None
        self.child.stdin.write(data)
        self.child.stdin.flush()

    def _fd(self) -> int:
        assert self.child is not None and self.child.stdout is not None
        return self.child.stdout.fileno()

    def close(self) -> None:
        """End the server: EOF on its stdin, then the ssh client (reaped)."""
        child, self.child = self.child, None
        if child is None:
            return
        if child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
        if not proc.wait_exit(child.pid, 2):
            proc.terminate(child, grace=1)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()

    # -- a command -------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = 600) -> Result:
        """Run argv as root in the guest: exit status (negative: killed by that signal), stdout, stderr.

        Past `timeout` the command is killed in the guest and ToolTimeout raised;
        the channel is kept. Unreachable if the channel dies while it runs.
        """
        if not argv:
            raise MachineError("no command given")
        header = {"argv": [os.fsencode(a).decode("latin-1") for a in argv], "input": input is not None, "timeout": timeout}
        request = frame(json.dumps(header).encode()) + frame(input or b"")
        with self.lock:
            if not self._usable():
                self.close()  # reaps a dead one
                self._start(START_TIMEOUT if timeout is None else max(timeout, START_TIMEOUT))
            deadline = None if timeout is None else time.monotonic() + timeout + SLACK
            try:
                self._send(request)
                reply, out, err = self._read_frames(3, deadline)
            except TimeoutError:
                self.close()  # the guest did not answer: it may be stuck mid-frame
                raise ToolTimeout(list(argv), timeout or 0) from None
            except (_Closed, OSError):
                self.close()
                raise Unreachable(f"the root channel to {self.name} closed while {argv[0]!r} ran") from None
        status = json.loads(reply)
        if status.get("timed_out"):
            raise ToolTimeout(list(argv), timeout or 0)
        return Result(list(argv), int(status["rc"]), out, err)

    def _read_frames(self, count: int, deadline: float | None) -> list[bytes]:
        frames = []
        for _ in range(count):
            (size,) = struct.unpack(">Q", self._take(8, deadline))
            frames.append(self._take(size, deadline))
        return frames

    def _take(self, size: int, deadline: float | None) -> bytes:
        while len(self._buffer) < size:
            self._fill(deadline)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self, deadline: float | None) -> None:
        """What the server has sent next, into the buffer: TimeoutError past the deadline,
        _Closed at the end of the stream."""
        fd = self._fd()
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and (wait <= 0 or not select.select([fd], [], [], wait)[0]):
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise _Closed
        self._buffer += chunk


# -- one channel per VM per process ----------------------------------------------

SERVER_ARGV = ("python3", "-c", SERVER)  # run as root by the caller's transport (sudo over ssh)
_CHANNELS: dict[str, Channel] = {}
_REGISTRY_LOCK = threading.Lock()


def channel(key: str, argv: Sequence[str], *, cwd: str | None = None, log: Path | None = None, name: str = "the VM") -> Channel:
    """This process's channel to the VM `key`, made on first use (its server starts with its
    first command); ChannelUnavailable if the guest has shown it cannot run one."""
    return registered(key, lambda: Channel(argv, cwd=cwd, log=log, name=name), name)


def registered(key: str, make: Callable[[], Channel], name: str) -> Channel:
    """This process's channel under `key`, made by `make` on first use."""
    with _REGISTRY_LOCK:
        found = _CHANNELS.get(key)
        if found is None or found.pid != os.getpid():
            found = _CHANNELS[key] = make()
    if found.unavailable:
        raise ChannelUnavailable(f"{name} cannot run the root channel")
    return found


def close(key: str) -> None:
    """End this process's channel to the VM `key` (its VM stops)."""
    with _REGISTRY_LOCK:
        found = _CHANNELS.pop(key, None)
    if found is not None and found.pid == os.getpid():
        with found.lock:
            found.close()


@atexit.register
def _close_all() -> None:
    for key in list(_CHANNELS):
        close(key)
