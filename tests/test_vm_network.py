"""VMs on racker's bridges (bridge.py): a tap on the bridge, the address from racker's own DHCP
(a dnsmasq of the VM's in a namespace of its own, also its DNS server for the network's names),
published ports, a VM and an nspawn machine in one group resolving each other by name, and
`racker gc` after a SIGKILL leaving nothing.

Two QEMU boots in all (TCG: minutes on a loaded host): the group, and the killed run."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_HOME, in_store, racker
from racker import machines, proc, store
from racker.errors import MachineError
from racker.machines import named_networks, network
from racker.vm import boards, bridge, seed

# Their "nothing left" checks look at the host's rk* links and dnsmasq processes, which every test
# that makes networks changes: all such tests (test_multi's too) run on one worker, one at a time.
pytestmark = pytest.mark.xdist_group("named-networks")

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

    with in_store(SHARED_HOME):
        image = prepare.prepare(images.pull(SERVER.removesuffix("+vm")))
        _board, firmware = boards.board_for(prepare.image_architecture(image))
        return promote.cached_disk(image, firmware)


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


@pytest.mark.slow  # the taken name fails only once the VM claims its address: the image's disk must be there (the shared store's)
@pytest.mark.root
def test_a_vms_bad_name_on_a_network_is_one_line_and_leaves_nothing(private_store) -> None:  # type: ignore[no-untyped-def]
    net = named_networks.create(f"t-{os.urandom(3).hex()}", owned=True)
    shared = {"RACKER_HOME": str(SHARED_HOME)}
    try:
        with a_vms_network_side(net.name, "web"):
            before = (links("rk"), dnsmasqs(), sorted(net.members()), net.hosts_file.read_text(), machines.all_states("qemu"))
            cases = [
                (["--name", "web-"], private_store, "'web-' is not a valid host name"),  # before anything is pulled
                (["--name", "WEB"], shared, f"network {net.name!r} has a machine named 'web' already"),
            ]
            for argv, env, message in cases:
                done = racker("vm", "start", "--network", net.name, *argv, SERVER, env=env)
                assert done.returncode == 125 and done.stderr.splitlines()[0] == "racker: error: " + message, done.stderr
                assert len(done.stderr.splitlines()) <= 2, done.stderr
                after = (links("rk"), dnsmasqs(), sorted(net.members()), net.hosts_file.read_text(), machines.all_states("qemu"))
                assert after == before, argv
            assert not (Path(private_store["RACKER_HOME"]) / "images").exists()
            assert not (SHARED_HOME / "vms" / "WEB.json").exists() and not (SHARED_HOME / "run" / "qemu" / "WEB").exists()
    finally:
        named_networks.release_owned(net)
    assert named_networks.get(net.name) is None


def test_a_vm_group_member_needs_a_known_engine() -> None:
    from racker.pytest import groups

    with pytest.raises(MachineError, match="engine 'lxc' cannot join a group"):
        groups.parse({"server": {"image": SERVER, "engine": "lxc"}})
    assert groups.parse({"server": {"image": SERVER, "engine": "qemu"}}) == {"server": (SERVER, "qemu")}


# -- a VM's DNS server on a private network: the network's names, as they change ------------------

# A DNS question from inside a machine (no dig there): "RCODE ANSWERS [ADDRESS]" for each TYPE NAME.
ASK = """
import socket, struct, sys
for qtype, name in zip(sys.argv[2::2], sys.argv[3::2]):
    kind = {"A": 1, "AAAA": 28}[qtype]
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(struct.pack(">6H", 7, 0x0100, 1, 0, 0, 0) + labels + b"\\0" + struct.pack(">2H", kind, 1), (sys.argv[1], 53))
        answer = s.recv(512)
    count = struct.unpack(">H", answer[6:8])[0]
    print(answer[3] & 15, count, socket.inet_ntoa(answer[-4:]) if count and kind == 1 else "")
