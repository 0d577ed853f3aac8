"""VMs on racker's bridges (bridge.py): a tap on the bridge, the address from racker's own DHCP
(a dnsmasq of the VM's in a namespace of its own), published ports, a VM and an nspawn machine in
one group resolving each other by name, and `racker gc` after a SIGKILL leaving nothing.

Two QEMU boots in all (TCG: minutes on a loaded host): the group, and the killed run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_HOME, racker
from racker import machines, proc
from racker.errors import MachineError
from racker.machines import named_networks, network
from racker.vm import boards, bridge

SERVER = "debian-bookworm+vm"
BOOT_TIMEOUT = 900  # TCG on a host that other tests load too
LISTEN = "import socket; c = socket.create_server((chr(48) + '.0.0.0', 7000)).accept()[0]; c.sendall(b'from-client'); c.close()"
READ = "import socket, sys; print(socket.create_connection((sys.argv[1], 7000), timeout=10).recv(64).decode())"
BANNER = "import socket, sys; print(socket.create_connection((sys.argv[1], 22), timeout=10).recv(64).decode().strip())"


def links(prefix: str) -> set[str]:
    return {name for name in os.listdir("/sys/class/net") if name.startswith(prefix)}


def dnsmasqs() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "dnsmasq":
                    found.add(int(entry))
            except OSError:
                pass
    return found


def shared_disk() -> Path:
    """The prepared bookworm's promoted disk in the shared store (a VM only reads it: its overlay is its own)."""
    from racker import images, prepare, promote

    private = os.environ.get("RACKER_HOME")
    os.environ["RACKER_HOME"] = str(SHARED_HOME)
    try:
        image = prepare.prepare(images.pull(SERVER.removesuffix("+vm")))
        _board, firmware = boards.board_for(prepare.image_architecture(image))
        return promote.cached_disk(image, firmware)
    finally:
        if private is None:
            del os.environ["RACKER_HOME"]
        else:
            os.environ["RACKER_HOME"] = private


# -- bad input: one line, nothing made ------------------------------------------------------


def test_mac_is_qemus_prefix_and_the_tokens() -> None:
    assert bridge.mac_for("96f4bea82886aa00") == "52:54:00:96:f4:be"


@pytest.mark.root
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--network", "private"], "a VM has no network 'private'"),
        (["--network", "nosuch-net"], "no network named 'nosuch-net'"),
        (["--network", "Bad Name"], "invalid network name 'Bad Name'"),
        (["-p", "8080:80"], "--publish needs a bridge to publish from"),
        (["--network", "nat", "-p", "80"], "bad --publish '80'"),
        (["--network", "nat", "--warm"], "a warm VM restores a snapshot taken on QEMU's user-mode network"),
    ],
)
def test_bad_vm_network_input_is_one_line_and_makes_nothing(argv, message, private_store) -> None:  # type: ignore[no-untyped-def]
    before = (links("rk"), dnsmasqs())
    done = racker("vm", "start", *argv, "debian-bookworm", env=private_store)
    assert done.returncode == 125, done.stderr
    assert done.stderr.splitlines()[0] == "racker: error: " + message
    assert len(done.stderr.splitlines()) <= 2
    assert not machines.all_states("qemu") and not (Path(private_store["RACKER_HOME"]) / "images").exists()
    assert (links("rk"), dnsmasqs()) == before


def test_a_vm_group_member_needs_a_known_engine() -> None:
    from racker.pytest import groups

    with pytest.raises(MachineError, match="engine 'lxc' cannot join a group"):
        groups.parse({"server": {"image": SERVER, "engine": "lxc"}})
    assert groups.parse({"server": {"image": SERVER, "engine": "qemu"}}) == {"server": (SERVER, "qemu")}


