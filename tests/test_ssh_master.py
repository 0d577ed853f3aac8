"""One SSH connection per VM for its whole life: every command rides the VM's connection master,
and root commands one root channel per process on it (guest_shell).

One VM of debian-bookworm serves the whole module, restored from the run's snapshot
(conftest's first_boot): what is tested here is the connection, not a first boot. It
is owned by a separate racker process, so that the last test can kill -9 it and let
`racker gc` clean up; its store sits under a path far past the 108 bytes a unix
socket's path may have. That process holds the VM's agent port, so root commands
from this one go over SSH, as they do to a VM without one.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, warm_store
from racker import machines, proc
from racker.errors import ToolTimeout, Unreachable
from racker.upkeep import gc
from racker.vm import guest_shell, ssh
from racker.vm.qemu import SSH_MASTER, VM

# One worker runs every test that restores the run's first boot (conftest.first_boot): no other waits for it.
pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.xdist_group("warm-vms")]

# The racker process that owns the VM. detached=True without detach(): like a
# `racker vm start` killed before it handed the VM over, its QEMU and master
# outlive a kill -9 of it, and only gc removes them.
HOLDER = r"""
import sys
from pathlib import Path
from racker.vm.qemu import VM

with VM(Path(sys.argv[1]), sys.argv[2], detached=True, warm=True) as vm:
    print(vm.connection()[0], vm.restored_from, flush=True)
    sys.stdin.read()  # until the test closes it, or kills us
"""

# Proof that commands share one TCP connection: the client's address and port as sshd saw them.
WHO = ["sh", "-c", 'echo "$SSH_CONNECTION"']
# The root channel's server in the guest (the parent of each command it runs): pgrep argv.
SERVERS = ["pgrep", "-f", "^python3 -c # racker-guest-shell"]
# Another process (a second pytest worker, say) attaching the same VM: its root channel's server.
OTHER = r"""
import sys
from racker.vm.qemu import VM

print(VM.attach(sys.argv[1]).check_output(["sh", "-c", "echo $PPID; tr '\\0' ' ' </proc/$PPID/cmdline"]), end="")
"""


@pytest.fixture(scope="module")
def booted(first_boot: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    disk = first_boot["disk"]
    home = tmp_path_factory.mktemp("ssh-master") / ("a-long-store-directory-name-" * 4) / "store"
    snapshot = warm_store(home, first_boot)
    name = f"ssh-master-{os.getpid()}"
    assert len(str(home / "run" / "qemu" / name / ssh.CONTROL_SOCKET)) > 108
    env = {**os.environ, "RACKER_HOME": str(home)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(disk), name], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        master, _, restored_from = holder.stdout.readline().strip().partition(" ")  # type: ignore[union-attr]
        assert master.isdigit(), f"the VM did not boot (exit {holder.wait()})"
        assert restored_from == snapshot.id, "the VM boots cold: the run's snapshot did not restore"
        yield {"name": name, "home": home, "holder": holder, "master": int(master)}
    finally:
        if holder.poll() is None:
            holder.stdin.close()  # type: ignore[union-attr]
            holder.wait(60)


@pytest.fixture
def vm(booted: dict, monkeypatch: pytest.MonkeyPatch) -> VM:
    """The module's VM, attached from this process (as `racker vm ssh` attaches)."""
    monkeypatch.setenv("RACKER_HOME", str(booted["home"]))
    return VM.attach(booted["name"])


def master_of(vm: VM) -> tuple[int, int]:
    state = machines.load("qemu", vm.name)
    assert state is not None
    return machines.helpers(state)[SSH_MASTER]


def check(vm: VM) -> subprocess.CompletedProcess[str]:
    """`ssh -O check`, asked as a user would, in the run directory."""
    argv = ["ssh", "-o", f"ControlPath={ssh.CONTROL_SOCKET}", "-O", "check", "racker@127.0.0.1"]
    return subprocess.run(argv, cwd=vm.rundir, capture_output=True, text=True, timeout=10)


