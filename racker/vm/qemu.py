"""VMs: a disk booted in QEMU until SSH answers and the boot has finished.

The disk itself is never written: the VM boots a qcow2 overlay over it. Every
VM gets its own run directory, root's alone (overlay, NoCloud seed, SSH key,
serial log, QMP sockets, UEFI variables), recorded in racker's registry before QEMU
starts, so that `racker gc` can clean up after a kill -9. SSH is forwarded
from a port on 127.0.0.1 chosen under a lock shared by all racker processes.

    with VM(disk) as vm:
        vm.run(["systemctl", "is-system-running"])
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from racker import machines, proc, progress, settings, store
from racker.cpu import accel
from racker.errors import (
    BootTimeout,
    ChannelUnavailable,
    GuestDied,
    RackerError,
    ToolMissing,
    ToolTimeout,
    Unreachable,
    VMError,
    VMLaunchFailure,
)
from racker.machines import State, network, sockets
from racker.proc import Result
from racker.vm import boards, boot_clock, bridge, disks, guest_agent, guest_shell, ports, seed, ssh, warm

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

DEFAULT_MEMORY = 1024
DEFAULT_CPUS = 2
KIND = ports.KIND  # the registry's kind of VMs, named once (ports reads the registry too)
# -- the VM -----------------------------------------------------------------


class VM(warm.WarmBoot, machines.Guest):
    """A disk booted in QEMU. Use as a context manager: it is stopped on the way out."""

    kind = KIND

    def __init__(
        self,
        disk: Path,
        name: str | None = None,
        *,
        image: str = "",
        digest: str = "",
        memory: int = DEFAULT_MEMORY,
        cpus: int = DEFAULT_CPUS,
        accelerator: str | None = None,
        firmware: str | None = None,
        disk_size: int | None = None,
        boot_timeout: float | None = None,
        detached: bool = False,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str = "",
        tcg_cpu: str | None = None,
        machine: str = "pc",
        warm: bool = False,
        seed_snapshot: bool = False,
        user_data: dict | None = None,
        network_mode: str = bridge.USER,
        publish: Sequence[network.Publish] = (),
        network_alias: str | None = None,
    ) -> None:
        """network_mode: `user` (QEMU's user-mode NIC only), `nat` or a private network's name
        (bridge.py: a tap on that bridge, first, beside the user-mode NIC racker's SSH uses);
        publish: ports forwarded from the host to the VM's bridge address (nat)."""
        self.disk = Path(disk).absolute()
        self.image = image or self.disk.name
        self.digest = digest
        self.name = machines.check_name(name) if name else machines.unique_name(self.image)
        self.memory = memory
        self.cpus = cpus
        self.requested_accel = accelerator
        self.firmware = firmware
        self.disk_size = disk_size
        self.boot_timeout = settings.VM_BOOT_TIMEOUT.value() if boot_timeout is None else boot_timeout
        self.detached = detached
        # Direct kernel boot, for disks without a bootloader (a Firecracker rootfs).
        self.kernel = Path(kernel).absolute() if kernel else None
        self.initrd = Path(initrd).absolute() if initrd else None
        self.append = append
        self.tcg_cpu = tcg_cpu or settings.TCG_CPU.value()
        self.machine = machine
        self.user_data = user_data  # more cloud-config for the seed, beside racker's user and hostname
        self.board = boards.board(machine)
        if self.board.foreign_cpu:
            self.boot_timeout *= boards.FOREIGN_SLOWDOWN  # a whole other CPU emulated: boots take minutes
        self.warm = warm  # restore the disk's snapshot, or save one after this boot (racker.vm.snapshots)
        # Boot cold, and save the disk's snapshot once ready if there is none: a real first
        # boot that spares later warm VMs one of their own.
        self.seed_snapshot = seed_snapshot and not user_data
        self.restored_from: str = ""  # the snapshot restored, if it was
        self.restored_hostname = ""  # what the snapshotted VM was named, and so its guest
        if warm and user_data:
            # A snapshot's guest ran cloud-init long ago, on the seed of the VM that made it.
            raise VMError("a warm VM restores a snapshot, whose cloud-init ran already: user-data needs a cold boot")
        self.bridge: bridge.Bridged | None = None
        if network_mode != bridge.USER:
            if warm or seed_snapshot:
                raise VMError("a warm VM restores a snapshot taken on QEMU's user-mode network", hint="boot it cold on a bridge")
            self.bridge = bridge.Bridged(network_mode, publish, network_alias)
        elif publish:
            raise VMError("--publish needs a bridge to publish from", hint="add --network nat")
        if not self.board.firmware and self.kernel is None:
            raise VMError(f"a {machine} machine boots only a kernel given directly", hint="give the VM a kernel (and initrd)")
        self.state: State | None = None
        self.endpoint: ssh.Endpoint | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._master: subprocess.Popen[bytes] | None = None  # the SSH connection master, if this process started it
        self._monitor: QEMUMonitorProtocol | None = None  # one QMP client for the VM's life
        self.argv: list[str] = []
        self._incoming: str = ""  # QEMU's -incoming while restoring a snapshot
        self._rundir_fd = -1  # the run directory, open for QEMU to bind its sockets in (racker.machines.sockets)
        self.boot_seconds = 0.0
        self.system_state = ""

    # -- paths ---------------------------------------------------------------

    def qmp_path(self, *, shared: bool = False) -> Path:
        """A QMP socket, in the run directory: whoever may connect can make QEMU run any command
        as root (`migrate exec:`), so only root may. The first is kept by the process that
        launched QEMU; `shared` is for any other."""
        return self.rundir / ("qmp-shared" if shared else "qmp")

    # -- lifecycle -----------------------------------------------------------

    @classmethod
    def attach(cls, name: str) -> VM:
        """A running VM from the registry, started by this or another racker process."""
        state = machines.load(KIND, name)
        if state is None or machines.is_stale(state):
            raise VMError(f"no running VM named {name!r}", hint="see `racker vm ps`")
        vm = cls(Path(state.extra.get("disk", "/")), name, image=state.image, digest=state.digest)
        vm.state = state
        vm.detached = state.owner == 0
        vm.endpoint = _endpoint(state)
        return vm

    def start(self) -> VM:
        started = time.monotonic()
        state = machines.new_state(KIND, self.name, self.image, self.digest, extra={"disk": str(self.disk)})
        machines.claim(state)  # recorded before anything is made
        self.state = state  # a detached VM is handed over once it runs (detach())
        try:
            machines.make_run_dir(self.kind, self.name)
            if self.bridge is not None:
                self.bridge.setup(state, self.rundir, detached=self.detached)  # a published port in use fails here
            info = disks.inspect_disk(self.disk, self.rundir, bootable=self.kernel is None)
            firmware = self.firmware or info.firmware
            deadline = started + self.boot_timeout
            with progress.step(f"booting {self.name} ({firmware}, {self.accelerator()}{', warm' if self.warm else ''})"):
                if self.warm:
                    self.warm_boot(info, firmware, deadline)
                elif self.seed_snapshot:
                    self.seed_boot(info, firmware, deadline)
                else:
                    self._cold_boot(info, firmware, deadline)
            if self.bridge is not None:
                self.bridge.start_forwarder(state, detached=self.detached)
        except BaseException as error:
            if isinstance(error, RackerError):
                error.evidence.update(self.boot_evidence())  # before stop() removes the console log
            self.stop(grace=0)
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def boot_evidence(self) -> dict[str, str]:
        return {**super().boot_evidence(), "qemu.log": machines.read_capped(self.rundir / "qemu.log")}

    def accelerator(self) -> str:
        if not hasattr(self, "_chosen_accel"):
            # Another architecture's board is emulated whatever the host's KVM can do.
            self._chosen_accel = "tcg" if self.board.foreign_cpu else accel.choose(self.requested_accel)
        return self._chosen_accel

    def _cold_boot(self, info: disks.DiskInfo, firmware: str, deadline: float) -> None:
        self._prepare_files(info, firmware)
        self._launch(firmware)
        self._wait_ready(deadline)

    @property
    def hostname(self) -> str:
        return self.restored_hostname or self.name

    def step_clock(self) -> None:
        """Set the guest's clock to ours: it stood still while the VM was paused (saved, or
        restored). Sent on a root channel already open, so it lands one round trip after the
        time it carries."""
        self.run_expect([0], ["true"], timeout=30)
        self.run_expect([0], ["date", "-s", f"@{time.time():.6f}"], timeout=30)

    def reconnect(self, deadline: float) -> None:
        """The connection master of a guest whose sshd runs already (restored, or just
        snapshotted), retried until the deadline: a busy guest may drop the first handshakes."""
        assert self.endpoint is not None
        while True:
            try:
                self.connection(timeout=max(deadline - time.monotonic(), 5), connect_timeout=3)
                return
            except Unreachable:
                if not self._alive() or time.monotonic() > deadline:
                    raise BootTimeout(f"VM {self.name!r}", self.boot_timeout, machines.console_tail(self.console_log)) from None
                time.sleep(0.1)

    def _reset(self) -> None:
        """Back to a claimed VM with an empty run directory, after a failed restore."""
        assert self.state is not None
        self.close_connection()
        self._power_off(0)
        self._close_qmp()
        self._child = None
        self.endpoint = None
        self.state.pid = 0
        machines.make_run_dir(self.kind, self.name)

    def _prepare_files(self, info: disks.DiskInfo, firmware: str) -> None:
        assert self.state is not None
        key = ssh.keygen(self.rundir / "id_ed25519", f"racker@{self.name}")
        bootcmd = self.bridge.seed_bootcmd() if self.bridge is not None else []
        seed.build(self.rundir / "seed.iso", self.name, key.with_suffix(".pub").read_text(), self.user_data, bootcmd)
        overlay = self.rundir / "overlay.qcow2"
        size = [str(self.disk_size)] if self.disk_size and self.disk_size > info.virtual_size else []
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.disk), "-F", info.format, str(overlay), *size]
        proc.run(argv, umask=proc.PRIVATE)
        if firmware == "uefi":
            code, variables = self._uefi_firmware()
            store.copy_private(Path(variables), self.rundir / "OVMF_VARS.fd")
            self.state.extra["ovmf"] = code
        self.state.extra["firmware"] = firmware
        self.state.extra["format"] = info.format
        self.state.extra["machine"] = self.machine
        machines.save(self.state)

    def _uefi_firmware(self) -> tuple[str, str]:
        """The board's UEFI firmware (code, variables): OVMF for a PC, AAVMF for arm64's virt."""
        if not self.board.uefi:
            return boards.ovmf()
        code, variables = self.board.uefi
        if not os.path.isfile(code) or not os.path.isfile(variables):
            raise ToolMissing(f"UEFI firmware for {self.board.binary} ({code})", "qemu-efi-aarch64")
        return code, variables

    def qemu_argv(self, firmware: str, port: int) -> list[str]:
        """QEMU's command line; it binds its sockets through self._rundir_fd, which it inherits."""
        accelerator = self.accelerator()
        run = self.rundir
        qmp, qmp_shared = (sockets.through(self._rundir_fd, path.name) for path in (self.qmp_path(), self.qmp_path(shared=True)))
        argv = [
            proc.require(self.board.binary),
            "-name", f"{self.name},debug-threads=on",
            "-machine", self.board.machine, "-accel", accelerator,
            "-cpu", "host" if accelerator == "kvm" else (self.board.foreign_cpu or self.tcg_cpu),
            "-smp", str(self.cpus), "-m", str(self.memory),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-chardev", f"file,id=serial0,path={self.console_log}", "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qmp-shared,path={qmp_shared},server=on,wait=off",
            "-mon", "chardev=qmp-shared,mode=control",
            *(arg for controller in self.board.controllers for arg in ("-device", controller)),
            "-drive", f"if=none,id=disk0,file={run / 'overlay.qcow2'},format=qcow2,discard=unmap,cache=unsafe",
            "-device", self.board.disk.format(i=0, drive="disk0") + ("" if self.kernel else ",bootindex=0"),
            "-drive", f"if=none,id=seed0,file={run / 'seed.iso'},format=raw,readonly=on",
            "-device", (self.board.seed or self.board.disk).format(i=1, drive="seed0"),
            *(self.bridge.qemu_args(self.board.nic) if self.bridge is not None else ()),
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", f"{self.board.nic},netdev=net0",
            *(("-device", self.board.rng) if self.board.rng else ()),
        ]  # fmt: skip
        if self.warm or self.seed_snapshot:
            argv += guest_agent.qemu_args(self.board.serial_bus, sockets.through(self._rundir_fd, guest_agent.SOCKET))
        if self.kernel is not None:
            append = self.append or "root=/dev/vda rw console=ttyS0"
            if not self.board.tsc_reference and accelerator == "tcg" and (khz := boards.host_tsc_khz()):
                append += f" tsc_early_khz={khz}"
            argv += ["-kernel", str(self.kernel), "-append", append]
            if self.initrd is not None:
                argv += ["-initrd", str(self.initrd)]
        if self._incoming:
            argv += ["-incoming", self._incoming]
        if firmware == "uefi":
            assert self.state is not None
            argv += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={self.state.extra['ovmf']}",
                "-drive", f"if=pflash,format=raw,unit=1,file={run / 'OVMF_VARS.fd'}",
            ]  # fmt: skip
        return argv

    def _launch(self, firmware: str) -> None:
        """Start QEMU with a port no other racker process can take; connect to its QMP."""
        assert self.state is not None
        for _attempt in range(3):
            with ports.ssh_port(self.state) as port:
                self._rundir_fd = sockets.open_directory(self.rundir)
                try:
                    self.argv = self.qemu_argv(firmware, port)
                    with open(self.rundir / "qemu.log", "wb") as log:
                        self._child = proc.start(
                            self.argv,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            new_session=True,  # a Ctrl-C on our terminal is ours to handle
                            die_with_parent=None if self.detached else signal.SIGKILL,
                            # Restoring, QEMU writes the state's pages all over the guest's RAM: with
                            # huge pages each first write costs the host a 2 MiB clear, most of
                            # a second per restore in all (bench/bench_warm.py).
                            huge_pages=not self._incoming,
                            pass_fds=[self._rundir_fd],
                            umask=proc.PRIVATE,  # its sockets, and a snapshot's memory written by its migration
                        )
                finally:
                    os.close(self._rundir_fd)
                    self._rundir_fd = -1
                self.state.pid = self._child.pid
                self.state.pid_start = proc.start_time(self._child.pid)
                machines.save(self.state)
                if self._wait_qmp(time.monotonic() + 30):
                    break  # QMP answers only after every netdev is set up: the port is bound
            output = (self.rundir / "qemu.log").read_text(errors="replace").strip()
            if "hostfwd" not in output and "forwarding" not in output:
                raise VMLaunchFailure(self._child.returncode, self.argv, output or machines.console_tail(self.console_log))
        else:
            raise VMLaunchFailure(self._child.returncode if self._child else None, self.argv, "no free port for SSH forwarding")
        self.endpoint = _endpoint(self.state)

    def _wait_qmp(self, deadline: float) -> bool:
        """True once QEMU's QMP socket answers; False if QEMU exited first."""
        assert self._child is not None
        while time.monotonic() < deadline:
            if self._child.poll() is not None:
                return False
            # Refused or dropped (qemu.qmp's ConnectError) while QEMU starts or dies: look again.
            with contextlib.suppress(Exception):
                self.qmp(["query-status"])
                return True
            time.sleep(0.05)
        raise VMLaunchFailure(None, self.argv, "QEMU did not open its QMP socket")

    def qmp(self, command: Sequence[str] | str, **arguments: object) -> object:
        """One QMP command on the VM's QMP connection, opened on first use and kept until stop()."""
        name = command if isinstance(command, str) else command[0]
        monitor = self._monitor or self._connect_qmp()
        try:
            reply = monitor.cmd_raw(name, dict(arguments) or None)
        except BaseException:
            self._close_qmp()  # dropped, or half-read: the next call connects again
            raise
        if "error" in reply:
            raise VMError(f"QMP {name} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def _connect_qmp(self) -> QEMUMonitorProtocol:
        """qemu.qmp's synchronous client on the VM's monitor: the first for the process that
        launched QEMU, the second for any other (QEMU serves one client per monitor)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        _quiet_library_logs()
        with sockets.short_path(self.qmp_path(shared=self._child is None)) as address:
            monitor = QEMUMonitorProtocol(address)
            try:
                monitor.connect(negotiate=True)
            except BaseException:
                monitor.close()
                raise
        monitor.settimeout(10)
        self._monitor = monitor
        return monitor

    def detach(self) -> None:
        self._close_qmp()  # the monitor is kept by the process that stops the VM, which is no longer us
        super().detach()

    def _close_qmp(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.close()

    def _alive(self) -> bool:
        if self._child is not None:
            return self._child.poll() is None
        return self.state is not None and proc.alive(self.state.pid, self.state.pid_start, self.state.boot_id)

    def _exit_status(self) -> int | None:
        return self._child.returncode if self._child is not None else None

    def _wait_ready(self, deadline: float) -> None:
        """SSH answers with our key and the guest's init says the boot has finished (WAIT_BOOTED).

        The deadline stretches for a guest that a busy host starves (racker.vm.boot_clock)."""
        assert self.endpoint is not None
        clock = boot_clock.BootClock(deadline, self.boot_timeout, self._cpu_seconds)
        greeted = False
        while True:
            if not self._alive():
                raise VMLaunchFailure(self._exit_status(), self.argv, machines.console_tail(self.console_log))
            if clock.overdue():
                raise self._boot_timeout(clock)
            if died := _console_has(self.console_log, GUEST_DEATH):
                tail = machines.console_tail(self.console_log, lines=60)
                raise GuestDied(
                    f"the guest kernel of VM {self.name!r} {GUEST_DEATH[died]} while booting", hint="last console lines:\n" + tail
                )
            # Wait for sshd's banner in-process: an ssh client started twice a second
            # for the half minute sshd takes would take host CPU from the guest. Once
            # only: sshd >= 9.8 counts connections that never log in against us.
            if not greeted:
                greeted = self.endpoint.answers(timeout=5)
                if not greeted:
                    time.sleep(0.25)
                    continue
            # The connection master both proves SSH and carries every later command:
            # under emulation each SSH handshake costs the guest a second of CPU.
            try:
                self.connection(timeout=max(clock.deadline - time.monotonic(), 5), connect_timeout=3)
                result = self.endpoint.run(WAIT_BOOTED, root=False, timeout=max(clock.deadline - time.monotonic(), 5), connect_timeout=3)
                break
            except Unreachable:
                pass
            except ToolTimeout:
                if clock.overdue():
                    raise self._boot_timeout(clock) from None
            time.sleep(0.5)
        self.system_state = result.stdout.strip()
        assert self.state is not None
        self.state.extra["system_state"] = self.system_state
        machines.save(self.state)

    def _cpu_seconds(self) -> float | None:
        """The CPU time QEMU has had (all its vCPU threads), None if it is not running."""
        return proc.cpu_seconds(self.state.pid) if self.state is not None and self.state.pid else None

    def _boot_timeout(self, clock: boot_clock.BootClock) -> BootTimeout:
        return BootTimeout(f"VM {self.name!r}", self.boot_timeout, machines.console_tail(self.console_log), extended=clock.extended)

    def stop(self, grace: float = 0.0) -> None:
        """Power the VM off and remove everything it had: process, overlay, seed, port, record.

        With grace, the guest gets an ACPI power-off request first; then QMP
        `quit`, SIGTERM, SIGKILL, each with a bounded wait.
        """
        state = self.state
        if state is None:
            return
        try:
            self.close_connection()  # first: a master would otherwise wait for the dead guest to time out
            self._power_off(grace)
        finally:
            self._close_qmp()
            bridge.release(state)  # its DHCP server, address and tap; the bridge after the last
            if self.bridge is not None:
                self.bridge.close()
            store.remove_tree(state.rundir)
            machines.release(state)
            self.state = None

    def _power_off(self, grace: float) -> None:
        state = self.state
        assert state is not None
        if state.pid and self._alive():
            if grace > 0:
                with contextlib.suppress(Exception):
                    self.qmp("system_powerdown")
                self._wait_gone(grace)
            if self._alive():
                with contextlib.suppress(Exception):
                    self.qmp("quit")
                if not self._wait_gone(3):
                    proc.signal_process(state.pid, state.pid_start, state.boot_id, signal.SIGTERM)
                    if not self._wait_gone(3):
                        proc.signal_process(state.pid, state.pid_start, state.boot_id, signal.SIGKILL)
                        self._wait_gone(5)
        elif self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(5)

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive():
                if self._child is not None:
                    self._child.wait()
                return True
            time.sleep(0.05)
        return False

    # -- the SSH connection --------------------------------------------------

    def connection(self, *, timeout: float = 60, connect_timeout: float = 5) -> tuple[int, int]:
        """The VM's SSH connection master, (pid, start time): started on first use and
        again if it died, recorded for stop() and `racker gc`; Unreachable if it cannot log in.

        Any racker process may start it (`racker vm ssh` on a VM another one runs);
        the VM's lock file keeps two from starting one each.
        """
        assert self.state is not None and self.endpoint is not None
        running = self._recorded_master(self.state)
        if running:
            return running
        with _flocked(self.rundir / "ssh.lock"):
            current = machines.load(KIND, self.name)
            if current is None or current.token != self.state.token:
                raise VMError(f"VM {self.name!r} is not running")
            running = self._recorded_master(current)
            if running:  # another process replaced it meanwhile
                machines.set_helper(self.state, SSH_MASTER, *running)
                return running

            def record(master: subprocess.Popen[bytes]) -> None:
                self._master = master
                for state in (current, self.state):
                    machines.set_helper(state, SSH_MASTER, master.pid, proc.start_time(master.pid))
                machines.save(current)

            # It dies with us only if the VM does: a `racker vm ssh` leaves it to the VM's stop or gc.
            owned = self._child is not None and not self.detached
            die = signal.SIGKILL if owned else None
            self.endpoint.start_master(record, die_with_parent=die, timeout=timeout, connect_timeout=connect_timeout)
            return machines.helpers(self.state)[SSH_MASTER]

    @staticmethod
    def _recorded_master(state: State) -> tuple[int, int] | None:
        master = machines.helpers(state).get(SSH_MASTER)
        return master if master and proc.alive(*master, state.boot_id) else None

    def close_connection(self) -> None:
        """Close the SSH connection master (`ssh -O exit`, else SIGKILL) and remove its socket."""
        state, endpoint = self.state, self.endpoint
        if state is None or endpoint is None:
            return
        guest_shell.close(state.token)  # this process's root channel rides it: its guest server ends on EOF
        guest_agent.close(state.token)  # not on SSH, but closed with it: a save must not find it open
        current = machines.load(KIND, self.name)
        if current is not None and current.token == state.token:
            state.extra["helpers"] = current.extra.get("helpers", {})  # another process may have replaced it
        master = self._recorded_master(state)
        if master:
            with contextlib.suppress(ToolTimeout):
                endpoint.exit_master()
            if not proc.wait_exit(master[0], 3):
                proc.kill_and_wait(*master, state.boot_id)
        if self._master is not None:
            proc.terminate(self._master, grace=1)  # reaps ours, whichever master it was
            self._master = None
        if endpoint.control_socket is not None:
            endpoint.control_socket.unlink(missing_ok=True)

    # -- commands ------------------------------------------------------------

    def run(self, argv: Sequence[str], *, root: bool = True, input: bytes | None = None, timeout: float | None = 600) -> Result:
        """Run a command in the VM over SSH (as root unless root=False), on its one connection.

        As root it goes to this process's root channel (guest_shell): one round trip,
        not a session and a sudo per command; to sudo per command if the guest cannot run one.
        """
        if self.endpoint is None or self.state is None:
            raise VMError(f"VM {self.name!r} is not running")
        if root and self.state.extra.get("agent"):
            with contextlib.suppress(ChannelUnavailable):  # another process holds it: SSH then
                return guest_agent.channel(self).run(argv, input=input, timeout=timeout)
        self.connection()
        if root:
            server = self.endpoint.argv(guest_shell.SERVER_ARGV)
            log = self.rundir / f"guest-shell-{os.getpid()}.log"
            with contextlib.suppress(ChannelUnavailable):
                channel = guest_shell.channel(self.state.token, server, cwd=self.endpoint.cwd, log=log, name=f"VM {self.name!r}")
                return channel.run(argv, input=input, timeout=timeout)
        return self.endpoint.run(argv, root=root, input=input, timeout=timeout)

    def interact(self, argv: Sequence[str], *, tty: bool | None = None, root: bool = False) -> int:
        """Run wired to our own terminal, on the VM's connection (an empty command is a login shell)."""
        if self.endpoint is None or self.state is None:
            raise VMError(f"VM {self.name!r} is not running")
        self.connection()
        return self.endpoint.interact(argv, tty=tty, root=root)

    def check_output(self, argv: Sequence[str], **kwargs: object) -> str:
        __tracebackhide__ = True
        return self.run_expect([0], argv, **kwargs).stdout


SSH_MASTER = "ssh master"  # its name among the record's helpers


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """An exclusive lock on a file of the VM's run directory (it goes with the directory)."""
    try:
        handle = open(path, "a")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise VMError(f"VM {path.parent.name!r} is not running") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _quiet_library_logs() -> None:
    """Keep qemu.qmp's and asyncio's log records off a user's terminal (--debug shows them).

    A Ctrl-C that lands while qemu.qmp negotiates interrupts its event loop;
    the library then logs errors and asyncio logs the abandoned task with a
    traceback at exit. racker reports the interrupt itself, in one line, and
    stops the VM in its `finally`.
    """
    import logging

    if not proc.debugging():
        for name in ("qemu.qmp", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _endpoint(state: State) -> ssh.Endpoint:
    return ssh.Endpoint("127.0.0.1", int(state.extra["ssh_port"]), seed.USER, state.rundir / "id_ed25519", control=state.rundir)


# Returns when the boot has finished (cloud-init's last stage is part of it), asked of the guest's
# own init: systemd's state; else (sysvinit, OpenRC) inittab's default runlevel reached with its rc
# finished: no /etc/init.d/rc, openrc, startpar or insserv-ordered script still running, and no
# copy of init about to exec one. Looked at twice in a row, half a second apart: init records the
# runlevel before it forks the rc (see racker.machines.inits.SysVinit). Prints the state ("running").
WAIT_RC_BOOTED = r"""
PATH=$PATH:/sbin:/usr/sbin  # runlevel: the seed's user's PATH lacks /sbin
level=$(sed -n 's/^[^#:]*:\([0-9]\):initdefault:.*/\1/p' /etc/inittab | head -n 1)
seen=0
while [ $seen -lt 2 ]; do
    sleep 0.5
    if [ "$(runlevel | cut -d ' ' -f 2)" = "$level" ] \
        && ! ps -eo args= | grep -Eq '^(/bin/sh )?/etc/init\.d/rc |(^|/)(openrc|openrc-run|startpar) ' \
        && [ "$(ps -eo args= | grep -cE '^(init \[|/sbin/init)')" -le 1 ]; then
        seen=$((seen + 1))
    else
        seen=0
    fi
done
echo running
"""
WAIT_BOOTED = (
    "sh", "-c",
    "if [ -d /run/systemd/system ]; then exec systemctl is-system-running --wait; fi" + WAIT_RC_BOOTED,
)  # fmt: skip
# What a guest prints when it is dead and will never answer (no use waiting for the timeout),
# and what it did. initramfs-tools gives up on a missing root after rootdelay, then waits at a shell.
GUEST_DEATH = {
    b"Kernel panic - not syncing": "panicked",
    b"---[ end Kernel panic": "panicked",
    b"Gave up waiting for root": "found no root filesystem",
}


def _console_has(path: Path, needles: dict[bytes, str], size: int = 16384) -> bytes | None:
    """The first of `needles` in the console's last `size` bytes, or None."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - size))
            tail = handle.read()
    except FileNotFoundError:
        return None
    return next((needle for needle in needles if needle in tail), None)
