"""Commands in a VM over OpenSSH, with the VM's own key, on a forwarded loopback port.

Transport failure (ssh's own exit status 255) raises Unreachable; a guest
command's status, stdout and stderr come back as they were.

An endpoint with a `control` directory sends every command through one
connection master (OpenSSH's ControlMaster) whose socket lives there: under
emulation a handshake costs the guest a second of CPU, a session on an open
connection a tenth of that. Its owner (qemu.VM) starts, records and closes it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from racker import proc
from racker.errors import Unreachable
from racker.proc import Result

SSH_TRANSPORT_FAILED = 255
# The master's socket, relative to the control directory ssh runs in: a unix
# socket's path has at most 108 bytes, and RACKER_HOME has no length limit.
CONTROL_SOCKET = "ssh"
MASTER_LOG = "ssh-master.log"


def keygen(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair at `path` (and `path`.pub), both 0600 from the start; returns the private key."""
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], umask=proc.PRIVATE)
    return path


@dataclass
class Endpoint:
    host: str
    port: int
    user: str
    key: Path
    control: Path | None = None  # the directory of the connection master's socket; None: a connection per command

    def options(self, connect_timeout: float = 5) -> list[str]:
        options = [
            "-i", str(self.key),
            "-p", str(self.port),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "PasswordAuthentication=no",
            # Host keys are made on the VM's first boot; the port is ours, on loopback.
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={connect_timeout:g}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-F", "/dev/null",
        ]  # fmt: skip
        if self.control is not None:
            # Never become a master by accident: a command without one connects on its own.
            options += ["-o", f"ControlPath={CONTROL_SOCKET}", "-o", "ControlMaster=no"]
        return options

    @property
    def cwd(self) -> str | None:
        """Where ssh runs: the control directory, so that the relative ControlPath finds the socket."""
        return str(self.control) if self.control is not None else None

    @property
    def control_socket(self) -> Path | None:
        return self.control / CONTROL_SOCKET if self.control is not None else None

    def answers(self, timeout: float = 2) -> bool:
        """True if an SSH server greets on the port: a banner read in-process, no ssh client started.

        Under QEMU's user networking the port accepts even while nothing listens
        in the guest, and then closes at once: only the banner tells.
        """
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as connection:
                return connection.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def argv(self, command: Sequence[str], *, tty: bool = False, root: bool = True, connect_timeout: float = 5) -> list[str]:
        """The host argv that runs `command` in the VM (as root through sudo, unless root=False)."""
        inner = ["sudo", "-n", "--", *command] if root else list(command)
        return ["ssh", *self.options(connect_timeout), *(["-t"] if tty else ["-T"]), f"{self.user}@{self.host}", "--", proc.quote(*inner)]

    def run(
        self,
        command: Sequence[str],
        *,
        root: bool = True,
        input: bytes | None = None,
        timeout: float | None = 600,
        connect_timeout: float = 5,
    ) -> Result:
        argv = self.argv(command, root=root, connect_timeout=connect_timeout)
        result = proc.run(argv, input=input, timeout=timeout, check=False, cwd=self.cwd)
        if result.returncode == SSH_TRANSPORT_FAILED:
            raise Unreachable(f"ssh to {self.user}@{self.host}:{self.port} failed: {_last_line(result.stderr)}")
        result.argv = list(command)
        return result

    def interact(self, command: Sequence[str], *, tty: bool | None = None, root: bool = False) -> int:
        """Run wired to our own terminal; an empty command is a login shell."""
        if tty is None:
            tty = sys.stdin.isatty() and sys.stdout.isatty()
        argv = self.argv(command, tty=tty, root=root) if command else ["ssh", *self.options(), "-t", f"{self.user}@{self.host}"]
        return proc.interact(argv, cwd=self.cwd)

    # -- the connection master ------------------------------------------------

    def start_master(
        self,
        started: Callable[[subprocess.Popen[bytes]], None],
        *,
        die_with_parent: int | None,
        timeout: float = 60,
        connect_timeout: float = 5,
    ) -> subprocess.Popen[bytes]:
        """Open the connection every later command shares: `ssh -M -N`, a child of ours
        (not ControlPersist's daemon), so its pid is known at once and it can die with us.

        `started` gets it before it has logged in (to record it, so that no kill of
        ours leaves it unrecorded). Returns once it has logged in and listens on its
        socket; Unreachable if it cannot.
        """
        assert self.control is not None and self.control_socket is not None
        self.control_socket.unlink(missing_ok=True)  # a killed master's: ssh would refuse to replace it
        options = [o if o != "ControlMaster=no" else "ControlMaster=yes" for o in self.options(connect_timeout)]
        argv = ["ssh", *options, "-o", "ControlPersist=no", "-N", f"{self.user}@{self.host}"]
        with open(self.control / MASTER_LOG, "wb") as log:
            master = proc.start(argv, stdout=log, stderr=log, new_session=True, die_with_parent=die_with_parent, cwd=self.cwd)
        try:
            started(master)
        except BaseException:
            proc.terminate(master, grace=1)
            raise
        deadline = time.monotonic() + timeout
        while not self.control_socket.exists():  # ssh listens only once logged in
            if master.poll() is not None or time.monotonic() > deadline:
                proc.terminate(master, grace=1)
                why = _last_line((self.control / MASTER_LOG).read_text(errors="replace"))
                raise Unreachable(f"ssh to {self.user}@{self.host}:{self.port} failed: {why}")
            time.sleep(0.02)
        return master

    def exit_master(self, timeout: float = 5) -> None:
        """Ask the master to close its connection and remove its socket (`ssh -O exit`)."""
        if self.control_socket is not None and self.control_socket.exists():
            argv = ["ssh", "-o", f"ControlPath={CONTROL_SOCKET}", "-F", "/dev/null", "-O", "exit", f"{self.user}@{self.host}"]
            proc.run(argv, timeout=timeout, check=False, cwd=self.cwd)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no answer"
