"""A machine's network: loopback only (`none`, `private`), or `nat`, what Docker's bridge gives.

`none` and `private` are one mode under two names (Docker's word and nspawn's):
a network namespace of the machine's own with nothing but `lo`.

`nat`: the host's bridge `racker0` holds the first address of a /24 taken from
RACKER_NETWORK_RANGE (default 10.213.0.0/16), the first one no host route
overlaps. Each machine gets a veth pair (nspawn makes it: `rk-…` on the host,
`eth0` inside), the next free address of that /24, a default route via the
bridge, the host's nameservers, and no port open to the outside: one
nftables table of racker's own (`racker`) masquerades the range and refuses
new connections into it. `--publish` ports are forwarded by a userspace
process of the machine's (racker/machines/forward.py) on 127.0.0.1 unless an address
is given.

A machine reaches what a Docker container reaches, no more. Forwarding is
accepted from racker0 out and, established or related, back; where racker
turned the host's ip_forward on, nothing else is forwarded (the host did not
route before), and ip_forward goes off again with the bridge. Link-local
destinations (169.254.0.0/16: the cloud metadata service at 169.254.169.254,
which hands a CI runner's credentials to whoever asks) are dropped from
machines, forwarded or to the host, unless the machine was started with
`--allow-link-local` (mode `nat+link-local`). IPv6 is not routed to machines.

The bridge and the table are the host's, shared by every store; so are the
address claims, one file per address in RACKER_NETWORK_DIR
(/run/racker/network), each naming the machine record that holds it. A claim
is made, under a host-wide lock, before anything it names exists. One whose
machine is gone is stale: the next allocation or `racker gc` removes it and
what it names, and the bridge and the table go with the last claim.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import racker
from racker import machines, proc, settings, store
from racker.errors import MachineError
from racker.machines import State

MODES = ("none", "private", "nat", "nat+link-local")
DEFAULT_MODE = "private"
BRIDGE = "racker0"
TABLE = "racker"
HOST_IF_PREFIX = "rk-"
GUEST_IF = "eth0"
SUBNET_PREFIX = 24
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
LINK_LOCAL_OK = "link_local_ok"  # the nft set of machine addresses allowed to reach LINK_LOCAL
FORWARDING_MARK = "forwarding-turned-on"  # in state_dir(): racker turned ip_forward on, and turns it off


def network_range() -> ipaddress.IPv4Network:
    network = settings.NETWORK_RANGE.value()
    if network.prefixlen > SUBNET_PREFIX:
        raise MachineError(f"RACKER_NETWORK_RANGE={str(network)!r} is smaller than a /{SUBNET_PREFIX}")
    return network


def state_dir() -> Path:
    return settings.NETWORK_DIR.value()


def claims_dir() -> Path:
    path = state_dir() / "claims"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Host-wide: held while addresses are claimed or released and the bridge made or removed."""
    with store.locked("network", store_home=state_dir()):
        yield


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise MachineError(f"unknown network {mode!r}", hint=f"--network {'|'.join(MODES)}")
    return mode


# -- published ports ------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """`--publish [ADDR:]HOST:GUEST`: the host's ADDR:HOST forwards to the guest's port GUEST."""

    address: str
    host_port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.host_port}:{self.guest_port}"


def parse_publish(spec: str) -> Publish:
    parts = spec.split(":")
    if len(parts) == 2:
        parts.insert(0, "127.0.0.1")  # never the outside, unless asked
    try:
        if len(parts) != 3:
            raise ValueError
        address = str(ipaddress.IPv4Address(parts[0]))
        host_port, guest_port = int(parts[1]), int(parts[2])
        if not (0 < host_port < 65536 and 0 < guest_port < 65536):
            raise ValueError
    except ValueError:
        raise MachineError(f"bad --publish {spec!r}", hint="--publish [ADDRESS:]HOST_PORT:GUEST_PORT, e.g. 8080:80") from None
    return Publish(address, host_port, guest_port)


def _listen(publish: Publish) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((publish.address, publish.host_port))
        listener.listen(128)
    except OSError as error:
        listener.close()
        what = "is already in use" if error.errno == errno.EADDRINUSE else f"cannot be bound ({error.strerror})"
        where = f"{publish.address}:{publish.host_port}"
        raise MachineError(f"cannot publish {publish}: {where} {what}", hint="pick another host port") from None
    return listener


# -- the modes ------------------------------------------------------------------


