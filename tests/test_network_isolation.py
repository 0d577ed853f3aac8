"""--network nat reaches what a Docker container reaches, no more: link-local addresses (the cloud
metadata service's range) only with --allow-link-local, and forwarding for racker0 only.

Every server here is the test's own, in a network namespace the test creates: a link-local one at
169.254.77.1 (never this host's real 169.254.169.254), and a pair of namespaces routed through the
host in 198.18.0.0/15 (the benchmarking range), which racker's rules must not forward between.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from racker import images, proc
from racker.machines import network
from racker.machines.nspawn import Machine

pytestmark = [pytest.mark.slow, pytest.mark.root]

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
PORT = 8077


@contextlib.contextmanager
def namespace(name: str, host_if: str, host_address: str, inside: str) -> Iterator[str]:
    """A netns NAME joined to the host by a veth (HOST_IF on the host, /24s), its default route via the
    host, and a TCP server of ours on INSIDE:PORT; yields INSIDE."""
    ns = f"{name}-{os.getpid()}"
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    subprocess.run(["ip", "link", "delete", host_if], capture_output=True)
    server = None
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns],
            ["ip", "address", "add", f"{host_address}/24", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", ns, "address", "add", f"{inside}/24", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "eth0", "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "route", "add", "default", "via", host_address],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        serve = "import socket\ns=socket.create_server((%r, %d))\nwhile True:\n c,_=s.accept(); c.sendall(b'hello\\n'); c.close()"
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", serve % (inside, PORT)])
        deadline = time.monotonic() + 10
        while not connects(["ip", "netns", "exec", ns], inside):
            assert time.monotonic() < deadline and server.poll() is None, "the test's server did not start"
            time.sleep(0.1)
        yield ns
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)


def connects(prefix: list[str], address: str) -> bool:
    """Whether a TCP connection from where PREFIX runs (a netns) to ADDRESS:PORT is answered."""
    probe = f"import socket; socket.create_connection(({address!r}, {PORT}), timeout=3).recv(6)"
    return subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0


def machine_connects(machine: Machine, address: str) -> bool:
    """Whether the machine reaches ADDRESS:PORT (bash's /dev/tcp: the plain image has no curl)."""
    probe = f"exec 3<>/dev/tcp/{address}/{PORT} && head -c 5 <&3"
    return machine.run(["timeout", "5", "bash", "-c", probe], timeout=30).returncode == 0


@pytest.fixture(scope="module")
def bookworm():
    return images.pull("debian-bookworm")


def test_link_local_is_refused_unless_asked_for(bookworm) -> None:
    with namespace("rkt-ll", "rkt-ll0", "169.254.77.2", "169.254.77.1") as ns:
        assert connects(["ip", "netns", "exec", ns], "169.254.77.1")  # the server answers
        with Machine(bookworm, network_mode="nat") as machine:
            assert not machine_connects(machine, "169.254.77.1"), "a nat machine reached a link-local address"
            assert not machine_connects(machine, "169.254.77.2"), "a nat machine reached the host's link-local address"
        with Machine(bookworm, network_mode="nat+link-local") as machine:
            assert machine_connects(machine, "169.254.77.1"), "--allow-link-local did not open link-local"


def _claims() -> list[Path]:
    return list(network.claims_dir().iterdir())


@pytest.fixture
def host_not_forwarding() -> Iterator[None]:
    """The host as it was before any racker turned ip_forward on (no machine of anyone's running);
    ip_forward as it was found afterwards."""
    deadline = time.monotonic() + 180
    while _claims():
        if time.monotonic() > deadline:
            pytest.skip("other nat machines keep running: cannot see the host before racker")
        time.sleep(2)
    found = IP_FORWARD.read_text()
    IP_FORWARD.write_text("0\n")
    try:
        yield
    finally:
        if not _claims():
            IP_FORWARD.write_text(found)


@pytest.mark.hostwide  # sets the host's ip_forward: run alone, after the parallel run
def test_forwarding_is_opened_for_racker0_only(bookworm, host_not_forwarding) -> None:
    with (
        namespace("rkt-fa", "rkt-fa0", "198.18.1.1", "198.18.1.2") as left,
        namespace("rkt-fb", "rkt-fb0", "198.18.2.1", "198.18.2.2"),
    ):
        from_left = ["ip", "netns", "exec", left]
        assert not connects(from_left, "198.18.2.2")  # the host does not route: the baseline
        with Machine(bookworm, network_mode="nat") as machine:
            assert IP_FORWARD.read_text().strip() == "1"
            assert machine_connects(machine, "198.18.2.2"), "the machine should reach out through the host"
            assert not connects(from_left, "198.18.2.2"), "racker's forwarding routed traffic that is not racker0's"
        if not _claims():
            assert IP_FORWARD.read_text().strip() == "0", "ip_forward stayed on after racker's last machine"
        assert not connects(from_left, "198.18.2.2")
        rules = proc.run(["nft", "list", "ruleset"]).stdout
        assert f"table ip {network.TABLE}" not in rules or _claims()