"""


def ask(host, server: str, *questions: str, tries: int = 1) -> list[str]:  # type: ignore[no-untyped-def]
    """The answers; `tries`: asked again while a question times out (once in a loaded CI run, the first
    question to a server that had just started went unanswered; a guest's resolver asks again too)."""
    script = base64.b64encode(ASK.encode()).decode()
    argv = " ".join(questions)
    command = f"python3 -c 'import base64; exec(base64.b64decode(\"{script}\"))' {server} {argv}"
    for _ in range(tries - 1):
        done = host.run(command)
        if done.rc == 0:
            return [line.strip() for line in done.stdout.splitlines()]
        if "TimeoutError" not in done.stderr:  # another failure: asked once more, check_output says what it was
            break
    return [line.strip() for line in host.check_output(command).splitlines()]


@contextlib.contextmanager
def a_vms_network_side(network_name: str, alias: str):  # type: ignore[no-untyped-def]
    """What `racker vm start --network NAME` makes before QEMU starts (claim, tap, DHCP and DNS server),
    without the QEMU: its lease. Removed as VM.stop removes it."""
    state = machines.new_state("qemu", machines.unique_name(alias), "no-image")
    machines.claim(state)
    rundir = machines.make_run_dir("qemu", state.name)
    side = bridge.Bridged(network_name, alias=alias)
    try:
        side.setup(state, rundir, detached=False)
        yield side.lease
    finally:
        bridge.release(state)
        side.close()
        store.remove_tree(rundir)
        machines.release(state)


def until(check, timeout: float = 10):  # type: ignore[no-untyped-def]
    """check() until it returns something true (dnsmasq rereads the hosts file a moment after a change)."""
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@pytest.mark.slow
@pytest.mark.root
def test_a_vms_dns_server_answers_the_networks_names_as_they_come_and_go(racker_machines) -> None:
    """No QEMU: the VM's dnsmasq is what the guest asks first (the seed pins it, below); here an nspawn
    member asks it, as the guest would."""
    client = racker_machines({"client": SERVER})["client"]
    mine = client.machine.state.extra["network"]
    with a_vms_network_side(mine["network"], "vm") as vm:
        dns = vm["dhcp_server"]
        # The members' names, an IPv4 address each; no AAAA (an empty answer, not a refusal that would send
        # the guest's resolver to its next server); any other name refused: the guest asks its next server.
        assert ask(client, dns, "A", "client", "A", "vm", "AAAA", "client", "A", "deb.debian.org", tries=3) == [
            f"0 1 {mine['address']}",
            f"0 1 {vm['address']}",
            "0 0",
            "5 0",
        ]
        # A member that joins later is known at once, and forgotten when it goes: the server rereads the hosts file.
        with a_vms_network_side(mine["network"], "late") as late:
            assert until(lambda: ask(client, dns, "A", "late") == [f"0 1 {late['address']}"]), ask(client, dns, "A", "late")
            assert client.check_output("getent hosts late").split()[0] == late["address"]  # nspawn's /etc/hosts: the same names
        assert until(lambda: ask(client, dns, "A", "late") == ["5 0"]), ask(client, dns, "A", "late")
    # A network made before hosts.d, its hosts file beside its other state: a VM's server reads that file.
    made_before = named_networks.lookup(mine["network"])
    os.rename(made_before.hosts_dir / "hosts", made_before.directory / "hosts")
    made_before.hosts_dir.rmdir()
    with a_vms_network_side(mine["network"], "old") as old:
        client.run("ip neigh flush all")  # its server has the address an earlier one had, not its MAC
        assert ask(client, old["dhcp_server"], "A", "client", "A", "old", tries=3) == [f"0 1 {mine['address']}", f"0 1 {old['address']}"]


def test_a_vm_on_a_private_network_asks_its_dns_server_first() -> None:
    """systemd-resolved lists the links' servers in an order of its own: the seed makes the network's the
    global one, which comes first; racker's bootcmd runs after the caller's, and keeps the minimal module lists."""
    named = object.__new__(bridge.Bridged)
    named.member, named.lease = object.__new__(named_networks.Member), {"dhcp_server": "10.250.3.2"}
    [command] = named.seed_bootcmd()
    assert command[:2] == ["sh", "-c"] and command[3:] == ["10.250.3.2", bridge.RESOLVED_DROPIN]
    nat = object.__new__(bridge.Bridged)
    nat.member = object.__new__(network.Nat)
    assert nat.seed_bootcmd() == []
    config = json.loads(seed.user_data("vm", "ssh-ed25519 AAAA", extra={"bootcmd": [["true"]]}, bootcmd=[command]).split("\n", 1)[1])
    assert config["bootcmd"] == [["true"], command]
    config = json.loads(seed.user_data("vm", "ssh-ed25519 AAAA", bootcmd=[command]).split("\n", 1)[1])
    assert config["bootcmd"] == [command]


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
    # And the VM resolves the client by the name the test gave (its DNS server serves the network's
    # names, and the seed made it the guest's first), and reaches it there.
    client_address = client.machine.state.extra["network"]["address"]
    assert server.check_output("getent hosts client").split()[0] == client_address
    assert server.check_output("sed -n 's/^nameserver //p' /etc/resolv.conf").split()[0] == lease["dhcp_server"]
    # First by racker's doing, not by luck: the links' servers come in resolved's hash order, the global one before them.
    assert server.check_output("resolvectl dns").splitlines()[0].split() == ["Global:", lease["dhcp_server"]]
    client.check_output(f'systemd-run --unit=racker-listen python3 -c "{LISTEN}"')
    deadline = time.monotonic() + 30
    while not client.socket("tcp://0.0.0.0:7000").is_listening:
        assert time.monotonic() < deadline, "the client's listener did not start"
        time.sleep(0.2)
    assert server.check_output(f"python3 -c '{READ}' client") == "from-client"
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
