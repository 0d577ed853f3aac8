"""Several machines in one test (racker_machines, racker_group): a server answers a client by name on
a private network of their own, which nothing else reaches, and which goes with its last machine,
after a kill -9 too (racker gc). Real nspawn boots of the shared prepared images (python3 in them)."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, racker
from racker import machines, proc
from racker.errors import MachineError
from racker.machines import named_networks, network
from racker.pytest import groups

# One worker for the module: its leak checks compare the host's rkn-/rkv- links before and after,
# which another test's network, made at the same moment, would change.
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.xdist_group("named-networks")]

SERVER = "debian-bookworm+vm"
CLIENT = "debian-trixie+vm"
PORT = 8000
GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"


@pytest.fixture(autouse=True)
def prepared_images(request: pytest.FixtureRequest) -> None:
    """SERVER and CLIENT are prepared images (+vm), which only prepare makes: in a fresh store
    they are made here, before a group asks for them (a group never builds an image itself)."""
    if {"racker_machines", "racker_group"} & set(request.fixturenames):
        from racker import images, prepare
        from racker.store.refs import PREPARED

        for name in (SERVER, CLIENT):
            prepare.prepare(images.pull(name.removesuffix(PREPARED)))


def serve(host, token: str) -> None:  # type: ignore[no-untyped-def]
    """python3's HTTP server in the machine, on PORT, serving a file that holds `token`."""
    host.check_output(f"mkdir -p /srv/www && echo {token} > /srv/www/token")
    host.check_output(f"systemd-run --unit=web --property=WorkingDirectory=/srv/www python3 -m http.server {PORT}")
    deadline = time.monotonic() + 30
    while not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening:
        assert time.monotonic() < deadline, "the HTTP server did not start"
        time.sleep(0.2)


def address(host) -> str:  # type: ignore[no-untyped-def]
    return host.machine.state.extra["network"]["address"]


def links(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir("/sys/class/net") if name.startswith(prefix))


def test_a_server_answers_its_client_by_name_and_nothing_else_reaches_them(racker_machines) -> None:
    umask = os.umask(0o077)  # racker's own, as its CLI and plugin narrow it: the guest's users still resolve names
    try:
        hosts = racker_machines({"server": SERVER, "client": CLIENT})
    finally:
        os.umask(umask)
    server, client = hosts["server"], hosts["client"]
    from racker.pytest import testinfra_backend  # testinfra: not in tox's unit environment, which collects this module

    as_nobody = testinfra_backend.host_for(client.machine, "nobody")
    assert as_nobody.check_output("getent hosts server").split()[0] == address(server)
    serve(server, "hello-from-server")
    assert client.check_output(f"python3 -c '{GET}' http://server:{PORT}/token") == "hello-from-server"
    assert client.check_output("getent hosts server").split()[0] == address(server)
    assert server.check_output("getent hosts client").split()[0] == address(client)
    assert client.system_info.codename == "trixie" and server.system_info.codename == "bookworm"
    lease = server.machine.state.extra["network"]
    net = named_networks.get(lease["network"])
    assert net is not None and ipaddress.ip_address(lease["address"]) in net.subnet
    # The host holds no address on the bridge and routes nothing to it; the machines have no way out.
    assert not json.loads(proc.run(["ip", "-j", "address", "show", "dev", net.bridge]).stdout)[0].get("addr_info")
    assert json.loads(proc.run(["ip", "-j", "route", "get", lease["address"]]).stdout)[0].get("dev") != net.bridge
    assert "default" not in client.check_output("ip route")
    outside = json.loads(proc.run(["ip", "-j", "-4", "route", "get", "192.0.2.200"]).stdout)[0]["prefsrc"]  # the host's own address
    with socket.socket() as listener:  # on every address of the host
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert client.run(f"python3 -c '{CONNECT}' {outside} {port}").rc != 0
        # Even with a route put in by hand, the host takes nothing from the bridge (racker_private's input drop).
        client.check_output(f"ip route add {outside}/32 dev eth0")
        assert client.run(f"python3 -c '{CONNECT}' {outside} {port}").rc != 0
        # Not even half a connection: the host's answer would go out of its default route, and be lost.
        assert not proc.run(["ss", "-tnH", "state", "syn-recv", f"sport = :{port}"]).stdout.strip()


