"""The root channel on a virtio-serial port: commands in a restored VM with no SSH handshake.

A warm VM's snapshot is saved with AGENT running in the guest: the root
channel's server (racker.vm.guest_shell) reading a virtio-serial port instead of
an SSH session's pipe, started over SSH just before the save. Every clone
restored from the snapshot has it running already, so its first command costs
neither an SSH handshake nor a sudo, each seconds of emulated work under TCG:
the clock is stepped over it, and the clone is ready about a second after QEMU
has loaded the state. SSH itself connects on first use.

The port's host end is a unix socket of QEMU's in the VM's run directory (root's
alone: whoever holds it has a root shell in the guest), which serves one client at a
time: the process holding it keeps a lock on a file of the VM's run
directory, and any other process takes the SSH root channel instead.

A port outlives its host connections, and a host may go mid-frame. So each
connection begins with a hello frame carrying a nonce; the guest, when it has
lost track (the host went away, a frame made no sense), scans the raw stream
for the next hello, and the host discards everything before the answer that
carries its nonce (such as the reply to a gone host's last command).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import secrets
import select
import socket
import time
from pathlib import Path
from typing import IO

from racker import machines
from racker.errors import ChannelUnavailable
from racker.machines import Guest, sockets
from racker.vm import guest_shell

PORT = "org.racker.agent.0"
GUEST_PATH = "/run/racker-agent.py"  # tmpfs: in the saved memory, gone at the next real boot
UNIT = "racker-agent"
HELLO = b"racker-guest-shell 1 "
HELLO_TIMEOUT = 20.0  # a restored agent answers within its 0.1 s poll; a busy host may take seconds

# Runs in the guest as root (any python3 >= 3.5), started by systemd-run (else setsid). While no host
# is connected a read returns at once with nothing, so it polls ten times a second.
AGENT = (
    "# racker-guest-agent"
    + guest_shell.EXECUTE
    + r"""
import time
# The port; or a descriptor it inherited (tests/test_guest_agent.py's stand-in for one).
fd = int(sys.argv[1]) if sys.argv[1].isdigit() else os.open(sys.argv[1], os.O_RDWR)
buf = b""
class Reset(Exception):
    pass
def fill():
    global buf
    chunk = os.read(fd, 1 << 16)
    if not chunk:  # no host end: what came before belonged to a host that has gone
        buf = b""
        time.sleep(0.1)
        raise Reset
    buf += chunk
def take(n):
    global buf
    while len(buf) < n:
        fill()
    data, buf = buf[:n], buf[n:]
    return data
def send(out):
    while out:
        out = out[os.write(fd, out):]
def hello(nonce):
    send(frames(b"racker-guest-shell 1 " + nonce))
def resync():
    global buf
    mark = b'{"hello": "'
    while True:
        at = buf.find(mark)
        end = buf.find(b'"}', at) if at >= 0 else -1
        if end >= 0:
            nonce, buf = buf[at + len(mark):end], buf[end + 2:]
            return hello(nonce)
        if at < 0:
            buf = buf[-len(mark):]
        fill()
synced = False
while True:
    try:
        if not synced:
            resync()
            synced = True
            continue
        size = struct.unpack(">Q", take(8))[0]
        if size > 1 << 30:
            raise Reset
        request = json.loads(take(size).decode())
        if "hello" in request:
            hello(request["hello"].encode())
            continue
        send(frames(*execute(request, take(struct.unpack(">Q", take(8))[0]))))
    except (Reset, ValueError, KeyError, TypeError):
        synced = False