# -- a VM server, an nspawn client, one private network --------------------------------------


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.root
def test_a_vm_server_answers_an_nspawn_client_by_name(racker_machines) -> None:
    hosts = racker_machines({"server": {"image": SERVER, "engine": "qemu"}, "client": SERVER}, boot_timeout=BOOT_TIMEOUT)
    server, client = hosts["server"], hosts["client"]
    lease = server.machine.state.extra["network"]
    assert server.machine.kind == "qemu" and client.machine.kind == "nspawn"
    # The client resolves the VM by the name the test gave, and its sshd answers there.
    assert client.check_output("getent hosts server").split()[0] == lease["address"]
    assert client.check_output(f"python3 -c '{BANNER}' server").startswith("SSH-2.0-")
    # The VM's first NIC is the bridge's, its address the claimed one, leased by racker's DHCP to its MAC.
    first = next(link for link in json.loads(server.check_output("ip -j address show")) if link["ifname"] != "lo")
    assert first["address"] == lease["mac"]
    ipv4 = [(a["local"], a.get("dynamic", False)) for a in first["addr_info"] if a["family"] == "inet"]
    assert ipv4 == [(lease["address"], True)]
    leases = (server.machine.rundir / "dhcp.leases").read_text()
    assert f"{lease['mac']} {lease['address']}" in leases
    # And the VM reaches the client by its address (no names in a VM: its DNS is the user-mode NIC's).
    client.check_output(f'systemd-run --unit=racker-listen python3 -c "{LISTEN}"')
    deadline = time.monotonic() + 30
    while not client.socket("tcp://0.0.0.0:7000").is_listening:
        assert time.monotonic() < deadline, "the client's listener did not start"
        time.sleep(0.2)
    client_address = client.machine.state.extra["network"]["address"]
    assert server.check_output(f"python3 -c '{READ}' {client_address}") == "from-client"
    # A private network gives no way out: no default route through the bridge's NIC.
    assert first["ifname"] not in server.check_output("ip -4 route show default")
    net = named_networks.get(lease["network"])
    assert net is not None and lease["tap"] in links("rkv-")


# -- nat, -p, the full-boot DHCP check, and SIGKILL then gc ----------------------------------

HOLD = """\
import json, time
from pathlib import Path
from racker.vm import qemu
from racker.machines import network
from racker.checks import guest, test_vm

def test_hold():
    publish = [network.parse_publish("127.0.0.1:{port}:22")]
    with qemu.VM(Path("{disk}"), network_mode="nat", publish=publish, boot_timeout={timeout}) as vm:
        facts = guest.gather(vm)
        test_vm.test_first_nic_configured_by_dhcp(facts)  # the full-boot check, on the bridge's NIC
        state = vm.state
        held = {{"lease": state.extra["network"], "pid": state.pid, "pid_start": state.pid_start}}
        held.update(helpers=state.extra["helpers"], nic=facts.first_nic())
        Path("{report}").write_text(json.dumps(held))
        time.sleep(1200)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.root
def test_a_nat_vm_passes_the_dhcp_check_publishes_and_gc_after_sigkill_leaves_nothing(tmp_path: Path, private_store) -> None:
    disk, port, report = shared_disk(), free_port(), tmp_path / "report.json"
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_hold.py").write_text(HOLD.format(port=port, disk=disk, timeout=BOOT_TIMEOUT, report=report))
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-c", os.devnull, str(suite)]
    env = {**os.environ, **private_store, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT + 120
        while not report.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if not report.exists():
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
            raise AssertionError(run.stdout.read().decode())  # type: ignore[union-attr]
        held = json.loads(report.read_text())
        lease = held["lease"]
        assert lease["mode"] == "nat" and {lease["tap"], lease["host_if"]} <= links(network.HOST_IF_PREFIX)
        assert held["nic"]["address"] == lease["mac"]
        # -p: the host's 127.0.0.1:port reaches the VM's sshd on its bridge address.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.settimeout(30)
            assert connection.recv(64).startswith(b"SSH-2.0-")
        dhcp_pid, dhcp_start = held["helpers"]["dhcp"]
        assert proc.alive(dhcp_pid, dhcp_start, proc.boot_id())
        server = lease["dhcp_server"]
        assert {lease["address"], server} <= set(os.listdir(network.claims_dir()))
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the whole run: pytest, and the QEMU it owns
        run.wait(10)
    collected = racker("gc", env=private_store)
    assert collected.returncode == 0, collected.stderr
    left = links("")  # every link of the host's: a tap named outside racker's prefixes would be left too
    assert lease["tap"] not in left and not any(name.startswith("rk-x" + lease["host_if"][3:11]) for name in left), collected.stdout
    assert not proc.alive(dhcp_pid, dhcp_start, proc.boot_id()) and not proc.alive(held["pid"], held["pid_start"], proc.boot_id())
    assert not {lease["address"], server} & set(os.listdir(network.claims_dir()))
    if not os.listdir(network.claims_dir()):  # racker0 is the host's: another run's machine may hold it
        assert network.BRIDGE not in links("racker") and f"table ip {network.TABLE}" not in proc.run(["nft", "list", "tables"]).stdout
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the forwarder is gone too
