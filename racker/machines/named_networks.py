"""Private networks of racker's own: machines on one see each other by name, and nothing else.

A network is a bridge of its own (`rkn-…`, no address on the host, so the host
routes nothing to or from it), a /24 of RACKER_NETWORK_RANGE that no other
network and not racker0 holds (network.claim_subnet), and a hosts file that
every member has bind-mounted read-only at /etc/hosts: each resolves the others
by the name it joined under (a VM, out of reach of bind mounts, asks its DNS
server, racker.vm.bridge, which serves that same file). A member is an nspawn
machine with a veth (`rkv-…` on the host, `eth0` inside) on the bridge and the
next free address, claimed as racker0's are (one file per address, naming the
machine record).
No default route, no NAT, no forwarding: racker's nft table `racker_private`
drops whatever comes in from these bridges to the host or leaves them routed.

Two kinds, one mechanism:
- named (`racker network create NAME`): lives until `racker network rm NAME`, as `docker network`;
- a test's group (plugin_fixtures.racker_machines): owned by the test's process, and gone with
  its last machine once that process is: `racker gc` removes one whose owner was killed.

Everything is the host's (state under network.state_dir(), /run/racker/network), changed
under network.locked().
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from racker import machines, proc, store
from racker.errors import MachineError
from racker.machines import State, network

BRIDGE_PREFIX = "rkn-"
HOST_IF_PREFIX = "rkv-"
TABLE = "racker_private"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)
HELPER = "helper"  # a claim's role: an address a machine's helper holds (a VM's DHCP server, racker.vm.bridge)
HOSTS_HEAD = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def networks_dir() -> Path:
    path = network.state_dir() / "networks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_network_name(name: str) -> str:
    if name in network.MODES or not _NAME.match(name):
        raise MachineError(
            f"invalid network name {name!r}",
            hint="lower-case letters, digits, '_', '.' and '-', at most 63, not none, private or nat",
        )
    return name


def check_hostname(name: str) -> str:
    """A name others resolve a member by: a DNS host name (labels of letters, digits and '-')."""
    if not (isinstance(name, str) and len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))):
        raise MachineError(f"{name!r} is not a valid host name", hint="letters, digits and '-' (dots between labels), e.g. server")
    return name


@dataclass(frozen=True)
class Network:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    owner: tuple[int, int, str] | None  # a test group's process (pid, start time, boot): None for a named network

    @property
    def directory(self) -> Path:
        return networks_dir() / self.name

    @property
    def claims(self) -> Path:
        return self.directory / "claims"

    @property
    def hosts_dir(self) -> Path:
        """The hosts file's directory, which holds nothing else: a VM's DNS server (racker.vm.bridge)
        reads it as dnsmasq's --hostsdir, and so sees every rewrite of the file as it happens."""
        return self.directory / "hosts.d"

    @property
    def hosts_file(self) -> Path:
        legacy = self.directory / "hosts"  # a network made before hosts.d, its members bound to that file
        return legacy if legacy.is_file() and not self.hosts_dir.is_dir() else self.hosts_dir / "hosts"

    def dnsmasq_hosts(self) -> list[str]:
        """A VM's DNS server's options for the network's names: the hosts file's directory, watched, so
        every change is seen (--hostsdir); a network made before hosts.d has only the file beside its
        other state, which is read as the server starts (--addn-hosts): names that come later are not known."""
        if self.hosts_file.parent == self.hosts_dir:
            return [f"--hostsdir={self.hosts_dir}"]
        return [f"--addn-hosts={self.hosts_file}"]

    def members(self) -> dict[str, dict]:
        """address -> claim, of every claim file (live or not)."""
        found = {}
        for path in sorted(self.claims.iterdir()) if self.claims.is_dir() else []:
            data = network.read_claim(path)
            if data is not None:
                found[path.name] = data
        return found


def _record(directory: Path) -> Network | None:
    try:
        data = json.loads((directory / "network.json").read_text())
        owner = data.get("owner")
        return Network(data["name"], data["bridge"], ipaddress.IPv4Network(data["subnet"]), tuple(owner) if owner else None)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def get(name: str) -> Network | None:
    if not _NAME.match(name):
        return None
    return _record(networks_dir() / name)


def all_networks() -> list[Network]:
    return [n for path in sorted(networks_dir().iterdir()) if (n := _record(path)) is not None]


def lookup(name: str) -> Network:
    """The network called `name`; one line if there is none."""
    found = get(name)
    if found is None:
        raise MachineError(f"no network named {name!r}", hint="see `racker network ls`; make one with `racker network create NAME`")
    return found


