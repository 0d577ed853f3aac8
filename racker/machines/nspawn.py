"""Machines: an image booted with systemd-nspawn, entered with nsenter.

The image in the store is never written: the machine's root is an overlay
whose upper layer is a tmpfs (`--volatile=overlay`), gone when nspawn exits.
Readiness is the container's own systemd saying READY=1 (boot finished),
relayed by nspawn over a notify socket that we own: no polling, no sleeps.
An init that says no READY=1 (sysvinit, OpenRC) is asked for its own sign of
a finished boot instead, and is stopped by its own shutdown (racker.machines.inits).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from racker import machines, proc, settings, store
from racker.cpu import emulation
from racker.errors import BootTimeout, GuestDied, HostLimit, MachineError, NoSuchMachine, RackerError, ToolTimeout, Unreachable
from racker.machines import State, cgroups, guest_env, inits, limits, logins, named_networks, network
from racker.machines.logins import Login
from racker.proc import Result


def has_machined() -> bool:
    """machined is there to register with when the host runs systemd as PID 1."""
    return os.path.isdir("/run/systemd/system") and proc.which("machinectl") is not None


class Machine(machines.Guest):
    """A booted image. Use as a context manager: it is stopped on the way out.

    with Machine(image) as m:
        m.run(["systemctl", "is-system-running"])
    """

    kind = "nspawn"

    def __init__(
        self,
        image: store.StoredImage,
        name: str | None = None,
        *,
        boot_timeout: float | None = None,
        detached: bool = False,
        network_mode: str = network.DEFAULT_MODE,
        publish: Sequence[network.Publish] = (),
        network_alias: str | None = None,
    ) -> None:
        """network_mode: one of network.MODES, or a private network's name (named_networks.py), which
        the machine joins as `network_alias` (default: its name)."""
        self.image = image
        self.detached = detached
        self.network = named_networks.for_mode(network_mode, publish, network_alias)
        self.name = machines.check_name(name) if name else machines.unique_name(image.name)
        self.boot_timeout = settings.BOOT_TIMEOUT.value() if boot_timeout is None else boot_timeout
        self.state: State | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0
        self.init: inits.Init = inits.named("systemd")  # chosen from the image by start()

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def attach(cls, name: str) -> Machine:
        """A running machine from the registry, started by this or another process."""
        state = machines.load("nspawn", name)
        if state is None or machines.is_stale(state):
            raise NoSuchMachine(f"no running machine named {name!r}", hint="see `racker ps`")
        machine = cls.__new__(cls)
        machine.image = store.lookup(state.image) or store.StoredImage(state.image, state.digest, "", "", 0)
        machine.name = name
        machine.boot_timeout = settings.BOOT_TIMEOUT.value()
        machine.detached = state.owner == 0
        machine.state = state
        machine.network = network.for_mode(network.DEFAULT_MODE)  # stop() releases what the record names
        machine._child = None
        machine.boot_seconds = 0.0
        machine.init = inits.named(state.extra.get("init", "systemd"))
        return machine

    def start(self) -> Machine:
        rootfs = self.image.rootfs
        if not rootfs.is_dir():
            raise MachineError(
                f"image {self.image.name!r} has no root filesystem in the store", hint=f"run: racker pull --force {self.image.name}"
            )
        self.init = self._find_init(rootfs)  # an init racker cannot wait for fails here, before anything is made
        # Another architecture's image runs under qemu-user (or says what to install), more slowly.
        self._slowdown = emulation.image_slowdown(self.image.manifest)
        self.boot_timeout *= self._slowdown
        state = machines.new_state("nspawn", self.name, self.image.name, self.image.digest, extra={"init": self.init.name})
        machines.claim(state)  # recorded before anything is made
        self.state = state
        try:
            self.network.setup(state)  # a published port in use fails here, before the boot
            self._boot(rootfs)
            self.network.start_forwarder(state, detached=self.detached)
        except BaseException as error:
            if isinstance(error, RackerError):
                error.evidence.update(self.boot_evidence())  # before stop() removes the logs
            self.stop()
            raise
        return self

    def boot_evidence(self) -> dict[str, str]:
        return {**super().boot_evidence(), "nspawn.log": machines.read_capped(self.nspawn_log)}

    def _find_init(self, rootfs: Path) -> inits.Init:
        found = inits.detect(rootfs, configured_init(self.image.manifest))
        if found is None:
            raise MachineError(
                f"image {self.image.name!r} has no init for --boot to run (no systemd, no /sbin/init)",
                hint=f"racker run {self.image.name} installs one first; racker run --no-boot runs a command without one",
            )
        return found

    def _boot(self, rootfs: Path) -> None:
        assert self.state is not None
        machines.make_run_dir(self.kind, self.name)
        emulated = emulation.nspawn_options(rootfs, self.rundir) if self._slowdown > 1 else []
        cgroup = machine_cgroup(self.name)
        if cgroup is not None:
            self.state.extra["cgroup"] = str(cgroup)
            machines.save(self.state)  # recorded before it is made
            cgroups.make(cgroup)
        # An abstract socket (no file, no 108-byte path limit wherever RACKER_HOME is),
        # named after this claim; sd_notify, which nspawn uses, takes "@name" for one.
        # Anyone may send to it: only what systemd-nspawn itself sends counts.
        notify_name = f"racker/{self.state.token}/notify"
        started = time.monotonic()
        with notify_socket(notify_name) as notify:
            # The container's console and nspawn's own complaints apart: a failed boot shows both.
            with open(self.console_log, "wb") as console, open(self.nspawn_log, "wb") as nspawn_stderr:
                self._child = proc.start(
                    nspawn_argv(
                        rootfs,
                        self.name,
                        [*self.network.nspawn_options(self.rundir), *emulated],
                        configured_init(self.image.manifest),
                        init_options=self.init.nspawn_options(),
                        masks=MASKS if self.init.runtime_masks else (),
                    ),
                    env={**nspawn_env(), "NOTIFY_SOCKET": "@" + notify_name},
                    stdout=console,
                    stderr=nspawn_stderr,
                    new_session=True,  # a Ctrl-C on our terminal is ours to handle, not nspawn's
                    # An owned machine shuts down if we die; a detached one outlives us.
                    die_with_parent=None if self.detached else signal.SIGTERM,
                    cgroup_procs=str(cgroup / "cgroup.procs") if cgroup is not None else None,
                )
            self.state.pid = self._child.pid
            self.state.pid_start = proc.start_time(self._child.pid)
            machines.save(self.state)
            self._wait_ready(notify, started + self.boot_timeout)
        self.state.extra["machined"] = has_machined()
        machines.save(self.state)
        if self.init.sends_ready:
            self._wait_booted(started + self.boot_timeout)
        else:
            self._wait_init_ready(started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started

    def _wait_ready(self, notify: socket.socket, deadline: float) -> int:
        """Read nspawn's notifications until READY=1 (recording the container's leader); its pid."""
        assert self._child is not None
        leader = 0
        searched: dict[Path, int] = {}  # bytes of each log already searched for a host limit's signs
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._boot_failed(f"machine {self.name!r} did not become ready", timed_out=True)
            # Wake up now and then to notice an nspawn that died without a word, or a
            # machine that ran out of a host limit (it would never become ready).
            notify.settimeout(min(remaining, 0.5))
            try:
                message = receive_notification(notify, self._child.pid)
            except TimeoutError:
                if self._child.poll() is not None:
                    status = self._child.returncode
                    raise self._boot_failed(f"systemd-nspawn exited with status {status} while booting {self.name!r}", died=True) from None
                if self._shows_a_limit(searched):
                    raise self._boot_failed(f"machine {self.name!r} cannot boot") from None
                continue
            for key, value in (message or {}).items():
                if key == "X_NSPAWN_LEADER_PID":
                    leader = int(value)
                    self.state.leader = leader  # type: ignore[union-attr]
                    self.state.leader_start = proc.start_time(leader)  # type: ignore[union-attr]
                    machines.save(self.state)  # type: ignore[arg-type]
                    self.network.configure(self.state)  # type: ignore[arg-type]  # eth0 is up before the guest's services start
                elif key == "READY" and value == "1" and leader:
                    return leader

    def _wait_booted(self, deadline: float) -> None:
        """Hand the machine over only once its boot is done: every job of the default target
        ended, its services started (as Docker hands over a container whose CMD runs). READY=1
        alone is not that on every systemd; `systemctl is-system-running --wait` is. "degraded"
        (a unit failed) is booted too: the checks say which unit. An init without systemctl
        (127, no such command) is taken as it is."""
        try:
            self.run(["systemctl", "is-system-running", "--wait"], timeout=max(1.0, deadline - time.monotonic()))
        except ToolTimeout:
            raise self._boot_failed(f"machine {self.name!r} did not finish booting", timed_out=True) from None

    def _wait_init_ready(self, deadline: float) -> None:
        """Ask an init that says no READY=1 (nspawn said READY=1 for it at its start, with
        --notify-ready=no) for its own sign of a finished boot, until it gives it."""
        assert self._child is not None and self.state is not None
        searched: dict[Path, int] = {}
        while not self.init.is_ready(self.run, self.state.leader):
            if self._child.poll() is not None:
                status = self._child.returncode
                raise self._boot_failed(f"systemd-nspawn exited with status {status} while booting {self.name!r}", died=True)
            if self._shows_a_limit(searched):
                raise self._boot_failed(f"machine {self.name!r} cannot boot")
            if time.monotonic() >= deadline:
                raise self._boot_failed(f"machine {self.name!r} did not reach {self.init.ready_means}", timed_out=True)
            time.sleep(0.05)  # between two looks at the init's state

    @property
    def nspawn_log(self) -> Path:
        return self.rundir / "nspawn.log"

    def _boot_output(self) -> str:
        """What nspawn and the container printed so far."""
        text = ""
        for path in (self.nspawn_log, self.console_log):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace")
        return text

    def _shows_a_limit(self, searched: dict[Path, int]) -> bool:
        """Whether nspawn or the console printed a host limit's sign since the last look.
        Only new output is searched (from the start of its line): 100 machines poll at once."""
        for path in (self.nspawn_log, self.console_log):
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(errors="replace")
                if limits.recognise(text[text.rfind("\n", 0, searched.get(path, 0)) + 1 :]):
                    return True
                searched[path] = len(text)
        return False

    def _boot_failed(self, message: str, timed_out: bool = False, died: bool = False) -> MachineError:
        """The error of a failed boot: nspawn's stderr and the console's tail, and the host limit
        it hit where racker recognises one (HostLimit)."""
        tails = [
            f"{title}:\n{tail}"
            for title, path, lines in (("systemd-nspawn said", self.nspawn_log, 10), ("last console lines", self.console_log, 15))
            if (tail := machines.console_tail(path, lines))
        ]
        recognised = limits.recognise(self._boot_output())
        if recognised is not None:
            limit, evidence = recognised
            hint = [limits.raise_hint(limit), f"the machine said: {evidence}", *tails]
            return HostLimit(f"{message}: the host ran out of {limits.describe(limit)}", limit.name, "\n".join(hint))
        if timed_out:
            return BootTimeout(f"machine {self.name!r}", self.boot_timeout, machines.console_tail(self.console_log), "\n".join(tails))
        return (GuestDied if died else MachineError)(message, hint="\n".join(tails) or None)

    def stop(self, grace: float = 10.0) -> None:
        """Shut the machine down: SIGTERM to nspawn (a clean poweroff), then SIGKILL.

        Only the processes this machine's record names are signalled, and only
        while they are still those processes (pid, start time and boot match).
        """
        state = self.state
        if state is None:
            return
        try:
            if self._halt_through_init(grace):
                pass
            elif proc.signal_process(state.pid, state.pid_start, state.boot_id, signal.SIGTERM):
                if not self._wait_gone(grace):
                    # The leader first: it takes the whole pid namespace down.
                    proc.signal_process(state.leader, state.leader_start, state.boot_id, signal.SIGKILL)
                    proc.signal_process(state.pid, state.pid_start, state.boot_id, signal.SIGKILL)
                    self._wait_gone(5)
            elif self._child is not None:
                self._child.wait(5)
        finally:
            shutil.rmtree(state.rundir, ignore_errors=True)
            cgroups.kill(state.extra.get("cgroup"))  # nothing of the machine outlives it
            cgroups.remove(state.extra.get("cgroup"))
            machines.remove_propagate_dir(state.name)
            network.release(state)  # the bridge too, with the last machine
            named_networks.release(state)
            self.network.close()
            machines.release(state)
            self.state = None

    def _halt_through_init(self, grace: float) -> bool:
        """Shut down by the init's own command (sysvinit ignores nspawn's SIGRTMIN+3), where it
        has one; whether the machine is gone within `grace`."""
        state = self.state
        if not self.init.halt or state is None or not state.leader:
            return False
        if not proc.alive(state.leader, state.leader_start, state.boot_id):
            return False
        # nsenter may lose the machine as it halts (Unreachable), or time out: the wait decides.
        with contextlib.suppress(RackerError):
            self.run(self.init.halt, timeout=grace)
        return self._wait_gone(grace)

    def _wait_gone(self, timeout: float) -> bool:
        assert self.state is not None
        if not proc.wait_exit(self.state.pid, timeout):
            return False
        if self._child is not None:
            self._child.wait()  # reap our own child
        return True

    # -- commands ----------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """What every command starts with: racker's base, the image's Env over it (as docker exec)."""
        return guest_env.for_image(self.image.manifest)

    def login(self, user: str) -> Login:
        """`user` (NAME, UID, NAME:GROUP or UID:GID) as the guest knows it; MachineError if it does not."""
        return logins.resolve(user, self.run, f"machine {self.name!r}")

    def command(
        self, argv: Sequence[str], *, tty: bool = False, env: Mapping[str, str] | None = None, login: Login | None = None
    ) -> list[str]:
        """The host argv that runs `argv` inside the machine, as root or as `login` (in its home,
        with its login variables and groups), in a clean environment."""
        if self.state is None or not self.state.leader:
            raise MachineError(f"machine {self.name!r} is not running")
        if not argv:
            raise MachineError("no command given")
        guest = self.environment()
        if login is not None:
            guest.update(login.env())
        if tty:
            guest["TERM"] = os.environ.get("TERM", "xterm-256color")
        guest.update(env or {})
        inner = list(argv)
        if tty:
            # A pty made inside the machine, so that `tty`, job control and
            # curses programs see a terminal of the machine's own.
            inner = ["script", "--quiet", "--return", "--command", proc.quote(*argv), "/dev/null"]
        chdir = []
        if login is not None:
            # env enters the home as root (one of mode 0700 too), then setpriv becomes the user.
            chdir = [f"--chdir={login.workdir}"]
            inner = [*login.setpriv(), *inner]
        return [
            proc.require("nsenter"),
            f"--target={self.state.leader}",
            "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
            "--root", "--wd",
            "--",
            "/usr/bin/env", "-i", *chdir, *(f"{k}={v}" for k, v in guest.items()),
            *inner,
        ]  # fmt: skip

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = 600,
        env: Mapping[str, str] | None = None,
        login: Login | None = None,
    ) -> Result:
        """Run a command to completion; exit code, stdout and stderr exactly as the guest gave them."""
        result = proc.run(self.command(argv, env=env, login=login), input=input, timeout=timeout, check=False)
        if result.failed and self.state is not None and not proc.alive(self.state.leader, self.state.leader_start, self.state.boot_id):
            # nsenter found no machine to enter: the channel is lost, the command never ran.
            raise Unreachable(f"machine {self.name!r} is gone (its init exited)", hint=machines.console_tail(self.console_log) or None)
        result.argv = list(argv)  # report the guest command, not the nsenter wrapper
        return result

    def interact(self, argv: Sequence[str], *, tty: bool | None = None, login: Login | None = None) -> int:
        """Run a command wired to our own stdin, stdout and stderr; return its exit code."""
        if tty is None:
            tty = sys.stdin.isatty() and sys.stdout.isatty()
        return proc.interact(self.command(argv, tty=tty, login=login))


_CREDENTIALS = struct.calcsize("3i")  # struct ucred: pid, uid, gid


def notify_socket(name: str) -> socket.socket:
    """A datagram socket bound to the abstract `name`, for sd_notify messages; the kernel
    attaches each sender's credentials to what it receives (SO_PASSCRED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock


