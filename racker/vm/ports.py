"""Loopback ports for VMs' SSH forwards, chosen under a lock every racker process shares."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from racker import machines, settings, store
from racker.errors import VMError
from racker.machines import State

KIND = "qemu"  # the registry's kind of the VMs whose ports these are


def _ports_in_use() -> set[int]:
    return {int(s.extra["ssh_port"]) for s in machines.all_states(KIND) if s.extra.get("ssh_port") and not machines.is_stale(s)}


def port_range() -> range | None:
    """RACKER_SSH_PORTS=LOW-HIGH: the ports VMs' SSH forwards may take (a firewall's
    opening, say); unset, any free port the kernel offers."""
    return settings.SSH_PORTS.get()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(exclude: set[int]) -> int:
    """A port on 127.0.0.1 that nothing listens on now and no live VM has recorded."""
    ports = port_range()
    if ports is not None:
        for port in ports:
            if port not in exclude and _bindable(port):
                return port
        raise VMError(f"no free port in RACKER_SSH_PORTS ({ports.start}-{ports.stop - 1}) for SSH forwarding")
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in exclude:
            return port
    raise VMError("no free port on 127.0.0.1 for SSH forwarding")


@contextlib.contextmanager
def ssh_port(state: State) -> Iterator[int]:
    """A port for the VM's SSH forward, recorded in its state.

    Chosen and held under a lock shared by every racker process until the
    block ends: QEMU binds it inside the block, so no other VM can be given it.
    """
    with store.locked("qemu-ports"):
        port = free_port(_ports_in_use())
        state.extra["ssh_port"] = port
        machines.save(state)
        yield port
