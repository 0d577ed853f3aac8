"""The one place racker starts host programs.

argv lists only, never a shell; every command is logged, has a timeout, and
raises one error type carrying the tool's own message.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from racker import redact, settings
from racker.errors import ToolFailed, ToolMissing, ToolTimeout

# Where each host program comes from on Debian/Ubuntu, for ToolMissing hints.
TOOL_PACKAGES: dict[str, str] = {
    "systemd-nspawn": "systemd-container",
    "machinectl": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "gpgv": "gpgv",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "buildah": "buildah",
    "git": "git",
    "podman": "podman",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "nsenter": "util-linux",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mcopy": "mtools",
    "mkfs.vfat": "dosfstools",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "tar": "tar",
    "zstd": "zstd",
    "xz": "xz-utils",
    "lz4": "lz4",
    "grub-mkimage": "grub-common",
    "mmd": "mtools",
    "xorriso": "xorriso",
    "qemu-io": "qemu-utils",
    "docker-registry": "docker-registry",
    "nft": "nftables",
    "ip": "iproute2",
}

# Host tools see a predictable environment, not whatever the caller had.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
}


DEBUG = False  # --debug; RACKER_DEBUG=1 is read when a command runs


def debugging() -> bool:
    return DEBUG or settings.DEBUG.value()


def debug(message: str) -> None:
    """With --debug (or RACKER_DEBUG=1): every command racker runs, on stderr."""
    if debugging():
        print(f"racker: {redact.text(message)}", file=sys.stderr, flush=True)  # a git URL's token stays out


_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41


@functools.cache
def _prctl() -> Callable[..., int]:
    """libc's prctl, loaded in the parent: never between fork and exec, where
    loading a library in a multi-threaded process (an xdist worker) can deadlock."""
    return ctypes.CDLL(None, use_errno=True).prctl


@contextlib.contextmanager
def child_setup(
    *, die_with_parent: int | None = signal.SIGTERM, cgroup_procs: str | None = None, huge_pages: bool = True
) -> Iterator[Callable[[], None] | None]:
    """What a child does between fork and exec (a preexec_fn, or None for nothing), with
    everything resolved here, in the parent, for the length of the block that starts it.

    die_with_parent: the signal the child gets when racker dies, even by kill -9
    (strictly: when the thread that started it exits; racker starts children
    from the thread that waits for them). cgroup_procs: a cgroup.procs file the
    child moves itself into before it runs, so its own children start there.
    huge_pages=False: no transparent huge pages for it, whatever it asks (madvise).
    """
    if die_with_parent is None and cgroup_procs is None and huge_pages:
        yield None
        return
    prctl = _prctl() if die_with_parent is not None or not huge_pages else None
    parent = os.getpid()
    procs = os.open(cgroup_procs, os.O_WRONLY | os.O_CLOEXEC) if cgroup_procs else None

    def setup() -> None:
        if procs is not None:
            os.write(procs, b"0")  # 0: the writing process itself
        if prctl is not None and not huge_pages:
            prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
        if prctl is not None and die_with_parent is not None:
            prctl(_PR_SET_PDEATHSIG, die_with_parent, 0, 0, 0)
            if os.getppid() != parent:  # racker died before prctl took effect
                os.kill(os.getpid(), die_with_parent)  # type: ignore[arg-type]

    try:
        yield setup
    finally:
        if procs is not None:
            os.close(procs)


def which(tool: str) -> str | None:
    """Where a host tool is. RACKER_PATH, if set, replaces the search path entirely."""
    path = settings.PATH.get() or BASE_ENV["PATH"] + ":" + os.environ.get("PATH", "")
    return shutil.which(tool, path=path)


def require(tool: str) -> str:
    """Absolute path of `tool`, or ToolMissing naming the package to install."""
    path = which(tool)
    if path is None:
        raise ToolMissing(tool, TOOL_PACKAGES.get(tool))
    return path


def quote(*args: str) -> str:
    """Quote arguments for the one shell boundary: a command line run inside a guest."""
    return shlex.join(args)


@dataclass
class Result:
    """What a finished command did. Output is decoded on first use."""

    argv: list[str]
    returncode: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""

    @cached_property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @cached_property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0

    @property
    def failed(self) -> bool:
        return self.returncode != 0


# The umask of a tool whose files are root's alone (keys, overlays, guest memory): what
# it creates is 0600 from the start, whatever umask racker was started with.
PRIVATE = 0o077


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(BASE_ENV)
    if env:
        merged.update(env)
    return merged


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    new_session: bool = False,
    foreground: bool = False,
    die_with_parent: int | None = signal.SIGTERM,
    cgroup_procs: str | None = None,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
    huge_pages: bool = True,
    umask: int = -1,
) -> subprocess.Popen[bytes]:
    """Start a program; the caller owns it (spawn() owns it for a block).

    Every child racker starts comes through here, so --debug shows every
    command line. It gets a process group of its own (so terminate() reaches
    its grandchildren too, mmdebstrap's apt and dpkg), or a session of its own
    (new_session: a Ctrl-C on our terminal is ours to handle, not nspawn's),
    or stays in ours (foreground: an interactive command reading our
    terminal). It dies with racker unless die_with_parent is None (a
    machine that `racker start` leaves running). pass_fds: descriptors it
    inherits (a nat machine's forwarder takes its listening sockets).
    huge_pages=False turns transparent huge pages off for it (see child_setup).
    umask: the child's (PRIVATE for one whose files are root's alone, whatever ours is).
    """
    argv = [str(a) for a in argv]
    argv[0] = require(argv[0]) if "/" not in argv[0] else argv[0]
    debug(f"run: {shlex.join(argv)}")
    with child_setup(die_with_parent=die_with_parent, cgroup_procs=cgroup_procs, huge_pages=huge_pages) as setup:
        return subprocess.Popen(
            argv,
            env=_environment(env),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
            process_group=None if new_session or foreground else 0,
            cwd=cwd,
            preexec_fn=setup,
            pass_fds=tuple(pass_fds),
            umask=umask,
        )


@contextlib.contextmanager
def spawn(argv: Sequence[str], **options: Any) -> Iterator[subprocess.Popen[bytes]]:
    """start() a program and own it: if the caller raises, or leaves the block
    while it runs, it is terminated (with its group), and always waited for."""
    child = start(argv, **options)
    try:
        yield child
    finally:
        if child.returncode is None:
            terminate(child, group=not options.get("foreground", False))


def interact(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    """Run a command wired to our own terminal (stdin, stdout, stderr); its exit status.

    It stays in our process group, so that it may read the terminal. If we are
    interrupted, it is terminated on the way out.
    """
    with spawn(argv, env=env, stdin=None, foreground=True, cwd=cwd) as child:
        return child.wait()


def terminate(child: subprocess.Popen[bytes], grace: float = 5.0, *, group: bool = True) -> None:
    """SIGTERM to the child (its process group, if `group`), a bounded wait, then SIGKILL to what is left.

    Always reaps the child; no descendant that stayed in its group survives.
    """
    send = _signal_group if group else signal_quietly
    if child.poll() is None:
        send(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace)
    if group or child.poll() is None:
        send(child.pid, signal.SIGKILL)
    child.wait()


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until a process exits (a child or not); True if it did within `timeout`.

    A pidfd wakes us the moment it happens, where Popen.wait(timeout) would
    poll with sleeps of up to 50 ms.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


def signal_quietly(pid: int, signum: int) -> None:
    """Send a signal to a process that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 600,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    capture: bool = True,
    stdout: IO[bytes] | None = None,
    cwd: str | None = None,
    umask: int = -1,
) -> Result:
    """Run a program to completion and return its Result.

    With check, an exit status outside ok_codes raises ToolFailed with the tool's
    stderr; a run past `timeout` seconds is killed and raises ToolTimeout.
    `stdout`: a file the output goes to (stderr is still kept for errors).
    """
    pipe = subprocess.PIPE if capture else None
    with spawn(
        argv,
        env=env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=stdout or pipe,
        stderr=subprocess.PIPE if stdout is not None else pipe,
        cwd=cwd,
        umask=umask,
    ) as child:
        try:
            out, err = child.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(child, grace=2)
            raise ToolTimeout(list(child.args), timeout or 0) from None
    result = Result(list(child.args), child.returncode, out or b"", err or b"")
    if check and result.returncode not in ok_codes:
        raise ToolFailed(result.argv, result.returncode, result.stderr)
    return result


# -- process identity ---------------------------------------------------------
#
# A pid alone names a process only until it exits: after that (or a reboot) the
# kernel hands the number to another process. racker records each process it
# starts as (pid, start time, boot id) and signals a pid only while all three match.


@functools.cache
def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def cpu_seconds(pid: int) -> float | None:
    """The CPU time (user and system, all threads) a process has had, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_time(pid: int) -> int:
    """The kernel's start time of a process (clock ticks since boot), or 0 if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return 0
    return int(fields[19])


def alive(pid: int, started: int, boot: str) -> bool:
    """The process recorded as (pid, start time, boot id) is still running."""
    return pid > 0 and started > 0 and boot == boot_id() and start_time(pid) == started


def signal_process(pid: int, started: int, boot: str, signum: int) -> bool:
    """Send `signum` to the process recorded as (pid, start time, boot id), and to no other.

    A pidfd pins the process while its start time is compared, so the pid
    cannot be reused between the check and the signal. False if it is gone.
    """
    if pid <= 0 or started <= 0 or boot != boot_id():
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if start_time(pid) != started:
            return False
        signal.pidfd_send_signal(fd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def kill_and_wait(pid: int, started: int, boot: str, timeout: float = 5) -> bool:
    """SIGKILL the recorded process and wait for it to go; True if there was one to kill."""
    if not signal_process(pid, started, boot, signal.SIGKILL):
        return False
    deadline = time.monotonic() + timeout
    while alive(pid, started, boot) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
