"""The host limits that cap how many machines one host runs at once.

Each machine's systemd takes inotify instances and watches, tasks (pids) and
memory; the kernel counts the first two per user (every machine runs as
root), the others host-wide. A machine that finds one exhausted does not fail
cleanly: its systemd boots half-way and never says READY=1. So racker names
the limit from what the machine printed, and `racker doctor` says how many
more machines fit before one runs out.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from racker import sizes
from racker.errors import RackerError

TARGET_MACHINES = 200  # what `racker doctor --fix` makes room for
SYSCTL_D = "/etc/sysctl.d/60-racker.conf"


def _inotify_fds(pids: Iterable[int] | None = None) -> list[tuple[int, str]]:
    """(pid, fd) of every inotify instance held by root's processes (by `pids` only, if given)."""
    found = []
    for pid in pids if pids is not None else (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid != 0:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                        found.append((pid, fd))
    return found


def inotify_instances(pids: Iterable[int] | None = None) -> int:
    return len(_inotify_fds(pids))


def inotify_watches(pids: Iterable[int] | None = None) -> int:
    total = 0
    for pid, fd in _inotify_fds(pids):
        with contextlib.suppress(OSError):
            total += Path(f"/proc/{pid}/fdinfo/{fd}").read_text().count("inotify wd:")
    return total


def tasks(pids: Iterable[int] | None = None) -> int:
    """Threads on the host (the 4th field of /proc/loadavg), or of `pids`."""
    if pids is None:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/task"))
    return total


def user_namespaces(pids: Iterable[int] | None = None) -> int:
    """User namespaces other than the host's that processes are in."""
    host = os.stat("/proc/self/ns/user").st_ino  # ours: /proc/1 may be out of reach in a sandbox
    seen = set()
    for pid in pids if pids is not None else (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            seen.add(os.stat(f"/proc/{pid}/ns/user").st_ino)
    return len(seen - {host})


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class Limit:
    name: str
    sysctl: str  # "" where no setting raises it (memory)
    typical: float  # per machine, measured on a booted Debian bookworm: used until a running machine is measured
    usage: Callable[..., int]  # host-wide use now, or that of the given pids
    signs: str  # a regex matching what a machine (or nspawn) prints when it ran out
    unit: str = ""

    @property
    def path(self) -> Path:
        return Path("/proc/sys") / self.sysctl.replace(".", "/")

    def current(self) -> int:
        """The limit now; for memory, what is in use plus what is available."""
        if not self.sysctl:
            return self.usage() + memory_available()
        return int(self.path.read_text().split()[0])


def _memory_used(pids: Iterable[int] | None = None) -> int:
    # Host-wide, what is not available; a machine's own comes from its cgroup (machine_costs).
    if pids is not None:
        return 0
    total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    return total * 1024 - memory_available()


LIMITS = (
    Limit(
        "inotify instances",
        "fs.inotify.max_user_instances",
        7,
        inotify_instances,
        r"(inotify|watch file descriptor).*Too many open files|Too many open files.*inotify",
    ),
    Limit("inotify watches", "fs.inotify.max_user_watches", 30, inotify_watches, r"(inotify|watch).*No space left on device"),
    Limit("pids", "kernel.pid_max", 10, tasks, r"(fork|clone|spawn).*(Resource temporarily unavailable|No more processes)"),
    Limit("threads", "kernel.threads-max", 10, tasks, r"(fork|clone|thread).*(Resource temporarily unavailable)"),
    Limit(
        "user namespaces", "user.max_user_namespaces", 0, user_namespaces, r"(user namespace|userns|CLONE_NEWUSER).*No space left on device"
    ),
    Limit("memory", "", 40 << 20, _memory_used, r"Cannot allocate memory|Out of memory", unit="bytes"),
)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def recognise(text: str) -> tuple[Limit, str] | None:
    """The limit a failed boot's output shows it ran out of, and the line that shows it; or None."""
    for limit in LIMITS:
        found = re.search(limit.signs, text, re.IGNORECASE)
        if found:
            start, end = text.rfind("\n", 0, found.start()) + 1, text.find("\n", found.end())
            return limit, _ANSI.sub("", text[start : end if end >= 0 else len(text)]).strip()
    return None


def describe(limit: Limit) -> str:
    if not limit.sysctl:
        return f"{limit.name} ({sizes.human(memory_available())} available)"
    return f"{limit.name} ({limit.sysctl}={limit.current()})"


def raise_hint(limit: Limit) -> str:
    if not limit.sysctl:
        return "free memory (stop machines) or run fewer at once"
    return f"raise it: sysctl -w {limit.sysctl}={fix_value(limit, limit.typical)}, or run: racker doctor --fix"


@dataclass
class Headroom:
    limit: Limit
    value: int  # the limit now
    used: int
    per_machine: float
    measured: bool  # per_machine from running machines, not the typical figure

    @property
    def machines(self) -> int | None:
        """How many more machines fit before this limit; None where a machine takes none of it."""
        if self.per_machine <= 0:
            return None
        return max(0, int((self.value - self.used) // self.per_machine))

    def line(self) -> str:
        fmt = sizes.human if self.limit.unit == "bytes" else (lambda n: f"{n:g}")
        setting = f"{self.limit.sysctl}={self.value}" if self.limit.sysctl else f"{sizes.human(self.value - self.used)} available"
        room = "no bound" if self.machines is None else f"{self.machines} more"
        cost = fmt(round(self.per_machine, 1)) + (" measured" if self.measured else " typical")
        return f"{room:>10}  {self.limit.name}: {setting}, {fmt(self.used)} in use, {cost} per machine"


def headroom(costs: dict[str, float] | None = None) -> list[Headroom]:
    """Each limit's room, tightest first. costs: per-machine use measured on running machines."""
    costs = costs or {}
    rows = [Headroom(limit, limit.current(), limit.usage(), costs.get(limit.name, limit.typical), limit.name in costs) for limit in LIMITS]
    return sorted(rows, key=lambda row: math.inf if row.machines is None else row.machines)


def fix_value(limit: Limit, per_machine: float) -> int:
    """A value that holds TARGET_MACHINES more machines than run now: a power of two, never lower than today's."""
    needed = limit.usage() + TARGET_MACHINES * max(per_machine, limit.typical) * 1.25
    return max(limit.current(), 1 << math.ceil(math.log2(max(needed, 2))))


def set_sysctl(limit: Limit, value: int) -> None:
    try:
        limit.path.write_text(f"{value}\n")
    except OSError as error:
        raise RackerError(f"cannot set {limit.sysctl}={value}: {error.strerror}", hint="run racker doctor --fix as root") from None


def fix(costs: dict[str, float] | None = None) -> list[tuple[Limit, int, int]]:
    """Raise every sysctl limit below what TARGET_MACHINES more machines need: (limit, old, new) per change."""
    costs = costs or {}
    changed = []
    for limit in LIMITS:
        if not limit.sysctl:
            continue
        old, new = limit.current(), fix_value(limit, costs.get(limit.name, limit.typical))
        if new > old:
            set_sysctl(limit, new)
            changed.append((limit, old, new))
    return changed


def machine_pids(leader: int, nspawn: int) -> list[int]:
    """The processes of one machine: every one in its leader's pid namespace, and its systemd-nspawn."""
    try:
        ns = os.stat(f"/proc/{leader}/ns/pid").st_ino
    except OSError:
        return []
    pids = [nspawn]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/pid").st_ino == ns:
                    pids.append(int(entry))
    return pids


def cgroup_memory(leader: int, cgroup: str | None) -> int:
    """memory.current of the machine's cgroup: racker's own, or the one machined made around its leader."""
    from racker.machines import cgroups

    root = cgroups.unified_root()
    if not cgroup and root is not None:
        with contextlib.suppress(OSError, StopIteration):
            line = next(li for li in Path(f"/proc/{leader}/cgroup").read_text().splitlines() if li.startswith("0::"))
            cgroup = str((root / line[3:].lstrip("/")).parent)  # the leader sits in init.scope below it
    with contextlib.suppress(OSError, ValueError, TypeError):
        return int((Path(cgroup) / "memory.current").read_text())  # type: ignore[arg-type]
    return 0  # no memory controller in cgroup v2 (a hybrid host): the caller sums its processes


def pss(pids: Iterable[int]) -> int:
    """Proportional set size of these processes, bytes: memory where no cgroup counts it."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration):
            line = next(li for li in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if li.startswith("Pss:"))
            total += int(line.split()[1]) * 1024
    return total


def machine_costs(machines: Iterable[tuple[int, int, str | None]]) -> dict[str, float]:
    """Mean use per machine of each limit, over running machines given as (leader, nspawn pid, cgroup)."""
    totals: dict[str, float] = {}
    count = 0
    for leader, nspawn, cgroup in machines:
        pids = machine_pids(leader, nspawn)
        if not pids:
            continue
        count += 1
        for limit in LIMITS:
            use = (cgroup_memory(leader, cgroup) or pss(pids)) if limit.unit == "bytes" else limit.usage(pids)
            totals[limit.name] = totals.get(limit.name, 0) + use
    return {name: total / count for name, total in totals.items()} if count else {}
