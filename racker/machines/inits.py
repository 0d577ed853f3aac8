"""What runs as PID 1 in a booted machine: how racker knows it is up, and how it asks it to stop.

Chosen once per boot from the image's files, in the order systemd-nspawn's --boot tries
them (systemd, then /sbin/init), or from the image's own init command; one class per
init, subclasses override what differs:

- Systemd: says READY=1 itself (nspawn relays it), stops on SIGRTMIN+3 (nspawn sends it).
- SysVinit: never says READY=1, ignores SIGRTMIN+3. Ready when its default runlevel
  (inittab's initdefault) is the one utmp records and that runlevel's `wait` entries
  (Debian: `/etc/init.d/rc 2`) have finished; stopped by `telinit 0`, its own halt.
- OpenRC on sysvinit's init: as SysVinit, and OpenRC's own state says its `default`
  runlevel is reached with no service still starting.
- Runit: ready once its stage 2 runs runsvdir; stopped by `runit-init 0`.

An init racker does not know is refused before the boot, in one line: waiting for a
signal it never sends would only end at the boot timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from racker.errors import UnknownInit
from racker.proc import Result
from racker.store import imagetree

# Where nspawn --boot looks for an init, in its order: the first that exists is PID 1.
BOOT_SEARCH = ("usr/lib/systemd/systemd", "lib/systemd/systemd", "sbin/init")
SYSVINIT_MARK = b"INIT_VERSION=sysvinit-"  # in sysvinit's /sbin/init, whatever its version
READ_LIMIT = 16 << 20  # an init binary is far smaller; a bigger file is not read whole


# Runs a command inside the machine (nspawn.Machine.run).
Run = Callable[..., Result]


@dataclass(frozen=True)
class Init:
    name: str = ""
    path: str = ""  # PID 1's program, inside the image

    # Says READY=1 through $NOTIFY_SOCKET once booted, which nspawn relays to racker.
    sends_ready: ClassVar[bool] = True
    # What nspawn sends PID 1 when nspawn itself is told to stop (SIGTERM: racker's stop
    # fallback, or racker's death); None: nspawn's own choice.
    kill_signal: ClassVar[str | None] = None
    # Whether racker's runtime masks (nspawn.MASKS: binds into /run/systemd/system) apply. Only
    # systemd's: that directory is how every program (sd_booted, Debian's init-functions,
    # testinfra) tells that systemd is PID 1, so no other init's machine may have it.
    runtime_masks: ClassVar[bool] = False

    @property
    def ready_means(self) -> str:
        return "READY=1"

    @property
    def halt(self) -> tuple[str, ...]:
        """Run inside to shut the machine down by the init's own path; empty: SIGTERM to nspawn does."""
        return ()

    def nspawn_options(self) -> list[str]:
        options = [f"--notify-ready={'yes' if self.sends_ready else 'no'}"]
        if self.kill_signal:
            options.append(f"--kill-signal={self.kill_signal}")
        return options

    def is_ready(self, run: Run, leader: int) -> bool:
        """Asked over and over after nspawn's READY=1, until True; only for inits that send none."""
        return True


@dataclass(frozen=True)
class Systemd(Init):
    name: str = "systemd"

    runtime_masks = True


@dataclass(frozen=True)
class SysVinit(Init):
    name: str = "sysvinit"
    runlevel: str = "2"  # inittab's initdefault
    waits: tuple[str, ...] = ()  # the `wait` entries of that runlevel, as inittab writes them

    sends_ready = False
    # sysvinit has no signal that halts it (SIGINT runs inittab's ctrlaltdel: a reboot on
    # Debian), so a stop that telinit did not finish, or racker's death, ends it at once.
    kill_signal = "SIGKILL"

    @property
    def halt(self) -> tuple[str, ...]:
        return ("telinit", "0")

    @property
    def ready_means(self) -> str:
        return f"runlevel {self.runlevel} (its inittab's initdefault) with its rc scripts finished"

    def is_ready(self, run: Run, leader: int) -> bool:
        # Looked at twice in a row: init records the runlevel in utmp, then forks that runlevel's
        # `wait` entries, whose child is a copy of init until it execs the entry. Each look reads
        # utmp first and the processes after, so a record seen just before the fork shows the
        # copy (or the entry) in the look that follows it.
        return self._reached(run, leader) and self._reached(run, leader)

    def _reached(self, run: Run, leader: int) -> bool:
        level = run(["runlevel"], timeout=10)
        if level.returncode != 0 or level.stdout.split()[-1:] != [self.runlevel]:
            return False
        return not any(process.forked_init or self.busy(process.argv) for process in machine_processes(leader))

    def busy(self, argv: list[str]) -> bool:
        """Whether this process is still bringing the runlevel up."""
        command = " ".join(argv)
        return any(wait in command for wait in self.waits)


@dataclass(frozen=True)
class OpenRC(SysVinit):
    name: str = "openrc"

    @property
    def ready_means(self) -> str:
        return "OpenRC's default runlevel with no service still starting"

    def is_ready(self, run: Run, leader: int) -> bool:
        if not super().is_ready(run, leader):
            return False
        # OpenRC's own record: the runlevel it reached (softlevel) and the services it is starting.
        state = run(["sh", "-c", "cat /run/openrc/softlevel && echo && ls -A /run/openrc/starting"], timeout=10)
        return state.returncode == 0 and state.stdout.split() == ["default"]

    def busy(self, argv: list[str]) -> bool:
        # Debian's /etc/init.d/rc execs `openrc default`, which starts the services.
        return super().busy(argv) or (bool(argv) and os.path.basename(argv[0]) == "openrc")