def test_two_groups_at_once_never_meet(racker_machines) -> None:
    """Started at the same moment, with the same names: distinct bridges and subnets, each client
    its own server, and a frame sent at the other group's server goes nowhere."""
    found: dict[str, dict] = {}
    errors: list[BaseException] = []

    def boot(tag: str) -> None:
        try:
            found[tag] = racker_machines({"server": SERVER, "client": SERVER})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=boot, args=(tag,)) for tag in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    a, b = found["a"], found["b"]
    lease_a, lease_b = (g["server"].machine.state.extra["network"] for g in (a, b))
    assert lease_a["bridge"] != lease_b["bridge"]
    subnets = [named_networks.get(lease["network"]).subnet for lease in (lease_a, lease_b)]  # type: ignore[union-attr]
    assert not subnets[0].overlaps(subnets[1])
    serve(a["server"], "server-of-a")
    serve(b["server"], "server-of-b")
    assert a["client"].check_output(f"python3 -c '{GET}' http://server:{PORT}/token") == "server-of-a"
    assert b["client"].check_output(f"python3 -c '{GET}' http://server:{PORT}/token") == "server-of-b"
    # a's client, given a route onto b's subnet by hand, still cannot reach b's server: separate bridges.
    a["client"].check_output(f"ip route add {subnets[1]} dev eth0")
    assert a["client"].run(f"python3 -c '{CONNECT}' {address(b['server'])} {PORT}").rc != 0


# An HTTP service as a Dockerfile makes one, FROM the bootstrap bookworm that hub_mirror serves (no python3
# there: systemd-socket-activate answers each connection with a shell script), its content in WORKDIR.
WEB_DOCKERFILE = """\
FROM debian:bookworm
COPY respond /usr/local/bin/respond
COPY index.html /srv/www/index.html
WORKDIR /srv/www
EXPOSE 8080
ENTRYPOINT ["systemd-socket-activate", "--listen=8080", "--accept", "--inetd", "/usr/local/bin/respond"]
"""
RESPOND = """\
#!/bin/sh
# One HTTP/1.0 answer per connection: the request read to its blank line, then the page in the working directory.
while IFS= read -r line && [ "$line" != "$(printf '\\r')" ]; do :; done
printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/html\\r\\n\\r\\n'
cat index.html
"""


def test_an_http_service_built_from_a_dockerfile_answers_a_client_by_name(  # type: ignore[no-untyped-def]
    racker_machines, share_image, hub_mirror: dict, tmp_path: Path, monkeypatch
) -> None:
    for key, value in hub_mirror.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_HOST", raising=False)  # buildah builds it, no engine
    client_image = share_image("debian-bookworm", prepared=True)  # into the private store: python3 for the client
    context = tmp_path / "web"
    context.mkdir()
    (context / "Dockerfile").write_text(WEB_DOCKERFILE)
    (context / "index.html").write_text("<h1>built from a Dockerfile</h1>\n")
    (context / "respond").write_text(RESPOND)
    (context / "respond").chmod(0o755)
    hosts = racker_machines({"web": f"dockerfile:{context}", "client": client_image.name})
    web, client = hosts["web"], hosts["client"]
    config = web.machine.image.manifest["config"]
    assert web.machine.image.manifest["build"]["builder"] == "buildah"
    # The service as the image says to run it: ENTRYPOINT + CMD, in its WORKDIR.
    argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    web.check_output(f"systemd-run --unit=web --property=WorkingDirectory={config['WorkingDir']} -- {shlex.join(argv)}")
    deadline = time.monotonic() + 30
    while not web.socket("tcp://8080").is_listening:  # on any address: IPv4 or IPv6
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.2)
    assert client.check_output(f"python3 -c '{GET}' http://web:8080/") == "<h1>built from a Dockerfile</h1>"
    assert client.check_output("getent hosts web").split()[0] == address(web)


