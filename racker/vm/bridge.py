"""A VM on one of racker's bridges (`racker vm start --network nat|NAME`): a tap device, and DHCP.

An nspawn machine's address is set from the host (nsenter, `ip address add`); a VM's
guest is out of reach of nsenter, so it asks DHCP as on any real network. The address
is still racker's: claimed as a machine's is (network.py for racker0, named_networks.py
for a private network), so a VM and nspawn machines share one allocation and one
hosts file. The tap takes the claim's host link name (`rk-…`, `rkv-…`), so
whatever removes a machine's veth removes a VM's tap.

The DHCP server is dnsmasq, one per VM, in a network namespace of its own with one
veth on the bridge and a second claimed address; it leases exactly the VM's
address to exactly the VM's MAC (`--dhcp-host`, static mode) and answers nobody
else. Why dnsmasq, and why there:
- a private network's bridge has no host address and its nft rules drop what reaches
  the host from it (named_networks.py): a server on the host would have to break that,
  one in a namespace of its own is a member like any other;
- its lifetime is the VM's: killed with it, or by `racker gc` through the claim that
  names it (the namespace, and so the veth, go with the process). A server per bridge
  would need a count of its users that a SIGKILL'd racker could leave wrong;
- systemd-networkd's DHCPServer needs networkd running on the host (racker assumes no
  systemd as PID 1) and hands out addresses from its own pool, not racker's claims;
- dnsmasq is small (dnsmasq-base: no service, no config) and logs each lease to the
  run directory.

On a private network, the same dnsmasq is the VM's DNS server for the network's names
(the hosts file nspawn members see as /etc/hosts), and the guest asks it first (seed_bootcmd).

The VM keeps QEMU's user-mode NIC too, second, for racker's SSH control channel on
127.0.0.1: a private network is unreachable from the host by design, and so the
SSH readiness, port and connection master work the same on every network. The
bridge's NIC comes first, so the guest's first NIC (what the full-boot DHCP check
reads) is the one racker's DHCP configures.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from racker import machines, proc
from racker.errors import MachineError
from racker.machines import State, named_networks, network

USER = "user"  # QEMU's user-mode network only: the default
HELPER_IF = "eth0"  # inside the DHCP server's namespace
RESOLVED_DROPIN = "/etc/systemd/resolved.conf.d/50-racker-network.conf"  # in the guest


def check_mode(mode: str, name: str | None = None) -> str:
    """user, nat, nat+link-local or a private network's name; one line for the rest. On a private
    network, the VM's `name` is the others' name for it: a host name."""
    if mode in (USER, "nat", "nat+link-local"):
        return mode
    if mode in network.MODES:
        raise MachineError(f"a VM has no network {mode!r}", hint="--network user (QEMU's own, the default), nat, or a network's name")
    named_networks.lookup(named_networks.check_network_name(mode))
    if name is not None:
        named_networks.check_hostname(name)
    return mode


def _wait_own_namespace(child: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until `unshare` has given the child its network namespace: a veth sent to its pid before
    would land in ours (and fail on the host's own eth0)."""
    ours = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise MachineError(f"the VM's DHCP server (dnsmasq) exited at start with status {child.returncode}")
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{child.pid}/ns/net") != ours:
                return
        time.sleep(0.01)
    raise MachineError("the VM's DHCP server (dnsmasq) did not start")


def mac_for(token: str) -> str:
    """A locally administered MAC of QEMU's prefix, from the VM's claim token: unique per VM."""
    return "52:54:00:" + ":".join(token[i : i + 2] for i in (0, 2, 4))


