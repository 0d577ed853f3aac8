"""The agent's protocol (racker.vm.guest_agent), its guest program run on this host.

QEMU's end of the port is stood in for by a listener on a unix socket that joins each client, in turn, to the agent's end of a socket pair,
as QEMU joins the port to whichever client it has: what the agent writes while
no client is there waits for the next one. tests/test_vm_warm.py runs the
agent in real restored clones.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from racker.errors import ChannelUnavailable, ToolTimeout
from racker.machines import sockets
from racker.vm import guest_agent, guest_shell


class StandInPort:
    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sockets.short_path(path) as name:
            self.listener.bind(name)
        self.listener.listen(4)
        guest, self.port = socket.socketpair()
        self.agent = subprocess.Popen([sys.executable, "-c", guest_agent.AGENT, str(guest.fileno())], pass_fds=[guest.fileno()])
        guest.close()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with client, selectors.DefaultSelector() as selector:
                selector.register(client, selectors.EVENT_READ)
                selector.register(self.port, selectors.EVENT_READ)
                while True:
                    ready = [key.fileobj for key, _ in selector.select()]
                    if self.port in ready:
                        data = self.port.recv(1 << 16)
                        try:
                            client.sendall(data)
                        except OSError:  # the client went: not ours to keep, as QEMU drops it too
                            break
                    if client in ready:
                        data = client.recv(1 << 16)
                        if not data:
                            break
                        self.port.sendall(data)

    def close(self) -> None:
        self.listener.close()
        self.agent.kill()
        self.agent.wait()
        self.port.close()


@pytest.fixture
def port(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    stand_in = StandInPort(tmp_path / guest_agent.SOCKET)
    yield tmp_path / guest_agent.SOCKET, tmp_path / "agent.lock"
    stand_in.close()


def test_commands_on_the_agent_are_exact_and_a_timeout_keeps_the_channel(port: tuple[Path, Path]) -> None:
    channel = guest_agent.AgentChannel(*port, name="the test agent")
    try:
        result = channel.run(["sh", "-c", "cat; printf err >&2; exit 3"], input=b"in\xff\n")
        assert (result.returncode, result.stdout, result.stderr) == (3, "in\ufffd\n", "err")
        odd = 'it\'s "quoted" $HOME\nand more'
        assert channel.run(["printf", "%s", odd]).stdout == odd
        with pytest.raises(ToolTimeout):
            channel.run(["sleep", "30"], timeout=0.5)
        assert channel.run(["echo", "still"]).stdout == "still\n"
    finally:
        channel.close()


def test_another_process_finds_the_agent_held_and_takes_it_once_free(port: tuple[Path, Path]) -> None:
    holder = guest_agent.AgentChannel(*port, name="the test agent")
    other = guest_agent.AgentChannel(*port, name="the test agent")
    try:
        assert holder.run(["true"]).returncode == 0
        with pytest.raises(ChannelUnavailable, match="another process holds"):
            other.run(["true"])
        assert not other.unavailable, "held is not absent: the next command tries again"
        holder.close()
        assert other.run(["echo", "mine"]).stdout == "mine\n"
    finally:
        holder.close()
        other.close()


@pytest.mark.slow  # waits out the agent's real timeouts and sleeps
def test_the_reply_to_a_gone_hosts_command_is_dropped(port: tuple[Path, Path]) -> None:
    gone = guest_agent.AgentChannel(*port, name="the test agent")
    assert gone.run(["true"]).returncode == 0
    request = {"argv": ["sh", "-c", "sleep 0.5; echo stale"], "input": False, "timeout": 10}
    gone._send(guest_shell.frame(guest_shell.json.dumps(request).encode()) + guest_shell.frame(b""))
    gone.close()  # before the reply: it waits for the next host
    time.sleep(1)
    channel = guest_agent.AgentChannel(*port, name="the test agent")
    try:
        assert channel.run(["echo", "fresh"], timeout=10).stdout == "fresh\n"
        assert channel.run(["echo", "again"], timeout=10).stdout == "again\n"
    finally:
        channel.close()


@pytest.mark.slow  # waits out the agent's real timeouts and sleeps
def test_a_host_gone_mid_frame_does_not_desynchronise_the_next(port: tuple[Path, Path]) -> None:
    gone = guest_agent.AgentChannel(*port, name="the test agent")
    assert gone.run(["true"]).returncode == 0
    gone._send((100).to_bytes(8, "big") + b'{"argv": ')  # a frame's start, never its end
    gone.close()
    channel = guest_agent.AgentChannel(*port, name="the test agent")
    try:
        started = time.monotonic()
        assert channel.run(["echo", "fresh"], timeout=10).stdout == "fresh\n"
        assert time.monotonic() - started < guest_agent.HELLO_TIMEOUT
        assert channel.run(["echo", "again"], timeout=10).stdout == "again\n"
    finally:
        channel.close()


@pytest.mark.slow  # waits out the agent's real timeouts and sleeps
def test_no_agent_behind_the_socket_is_unavailable_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sockets.short_path(tmp_path / guest_agent.SOCKET) as name:
        silent.bind(name)
    silent.listen(1)
    monkeypatch.setattr(guest_agent, "HELLO_TIMEOUT", 1.5)
    channel = guest_agent.AgentChannel(tmp_path / guest_agent.SOCKET, tmp_path / "agent.lock", name="the test agent")
    try:
        with pytest.raises(ChannelUnavailable, match="did not answer"):
            channel.run(["true"])
        assert channel.unavailable
    finally:
        channel.close()
        silent.close()
    assert os.path.exists(tmp_path / "agent.lock")