def receive_notification(sock: socket.socket, sender: int) -> dict[str, str] | None:
    """The next message's fields (KEY=VALUE lines) if the kernel says process `sender` sent it;
    None for anyone else's (an abstract socket has no permissions: any local user may send)."""
    data, ancillary, _flags, _address = sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS))
    pid = 0
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDENTIALS:
            pid = struct.unpack("3i", payload[:_CREDENTIALS])[0]
    if pid != sender:
        proc.debug(f"ignored a notification from pid {pid or 'unknown'}: not systemd-nspawn (pid {sender})")
        return None
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def run_unbooted(image: store.StoredImage, command: Sequence[str], *, tty: bool | None = None) -> int:
    """Run one command in the image as `docker run` would: no init, the image's Env,
    WorkingDir and User, ENTRYPOINT + CMD when no command is given; its exit status.

    The store's copy is never written (a tmpfs overlay takes the writes), and
    gc leaves the image alone while it runs.
    """
    emulation.image_slowdown(image.manifest)
    config = image.manifest.get("config") or {}
    argv = list(command) or [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    if not argv:
        raise MachineError(f"{image.name} has no ENTRYPOINT or CMD, and no command was given", hint="racker run --no-boot IMAGE -- COMMAND")
    if tty is None:
        tty = sys.stdin.isatty() and sys.stdout.isatty()
    with store.reading(image) as rootfs:
        nspawn = [
            "systemd-nspawn", "--quiet", f"--directory={rootfs}", f"--machine={machines.unique_name(image.name)}",
            "--volatile=overlay", "--private-network", "--as-pid2", "--link-journal=no", "--timezone=off",
            "--register=no", *([] if has_machined() else ["--keep-unit"]), f"--console={'interactive' if tty else 'pipe'}",
            *(f"--setenv={item}" for item in config.get("Env") or [] if "=" in item),
            *([f"--chdir={config['WorkingDir']}"] if config.get("WorkingDir") else []),
            *([f"--user={config['User']}"] if config.get("User") else []),
            "--", *argv,
        ]  # fmt: skip
        return proc.interact(nspawn, env=nspawn_env())


# Entrypoints that are an init: an image configured to start one (`CMD ["/sbin/init"]`)
# boots with exactly that command as PID 1, as Docker runs it.
INITS = ("/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")


# Units that act on a host disk, which a container has none of. systemd's fstab generator skips
# fstab's device lines in a container, but systemd-remount-fs (252) still remounts / as fstab says,
# and fails on a disk image's `UUID=… /` line. Masked at run time: /dev/null bound over the unit in
# /run/systemd/system (a runtime mask, as `systemctl mask --runtime` makes), so that any image from
# a disk boots with no failed unit while its files, fstab included, stay as they are, and PID 1's
# command line is exactly the image's (as Docker runs the CMD as given). Not systemd.mask= on that
# command line: a test of PID 1 (testinfra's test_process) would see it.
HOST_DISK_UNITS = ("systemd-remount-fs.service",)
MASKS = tuple(f"--bind-ro=/dev/null:/run/systemd/system/{unit}" for unit in HOST_DISK_UNITS)


def configured_init(manifest: Mapping) -> list[str] | None:
    """The image's ENTRYPOINT + CMD when it starts an init, else None (nspawn --boot finds one)."""
    config = manifest.get("config") or {}
    argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    return argv if argv and argv[0] in INITS else None


def nspawn_argv(
    rootfs: Path,
    name: str,
    network_options: Sequence[str] = ("--private-network",),
    init: Sequence[str] | None = None,
    *,
    init_options: Sequence[str] = ("--notify-ready=yes",),
    masks: Sequence[str] = MASKS,
) -> list[str]:
    """network_options: from network.py; only lo by default, so machines never fight over the host's ports.
    init: the image's own init command, run as PID 1 in place of --boot's search for one, with
    exactly its arguments. init_options: how nspawn learns the init is up and stops it, masks: the
    units masked at run time (both from inits.Init)."""
    argv = [
        "systemd-nspawn",
        "--quiet",
        *(() if init else ("--boot",)),
        f"--directory={rootfs}",
        f"--machine={name}",
        "--volatile=overlay",  # writes go to a tmpfs; the store's copy stays pristine
        *network_options,
        "--link-journal=no",
        *init_options,
        "--console=read-only",
        *masks,
    ]
    if has_machined():
        argv.append("--register=yes")
    else:
        argv += ["--register=no", "--keep-unit"]
    return [*argv, "--", *(init or ())]


def machine_cgroup(name: str) -> Path | None:
    """A cgroup of the machine's own, where no machined makes one.

    With --keep-unit, nspawn puts the container in its caller's cgroup. Two
    machines started from one cgroup would share it, and each one's systemd
    would create and remove the other's service cgroups ("Failed to spawn
    executor: No such file or directory"). machined gives each machine a
    scope; without it, racker does the same.
    """
    if has_machined():
        return None
    return cgroups.for_machine(name)


def nspawn_env() -> dict[str, str]:
    """Give every machine a pure cgroup v2 hierarchy.

    On a host with the hybrid layout (cgroup v1 controllers, cgroup2 beside
    them), nspawn would hand the container the legacy v1 hierarchy, and
    systemd >= 258 (Debian sid) refuses to boot on that. Every systemd since
    230 runs on v2. RACKER_NSPAWN_UNIFIED=0 restores nspawn's own choice, for
    images older than that.
    """
    if not settings.NSPAWN_UNIFIED.value():
        return {}
    return {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
