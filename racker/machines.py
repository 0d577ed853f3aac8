"""racker's own registry of running machines and VMs, one JSON file each.

It works where there is no machined (hosts whose PID 1 is not systemd). A
name is claimed, atomically, before anything is started for it, so that a
crash at any later point leaves a record that `racker gc` can act on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from racker import proc, store
from racker.errors import MachineError, NameTaken
from racker.proc import Result

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")


@dataclass
class State:
    name: str
    kind: str  # "nspawn" or "qemu"
    image: str
    digest: str = ""
    pid: int = 0  # systemd-nspawn or qemu
    pid_start: int = 0  # the process's start time: guards against pid reuse
    leader: int = 0  # the machine's init, for nsenter
    owner: int = 0  # the racker process that will stop it; 0 once detached
    owner_start: int = 0
    rundir: str = ""
    started: str = ""
    extra: dict = field(default_factory=dict)


def registry_dir(kind: str) -> Path:
    path = store.home() / ("machines" if kind == "nspawn" else "vms")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise MachineError(f"invalid machine name {name!r}: letters, digits, '-' and '.', at most 64")
    return name


def unique_name(image: str) -> str:
    base = re.sub(r"[^A-Za-z0-9.-]+", "-", image.rsplit("/", 1)[-1]).strip("-.")[:50] or "machine"
    return f"{base}-{os.urandom(3).hex()}"


def start_time(pid: int) -> int:
    """The kernel's start time of a process (clock ticks), or 0 if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return 0
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    return pid > 0 and started > 0 and start_time(pid) == started


def claim(state: State) -> None:
    """Reserve a name; NameTaken if it is in use (a stale record is cleared first)."""
    check_name(state.name)
    path = registry_dir(state.kind) / f"{state.name}.json"
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            existing = load(state.kind, state.name)
            if existing is not None and not is_stale(existing):
                raise NameTaken(f"machine name {state.name!r} is already in use", hint="pick another --name, or `racker stop` it") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(state), handle)
        return
    raise NameTaken(f"machine name {state.name!r} is already in use")


def save(state: State) -> None:
    store.write_json(registry_dir(state.kind) / f"{state.name}.json", asdict(state))


def load(kind: str, name: str) -> State | None:
    try:
        data = json.loads((registry_dir(kind) / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return State(**data)


def release(state: State) -> None:
    with contextlib.suppress(FileNotFoundError):
        (registry_dir(state.kind) / f"{state.name}.json").unlink()


def all_states(kind: str) -> list[State]:
    states = []
    for path in sorted(registry_dir(kind).glob("*.json")):
        state = load(kind, path.stem)
        if state is not None:
            states.append(state)
    return states


def is_stale(state: State) -> bool:
    """A record whose machine is gone, or whose owner died without stopping it."""
    if state.pid and not alive(state.pid, state.pid_start):
        return True
    if state.owner and not alive(state.owner, state.owner_start):
        return True
    return not state.pid and not (state.owner and alive(state.owner, state.owner_start))


def in_use(digest: str) -> list[State]:
    return [s for kind in ("nspawn", "qemu") for s in all_states(kind) if s.digest == digest and not is_stale(s)]


def console_tail(path: Path, lines: int = 25) -> str:
    """The last lines a machine wrote to its console log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.replace("\r", "").rstrip().splitlines()[-lines:])


class Guest:
    """What an nspawn machine and a QEMU VM share: a context manager that stops
    what it started, hand-over to `racker start`'s caller, and run_expect."""

    name: str
    state: State | None
    detached: bool
    _child: object

    @property
    def rundir(self) -> Path:
        """Where its console log, sockets and overlay live while it runs."""
        return store.home() / "run" / self.name

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"

    def start(self) -> Guest:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def run(self, argv: Sequence[str], **kwargs: object) -> Result:
        raise NotImplementedError

    def __enter__(self) -> Guest:
        if self.state is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def detach(self) -> None:
        """Leave it running after this process exits (`racker start`, `racker vm start`)."""
        assert self.state is not None and self.detached, "only one made with detached=True may outlive its owner"
        self.state.owner = self.state.owner_start = 0
        save(self.state)
        self._child = None

    def run_expect(self, codes: Sequence[int], argv: Sequence[str], **kwargs: object) -> Result:
        __tracebackhide__ = True
        result = self.run(argv, **kwargs)
        assert result.returncode in codes, (
            f"{proc.quote(*argv)} exited {result.returncode}, expected {list(codes)}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result
