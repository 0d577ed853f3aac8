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
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from racker import proc, store
from racker.errors import MachineError, NameTaken
from racker.machines import cgroups
from racker.proc import Result

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
KINDS = {"nspawn": "machines", "qemu": "vms"}


# -- records ------------------------------------------------------------------


@dataclass
class State:
    name: str
    kind: str  # "nspawn" or "qemu"
    image: str
    digest: str = ""
    boot_id: str = ""  # the boot every pid below belongs to
    pid: int = 0  # systemd-nspawn or qemu
    pid_start: int = 0  # each pid's start time: guards against pid reuse
    leader: int = 0  # the machine's init, for nsenter
    leader_start: int = 0
    owner: int = 0  # the racker process that will stop it; 0 once detached
    owner_start: int = 0
    token: str = ""  # tells this claim of the name from a later one
    started: str = ""
    extra: dict = field(default_factory=dict)  # "helpers": {what: [pid, start time]}, killed by reap()

    @property
    def rundir(self) -> Path:
        return run_dir(self.kind, self.name)


def valid_name(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name))


def check_name(name: str) -> str:
    if not valid_name(name):
        raise MachineError(f"invalid machine name {name!r}: letters, digits, '-' and '.', at most 64, not starting with '.' or '-'")
    return name


def registry_dir(kind: str) -> Path:
    path = store.home() / KINDS[kind]
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_path(kind: str, name: str) -> Path:
    """The one place a machine name becomes a path: the name is checked first."""
    return registry_dir(kind) / f"{check_name(name)}.json"


def run_dir(kind: str, name: str) -> Path:
    """Where a machine's console log, sockets and overlay live while it runs: one per kind
    and name, so that no machine's start or stop touches a VM's (or the reverse)."""
    if kind not in KINDS:
        raise MachineError(f"unknown machine kind {kind!r}")
    return store.home() / "run" / kind / check_name(name)


def make_run_dir(kind: str, name: str) -> Path:
    """A fresh, empty run directory, root's alone (0700, made so: mkdir's mode, which a umask
    can only narrow). What a killed racker left there is removed first."""
    path = run_dir(kind, name)
    store.private_dir(store.private_dir(path.parent.parent) / kind)
    store.remove_tree(path)
    os.mkdir(path, 0o700)
    return path


def unique_name(image: str) -> str:
    base = re.sub(r"[^A-Za-z0-9.-]+", "-", image.rsplit("/", 1)[-1]).strip("-.")[:50] or "machine"
    return f"{base}-{os.urandom(3).hex()}"


class DamagedRecord(MachineError):
    """A registry file that is not a record racker wrote for that name."""


_TYPES = {f.name: (int if f.type == "int" else dict if f.type == "dict" else str) for f in fields(State)}


def _parse(kind: str, name: str, text: str) -> State:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DamagedRecord(f"the record of {name!r} is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise DamagedRecord(f"the record of {name!r} is not a machine record")
    known = {key: value for key, value in data.items() if key in _TYPES}  # an older racker's extra keys are ignored
    for key, value in known.items():
        if type(value) is not _TYPES[key]:
            raise DamagedRecord(f"the record of {name!r} has a bad {key!r}: {value!r}")
    if known.get("name") != name or known.get("kind") != kind or "image" not in known:
        raise DamagedRecord(f"the record of {name!r} names another machine or kind")
    return State(**known)


def load(kind: str, name: str) -> State | None:
    """The record of `name`, or None; DamagedRecord if the file is not one of ours."""
    try:
        text = record_path(kind, name).read_text()
    except FileNotFoundError:
        return None
    return _parse(kind, name, text)


def load_file(path: Path, kind: str, name: str) -> State | None:
    """The record at `path`, in whichever store it is (host-wide network claims name them), or None."""
    try:
        return _parse(kind, name, path.read_text())
    except (OSError, DamagedRecord):
        return None


def save(state: State) -> None:
    store.write_json(record_path(state.kind, state.name), asdict(state))


def _names(kind: str) -> list[str]:
    return sorted(path.stem for path in registry_dir(kind).glob("*.json") if _NAME.match(path.stem))


def all_states(kind: str) -> list[State]:
    """Every readable record of `kind` (damaged ones are left for gc)."""
    states = []
    for name in _names(kind):
        with contextlib.suppress(DamagedRecord):
            state = load(kind, name)
            if state is not None:
                states.append(state)
    return states


def is_stale(state: State) -> bool:
    """A record whose machine is gone, or whose owner died without stopping it."""
    if state.pid and not proc.alive(state.pid, state.pid_start, state.boot_id):
        return True
    if state.owner and not proc.alive(state.owner, state.owner_start, state.boot_id):
        return True
    return not state.pid and not state.owner


def helpers(state: State) -> dict[str, tuple[int, int]]:
    """The helper processes a record names, {what: (pid, start time)}; malformed entries are left out."""
    found = state.extra.get("helpers")
    if not isinstance(found, dict):
        return {}
    return {
        str(what): (pid, started)
        for what, value in found.items()
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(n) is int for n in value)
        for pid, started in [value]
    }