class Bridged:
    """The VM's place on a bridge: racker's claim (and published ports), its tap, its DHCP server."""

    def __init__(self, mode: str, publish: Sequence[network.Publish] = (), alias: str | None = None) -> None:
        check_mode(mode)
        self.mode = mode
        self.member = named_networks.for_mode(mode, publish, alias)  # network.Nat or named_networks.Member
        self.lease: dict = {}
        self.dhcp: subprocess.Popen[bytes] | None = None

    @property
    def named(self) -> bool:
        return isinstance(self.member, named_networks.Member)

    def setup(self, state: State, rundir: Path, *, detached: bool) -> None:
        """Claim the VM's address (a published port in use fails here), make its tap, start its DHCP server."""
        self.member.setup(state)
        lease = self.member.lease  # type: ignore[attr-defined]
        lease["mac"] = mac_for(state.token)
        lease["tap"] = lease["host_if"]
        bridge = lease["bridge"] if self.named else network.BRIDGE
        mtu = [] if self.named else ["mtu", str(lease["mtu"])]
        proc.run(["ip", "tuntap", "add", "dev", lease["tap"], "mode", "tap"], timeout=30)
        proc.run(["ip", "link", "set", lease["tap"], "master", bridge, *mtu, "up"], timeout=30)
        # The server's link: rk-x…/rkv-x… ('x' is no hex digit: never another claim's token).
        prefix = named_networks.HOST_IF_PREFIX if self.named else network.HOST_IF_PREFIX
        helper_if = (prefix + "x" + state.token)[:15]
        if self.named:
            server = named_networks.claim_helper_address(self.mode, state, helper_if)
        else:
            server = network.claim_helper_address(state, helper_if)
        lease["dhcp_server"] = server
        state.extra["network"] = lease
        machines.save(state)
        self.lease = lease
        self._start_dhcp(state, rundir, bridge, helper_if, server, mtu, detached=detached)

    def _start_dhcp(self, state: State, rundir: Path, bridge: str, helper_if: str, server: str, mtu: list[str], *, detached: bool) -> None:
        lease = self.lease
        netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{lease['prefix']}").netmask)
        if self.named:
            # No router: a private network routes nowhere. DNS: the network's names, from the hosts file
            # the nspawn members have as /etc/hosts, reread on every change (--hostsdir watches it).
            # A member's name has an IPv4 address only: its AAAA is an empty answer (--filter-AAAA), not a
            # refusal a resolver would take to its next server. Any other name is refused (no upstream):
            # the guest asks its next server, the user-mode NIC's.
            options = ["--dhcp-option=option:router", f"--dhcp-option=option:dns-server,{server}"]
            options += [*named_networks.lookup(self.mode).dnsmasq_hosts(), "--filter-AAAA"]
        else:
            nameservers = [line.split()[1] for line in network.resolv_conf().splitlines() if line.split()[:1] == ["nameserver"]]
            options = [f"--dhcp-option=option:router,{lease['gateway']}", f"--dhcp-option=option:mtu,{lease['mtu']}"]
            options.append("--dhcp-option=option:dns-server" + "".join(f",{n}" for n in nameservers))
            options.append("--port=0")  # no DNS: the host's resolvers serve racker0's machines
        argv = [
            "unshare", "--net", "--", proc.require("dnsmasq"),
            "--keep-in-foreground", "--conf-file=/dev/null", "--no-hosts", "--no-resolv",
            "--user=root", "--group=root", f"--interface={HELPER_IF}", "--bind-dynamic",
            f"--dhcp-range={lease['address']},static,{netmask}", f"--dhcp-host={lease['mac']},{lease['address']}",
            f"--dhcp-leasefile={rundir / 'dhcp.leases'}", f"--pid-file={rundir / 'dnsmasq.pid'}",
            "--log-facility=-", "--log-dhcp", *options,
        ]  # fmt: skip
        with open(rundir / "dhcp.log", "ab") as log:
            self.dhcp = proc.start(
                argv, stdout=log, stderr=subprocess.STDOUT, new_session=True, die_with_parent=None if detached else signal.SIGTERM
            )
        pid, started = self.dhcp.pid, proc.start_time(self.dhcp.pid)
        _wait_own_namespace(self.dhcp)
        if self.named:
            named_networks.set_claim_helper(self.mode, server, pid, started)
        else:
            network.set_claim_helper(server, pid, started)
        machines.set_helper(state, "dhcp", pid, started)
        machines.save(state)
        proc.run(["ip", "link", "add", helper_if, "type", "veth", "peer", "name", HELPER_IF, "netns", str(pid)], timeout=30)
        proc.run(["ip", "link", "set", helper_if, "master", bridge, *mtu, "up"], timeout=30)
        inside = f"link set lo up\nlink set {HELPER_IF} {' '.join(mtu)} up\naddress add {server}/{lease['prefix']} dev {HELPER_IF}\n"
        proc.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", proc.require("ip"), "-batch", "-"], input=inside.encode(), timeout=30)

    def seed_bootcmd(self) -> list[list[str]]:
        """cloud-init bootcmd (the seed's dsmode is local: it runs before the network, and long
        before sshd and racker's first command): on a private network, the guest asks the network's
        DNS server before any other. systemd-resolved lists the links' servers in /etc/resolv.conf in
        an order of its own (a hash table's), and the user-mode NIC's server, which knows none of the
        network's names, may come first; resolved.conf's DNS= (a global server) comes before every
        link's. Written whether resolved runs yet or not (it may start in parallel): a running one is
        restarted, one not started yet reads it. Without resolved, the file is read by nobody and an
        image's dhclient takes the bridge's lease's server."""
        if not self.named:
            return []
        write = 'mkdir -p "${1%/*}" && printf "[Resolve]\\nDNS=%s\\n" "$0" >"$1"'
        script = f"{write} && {{ systemctl try-restart systemd-resolved.service 2>/dev/null || true; }}"
        return [["sh", "-c", script, self.lease["dhcp_server"], RESOLVED_DROPIN]]

    def qemu_args(self, nic: str) -> list[str]:
        """The bridge's NIC, first of the VM's: QEMU opens the tap racker made (no scripts)."""
        netdev = f"tap,id=bridge0,ifname={self.lease['tap']},script=no,downscript=no"
        return ["-netdev", netdev, "-device", f"{nic},netdev=bridge0,mac={self.lease['mac']}"]

    def start_forwarder(self, state: State, *, detached: bool) -> None:
        self.member.start_forwarder(state, detached=detached)

    def close(self) -> None:
        self.member.close()
        if self.dhcp is not None:
            proc.terminate(self.dhcp, grace=2)
            self.dhcp = None


def release(state: State) -> list[str]:
    """The VM is gone: its DHCP server and its address, then its tap (and the bridge, after the last)."""
    lease = state.extra.get("network") or {}
    server = lease.get("dhcp_server")
    removed: list[str] = []
    if server:
        if lease.get("mode") == "named":
            removed += named_networks.release_helper_address(str(lease.get("network", "")), str(server), state.token)
        else:
            removed += network.release_helper_address(str(server), state.token)
    return removed + network.release(state) + named_networks.release(state)
