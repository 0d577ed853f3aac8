"""A pytest-testinfra backend for racker machines: `racker://NAME`, `racker://USER@NAME`.

Every testinfra module (service, file, package, socket, …) runs its shell
commands through here, with the guest's exact exit code, stdout and stderr,
decoded in the guest's own encoding. USER takes what `docker exec --user`
takes: NAME, UID, NAME:GROUP or UID:GID.

    with racker.host("debian-bookworm") as host:   # outside pytest
        assert host.package("systemd").is_installed
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import testinfra
import testinfra.backend
from testinfra.backend import base

import racker
from racker.errors import MachineError, Unreachable
from racker.machines import guest_env

# Here too, not only through racker's import hook: pytest's assertion-rewriting
# finder sits before it in sys.meta_path and loads testinfra itself.
racker.register_backend(testinfra.backend.BACKENDS)

# The commands of the current test, on every racker host, for its failure report;
# the plugin empties it when a test starts.
HISTORY: deque[base.CommandResult] = deque(maxlen=10)


class RackerBackend(base.BaseBackend):
    NAME = "racker"

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name, self.user = self.parse_containerspec(name)
        self._machine: Any = None
        self._login: Any = None
        super().__init__(self.name, *args, **kwargs)

    @property
    def machine(self) -> Any:
        if self._machine is None:
            from racker.machines.nspawn import Machine

            self._machine = Machine.attach(self.name)
        return self._machine

    def bind(self, machine: Any) -> None:
        """Use this machine object (nspawn.Machine or qemu.VM) rather than looking it up."""
        self._machine = machine
        self._login = None

    def get_pytest_id(self) -> str:
        return f"racker://{self.user}@{self.name}" if self.user else f"racker://{self.name}"

    def get_encoding(self) -> str:
        # The locale commands run under, not python in the guest (images may have none).
        environment = getattr(self.machine, "environment", None)
        return guest_env.encoding(environment()) if environment else guest_env.FALLBACK_ENCODING

    def login(self) -> Any:
        """The user commands run as (None: root), resolved in the guest once."""
        if self.user is None:
            return None
        if self._login is None:
            if not hasattr(self.machine, "login"):
                raise MachineError(f"{self.name!r} cannot run commands as another user", hint="use sudo=True with sudo_user")
            self._login = self.machine.login(self.user)
        return self._login

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        login = self.login()
        extra = {"login": login} if login is not None else {}
        try:
            result = self.machine.run(["/bin/sh", "-c", cmd], timeout=kwargs.get("timeout", 600), **extra)
        except MachineError as error:
            raise Unreachable(f"cannot run a command in {self.name!r}: {error}") from error
        out = self.result(result.returncode, self.encode(cmd), result.stdout_bytes, result.stderr_bytes)
        HISTORY.append(out)
        return out


def host_for(machine: Any, user: str | None = None) -> testinfra.host.Host:
    """A testinfra Host on a running machine object (as `user`, or root)."""
    host = testinfra.get_host(f"racker://{user}@{machine.name}" if user else f"racker://{machine.name}")
    host.backend.bind(machine)
    return host


@contextlib.contextmanager
def booted_host(image: str, *, user: str | None = None, engine: str = "nspawn") -> Iterator[testinfra.host.Host]:
    """`racker.host(IMAGE)`: boot a machine of the image, yield a testinfra Host on it, stop it."""
    from racker import engines, images

    with engines.get(engine).machine_for(images.pull(image)) as machine:
        yield host_for(machine, user)
