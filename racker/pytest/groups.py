"""Several machines on one private network of their own, each resolving the others by name.

    with Group({"server": "debian-bookworm+vm", "client": "debian-trixie+vm"}) as group:
        group["client"].run(["getent", "hosts", "server"])

A machine may be a VM: {"server": {"image": "debian-bookworm+vm", "engine": "qemu"}} boots the
image's promoted disk in QEMU, with a NIC on the group's bridge (racker.vm.bridge).

The network (named_networks.py) is the group's process's: its machines boot at once,
and stop together with it; a killed process's network goes at `racker gc`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping

from racker import machines
from racker.errors import MachineError
from racker.machines import named_networks
from racker.vm import boards

ENGINES = ("nspawn", "qemu")


def parse(spec: Mapping[str, object]) -> dict[str, tuple[str, str]]:
    """{name: IMAGE or {"image": IMAGE, "engine": ENGINE}} -> {name: (image, engine)}; one line for bad input."""
    if not isinstance(spec, Mapping) or not spec:
        raise MachineError(
            "a group names its machines: {NAME: IMAGE, …}", hint='e.g. {"server": "debian-bookworm", "client": "debian-trixie"}'
        )
    parsed: dict[str, tuple[str, str]] = {}
    seen: dict[str, str] = {}
    for name, value in spec.items():
        named_networks.check_hostname(name)
        if name.lower() in seen:  # host names are not case-sensitive
            raise MachineError(
                f"two machines are named {seen[name.lower()]!r} and {name!r}: one name each", hint="give each machine its own name"
            )
        seen[name.lower()] = name
        image, engine = (value, "nspawn") if isinstance(value, str) else (dict(value).get("image"), dict(value).get("engine", "nspawn"))  # type: ignore[call-overload]
        if not isinstance(image, str) or not image:
            raise MachineError(
                f"machine {name!r} names no image", hint='{"server": "debian-bookworm"} or {"server": {"image": …, "engine": "nspawn"}}'
            )
        if engine not in ENGINES:
            raise MachineError(f"machine {name!r}: engine {engine!r} cannot join a group", hint=f"engines: {', '.join(ENGINES)}")
        parsed[name] = (image, engine)
    return parsed


def _maker(image: str, engine: str) -> Callable[..., machines.Guest]:
    """The image pulled and made bootable for its engine; a function that makes a machine of it."""
    from racker import images, prepare

    pulled = images.pull(image)
    if engine == "nspawn":
        from racker.machines import nspawn

        return functools.partial(nspawn.Machine, prepare.bootable(pulled))
    from racker import promote
    from racker.vm import qemu

    prepared = prepare.prepare(pulled)
    board, firmware = boards.board_for(prepare.image_architecture(prepared))
    disk = promote.cached_disk(prepared, firmware)
    return functools.partial(qemu.VM, disk, image=prepared.name, digest=prepared.digest, machine=board)


class Group(Mapping[str, machines.Guest]):
    """Machines by the names the caller gave; a context manager that stops them and removes their network."""

    def __init__(self, spec: Mapping[str, object], *, boot_timeout: float | None = None) -> None:
        self.spec = parse(spec)
        self.boot_timeout = boot_timeout
        self.network: named_networks.Network | None = None
        self.machines: dict[str, machines.Guest] = {}
        self._threads: list[threading.Thread] = []
        self._started: list[threading.Event] = []
        self._errors: list[BaseException] = []
        self._done = threading.Event()

    def __getitem__(self, name: str) -> machines.Guest:
        return self.machines[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.machines)

    def __len__(self) -> int:
        return len(self.machines)

    def start(self) -> Group:
        # Every image first (a VM's promoted to its disk): one that cannot be had fails before anything is made.
        makers = {name: _maker(image, engine) for name, (image, engine) in self.spec.items()}
        self.network = named_networks.create(f"group-{os.urandom(4).hex()}", owned=True)
        try:
            options = {} if self.boot_timeout is None else {"boot_timeout": self.boot_timeout}
            for name, make in makers.items():
                self.machines[name] = make(machines.unique_name(name), network_mode=self.network.name, network_alias=name, **options)
            # They boot at once, each in a thread that lives as long as its machine: nspawn dies with
            # the thread that started it (PR_SET_PDEATHSIG is the thread's), so that thread must wait.
            for name, machine in self.machines.items():
                started = threading.Event()
                thread = threading.Thread(target=self._own, args=(machine, started), name=f"racker-group-{name}", daemon=True)
                self._started.append(started)
                self._threads.append(thread)
                thread.start()
            for started in self._started:
                started.wait()
            if self._errors:
                raise self._errors[0]
        except BaseException:
            self.stop()
            raise
        return self

    def _own(self, machine: machines.Guest, started: threading.Event) -> None:
        try:
            machine.start()
        except BaseException as error:
            self._errors.append(error)
            return
        finally:
            started.set()
        self._done.wait()
        machine.stop()

    def stop(self) -> None:
        self._done.set()
        try:
            for thread in self._threads:
                thread.join()
        finally:
            if self.network is not None:
                named_networks.release_owned(self.network)
                self.network = None

    def __enter__(self) -> Group:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