@pytest.mark.racker_machines(web=SERVER, probe=SERVER)
def test_the_mark_names_the_machines(racker_group) -> None:
    assert set(racker_group) == {"web", "probe"}
    assert racker_group["probe"].check_output("getent hosts web").split()[0] == address(racker_group["web"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"server": SERVER, "Server": SERVER}, "two machines are named 'server' and 'Server': one name each"),
        ({"under_score": SERVER}, "'under_score' is not a valid host name"),
        ({"web-": SERVER}, "'web-' is not a valid host name"),
        ({"server": {"image": SERVER, "engine": "lxc"}}, "machine 'server': engine 'lxc' cannot join a group"),
        ({}, "a group names its machines: {NAME: IMAGE, …}"),
    ],
)
def test_bad_groups_are_one_error_and_make_nothing(spec, message) -> None:  # type: ignore[no-untyped-def]
    before = (links("rkn-"), links("rkv-"), sorted(p.name for p in named_networks.networks_dir().iterdir()))
    with pytest.raises(MachineError) as raised:
        groups.Group(spec).start()
    assert str(raised.value) == message
    assert (links("rkn-"), links("rkv-"), sorted(p.name for p in named_networks.networks_dir().iterdir())) == before


KILLED = """\
import time

def test_hold(racker_machines):
    racker_machines({{"server": "{image}", "client": "{image}"}})
    time.sleep(600)
"""