def set_helper(state: State, what: str, pid: int, started: int) -> None:
    state.extra["helpers"] = {**helpers(state), what: [pid, started]}


def in_use(digest: str) -> list[State]:
    return [s for kind in KINDS for s in all_states(kind) if s.digest == digest and not is_stale(s)]


@contextlib.contextmanager
def names_locked(kind: str) -> Iterator[None]:
    """Held while a name is claimed, released or its stale record reaped: these never interleave."""
    with store.locked(f"claim-{kind}"):
        yield


@contextlib.contextmanager
def all_names_locked() -> Iterator[None]:
    """Every kind's names lock, always taken in the same order (so two takers never deadlock)."""
    with contextlib.ExitStack() as stack:
        for kind in KINDS:
            stack.enter_context(names_locked(kind))
        yield


WHAT = {"nspawn": "a machine", "qemu": "a VM"}


def new_state(kind: str, name: str, image: str, digest: str = "", *, extra: dict | None = None) -> State:
    """A record for a machine this process is about to make (and will stop)."""
    me = os.getpid()
    return State(
        name=check_name(name),
        kind=kind,
        image=image,
        digest=digest,
        boot_id=proc.boot_id(),
        owner=me,
        owner_start=proc.start_time(me),
        token=os.urandom(8).hex(),
        started=store.now(),
        extra=extra or {},
    )


def claim(state: State) -> None:
    """Reserve a name; NameTaken if a machine or a VM has it (a name is one thing's, whatever
    its kind). A stale record is reaped first.

    The record appears whole (written aside, then linked into place), so no
    other claimer ever reads a half-written one.
    """
    path = record_path(state.kind, state.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(state), handle)
        with all_names_locked():
            for kind in KINDS:
                if kind != state.kind:
                    _refuse_if_taken(kind, state.name)
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                pass
            try:
                existing = load(state.kind, state.name)
            except DamagedRecord:
                existing = None
            if existing is not None and not is_stale(existing):
                raise NameTaken(f"machine name {state.name!r} is already in use", hint="pick another --name, or stop it first")
            if existing is not None:
                reap(existing)
            os.replace(tmp, path)
            tmp = ""
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _refuse_if_taken(kind: str, name: str) -> None:
    """NameTaken if a live `kind` has the name; its stale record is reaped. The caller holds the names locks."""
    try:
        existing = load(kind, name)
    except DamagedRecord:
        return  # not ours to act on; gc removes it
    if existing is None:
        return
    if not is_stale(existing):
        raise NameTaken(f"machine name {name!r} is already in use by {WHAT[kind]}", hint="pick another --name, or stop it first")
    reap(existing)


def release(state: State) -> None:
    """Drop the record of this claim (not a later claim of the same name)."""
    with names_locked(state.kind):
        try:
            current = load(state.kind, state.name)
        except DamagedRecord:
            current = None
        if current is not None and current.token == state.token:
            record_path(state.kind, state.name).unlink(missing_ok=True)


