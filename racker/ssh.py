"""Commands in a VM over OpenSSH, with the VM's own key, on a forwarded loopback port.

Transport failure (ssh's own exit status 255) raises Unreachable; a guest
command's status, stdout and stderr come back as they were.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from racker import proc
from racker.errors import Unreachable
from racker.proc import Result

SSH_TRANSPORT_FAILED = 255


def keygen(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair at `path` (and `path`.pub); returns the private key."""
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


@dataclass
class Endpoint:
    host: str
    port: int
    user: str
    key: Path

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
        return options

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
        result = proc.run(self.argv(command, root=root, connect_timeout=connect_timeout), input=input, timeout=timeout, check=False)
        if result.returncode == SSH_TRANSPORT_FAILED:
            why = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no answer"
            raise Unreachable(f"ssh to {self.user}@{self.host}:{self.port} failed: {why}")
        result.argv = list(command)
        return result

    def interact(self, command: Sequence[str], *, tty: bool | None = None, root: bool = False) -> int:
        """Run wired to our own terminal; an empty command is a login shell."""
        if tty is None:
            tty = sys.stdin.isatty() and sys.stdout.isatty()
        argv = self.argv(command, tty=tty, root=root) if command else ["ssh", *self.options(), "-t", f"{self.user}@{self.host}"]
        return proc.interact(argv)