"""
)


SOCKET = "agent"  # QEMU's end of the port, in the VM's run directory


def qemu_args(serial_bus: str, socket_path: str) -> list[str]:
    """The virtio-serial controller, the port and its socket (a path QEMU binds; see racker.machines.sockets),
    for a VM that may be snapshotted."""
    return [
        "-device", f"{serial_bus},id=agentbus",
        "-chardev", f"socket,id=agent0,path={socket_path},server=on,wait=off",
        "-device", f"virtserialport,bus=agentbus.0,chardev=agent0,name={PORT}",
    ]  # fmt: skip


class AgentChannel(guest_shell.Channel):
    """The root channel's protocol on the port's socket, held under the VM's agent lock."""

    def __init__(self, socket_path: Path, lock: Path, name: str) -> None:
        super().__init__([], name=name)
        self.socket_path = socket_path
        self.lock_path = lock
        self.sock: socket.socket | None = None
        self._lock: IO[str] | None = None

    def _start(self, timeout: float) -> None:
        self._buffer.clear()
        try:
            lock = open(self.lock_path, "a")  # noqa: SIM115 (kept open while the socket is ours)
        except FileNotFoundError:
            raise ChannelUnavailable(f"{self.name} is not running") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ChannelUnavailable(f"another process holds the agent of {self.name}") from None
        self._lock = lock
        try:
            self.sock = sockets.connect(self.socket_path)
            self._greet(time.monotonic() + min(timeout, HELLO_TIMEOUT))
        except (OSError, TimeoutError, guest_shell._Closed):
            self.close()
            self.unavailable = True  # no agent in this guest: not worth a wait per command
            raise ChannelUnavailable(f"the agent of {self.name} did not answer") from None

    def _greet(self, deadline: float) -> None:
        """Say hello until the agent answers the last one; drop everything before that answer.

        Again each second: a gone host's half frame may have swallowed the first. The
        agent answers in order, so once the last is answered no earlier answer can follow."""
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            nonce = secrets.token_hex(8)
            self._send(guest_shell.frame(json.dumps({"hello": nonce}).encode()))
            answer = HELLO + nonce.encode()
            retry = min(deadline, time.monotonic() + 1.0)
            with contextlib.suppress(TimeoutError):  # not answered within the second: say it again
                while (at := self._buffer.find(answer)) < 0:
                    self._fill(retry)
                del self._buffer[: at + len(answer)]
                return

    def _usable(self) -> bool:
        return self.sock is not None and not self._buffer and not select.select([self.sock], [], [], 0)[0]

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def _fd(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()


def channel(vm: Guest) -> guest_shell.Channel:
    """This process's agent channel to the VM; ChannelUnavailable if it has none, or another process holds it."""
    assert vm.state is not None
    if not vm.state.extra.get("agent"):
        raise ChannelUnavailable(f"VM {vm.name!r} has no agent")
    token, name = vm.state.token, f"VM {vm.name!r}"
    return guest_shell.registered(key(token), lambda: AgentChannel(vm.rundir / SOCKET, vm.rundir / "agent.lock", name), name)


def key(token: str) -> str:
    return f"{token}/agent"


def close(token: str) -> None:
    guest_shell.close(key(token))


def start_in_guest(vm: Guest) -> bool:
    """Start the agent in the running guest (over SSH); True once it answers on the port.
    False (with the VM unchanged but for a stray unit) if the guest cannot run it."""
    assert vm.state is not None
    put = vm.run(["sh", "-c", f"cat > {GUEST_PATH}"], input=AGENT.encode(), timeout=60)
    agent = ["python3", GUEST_PATH, f"/dev/virtio-ports/{PORT}"]
    # A unit of its own under systemd; under another init (sysvinit, OpenRC), a session of its own,
    # detached from this SSH session's.
    run = [
        "sh", "-c",
        'if [ -d /run/systemd/system ]; then exec systemd-run "$@"; fi; shift 3; exec setsid -f "$@" </dev/null >/dev/null 2>&1',
        "sh", f"--unit={UNIT}", "--quiet", "--collect", *agent,
    ]  # fmt: skip
    started = put.returncode == 0 and vm.run(run, timeout=60).returncode == 0
    vm.state.extra["agent"] = started
    close(vm.state.token)  # a channel to an earlier agent
    if started:
        try:
            channel(vm).run(["true"], timeout=30)
        except ChannelUnavailable:
            vm.state.extra["agent"] = False
    machines.save(vm.state)  # other processes' commands look for it there
    return bool(vm.state.extra["agent"])
