"""--network nat: eth0, an address of racker's range, outbound NAT (to a server beyond the host that the test
runs in a network namespace of its own, never the internet), DNS, published ports, and cleanup.

Real nspawn boots of the shared bookworm images; the bridge, the nft table and the
address claims are the host's, so the "nothing left" checks look at this test's own
veth and claim, and at the bridge and table only when no other machine holds a claim.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from conftest import ROOT, free_port, racker
from racker import images, machines, prepare, proc
from racker.machines import network
from racker.machines.nspawn import Machine

pytestmark = pytest.mark.slow


def leftovers() -> dict:
    links = [line.split(":")[1].strip().split("@")[0] for line in proc.run(["ip", "-o", "link"]).stdout.splitlines()]
    return {
        "veths": sorted(name for name in links if name.startswith(network.HOST_IF_PREFIX)),
        "bridge": network.BRIDGE in links,
        "table": f"table ip {network.TABLE}" in proc.run(["nft", "list", "tables"]).stdout,
        # A claim is its address and the claim's token: an address reclaimed by another machine is a new claim.
        "claims": sorted(f"{path.name}={claim_token(path)}" for path in network.claims_dir().iterdir()),
    }


def claim_token(path) -> str:  # type: ignore[no-untyped-def]
    try:
        return json.loads(path.read_text())["token"]
    except (OSError, ValueError, KeyError):
        return "?"


def assert_nothing_left(before: dict) -> None:
    """Nothing new is left; the bridge and the table are gone unless another machine still holds a claim.

    Another worker's machine may hold a claim and a veth meanwhile (they are the host's): what
    a live machine holds is not left behind."""
    after = leftovers()
    held = {path.name: data for path in network.claims_dir().iterdir() if network._claim_live(data := network._read_claim(path))}
    others = {f"{address}={data['token']}" for address, data in held.items()}
    assert set(after["claims"]) <= set(before["claims"]) | others, after
    assert set(after["veths"]) <= set(before["veths"]) | {data.get("host_if") for data in held.values()}, after
    # Another worker's last machine may be between releasing its claim and removing the bridge
    # (or between a new claim and its bridge): give the host a moment to settle before calling
    # a bridge with no claim a leak.
    deadline = time.monotonic() + 15
    while not after["claims"] and (after["bridge"] or after["table"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = leftovers()
    if not after["claims"]:
        assert not after["bridge"] and not after["table"], after


def listeners(port: int) -> list[str]:
    """The local addresses listening on TCP `port` on the host."""
    lines = proc.run(["ss", "-ltnH", f"sport = :{port}"]).stdout.splitlines()
    return [line.split()[3].rsplit(":", 1)[0] for line in lines]


def host_address() -> str:
    """The host's address on its uplink (not loopback)."""
    return json.loads(proc.run(["ip", "-j", "-4", "route", "get", "192.0.2.200"]).stdout)[0]["prefsrc"]


def test_a_published_port_in_use_is_one_error_and_leaves_nothing(share_image, private_store) -> None:
    share_image("debian-bookworm")
    before = leftovers()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = racker("run", "--network", "nat", "--publish", f"{port}:8080", "debian-bookworm", "--", "true", env=private_store)
    assert ran.returncode == 125, ran.stderr
    first, *rest = ran.stderr.splitlines()
    assert first == f"racker: error: cannot publish 127.0.0.1:{port}:8080: 127.0.0.1:{port} is already in use"
    assert len(rest) <= 1  # the hint
    assert_nothing_left(before)
    assert not machines.all_states("nspawn")
    run = os.path.join(private_store["RACKER_HOME"], "run", "nspawn")
    assert not os.path.isdir(run) or not os.listdir(run)