class Loopback:
    """`none` and `private`: only `lo`; machines never fight over the host's ports."""

    mode = "private"

    def __init__(self, publish: Sequence[Publish] = ()) -> None:
        if publish:
            raise MachineError("--publish needs a network to publish from", hint="add --network nat")

    def setup(self, state: State) -> None:
        pass

    def nspawn_options(self, rundir: Path) -> list[str]:
        return ["--private-network"]

    def configure(self, state: State) -> None:
        pass

    def start_forwarder(self, state: State, *, detached: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Nat(Loopback):
    """`nat`: eth0 on racker's bridge, an address of racker's range, outbound NAT, published ports."""

    mode = "nat"
    link_local = False  # may the machine reach 169.254.0.0/16 (the cloud metadata service among them)?

    def __init__(self, publish: Sequence[Publish] = ()) -> None:
        self.publish = list(publish)
        self.listeners: list[socket.socket] = []
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.lease: dict = {}

    def setup(self, state: State) -> None:
        """Bind the published ports (a port in use fails here, before anything is made), then claim an address."""
        for publish in self.publish:
            self.listeners.append(_listen(publish))
        host_if = HOST_IF_PREFIX + state.token[:12]  # at most 15 characters, unique per claim
        with _locked():
            _reap_stale_claims()
            subnet, mtu = _ensure_bridge()
            address = _claim_address(subnet, state, host_if, link_local=self.link_local)
            if self.link_local:
                _apply_rules(subnet)  # the rules name the addresses allowed link-local: this one now too
        self.lease = {
            "mode": "nat",
            "link_local": self.link_local,
            "address": str(address),
            "gateway": str(next(subnet.hosts())),
            "prefix": subnet.prefixlen,
            "mtu": mtu,
            "host_if": host_if,
            "ports": [str(p) for p in self.publish],
        }
        state.extra["network"] = self.lease
        machines.save(state)

    def nspawn_options(self, rundir: Path) -> list[str]:
        resolv = rundir / "resolv.conf"
        resolv.write_text(resolv_conf())
        # The image's networkd (a prepared image runs DHCP on eth*) must leave racker's eth0 alone.
        unmanaged = rundir / "racker-eth0.network"
        unmanaged.write_text(f"# racker configures {GUEST_IF} from the host\n[Match]\nName={GUEST_IF}\n\n[Link]\nUnmanaged=yes\n")
        return [
            f"--network-veth-extra={self.lease['host_if']}:{GUEST_IF}",
            f"--bind={resolv}:/etc/resolv.conf",
            f"--bind-ro={unmanaged}:/run/systemd/network/10-racker-{GUEST_IF}.network",
        ]

    def configure(self, state: State) -> None:
        """Plug the host end into the bridge; address, link and default route inside (no guest tool needed)."""
        lease = self.lease
        proc.run(["ip", "link", "set", lease["host_if"], "master", BRIDGE, "mtu", str(lease["mtu"]), "up"], timeout=30)
        inside = (
            f"link set {GUEST_IF} mtu {lease['mtu']} up\n"
            f"address add {lease['address']}/{lease['prefix']} dev {GUEST_IF}\n"
            f"route add default via {lease['gateway']} dev {GUEST_IF}\n"
        )
        netns = f"--net=/proc/{state.leader}/ns/net"
        proc.run(["nsenter", netns, "--", proc.require("ip"), "-batch", "-"], input=inside.encode(), timeout=30)

    def start_forwarder(self, state: State, *, detached: bool) -> None:
        """Hand the bound ports to a forwarder that lives as long as the machine's leader (a VM's: QEMU)."""
        if not self.listeners:
            return
        leader, leader_start = (state.leader, state.leader_start) if state.leader else (state.pid, state.pid_start)
        argv = [sys.executable, "-m", "racker.machines.forward", str(leader), str(leader_start)]
        argv += [f"{s.fileno()}={self.lease['address']}:{p.guest_port}" for s, p in zip(self.listeners, self.publish, strict=True)]
        with open(state.rundir / "forward.log", "ab") as log:
            self.forwarder = proc.start(
                argv,
                env={"PYTHONPATH": str(Path(racker.__file__).resolve().parent.parent)},  # this very racker
                stdout=log,
                stderr=subprocess.STDOUT,
                new_session=True,
                die_with_parent=None if detached else signal.SIGTERM,
                pass_fds=[s.fileno() for s in self.listeners],
            )
        self.lease["forwarder"] = [self.forwarder.pid, proc.start_time(self.forwarder.pid)]
        machines.save(state)
        _update_claim(self.lease["address"], forwarder=self.lease["forwarder"])
        self.close_listeners()

    def close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def close(self) -> None:
        self.close_listeners()
        if self.forwarder is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.forwarder.wait(5)  # release() killed it: reap our child


class NatLinkLocal(Nat):
    """`nat` that may reach link-local addresses (`--allow-link-local`): a cloud's metadata service too."""

    link_local = True


NETWORKS: dict[str, type[Loopback]] = {"none": Loopback, "private": Loopback, "nat": Nat, "nat+link-local": NatLinkLocal}


def for_mode(mode: str, publish: Sequence[Publish] = ()) -> Loopback:
    return NETWORKS[check_mode(mode)](publish)


# -- the host's side: bridge, table, claims ------------------------------------


def _ip_json(*args: str) -> list[dict]:
    return json.loads(proc.run(["ip", "-j", *args], timeout=30).stdout or "[]")


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host routes or holds an address in (racker's bridge aside)."""
    networks = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        if route.get("dev") == BRIDGE or route.get("dst") in (None, "default"):
            continue
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.IPv4Network(route["dst"], strict=False))
    return networks


def subnet_claims_dir() -> Path:
    """One file per /24 that a private network of racker's (named_networks.py) holds: never racker0's."""
    path = state_dir() / "subnets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _claimed_subnets() -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(p.name.replace("_", "/")) for p in subnet_claims_dir().iterdir() if not p.name.startswith(".")]


def claim_subnet(holder: str) -> ipaddress.IPv4Network:
    """A /24 of the range for a private network: none a host route, racker0 or another claim overlaps.
    The claim is a file named after the subnet, holding `holder`. Under _locked()."""
    taken = _host_networks() + _claimed_subnets()
    if (current := _bridge_subnet()) is not None:
        taken.append(current)
    for subnet in network_range().subnets(new_prefix=SUBNET_PREFIX):
        if not any(subnet.overlaps(network) for network in taken):
            (subnet_claims_dir() / str(subnet).replace("/", "_")).write_text(holder + "\n")
            return subnet
    raise MachineError(f"every /{SUBNET_PREFIX} of {network_range()} is in use", hint="remove a network, or set RACKER_NETWORK_RANGE")


def release_subnet(subnet: ipaddress.IPv4Network) -> None:
    (subnet_claims_dir() / str(subnet).replace("/", "_")).unlink(missing_ok=True)


def locked() -> contextlib.AbstractContextManager[None]:
    """The host-wide network lock, for named_networks.py: one lock for racker0 and every private network."""
    return _locked()


def claim_live(data: dict | None) -> bool:
    return _claim_live(data)


def read_claim(path: Path) -> dict | None:
    return _read_claim(path)


def _pick_subnet() -> ipaddress.IPv4Network:
    taken = _host_networks() + _claimed_subnets()  # a private network's subnet has no host route
    for subnet in network_range().subnets(new_prefix=SUBNET_PREFIX):
        if not any(subnet.overlaps(network) for network in taken):
            return subnet
    hint = "set RACKER_NETWORK_RANGE to a free range"
    raise MachineError(f"every /{SUBNET_PREFIX} of {network_range()} overlaps a host route", hint=hint)


def _uplink_mtu() -> int:
    """The MTU of the default route's device: a guest sending bigger packets would stall behind it."""
    for route in _ip_json("-4", "route", "show", "default"):
        with contextlib.suppress(OSError, ValueError):
            return int(Path("/sys/class/net", route["dev"], "mtu").read_text())
    return 1500


def _bridge_subnet() -> ipaddress.IPv4Network | None:
    for link in _ip_json("-4", "address", "show", "dev", BRIDGE) if _link_exists(BRIDGE) else []:
        for info in link.get("addr_info", []):
            return ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
    return None


def _nft_rules(subnet: ipaddress.IPv4Network, link_local_ok: Sequence[str], forwarding_is_ours: bool) -> str:
    """racker's table: NAT for the range; forwarding for racker0 only (and nothing else where racker
    turned ip_forward on); link-local refused from machines but for the addresses in `link_local_ok`."""
    elements = f"elements = {{ {', '.join(link_local_ok)} }}" if link_local_ok else ""
    others = "drop" if forwarding_is_ours else "accept"  # the host's own routing, if it had any, is left alone
    return f"""\
table ip {TABLE} {{}}
delete table ip {TABLE}
table ip {TABLE} {{
  set {LINK_LOCAL_OK} {{
    type ipv4_addr; {elements}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} ip daddr != {subnet} masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy {others};
    iifname "rkn-*" oifname "rkn-*" accept comment "private networks (named_networks.py) decide for their bridges"
    iifname "{BRIDGE}" ip daddr {LINK_LOCAL} ip saddr != @{LINK_LOCAL_OK} drop
    iifname "{BRIDGE}" oifname "{BRIDGE}" accept comment "bridged, where br_netfilter is on: a VM's DHCP from 0.0.0.0 too"
    iifname "{BRIDGE}" ip saddr {subnet} accept
    oifname "{BRIDGE}" ct state established,related accept
    oifname "{BRIDGE}" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{BRIDGE}" ip daddr {LINK_LOCAL} ip saddr != @{LINK_LOCAL_OK} drop
  }}
}}
"""


def _apply_rules(subnet: ipaddress.IPv4Network) -> None:
    """(Re)write racker's table from the live claims: one nft transaction, idempotent. Under _locked()."""
    allowed = sorted(p.name for p in claims_dir().iterdir() if (_read_claim(p) or {}).get("link_local"))
    rules = _nft_rules(subnet, allowed, (state_dir() / FORWARDING_MARK).exists())
    proc.run(["nft", "-f", "-"], input=rules.encode(), timeout=30)


def _forwarding_on() -> None:
    """ip_forward on; if racker is the one turning it on, say so in FORWARDING_MARK (the rules then forward
    nothing but racker0's, and teardown turns it off again). Someone else's forwarding stays theirs."""
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if forward.read_text().strip() != "1":
        (state_dir() / FORWARDING_MARK).write_text("racker turned net.ipv4.ip_forward on\n")
        forward.write_text("1\n")


def _forwarding_off() -> list[str]:
    """ip_forward back off where racker turned it on (the last bridge is gone)."""
    mark = state_dir() / FORWARDING_MARK
    if not mark.exists():
        return []
    Path("/proc/sys/net/ipv4/ip_forward").write_text("0\n")
    mark.unlink()
    return ["turned net.ipv4.ip_forward off (racker had turned it on)"]


def _ensure_bridge() -> tuple[ipaddress.IPv4Network, int]:
    """racker0 with its address, racker's nft table, forwarding on; (the bridge's subnet, the MTU)."""
    subnet = _bridge_subnet()
    mtu = _uplink_mtu()
    if subnet is None:
        if not _link_exists(BRIDGE):
            proc.run(["ip", "link", "add", BRIDGE, "type", "bridge"], timeout=30)
        subnet = _pick_subnet()
        proc.run(["ip", "address", "add", f"{next(subnet.hosts())}/{subnet.prefixlen}", "dev", BRIDGE], timeout=30)
    proc.run(["ip", "link", "set", BRIDGE, "mtu", str(mtu), "up"], timeout=30)
    _forwarding_on()  # first, so that the rules know whose forwarding it is
    _apply_rules(subnet)  # before any machine is plugged in
    return subnet, mtu


def _claim_address(subnet: ipaddress.IPv4Network, state: State, host_if: str, *, link_local: bool) -> ipaddress.IPv4Address:
    """The lowest free address of the subnet, claimed by a file created with O_EXCL."""
    claim = {
        "link_local": link_local,
        "record": str(machines.record_path(state.kind, state.name)),
        "kind": state.kind,
        "name": state.name,
        "token": state.token,
        "boot_id": proc.boot_id(),
        "host_if": host_if,
        "forwarder": [0, 0],
    }
    gateway = next(subnet.hosts())
    for address in subnet.hosts():
        if address == gateway:
            continue
        try:
            fd = os.open(claims_dir() / str(address), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(claim, handle)
        return address
    raise MachineError(f"every address of {subnet} is taken by a running machine", hint="stop some machines, or run `racker gc`")


def claim_helper_address(state: State, host_if: str) -> str:
    """A second address on racker0 for a helper of the machine's (a VM's DHCP server, racker.vm.bridge):
    its claim names the helper's link, and its process once set_claim_helper() tells it, so that
    the claim's release or `racker gc` removes both."""
    with _locked():
        subnet = _bridge_subnet()
        if subnet is None:
            raise MachineError(f"bridge {BRIDGE} is gone", hint="run `racker gc`, then start the machine again")
        return str(_claim_address(subnet, state, host_if, link_local=False))


def set_claim_helper(address: str, pid: int, started: int) -> None:
    _update_claim(address, forwarder=[pid, started])


def release_helper_address(address: str, token: str) -> list[str]:
    """Drop a helper's claim (its process, its link), if it is still `token`'s. The bridge stays: release() decides."""
    with _locked():
        path = claims_dir() / address
        data = _read_claim(path)
        return _drop_claim(path, data) if data is not None and data.get("token") == token else []


def _update_claim(address: str, **changes: object) -> None:
    path = claims_dir() / address
    with _locked():
        data = _read_claim(path)
        if data is not None:
            store.write_json(path, {**data, **changes})


def _read_claim(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _claim_live(data: dict | None) -> bool:
    """A claim whose machine record is still there, still this claim's, and not stale."""
    if data is None or data.get("kind") not in machines.KINDS or not machines.valid_name(data.get("name")):
        return False
    state = machines.load_file(Path(str(data.get("record"))), data["kind"], data["name"])
    return state is not None and state.token == data.get("token") and not machines.is_stale(state)


def _drop_claim(path: Path, data: dict | None) -> list[str]:
    """Remove a claim and what it names: the machine's forwarder, its host veth, the claim file."""
    removed = []
    if data is not None:
        pid, started = (data.get("forwarder") or [0, 0])[:2]
        if isinstance(pid, int) and isinstance(started, int) and proc.kill_and_wait(pid, started, str(data.get("boot_id"))):
            removed.append(f"killed the port forwarder of {data.get('name')} (pid {pid})")
        host_if = str(data.get("host_if", ""))
        if host_if.startswith(HOST_IF_PREFIX) and _link_exists(host_if):
            proc.run(["ip", "link", "delete", host_if], timeout=30, check=False)  # gone with the netns meanwhile: fine
            removed.append(f"removed veth {host_if}")
    path.unlink(missing_ok=True)
    removed.append(f"released address {path.name}")
    return removed


def _reap_stale_claims() -> list[str]:
    removed = []
    for path in sorted(claims_dir().iterdir()):
        data = _read_claim(path)
        if not _claim_live(data):
            removed += _drop_claim(path, data)
    return removed


def _teardown_if_unused() -> list[str]:
    """The bridge and the table go with the last claim; stray veths of racker's go always."""
    removed = []
    claimed = {(_read_claim(p) or {}).get("host_if") for p in claims_dir().iterdir()}
    for name in sorted(os.listdir("/sys/class/net")):
        if name.startswith(HOST_IF_PREFIX) and name not in claimed:
            proc.run(["ip", "link", "delete", name], timeout=30, check=False)
            removed.append(f"removed veth {name}")
    if any(claims_dir().iterdir()):
        return removed
    if _link_exists(BRIDGE):
        proc.run(["ip", "link", "delete", BRIDGE], timeout=30)
        removed.append(f"removed bridge {BRIDGE}")
    if proc.which("nft") and proc.run(["nft", "list", "table", "ip", TABLE], timeout=30, check=False).succeeded:
        proc.run(["nft", "delete", "table", "ip", TABLE], timeout=30)
        removed.append(f"removed nftables table {TABLE}")
    return removed + _forwarding_off()


def release(state: State) -> list[str]:
    """Give up what the machine's network holds (its machine is gone); the bridge too if it was the last."""
    lease = state.extra.get("network") or {}
    if lease.get("mode") != "nat" or not lease.get("address"):
        return []
    with _locked():
        path = claims_dir() / str(lease["address"])
        data = _read_claim(path)
        removed = _drop_claim(path, data) if data is not None and data.get("token") == state.token else []
        if lease.get("link_local") and (subnet := _bridge_subnet()) is not None and any(claims_dir().iterdir()):
            _apply_rules(subnet)  # its address may reach link-local no more
        # A forwarder started after the claim was read still dies here.
        pid, started = (lease.get("forwarder") or [0, 0])[:2]
        proc.kill_and_wait(pid, started, state.boot_id)
        return removed + _teardown_if_unused()


def collect() -> list[str]:
    """`racker gc`: stale claims and what they name, stray veths, and the bridge and table if unused."""
    if not state_dir().exists():
        return []
    with _locked():
        return _reap_stale_claims() + _teardown_if_unused()


def resolv_conf() -> str:
    """The host's resolv.conf without loopback nameservers (unreachable from a machine); resolved's
    upstream list where the host names only its own stub."""
    for source in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        try:
            lines = Path(source).read_text().splitlines()
        except OSError:
            continue
        kept = [line for line in lines if not _loopback_nameserver(line)]
        if any(line.split()[:1] == ["nameserver"] for line in kept):
            return f"# racker: {source} of the host, without loopback nameservers\n" + "\n".join(kept) + "\n"
    return "# racker: the host names no nameserver a machine can reach\n"


def _loopback_nameserver(line: str) -> bool:
    words = line.split()
    if words[:1] != ["nameserver"] or len(words) < 2:
        return False
    try:
        return ipaddress.ip_address(words[1].split("%")[0]).is_loopback
    except ValueError:
        return False