def ssh_processes(rundir: Path) -> list[int]:
    """ssh processes working in the VM's run directory (the master and any client running now)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            is_ssh = entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == "ssh"
            if is_ssh and os.readlink(f"/proc/{entry}/cwd") == str(rundir):
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_commands_share_one_connection_master(booted: dict, vm: VM) -> None:
    master = master_of(vm)
    assert master[0] == booted["master"], "the master the VM's owner started is the one every process uses"
    seen = {vm.check_output(WHO, root=False) for _ in range(10)}
    assert len(seen) == 1, f"commands came over {len(seen)} connections: {seen}"
    assert master_of(vm) == master and proc.alive(*master, proc.boot_id())
    assert ssh_processes(vm.rundir) == [master[0]]
    checked = check(vm)
    assert checked.returncode == 0 and f"pid={master[0]}" in checked.stderr, checked.stderr


def test_results_are_exact(vm: VM) -> None:
    result = vm.run(["sh", "-c", "printf 'out\\n'; printf 'err' >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err")
    assert result.argv == ["sh", "-c", "printf 'out\\n'; printf 'err' >&2; exit 3"]
    binary = bytes(range(256)) * 64
    echoed = vm.run(["cat"], input=binary, root=False)
    assert echoed.returncode == 0 and echoed.stdout_bytes == binary and echoed.stderr_bytes == b""
    assert vm.check_output(["id", "-un"]) == "root\n" and vm.check_output(["id", "-un"], root=False) == "racker\n"
    assert vm.run(["false"]).returncode == 1  # a guest failure, not a transport failure
    # A transport failure still raises: a master for a port nothing listens on.
    control = vm.rundir / "elsewhere"
    control.mkdir()
    nowhere = dataclasses.replace(vm.endpoint, port=free_port(), control=control)
    with pytest.raises(Unreachable, match=r"failed: .*refused"):
        nowhere.start_master(lambda _master: None, die_with_parent=signal.SIGKILL, connect_timeout=2)
    assert not ssh_processes(control)


def channel_of(vm: VM) -> guest_shell.Channel:
    """This process's root channel to the VM, running (a root command starts it)."""
    assert vm.state is not None
    vm.check_output(["true"])
    return guest_shell.channel(vm.state.token, [])


def server_pid(vm: VM) -> int:
    return int(vm.check_output(["sh", "-c", "echo $PPID"]))


def guest_servers(vm: VM) -> set[int]:
    return {int(pid) for pid in vm.run(SERVERS, root=False).stdout.split()}