def reap(state: State) -> list[str]:
    """Remove what a stale record owns: its processes (only if still the ones recorded),
    its cgroup, its run directory and the record itself. One line per thing removed.

    The caller holds the names lock (claim() and collect_stale() do).
    """
    removed = []
    # Its helpers first (a VM's SSH connection master), while the machine they talk to still runs.
    for what, (pid, started) in helpers(state).items():
        if proc.kill_and_wait(pid, started, state.boot_id):
            removed.append(f"killed the {what} of {state.name} (pid {pid})")
    # The leader first: killing a pid namespace's init takes the whole machine down.
    if proc.kill_and_wait(state.leader, state.leader_start, state.boot_id):
        removed.append(f"killed {state.kind} machine {state.name} (pid {state.leader})")
    if proc.kill_and_wait(state.pid, state.pid_start, state.boot_id):
        removed.append(f"killed {state.kind} process of {state.name} (pid {state.pid})")
    cgroup = state.extra.get("cgroup")
    if cgroup:
        # A container whose nspawn died before its leader was known runs on in its cgroup.
        if cgroups.kill(cgroup):
            removed.append(f"killed the processes left in cgroup {cgroup}")
        if os.path.isdir(cgroup) and cgroups.remove(cgroup):
            removed.append(f"removed cgroup {cgroup}")
    if state.rundir.exists():
        store.remove_tree(state.rundir)
        removed.append(f"removed {state.rundir}")
    if state.kind == "nspawn" and remove_propagate_dir(state.name):
        removed.append(f"removed {NSPAWN_PROPAGATE / state.name}")
    record_path(state.kind, state.name).unlink(missing_ok=True)
    removed.append(f"removed stale {state.kind} record {state.name}")
    return removed


# systemd-nspawn's per-machine directory for bind mounts made later; a killed nspawn
# leaves it, and where /run is no tmpfs nothing else ever removes it.
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")


def remove_propagate_dir(name: str) -> bool:
    """Remove nspawn's propagate directory of a machine that is gone; only if empty."""
    try:
        os.rmdir(NSPAWN_PROPAGATE / check_name(name))
        return True
    except OSError:  # gone already, or not empty: not ours to remove
        return False


def collect_stale(kind: str) -> list[str]:
    """Reap every stale or damaged record of `kind`; what `racker gc` does for machines."""
    removed = []
    for name in _names(kind):
        with names_locked(kind):
            try:
                state = load(kind, name)
            except DamagedRecord as damaged:
                # Not ours to act on: nothing it names is signalled or deleted.
                record_path(kind, name).unlink(missing_ok=True)
                removed.append(f"removed damaged {kind} record {name} ({damaged})")
                continue
            if state is not None and is_stale(state):
                removed += reap(state)
    return removed


def console_tail(path: Path, lines: int = 25) -> str:
    """The last lines a machine wrote to its console log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join([line for line in text.replace("\r", "").splitlines() if line.strip()][-lines:])


# What a failed test keeps of a file (a console log, a journal): its last this many bytes.
EVIDENCE_FILE_LIMIT = 1_000_000


def read_capped(path: Path, limit: int = EVIDENCE_FILE_LIMIT) -> str:
    """A log file's text, or its last `limit` bytes with a line saying so; "" if there is none."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - limit))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace")
    return f"[… the first {size - limit} bytes left out …]\n{text}" if size > limit else text


class Guest:
    """What an nspawn machine and a QEMU VM share: a context manager that stops
    what it started, hand-over to `racker start`'s caller, and run_expect."""

    kind: str
    name: str
    state: State | None
    detached: bool
    _child: object

    @property
    def rundir(self) -> Path:
        """Where its console log, sockets and overlay live while it runs."""
        return run_dir(self.kind, self.name)

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"

    def boot_evidence(self) -> dict[str, str]:
        """The logs that show how its boot went, file name -> text, for a failed boot's error."""
        return {"console.log": read_capped(self.console_log)}

    @property
    def hostname(self) -> str:
        """The hostname the guest was given when it booted: its name (a restored VM's differs)."""
        return self.name

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