def hold_a_group(tmp_path: Path, image: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    """A pytest run whose test holds a two-machine group: (the run, its network, the claims, the records), once both are up."""
    suite = tmp_path / "suite"  # beside the private store, never above it: pytest would collect the images
    suite.mkdir()
    (suite / "test_hold.py").write_text(KILLED.format(image=image))
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-c", os.devnull, str(suite)]
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 180
    mine: list[named_networks.Network] = []
    while time.monotonic() < deadline and run.poll() is None:
        mine = [n for n in named_networks.all_networks() if n.owner and n.owner[0] == run.pid]
        claims = mine[0].members().values() if mine else []
        states = [
            s for d in claims if (s := machines.load_file(Path(d["record"]), d["kind"], d["name"])) and s.extra.get("machined") is not None
        ]
        if len(states) == 2:  # both up: the test is running
            break
        time.sleep(0.3)
    if not mine or run.poll() is not None:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        raise AssertionError(run.stdout.read().decode())  # type: ignore[union-attr]
    net = mine[0]
    members = net.members()
    assert net.bridge in links("rkn-") and {d["host_if"] for d in members.values()} <= set(links("rkv-"))
    return run, net, members, states


def test_ctrl_c_of_the_run_leaves_no_network(tmp_path: Path, share_image, private_store) -> None:
    image = share_image("debian-bookworm", prepared=True)
    run, net, members, states = hold_a_group(tmp_path, image.name, private_store)
    os.kill(run.pid, signal.SIGINT)
    try:
        run.wait(60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    assert named_networks.get(net.name) is None and net.bridge not in links("rkn-")
    assert not {d["host_if"] for d in members.values()} & set(links("rkv-"))
    assert not any(proc.alive(s.leader, s.leader_start, s.boot_id) for s in states)


def test_sigkill_of_the_run_then_gc_leaves_no_bridge_veth_claim_or_rule(tmp_path: Path, share_image, private_store) -> None:
    image = share_image("debian-bookworm", prepared=True)  # into a store of the test's own, which gc may clean
    run, net, members, states = hold_a_group(tmp_path, image.name, private_store)
    try:
        # The whole run at once: pytest, and the nspawns (which would otherwise shut their machines down).
        os.killpg(run.pid, signal.SIGKILL)
        for state in states:
            os.kill(state.pid, signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    collected = racker("gc", env=private_store)
    assert collected.returncode == 0, collected.stderr
    assert named_networks.get(net.name) is None, collected.stdout
    assert net.bridge not in links("rkn-")
    assert not {d["host_if"] for d in members.values()} & set(links("rkv-"))
    assert str(net.subnet).replace("/", "_") not in os.listdir(network.subnet_claims_dir())
    assert not any(proc.alive(s.leader, s.leader_start, s.boot_id) for s in states)  # type: ignore[union-attr]
    if not named_networks.all_networks():
        assert named_networks.TABLE not in proc.run(["nft", "list", "tables"]).stdout


# -- the command line: racker network create|ls|rm, racker start|run --network NAME ---------------


@pytest.fixture
def cli_network(share_image, private_store):  # type: ignore[no-untyped-def]
    """A network made with `racker network create`, and the prepared bookworm in a private store: (name, image, env)."""
    image = share_image("debian-bookworm", prepared=True)
    name = f"t-{os.urandom(3).hex()}"
    made = racker("network", "create", name, env=private_store)
    assert made.returncode == 0, made.stderr
    yield name, image.name, private_store
    racker("stop", "--all", env=private_store)
    racker("network", "rm", name, env=private_store)


def test_cli_machines_on_a_named_network_resolve_each_other(cli_network) -> None:
    name, image, env = cli_network
    for machine in ("web", "probe"):
        started = racker("start", "--network", name, "--name", machine, image, env=env)
        assert started.returncode == 0, started.stderr
    listed = json.loads(racker("network", "ls", "--json", env=env).stdout)
    mine = next(n for n in listed if n["name"] == name)
    assert set(mine["machines"]) == {"web", "probe"}
    assert racker("exec", "web", "--", "sh", "-c", "mkdir -p /srv/www && echo served-by-web > /srv/www/token", env=env).returncode == 0
    serve = ["systemd-run", "--unit=web", "--property=WorkingDirectory=/srv/www", "python3", "-m", "http.server", "8000"]
    assert racker("exec", "web", "--", *serve, env=env).returncode == 0
    for _ in range(20):  # the server takes a moment to listen
        fetched = racker("exec", "probe", "--", "python3", "-c", GET, "http://web:8000/token", env=env)
        if fetched.returncode == 0:
            break
        time.sleep(0.5)
    assert fetched.returncode == 0 and fetched.stdout.strip() == "served-by-web", fetched.stderr
    refused = racker("network", "rm", name, env=env)
    assert (
        refused.returncode == 125 and refused.stderr.splitlines()[0] == f"racker: error: network {name!r} has running machines: probe, web"
    )
    assert racker("stop", "web", "probe", env=env).returncode == 0
    assert racker("network", "rm", name, env=env).returncode == 0
    assert named_networks.get(name) is None and not any(n["name"] == name for n in json.loads(racker("network", "ls", "--json").stdout))
    assert mine["bridge"] not in links("rkn-")


def test_cli_bad_network_input_is_one_line_and_leaves_nothing(cli_network, tmp_path: Path) -> None:
    name, image, env = cli_network
    assert racker("start", "--network", name, "--name", "web", image, env=env).returncode == 0
    net = named_networks.lookup(name)
    before = (links("rkv-"), sorted(net.members()), net.hosts_file.read_text())
    shared = {"RACKER_HOME": "/var/lib/racker-tests"}  # another store: a registry of its own, the host's networks
    cases = [
        (("run", "--network", "nosuch", image, "--", "true"), env, "racker: error: no network named 'nosuch'"),
        (("start", "--network", name, "--name", "web-", image), env, "racker: error: 'web-' is not a valid host name"),
        (("start", "--network", name, "--name", "web", image), env, "racker: error: machine name 'web' is already in use"),
        (("start", "--network", name, "--name", "WEB", "debian-bookworm+vm"), shared,
         f"racker: error: network {name!r} has a machine named 'web' already"),
        (("network", "create", name), env, f"racker: error: network {name!r} already exists"),
        (("network", "create", "nat"), env, "racker: error: invalid network name 'nat'"),
        (("start", "--network", name, "--publish", "8080:80", image), env,
         "racker: error: --publish needs --network nat: a private network is not reachable from the host"),
    ]  # fmt: skip
    try:
        for argv, where, message in cases:
            done = racker(*argv, env=where)
            assert done.returncode == 125 and done.stderr.splitlines()[0] == message, (argv, done.stderr)
            assert len(done.stderr.splitlines()) <= 2, done.stderr  # the error and its hint
            assert (links("rkv-"), sorted(net.members()), net.hosts_file.read_text()) == before, argv
        assert [s.name for s in machines.all_states("nspawn")] == ["web"]
    finally:
        racker("stop", "WEB", env=shared)  # should it have started after all


TWO_AT_ONCE = """\
import ipaddress, os, time
from pathlib import Path

GET = "import urllib.request; print(urllib.request.urlopen('http://server:8000/token', timeout=10).read().decode())"
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"

def group_test(racker_machines, tag):
    hosts = racker_machines({{"server": "{image}", "client": "{image}"}})
    hosts["server"].check_output(f"mkdir -p /srv && echo {{tag}} > /srv/token")
    hosts["server"].check_output("systemd-run --unit=web --property=WorkingDirectory=/srv python3 -m http.server 8000")
    lease = hosts["server"].machine.state.extra["network"]
    subnet = str(ipaddress.ip_interface(f"{{lease['address']}}/{{lease['prefix']}}").network)
    Path("{shared}", tag).write_text(" ".join([lease["network"], lease["bridge"], subnet, lease["address"]]))
    deadline = time.monotonic() + 120
    while len(os.listdir("{shared}")) < 2:  # both groups up at the same time
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for _ in range(40):
        got = hosts["client"].run(f"python3 -c \\"{{GET}}\\"")
        if got.rc == 0:
            break
        time.sleep(0.25)
    assert got.stdout.strip() == tag, got.stderr
    # The other group's server, its address and a route to it given by hand: out of reach.
    other = Path("{shared}", "b" if tag == "a" else "a").read_text().split()
    hosts["client"].check_output(f"ip route add {{other[2]}} dev eth0")
    assert hosts["client"].run(f"python3 -c \\"{{CONNECT}}\\" {{other[3]}} 8000").rc != 0

def test_a(racker_machines):
    group_test(racker_machines, "a")

def test_b(racker_machines):
    group_test(racker_machines, "b")
"""


def test_two_group_tests_at_once_under_xdist(tmp_path: Path, share_image, private_store) -> None:
    image = share_image("debian-bookworm", prepared=True)
    suite, shared = tmp_path / "suite", tmp_path / "shared"
    suite.mkdir()
    shared.mkdir()
    (suite / "test_two.py").write_text(TWO_AT_ONCE.format(image=image.name, shared=shared))
    env = {**os.environ, **private_store, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", "-c", os.devnull, str(suite)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    networks = {tag.name: tag.read_text().split() for tag in shared.iterdir()}
    (name_a, bridge_a, subnet_a, _), (name_b, bridge_b, subnet_b, _) = networks["a"], networks["b"]
    assert name_a != name_b and bridge_a != bridge_b  # two networks, at the same time
    assert not ipaddress.ip_network(subnet_a).overlaps(ipaddress.ip_network(subnet_b))  # no address in both
    assert all(named_networks.get(n[0]) is None for n in networks.values())  # and both gone with their tests


def test_racker0_and_private_networks_never_share_a_subnet(cli_network) -> None:
    """A private network's subnet has no host route; racker0, made after it, still steers clear (its claim)."""
    name, image, env = cli_network
    private = named_networks.lookup(name).subnet
    ran = racker("run", "--network", "nat", image, "--", "ip", "-4", "-o", "address", "show", "eth0", env=env)
    assert ran.returncode == 0, ran.stderr
    nat_address = ipaddress.ip_address(ran.stdout.split()[3].split("/")[0])
    assert nat_address not in private, (nat_address, private)