# -- making and removing ----------------------------------------------------------


def create(name: str, *, owned: bool = False) -> Network:
    """A new network: its record and subnet claim first, then the bridge and the isolating rules.
    owned: a test group's, gone with its last machine once this process is (racker gc)."""
    check_network_name(name)
    me = os.getpid()
    owner = (me, proc.start_time(me), proc.boot_id()) if owned else None
    with network.locked():
        directory = networks_dir() / name
        try:
            directory.mkdir()
        except FileExistsError:
            raise MachineError(f"network {name!r} already exists", hint="pick another name, or `racker network rm` it") from None
        subnet = None
        try:
            subnet = network.claim_subnet(f"network {name}")
            created = Network(name, BRIDGE_PREFIX + os.urandom(5).hex(), subnet, owner)
            (directory / "claims").mkdir()
            (directory / "hosts.d").mkdir()
            store.write_json(
                directory / "network.json",
                {"name": name, "bridge": created.bridge, "subnet": str(subnet), "owner": list(owner) if owner else None},
            )
            _write_hosts(created)
            _apply_rules()
            proc.run(["ip", "link", "add", created.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0"], timeout=30)
            # No IPv6 link-local address of the host's on it either: the host is not on this network.
            Path(f"/proc/sys/net/ipv6/conf/{created.bridge}/disable_ipv6").write_text("1\n")
            proc.run(["ip", "link", "set", created.bridge, "up"], timeout=30)
        except BaseException:
            if (made := _record(directory)) is not None:
                _remove(made)
            else:
                shutil.rmtree(directory, ignore_errors=True)
                if subnet is not None:
                    network.release_subnet(subnet)
            raise
    return created


def remove(name: str) -> list[str]:
    """`racker network rm NAME`: refused while a machine is on it."""
    with network.locked():
        found = lookup(name)
        _reap_members(found)
        live = [data.get("alias", "?") for data in found.members().values()]
        if live:
            raise MachineError(f"network {name!r} has running machines: {', '.join(sorted(live))}", hint="stop them first")
        return _remove(found)


def _remove(net: Network) -> list[str]:
    """The bridge, the subnet claim, the record; the rules too if it was the last network. Under the lock."""
    removed = []
    if Path("/sys/class/net", net.bridge).exists():
        proc.run(["ip", "link", "delete", net.bridge], timeout=30, check=False)
        removed.append(f"removed bridge {net.bridge}")
    network.release_subnet(net.subnet)
    shutil.rmtree(net.directory, ignore_errors=True)
    removed.append(f"removed network {net.name} ({net.subnet})")
    if any(networks_dir().iterdir()):
        _apply_rules()
    else:
        removed += _drop_rules()
    return removed


def release_owned(net: Network) -> list[str]:
    """A test group is done: its network goes (its machines are stopped already)."""
    with network.locked():
        _reap_members(net)
        if net.members():
            return []  # a machine still on it: gc removes the network after it
        return _remove(net)


# -- rules ------------------------------------------------------------------------


def _apply_rules() -> None:
    """Whatever reaches the host from a private bridge, or would be routed off one, is dropped.
    Where br_netfilter passes bridged frames through the IP hooks (Docker loads it; a bridge cannot
    opt out while the sysctl is on), a network's own traffic shows as in and out on its bridge:
    that, and only that, passes. Rewritten from the records whenever a network comes or goes."""
    bridges = sorted(n.bridge for n in all_networks())
    pairs = ", ".join(f'"{bridge}" . "{bridge}"' for bridge in bridges)
    elements = f"elements = {{ {pairs} }}" if bridges else ""
    rules = f"""\
table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
  set within {{
    type ifname . ifname; {elements}
  }}
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    iifname "{BRIDGE_PREFIX}*" drop
  }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    iifname . oifname @within accept
    iifname "{BRIDGE_PREFIX}*" drop
    oifname "{BRIDGE_PREFIX}*" drop
  }}
}}
"""
    proc.run(["nft", "-f", "-"], input=rules.encode(), timeout=30)


def _drop_rules() -> list[str]:
    if proc.which("nft") and proc.run(["nft", "list", "table", "inet", TABLE], timeout=30, check=False).succeeded:
        proc.run(["nft", "delete", "table", "inet", TABLE], timeout=30)
        return [f"removed nftables table {TABLE}"]
    return []


# -- members ----------------------------------------------------------------------


def _write_hosts(net: Network) -> None:
    """Rewritten in place (never renamed over): the members' read-only bind mounts see the change."""
    lines = [HOSTS_HEAD]
    for address, data in sorted(net.members().items(), key=lambda item: ipaddress.IPv4Address(item[0])):
        if data.get("role") == HELPER:
            continue  # a VM's DHCP server: nobody's name
        names = [data.get("alias", ""), data.get("name", "")]
        lines.append(f"{address}\t{' '.join(dict.fromkeys(n for n in names if n))}\n")
    with open(net.hosts_file, "w") as handle:
        os.fchmod(handle.fileno(), 0o644)  # every user in the machines reads /etc/hosts, whatever racker's umask
        handle.write("".join(lines))


def _drop_member(net: Network, address: str, data: dict) -> list[str]:
    removed = []
    pid, started = (data.get("helper") or [0, 0])[:2]
    if isinstance(pid, int) and isinstance(started, int) and proc.kill_and_wait(pid, started, str(data.get("boot_id"))):
        removed.append(f"killed the DHCP server of {data.get('name')} (pid {pid})")
    host_if = str(data.get("host_if", ""))
    if host_if.startswith(HOST_IF_PREFIX) and Path("/sys/class/net", host_if).exists():
        proc.run(["ip", "link", "delete", host_if], timeout=30, check=False)
        removed.append(f"removed veth {host_if}")
    (net.claims / address).unlink(missing_ok=True)
    removed.append(f"released address {address} of network {net.name}")
    return removed


def _reap_members(net: Network) -> list[str]:
    """Drop the claims whose machine is gone. Under the lock."""
    removed = []
    for address, data in net.members().items():
        if not network.claim_live(data):
            removed += _drop_member(net, address, data)
    if removed:
        _write_hosts(net)
    return removed


class Member(network.Loopback):
    """An nspawn machine's place on a private network: eth0 on its bridge, an address, /etc/hosts."""

    def __init__(self, name: str, alias: str | None = None, publish: Sequence[network.Publish] = ()) -> None:
        if publish:
            raise MachineError("--publish needs --network nat: a private network is not reachable from the host")
        self.net = lookup(name)
        self.alias = check_hostname(alias) if alias is not None else None
        self.mode = name
        self.lease: dict = {}

    def setup(self, state: State) -> None:
        alias = self.alias or check_hostname(state.name)
        host_if = HOST_IF_PREFIX + state.token[:11]  # 15 characters, unique per claim
        with network.locked():
            net = lookup(self.net.name)  # it may have been removed meanwhile
            _reap_members(net)
            taken = {str(data.get("alias", "")).lower(): data.get("alias") for data in net.members().values()}
            if alias.lower() in taken:  # host names are not case-sensitive
                raise MachineError(
                    f"network {net.name!r} has a machine named {taken[alias.lower()]!r} already", hint="give each machine its own name"
                )
            claim = {
                "record": str(machines.record_path(state.kind, state.name)),
                "kind": state.kind,
                "name": state.name,
                "alias": alias,
                "token": state.token,
                "boot_id": proc.boot_id(),
                "host_if": host_if,
            }
            address = _claim_free_address(net, claim)
            _write_hosts(net)
        self.lease = {
            "mode": "named",
            "network": net.name,
            "alias": alias,
            "address": str(address),
            "prefix": net.subnet.prefixlen,
            "bridge": net.bridge,
            "host_if": host_if,
            "ports": [],
        }
        state.extra["network"] = self.lease
        machines.save(state)

    def nspawn_options(self, rundir: Path) -> list[str]:
        unmanaged = rundir / "racker-eth0.network"
        unmanaged.write_text(
            f"# racker configures {network.GUEST_IF} from the host\n[Match]\nName={network.GUEST_IF}\n\n[Link]\nUnmanaged=yes\n"
        )
        unmanaged.chmod(0o644)  # systemd-networkd reads it as a user of its own
        return [
            f"--network-veth-extra={self.lease['host_if']}:{network.GUEST_IF}",
            f"--bind-ro={self.net.hosts_file}:/etc/hosts",
            f"--bind-ro={unmanaged}:/run/systemd/network/10-racker-{network.GUEST_IF}.network",
        ]

    def configure(self, state: State) -> None:
        """The host end onto the bridge; the address inside. No route beyond the subnet."""
        lease = self.lease
        proc.run(["ip", "link", "set", lease["host_if"], "master", lease["bridge"], "up"], timeout=30)
        inside = f"link set {network.GUEST_IF} up\naddress add {lease['address']}/{lease['prefix']} dev {network.GUEST_IF}\n"
        netns = f"--net=/proc/{state.leader}/ns/net"
        proc.run(["nsenter", netns, "--", proc.require("ip"), "-batch", "-"], input=inside.encode(), timeout=30)


def claim_helper_address(name: str, state: State, host_if: str) -> str:
    """A second address on network `name` for a helper of the machine's (a VM's DHCP server): its claim
    names the helper's link and, once set_claim_helper() tells it, its process; both go with the claim."""
    claim = {
        "record": str(machines.record_path(state.kind, state.name)),
        "kind": state.kind,
        "name": state.name,
        "role": HELPER,
        "token": state.token,
        "boot_id": proc.boot_id(),
        "host_if": host_if,
    }
    with network.locked():
        return _claim_free_address(lookup(name), claim)


def _claim_free_address(net: Network, claim: dict) -> str:
    """The first address of the network no claim holds, claimed (created, never overwritten) for `claim`."""
    for address in net.subnet.hosts():
        try:
            fd = os.open(net.claims / str(address), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(claim, handle)
        return str(address)
    raise MachineError(f"every address of network {net.name!r} ({net.subnet}) is taken")


def set_claim_helper(name: str, address: str, pid: int, started: int) -> None:
    with network.locked():
        net = lookup(name)
        data = network.read_claim(net.claims / address)
        if data is not None:
            store.write_json(net.claims / address, {**data, "helper": [pid, started]})


def release_helper_address(name: str, address: str, token: str) -> list[str]:
    with network.locked():
        net = get(name)
        data = network.read_claim(net.claims / address) if net is not None else None
        if net is None or data is None or data.get("token") != token:
            return []
        return _drop_member(net, address, data)


def for_mode(mode: str, publish: Sequence[network.Publish] = (), alias: str | None = None) -> network.Loopback:
    """A machine's network: one of network.MODES, or the private network of that name."""
    if mode in network.MODES:
        return network.for_mode(mode, publish)
    return Member(mode, alias, publish)


def release(state: State) -> list[str]:
    """The machine is gone: its address and veth go, and the others' /etc/hosts forget it."""
    lease = state.extra.get("network") or {}
    if lease.get("mode") != "named":
        return []
    with network.locked():
        net = get(str(lease.get("network", "")))
        if net is None:
            return []
        data = network.read_claim(net.claims / str(lease.get("address")))
        removed = []
        if data is not None and data.get("token") == state.token:
            removed = _drop_member(net, str(lease["address"]), data)
            _write_hosts(net)
        return removed


def _owner_alive(net: Network) -> bool:
    if net.owner is None:
        return True  # a named network lives until `racker network rm`
    pid, started, boot = net.owner
    return proc.alive(pid, started, boot)


def collect() -> list[str]:
    """`racker gc`: claims of gone machines, test groups' networks whose owner and machines are gone,
    and racker's bridges and veths no network names."""
    if not network.state_dir().exists():
        return []
    removed: list[str] = []
    with network.locked():
        known = all_networks()
        for net in known:
            removed += _reap_members(net)
            if not _owner_alive(net) and not net.members():
                removed += _remove(net)
        live = all_networks()
        bridges = {n.bridge for n in live}
        veths = {str(d.get("host_if")) for n in live for d in n.members().values()}
        for name in sorted(os.listdir("/sys/class/net")):
            stray = (name.startswith(BRIDGE_PREFIX) and name not in bridges) or (name.startswith(HOST_IF_PREFIX) and name not in veths)
            if stray:
                proc.run(["ip", "link", "delete", name], timeout=30, check=False)
                removed.append(f"removed stray link {name}")
        # What a racker killed while making a network left: a directory without a record, a subnet claim.
        for path in networks_dir().iterdir():
            if _record(path) is None:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"removed unfinished network {path.name}")
        held = {n.subnet for n in live}
        for path in network.subnet_claims_dir().iterdir():
            subnet = ipaddress.IPv4Network(path.name.replace("_", "/"))
            if subnet not in held:
                network.release_subnet(subnet)
                removed.append(f"released subnet {subnet}")
        if not live:
            removed += _drop_rules()
    return removed


def listing() -> list[dict]:
    """`racker network ls`: each network, its bridge, subnet and machines."""
    rows = []
    for net in all_networks():
        members = {d.get("alias", "?"): a for a, d in net.members().items() if network.claim_live(d) and d.get("role") != HELPER}
        rows.append(
            {"name": net.name, "bridge": net.bridge, "subnet": str(net.subnet), "owned": net.owner is not None, "machines": members}
        )
    return rows


__all__ = ["Member", "Network", "collect", "create", "for_mode", "get", "listing", "lookup", "release", "release_owned", "remove"]
