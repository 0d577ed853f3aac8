"""A pytest-testinfra backend for racker machines: `racker://NAME`.

Every testinfra module (service, file, package, socket, …) runs its shell
commands through here, with the guest's exact exit code, stdout and stderr.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from testinfra.backend import base

from racker.errors import MachineError, Unreachable


class RackerBackend(base.BaseBackend):
    NAME = "racker"

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name = name
        self._machine: Any = None
        # The last commands run, so that a failing test can show what it saw.
        self.history: deque[base.CommandResult] = deque(maxlen=5)
        super().__init__(name, *args, **kwargs)

    @property
    def machine(self) -> Any:
        if self._machine is None:
            from racker.nspawn import Machine

            self._machine = Machine.attach(self.name)
        return self._machine

    def bind(self, machine: Any) -> None:
        """Use this machine object (nspawn.Machine or qemu.VM) rather than looking it up."""
        self._machine = machine

    def get_encoding(self) -> str:
        return "utf-8"  # testinfra would run python in the guest to ask; images may have none

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        try:
            result = self.machine.run(["/bin/sh", "-c", cmd], timeout=kwargs.get("timeout", 600))
        except MachineError as error:
            raise Unreachable(f"cannot run a command in {self.name!r}: {error}") from error
        out = self.result(result.returncode, self.encode(cmd), result.stdout_bytes, result.stderr_bytes)
        self.history.append(out)
        return out