def test_sigkill_of_racker_and_nspawn_then_gc_leaves_nothing(share_image, private_store) -> None:
    share_image("debian-bookworm")
    before = leftovers()
    port = free_port()
    owner = subprocess.Popen(
        [sys.executable, "-m", "racker", "run", "--network", "nat", "--publish", f"{port}:8080", "debian-bookworm", "--", "sleep", "600"],
        env={**os.environ, **private_store},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        state = None
        while time.monotonic() < deadline and owner.poll() is None:
            states = machines.all_states("nspawn")
            if states and (states[0].extra.get("network") or {}).get("forwarder"):
                state = states[0]
                break
            time.sleep(0.2)
        assert state is not None, owner.stderr.read().decode() if owner.poll() is not None else "no machine came up"
        lease = state.extra["network"]
        running = leftovers()
        assert lease["host_if"] in running["veths"] and f"{lease['address']}={state.token}" in running["claims"]
        assert running["bridge"] and running["table"]
        assert listeners(port) == ["127.0.0.1"]
        os.kill(state.pid, signal.SIGKILL)  # nspawn first: killed, it cannot shut the machine down
        owner.kill()
        owner.wait(10)
        assert proc.alive(state.leader, state.leader_start, state.boot_id), "the machine should outlive its nspawn"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
    collected = racker("gc", env=private_store)
    assert collected.returncode == 0, collected.stderr
    # Released by this gc, or already by another worker's allocation, which collects stale claims too.
    assert f"{lease['address']}={state.token}" not in leftovers()["claims"], collected.stdout
    assert not proc.alive(state.leader, state.leader_start, state.boot_id)
    assert not listeners(port)
    assert lease["host_if"] not in leftovers()["veths"]
    assert_nothing_left(before)


@pytest.fixture(scope="module")
def bookworm():
    return images.pull("debian-bookworm")


def test_machines_started_in_parallel_get_distinct_addresses(bookworm) -> None:
    before = leftovers()
    count = 8
    together = threading.Barrier(count, timeout=300)
    addresses: list[str] = []
    failures: list[BaseException] = []

    def boot() -> None:
        try:
            # Each machine is started and stopped by its own thread: nspawn dies with the thread that started it.
            with Machine(bookworm, network_mode="nat", boot_timeout=240) as machine:
                shown = machine.run_expect([0], ["ip", "-4", "-o", "address", "show", "eth0"]).stdout
                address = machine.state.extra["network"]["address"]
                assert f"inet {address}/" in shown
                addresses.append(address)
                together.wait()  # all of them run at once
        except BaseException as error:
            failures.append(error)
            together.abort()

    threads = [threading.Thread(target=boot) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(400)
    assert not failures, failures
    assert len(set(addresses)) == count, addresses
    assert all(ipaddress.ip_address(a) in network.network_range() for a in addresses)
    assert_nothing_left(before)


@pytest.fixture(scope="module")
def nat_machine():
    """The prepared bookworm (it has python3, and networkd set to DHCP on eth*) with a published port."""
    port = free_port()
    image = prepare.prepare(images.pull("debian-bookworm"))
    with Machine(image, network_mode="nat", publish=[network.parse_publish(f"{port}:8080")]) as machine:
        yield machine, port


def test_nat_gives_eth0_an_address_a_default_route_dns_and_the_way_out(nat_machine) -> None:
    machine, _ = nat_machine
    lease = machine.state.extra["network"]
    shown = machine.run_expect([0], ["ip", "-4", "-o", "address", "show", "eth0"]).stdout
    address = shown.split(" inet ")[1].split("/")[0]
    assert address == lease["address"] and ipaddress.ip_address(address) in network.network_range()
    bridge = json.loads(proc.run(["ip", "-j", "-4", "address", "show", "dev", network.BRIDGE]).stdout)[0]["addr_info"][0]["local"]
    routes = machine.run_expect([0], ["ip", "route"]).stdout
    assert f"default via {bridge} dev eth0" in routes
    assert machine.run_expect([0], ["cat", "/etc/resolv.conf"]).stdout == network.resolv_conf()
    listed = {m["name"]: m for m in json.loads(racker("ps", "--json").stdout)}
    assert listed[machine.name]["address"] == address and listed[machine.name]["network"] == "nat"
    # Out through the host, as the archive would be reached, but to a server of this test's own:
    # it answers with the address it saw, which is the host's own (masqueraded), not the machine's.
    with beyond_the_host() as (url, host_side):
        fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=20).read().decode())"
        seen = machine.run(["python3", "-c", fetch], timeout=120)
    assert seen.returncode == 0, seen.stdout + seen.stderr
    assert seen.stdout.strip() == host_side, (seen.stdout, address)


# Answers every GET with the client's address; runs inside the test's own network namespace.
ECHO_SERVER = """
import http.server, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer((sys.argv[1], 8000), Echo).serve_forever()
"""


@contextlib.contextmanager
def beyond_the_host() -> Iterator[tuple[str, str]]:
    """An HTTP server on an address beyond this host: in a network namespace of this test's own,
    joined to the host by a veth pair on a /30 of TEST-NET-2. Yields its URL and the host side's address."""
    tag = f"{os.getpid() % 10000}"
    namespace, host_if, far_if = f"racker-beyond-{tag}", f"beyond{tag}h", f"beyond{tag}n"
    base = 4 * (os.getpid() % 64)  # one /30 per worker: two runs never share an address
    host_side, far_side = f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"
    steps = [
        ["ip", "netns", "add", namespace],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", far_if, "netns", namespace],
        ["ip", "address", "add", f"{host_side}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", namespace, "address", "add", f"{far_side}/30", "dev", far_if],
        ["ip", "-n", namespace, "link", "set", far_if, "up"],
        ["ip", "-n", namespace, "link", "set", "lo", "up"],
    ]
    server = None
    try:
        for step in steps:
            proc.run(step)
        server = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", ECHO_SERVER, far_side])
        url = f"http://{far_side}:8000/"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    assert answer.read().decode() == host_side  # the host reaches it on the veth, unmasqueraded
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the server beyond the host did not start"
                time.sleep(0.2)
        yield url, host_side
    finally:
        if server is not None:
            server.kill()
            server.wait()
        proc.run(["ip", "link", "delete", host_if], check=False)
        proc.run(["ip", "netns", "delete", namespace], check=False)


def test_publish_reaches_the_guest_on_the_hosts_loopback_only(nat_machine) -> None:
    machine, port = nat_machine
    marker = f"hello-{os.getpid()}"
    machine.run_expect([0], ["sh", "-c", f"mkdir -p /srv/www && echo {marker} > /srv/www/index.txt"])
    machine.run_expect([0], ["systemd-run", "--unit=web", "python3", "-m", "http.server", "8080", "--directory", "/srv/www"])
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.txt", timeout=5) as answer:
                assert answer.read().decode().strip() == marker
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert listeners(port) == ["127.0.0.1"]
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host_address(), port), timeout=5):
        pass


def test_plugin_boots_its_machines_with_racker_network(share_image, private_store, tmp_path) -> None:
    share_image("debian-bookworm")
    (tmp_path / "test_eth0.py").write_text(
        "def test_eth0(host):\n    shown = host.check_output('ip -4 -o address show eth0')\n    assert ' inet 10.213.' in shown, shown\n"
    )
    env = {**os.environ, **private_store, "PYTHONPATH": str(ROOT)}  # this tree's racker, not the installed one
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--racker-images=debian-bookworm", "--racker-network=nat"]
    done = subprocess.run([*argv, "-c", os.devnull, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