def gone_from_guest(vm: VM, pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while vm.run(["test", "-e", f"/proc/{pid}"], root=False).returncode == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_root_commands_share_one_channel_per_process(booted: dict, vm: VM) -> None:
    server = server_pid(vm)
    assert {server_pid(vm) for _ in range(3)} == {server}, "every root command runs under the one server (no sudo each)"
    assert guest_servers(vm) == {server}
    channel = channel_of(vm)
    assert channel.child is not None and channel.child.pid in ssh_processes(vm.rundir), "a session on the master"
    # Another process gets its own channel, and its server leaves the guest when that process exits.
    env = {**os.environ, "RACKER_HOME": str(booted["home"])}
    other = subprocess.run([sys.executable, "-c", OTHER, vm.name], env=env, capture_output=True, text=True, timeout=120)
    pid, _, command = other.stdout.partition("\n")
    assert other.returncode == 0 and pid.isdigit(), other.stderr
    assert command.startswith("python3 -c # racker-guest-shell") and int(pid) != server, other.stdout
    assert gone_from_guest(vm, int(pid)), "the other process's server outlived it"
    assert guest_servers(vm) == {server}


def test_root_channel_results_are_exact(vm: VM) -> None:
    assert vm.check_output(["id", "-un"]) == "root\n"
    result = vm.run(["sh", "-c", "printf 'out\\n'; printf err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err")
    assert vm.run(["sh", "-c", "kill -9 $$"]).returncode == -signal.SIGKILL, "killed by a signal: its number, negative"
    assert vm.run(["sh", "-c", "kill -TERM $$"]).returncode == -signal.SIGTERM
    assert vm.run(["/nonexistent/tool"]).returncode == 127
    for arg in ['it\'s "quoted" $HOME `id` \\ *', "two\nlines", "", os.fsdecode(b"\xff\xfe latin \xe9")]:
        assert vm.run(["printf", "%s", arg]).stdout_bytes == os.fsencode(arg), repr(arg)
    binary = bytes(range(256)) * 1024
    echoed = vm.run(["cat"], input=binary)
    assert echoed.stdout_bytes == binary and echoed.stderr_bytes == b""
    assert len(vm.run(["head", "-c", "2000000", "/dev/urandom"]).stdout_bytes) == 2_000_000


def test_root_channel_timeout_kills_the_command_not_the_channel(vm: VM) -> None:
    server = server_pid(vm)
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match=r"sh did not finish within 3s"):
        vm.run(["sh", "-c", "sleep 61 & sleep 62"], timeout=3)
    assert time.monotonic() - started < 10
    assert vm.run(["pgrep", "-f", "sleep 6[12]"], root=False).returncode == 1, "the command and its child are gone"
    assert server_pid(vm) == server, "the same channel answers"


def test_a_killed_root_channel_is_replaced_on_the_next_command(vm: VM) -> None:
    server, channel = server_pid(vm), channel_of(vm)
    assert channel.child is not None
    channel.child.kill()  # its host end: the ssh client
    channel.child.wait()
    replaced = server_pid(vm)
    assert replaced != server
    assert gone_from_guest(vm, server), "the old server left the guest"
    # Its guest end, while a command runs: a transport failure, not the command's status.
    with pytest.raises(Unreachable, match="closed while 'sh' ran"):
        vm.run(["sh", "-c", "kill -9 $PPID; sleep 5"])
    assert server_pid(vm) not in (server, replaced)
    assert len(guest_servers(vm)) == 1


def test_a_killed_master_is_replaced_on_the_next_command(vm: VM) -> None:
    before = master_of(vm)
    connection = vm.check_output(WHO, root=False)
    os.kill(before[0], signal.SIGKILL)
    proc.wait_exit(before[0], 5)
    assert (vm.rundir / ssh.CONTROL_SOCKET).exists(), "a killed master leaves its socket behind"
    result = vm.run(["sh", "-c", "echo again; echo quiet >&2"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "again\n", "quiet\n")
    after = master_of(vm)
    assert after != before and proc.alive(*after, proc.boot_id())
    assert vm.check_output(WHO, root=False) != connection, "a new connection"
    assert check(vm).returncode == 0
    channel = channel_of(vm).child  # the root channel, on the new master too
    assert channel is not None and sorted(ssh_processes(vm.rundir)) == sorted([after[0], channel.pid])


def test_qmp_keeps_one_client_and_answers_another_process(vm: VM) -> None:
    """The owner holds its QMP connection from launch to stop; this process gets the second monitor."""
    answers: list[object] = []
    asking = threading.Thread(target=lambda: answers.extend(vm.qmp("query-status") for _ in range(3)), daemon=True)
    asking.start()
    asking.join(20)
    assert not asking.is_alive(), "QMP did not answer while the VM's owner holds its connection"
    assert [a["status"] for a in answers] == ["running"] * 3  # type: ignore[index]
    monitor = vm._monitor
    assert monitor is not None
    vm.qmp("query-status")
    assert vm._monitor is monitor, "one client, kept"


def test_closing_the_connection_leaves_no_master_and_no_socket(vm: VM) -> None:
    """What stop() does first; the next command opens a connection again."""
    before, channel = master_of(vm), channel_of(vm).child
    assert channel is not None
    vm.close_connection()
    assert channel.poll() is not None, "the root channel is closed with it"
    assert not proc.alive(*before, proc.boot_id())
    assert not (vm.rundir / ssh.CONTROL_SOCKET).exists()
    assert not ssh_processes(vm.rundir)
    assert check(vm).returncode != 0
    assert vm.check_output(["true"]) == ""
    assert proc.alive(*master_of(vm), proc.boot_id())


def test_kill_9_of_the_owner_then_gc_leaves_no_master(booted: dict, vm: VM) -> None:
    master = master_of(vm)
    state = machines.load("qemu", vm.name)
    assert state is not None
    vm.check_output(["true"])
    channel = channel_of(vm).child
    assert channel is not None
    booted["holder"].kill()
    booted["holder"].wait(10)
    assert proc.alive(*master, state.boot_id), "the master outlives its owner until gc"
    removed = gc.collect()
    assert f"killed the {SSH_MASTER} of {vm.name} (pid {master[0]})" in removed, removed
    assert not proc.alive(*master, state.boot_id)
    assert proc.wait_exit(channel.pid, 10), "and this process's root channel"
    assert not proc.alive(state.pid, state.pid_start, state.boot_id), "and the VM's QEMU"
    assert not vm.rundir.exists() and machines.load("qemu", vm.name) is None
    assert not ssh_processes(vm.rundir)
