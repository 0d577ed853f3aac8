"""The root command channel's protocol, with its server run on this host as the guest runs it
(tests/test_ssh_master.py runs it in a real VM, as root over SSH)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from racker import proc
from racker.errors import ChannelUnavailable, ToolTimeout, Unreachable
from racker.vm import guest_shell

SERVER = [sys.executable, "-c", guest_shell.SERVER]
# Not UTF-8, quotes, a newline, what a shell would expand: each argument arrives byte for byte.
AWKWARD = ['it\'s "quoted" $HOME `id` \\ *', "two\nlines", "", os.fsdecode(b"\xff\xfe latin \xe9")]


@pytest.fixture
def channel(tmp_path: Path) -> Iterator[guest_shell.Channel]:
    found = guest_shell.Channel(SERVER, log=tmp_path / "server.log", name="the test server")
    yield found
    found.close()


def server_pid(channel: guest_shell.Channel) -> int:
    """The server process a command runs under: its parent."""
    return int(channel.run(["sh", "-c", "echo $PPID"]).stdout)


def test_exit_status_stdout_and_stderr_are_exact(channel: guest_shell.Channel) -> None:
    result = channel.run(["sh", "-c", "printf 'out\\n'; printf err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err")
    assert result.argv == ["sh", "-c", "printf 'out\\n'; printf err >&2; exit 3"]
    assert channel.run(["sh", "-c", "kill -9 $$"]).returncode == -signal.SIGKILL
    assert channel.run(["sh", "-c", "kill -TERM $$"]).returncode == -signal.SIGTERM
    missing = channel.run(["/nonexistent/tool"])
    assert missing.returncode == 127 and "No such file" in missing.stderr


def test_arguments_and_input_arrive_byte_for_byte(channel: guest_shell.Channel) -> None:
    for arg in AWKWARD:
        assert channel.run(["printf", "%s", arg]).stdout_bytes == os.fsencode(arg)
    binary = bytes(range(256)) * 4096
    echoed = channel.run(["cat"], input=binary)
    assert echoed.stdout_bytes == binary and echoed.stderr_bytes == b""
    assert channel.run(["cat"]).stdout_bytes == b"", "no input: stdin is empty, not the channel's"
    assert len(channel.run(["head", "-c", "3000000", "/dev/zero"]).stdout_bytes) == 3_000_000


@pytest.mark.slow  # waits out real timeouts
def test_a_timeout_kills_the_command_and_its_children_not_the_channel(channel: guest_shell.Channel, tmp_path: Path) -> None:
    server = server_pid(channel)
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match=r"sh did not finish within 1s"):
        channel.run(["sh", "-c", f"sleep 60 & echo $! >{marker}; wait"], timeout=1)
    assert time.monotonic() - started < 5
    assert proc.wait_exit(int(marker.read_text()), 5), "the command's own child is killed too"
    assert server_pid(channel) == server, "the same channel answers"


def test_a_killed_channel_is_replaced_on_the_next_command(channel: guest_shell.Channel) -> None:
    server = server_pid(channel)
    os.kill(server, signal.SIGKILL)  # the server end, as if the guest killed it
    assert proc.wait_exit(server, 5)
    assert server_pid(channel) != server
    assert channel.child is not None
    channel.child.kill()  # the host end
    channel.child.wait()
    assert channel.run(["echo", "again"]).stdout == "again\n"
    # Dying while a command runs is a transport failure, not a guest one; the next command gets a new channel.
    with pytest.raises(Unreachable, match="closed while 'sh' ran"):
        channel.run(["sh", "-c", "kill -9 $PPID; sleep 5"])
    assert channel.run(["true"]).returncode == 0


@pytest.mark.slow  # waits out real timeouts
def test_a_guest_that_cannot_run_the_server(tmp_path: Path) -> None:
    """No python3 (sudo's 1, a shell's 127): unavailable, and said once; ssh's own 255: unreachable."""
    cannot = guest_shell.Channel(["sh", "-c", "echo 'sudo: python3: command not found' >&2; exit 1"], log=tmp_path / "a.log", name="vm1")
    with pytest.raises(ChannelUnavailable, match="vm1 cannot run the root channel: sudo: python3: command not found"):
        cannot.run(["true"])
    assert cannot.unavailable and cannot.child is None
    down = guest_shell.Channel(["sh", "-c", "echo 'Connection refused' >&2; exit 255"], log=tmp_path / "b.log", name="vm2")
    with pytest.raises(Unreachable, match="Connection refused"):
        down.run(["true"])
    assert not down.unavailable
    silent = guest_shell.Channel(["sleep", "30"], name="vm3")
    with pytest.raises(Unreachable, match="vm3 did not answer within 1s"):
        silent._start(timeout=1)
    assert not silent.unavailable and silent.child is None


def test_one_channel_per_vm_per_process(tmp_path: Path) -> None:
    key = f"test-{os.getpid()}"
    first = guest_shell.channel(key, SERVER, log=tmp_path / "server.log")
    try:
        assert guest_shell.channel(key, SERVER) is first
        server = server_pid(first)
        child = os.fork()
        if child == 0:  # a forked worker: its own channel, not the parent's pipes
            mine = guest_shell.channel(key, SERVER)
            os._exit(0 if mine is not first and server_pid(mine) != server else 1)
        assert os.waitpid(child, 0)[1] == 0
        assert server_pid(first) == server
    finally:
        guest_shell.close(key)
    assert first.child is None and proc.wait_exit(server, 5), "closing ends the server"