@dataclass(frozen=True)
class Runit(Init):
    """runit: stage 1 (/etc/runit/1, Debian's runs rcS), stage 2 (/etc/runit/2, which execs
    runsvdir to supervise /etc/service), stage 3 on `runit-init 0`. Ready once stage 2 has
    exec'ed runsvdir: its own boot work (Debian's: rc2's scripts) is done, the services supervised."""

    name: str = "runit"

    sends_ready = False
    kill_signal = "SIGKILL"  # runit halts on runit-init's stopit file and SIGCONT, no signal alone

    @property
    def ready_means(self) -> str:
        return "stage 2 (runsvdir supervising the services)"

    @property
    def halt(self) -> tuple[str, ...]:
        return (self.path or "/sbin/init", "0")  # runit-init 0, as /sbin/init names it

    def is_ready(self, run: Run, leader: int) -> bool:
        return any(p.argv[:1] and os.path.basename(p.argv[0]) == "runsvdir" for p in machine_processes(leader))


RUNIT_NAMES = ("runit-init", "runit")  # what /sbin/init resolves to in a runit image

KNOWN = {cls.name: cls for cls in (Systemd(), SysVinit(), OpenRC(), Runit())}


def named(name: str) -> Init:
    """The init a running machine's record names (its boot chose it); systemd for older records."""
    return KNOWN.get(name, KNOWN["systemd"])


def detect(rootfs: Path, command: Sequence[str] | None = None) -> Init | None:
    """The init that will be PID 1: `command[0]` (the image's own init command) or what nspawn
    --boot would find. None when the image has no init at all; UnknownInit for one racker does not know."""
    tree = imagetree.Tree(rootfs)  # the image's links resolve inside it, never on the host
    candidates = [command[0]] if command else BOOT_SEARCH
    path = next((p for p in candidates if tree.is_file(p)), None)
    if path is None:
        if command:
            raise UnknownInit(f"the image's init {command[0]} is not in the image")
        return None
    found = Path(tree.resolve(path))
    if found.name == "systemd":
        return Systemd(path="/" + path.lstrip("/"))
    if found.name in RUNIT_NAMES:
        return Runit(path="/" + path.lstrip("/"))
    content = _read(tree, path)
    if SYSVINIT_MARK in content:
        return _sysvinit(tree, "/" + path.lstrip("/"))
    raise UnknownInit(
        f"the image's init /{path.lstrip('/')} is {_describe(content)}, not an init racker can boot",
        hint=f"racker boots {', '.join(KNOWN)}; to boot this image with systemd, install it (systemd-sysv on Debian)",
    )


def _sysvinit(tree: imagetree.Tree, path: str) -> SysVinit:
    text = _read(tree, "etc/inittab").decode(errors="replace")
    runlevel, waits = parse_inittab(text)
    if not runlevel:
        raise UnknownInit(
            "the image's /etc/inittab names no default runlevel (no initdefault line), so sysvinit would ask for one on the console",
            hint="add a line such as id:2:initdefault: to /etc/inittab",
        )
    # OpenRC brings the runlevels up when the wait entries hand them to it (Debian's /etc/init.d/rc does).
    handed = [text, *(_read(tree, wait.split()[0]).decode(errors="replace") for wait in waits)]
    if tree.is_file("sbin/openrc") and any("openrc" in part for part in handed):
        return OpenRC(path=path, runlevel=runlevel, waits=waits)
    return SysVinit(path=path, runlevel=runlevel, waits=waits)


def parse_inittab(text: str) -> tuple[str, tuple[str, ...]]:
    """(the initdefault runlevel or "", the `wait` entries' commands for that runlevel)."""
    entries = []
    for line in text.splitlines():
        fields = line.strip().split(":", 3)
        if len(fields) == 4 and not line.lstrip().startswith("#"):
            entries.append(fields)
    runlevel = next((levels[:1] for _, levels, action, _ in entries if action == "initdefault"), "")
    waits = tuple(process.strip() for _, levels, action, process in entries if action == "wait" and runlevel and runlevel in levels)
    return runlevel, waits


@dataclass(frozen=True)
class Process:
    argv: list[str]
    forked_init: bool  # a child of PID 1 that has not exec'ed yet: PID 1's program, not PID 1


def machine_processes(leader: int) -> list[Process]:
    """Every process in the machine (the pid namespace of its PID 1, `leader`), read from the
    host's /proc: no tool of the image's is needed, and nothing of the image's is read."""

    def identity(path: str) -> tuple[int, int]:
        info = os.stat(path)
        return info.st_dev, info.st_ino

    try:
        ns, init = identity(f"/proc/{leader}/ns/pid"), identity(f"/proc/{leader}/exe")
    except OSError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if identity(f"/proc/{entry.name}/ns/pid") != ns:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                raw = cmdline.read()
            forked = int(entry.name) != leader and identity(f"/proc/{entry.name}/exe") == init
        except OSError:
            continue  # gone meanwhile (or a kernel thread, which has no exe)
        found.append(Process([arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]], forked))
    return found


def _read(tree: imagetree.Tree, rel: str) -> bytes:
    """The first READ_LIMIT bytes of a file of the image; b"" when it cannot be read."""
    try:
        fd = tree.open(rel.lstrip("/"))
    except (OSError, ValueError):
        return b""
    with open(fd, "rb") as handle:
        try:
            return handle.read(READ_LIMIT)
        except OSError:
            return b""


def _describe(content: bytes) -> str:
    """What an unknown init is, in a few words, for the error line."""
    if content.startswith(b"#!"):
        return f"a script ({content.splitlines()[0].decode(errors='replace')[:60]})"
    if b"BusyBox" in content:
        return "BusyBox's init"
    if content.startswith(b"\x7fELF"):
        return "a program racker does not recognise"
    return "a file racker does not recognise" if content else "an empty file"
