"""What the full-boot checks read from a booted VM, gathered in one round trip.

FACTS is the table: a name and the shell command (run as root) whose output
and exit status are that fact. `gather` runs them all in one script, over
one SSH connection, and the checks read the answers by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from racker import proc
from racker.promote import profiles
from racker.vm import seed

# One DNS query, as small as it gets, to the first nameserver of /etc/resolv.conf: "answer rcode=N
# from ADDRESS" or "timeout ADDRESS". A name under .invalid, which a resolver answers (NXDOMAIN)
# without asking anyone (RFC 6761): an answer proves the server serves this guest, with no internet.
DNS_QUERY = """\
import os, re, socket, struct
conf = open("/etc/resolv.conf").read()
server = (re.findall(r"^\\s*nameserver\\s+(\\S+)", conf, re.M) or ["none"])[0]
qid = int.from_bytes(os.urandom(2), "big")
name = b"".join(bytes([len(p)]) + p for p in (b"racker-check", b"invalid")) + b"\\0"
packet = struct.pack(">6H", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack(">2H", 1, 1)
family = socket.AF_INET6 if ":" in server else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(5)
try:
    sock.sendto(packet, (server, 53))
    while True:
        data, peer = sock.recvfrom(4096)
        if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid and data[2] & 0x80:
            print(f"answer rcode={data[3] & 15} from {peer[0]}")
            break
except (OSError, socket.timeout) as error:
    print(f"timeout {server} ({error})")
"""

# Each command's stderr is part of its output: a failure message shows both.
FACTS: dict[str, str] = {
    "system_state": "systemctl is-system-running",
    "failed_units": "systemctl --failed --no-legend --plain",
    # sshd's service and its state ("active" when running), asked of the image's init: systemctl,
    # else the init script's own status (sysv-rc's and OpenRC's images both have /etc/init.d/ssh).
    "sshd_unit": "for u in ssh sshd; do if [ -d /run/systemd/system ]; then systemctl cat $u.service >/dev/null 2>&1"
    " && { echo $u; systemctl is-active $u; break; }; elif [ -x /etc/init.d/$u ]; then echo $u;"
    " /etc/init.d/$u status >/dev/null 2>&1 && echo active || echo inactive; break; fi; done",
    "listening_22": "ss -Htln 'sport = :22'",
    # Match blocks evaluated for root logging in from QEMU's gateway, as a client's login would be.
    "sshd_config": "sshd -T -C user=root,host=racker-check,addr=10.0.2.2",
    "ssh_methods": "ssh -F /dev/null -o BatchMode=yes -o PreferredAuthentications=none -o StrictHostKeyChecking=no "
    f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=20 {seed.USER}@127.0.0.1 true",
    "authorized_keys": f'cat "$(getent passwd {seed.USER} | cut -d: -f6)/.ssh/authorized_keys"',
    "hostname": "hostname",
    # Its version module alone: the CLI would import all of cloud-init first (3 s under emulation).
    "cloud_init_version": "python3 -c 'from cloudinit import version; print(\"cloud-init\", version.version_string())' 2>/dev/null"
    " || cloud-init --version",
    "cloud_init_status": "cloud-init status --format=json",
    "cloud_init_result": "cat /run/cloud-init/result.json",
    "cloud_init_stages": "cat /run/cloud-init/status.json",
    "cloud_init_schema": "cloud-init schema --system",
    "cloud_init_tracebacks": "grep -n -A6 Traceback /var/log/cloud-init.log | head -80",
    "links": "ip -j addr show",
    "default_route": "ip -j -4 route show default",
    "networkd_leases": "for f in /run/systemd/netif/leases/*; do grep -h -e '^ADDRESS=' -e '^DNS=' $f; done",
    # Newer networkd keeps no lease files in /run (Debian sid): its JSON names each address's source.
    "networkd_json": "networkctl --json=short status 2>/dev/null",
    "dhclient_leases": "cat /var/lib/dhcp/dhclient*.leases /var/lib/dhclient/*.lease* 2>/dev/null",
    "resolv_conf": "ls -l /etc/resolv.conf; cat /etc/resolv.conf",
    # What systemd-resolved's stub (127.0.0.53) forwards to: the servers the network gave it.
    "resolved_servers": "cat /run/systemd/resolve/resolv.conf",
    "dns_answer": proc.quote("python3", "-c", DNS_QUERY),
    "root_mount": "findmnt -J -b -o SOURCE,FSTYPE,OPTIONS,SIZE,UUID /",
    "block_devices": "lsblk -J -b -o NAME,PATH,SIZE,TYPE,PKNAME",
    "root_write": "f=/.racker-write-check-$$; echo racker-write-check >$f && sync $f && cat $f; rm -f $f",
    "fstab": "cat /etc/fstab",
    "booted_at": "sed -n 's/^btime //p' /proc/stat",
    "machine_id": "cat /etc/machine-id; stat -c %Y /etc/machine-id",
    "host_keys": "stat -c '%Y %n' /etc/ssh/ssh_host_*_key",
    "cmdline": "cat /proc/cmdline",
    "boot_time": "systemd-analyze time",
    # The time-sync service, then the NTP servers it was configured with (a profile's drop-in, user-data's ntp:).
    "time_sync": "systemctl is-active systemd-timesyncd.service; timedatectl show-timesync -p SystemNTPServers --value",
    "os_release": "cat /etc/os-release /usr/lib/os-release 2>/dev/null | head -20",
    "virtio_modules": "for m in virtio_scsi virtio_net virtio_pci; do echo $m $(modinfo -F filename $m 2>&1); done",
    "profile_files": "sha256sum " + " ".join(sorted({f"/{rel}" for p in profiles.PROFILES.values() for rel in p.files})) + " 2>/dev/null",
}

START, END = "\x1e", "\x1f"


# systemd-resolved's local stubs: a nameserver line naming one of them means resolved's own servers.
RESOLVED_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})


def nameservers(resolv_conf: str) -> list[str]:
    return re.findall(r"^\s*nameserver\s+(\S+)", resolv_conf, re.M)


def networkd_dhcp_dns(status: object) -> set[str]:
    """IPv4 DNS servers `networkctl --json=short status` says DHCPv4 gave."""
    found = set()
    for link in (status or {}).get("Interfaces", []) if isinstance(status, dict) else []:
        for server in link.get("DNS", []):
            value = server.get("Address")
            if server.get("ConfigSource") == "DHCPv4" and isinstance(value, list) and len(value) == 4:
                found.add(".".join(str(byte) for byte in value))
    return found


def networkd_dhcp_addresses(status: object) -> set[str]:
    """IPv4 addresses `networkctl --json=short status` says DHCPv4 gave (Address: a list of bytes)."""
    found = set()
    for link in (status or {}).get("Interfaces", []) if isinstance(status, dict) else []:
        for address in link.get("Addresses", []):
            value = address.get("Address")
            if address.get("ConfigSource") == "DHCPv4" and isinstance(value, list) and len(value) == 4:
                found.add(".".join(str(byte) for byte in value))
    return found


@dataclass(frozen=True)
class Fact:
    out: str  # stdout and stderr, stripped
    rc: int


class Facts(dict[str, Fact]):
    """The answers, by name, with the parsing the checks share."""

    def __repr__(self) -> str:  # an assertion's explanation shows the fact it read, not all of them
        return f"<{len(self)} facts>"

    def out(self, name: str) -> str:
        return self[name].out

    def shown(self, name: str) -> str:
        """The command and what it printed, for a failure message."""
        return f"$ {FACTS[name]}\n(exit {self[name].rc})\n{self[name].out}"

    def json(self, name: str):  # type: ignore[no-untyped-def]
        try:
            return json.loads(self.out(name))
        except ValueError:
            return None

    def sshd_config(self) -> dict[str, str]:
        # sshd -T prints lower-case keys, or (OpenSSH 10) the configuration's own spelling.
        return {k.lower(): v.lower() for k, _, v in (line.partition(" ") for line in self.out("sshd_config").splitlines())}

    def cloud_init_status(self) -> dict:
        """`cloud-init status --format=json`, or on a cloud-init without it, result.json's v1 and the plain status."""
        status = self.json("cloud_init_status")
        if isinstance(status, dict):
            return status
        result = (self.json("cloud_init_result") or {}).get("v1", {})
        return {**result, "status": "done" if result else "not done", "detail": self.out("cloud_init_status")}

    def first_nic(self) -> dict | None:
        return next((link for link in self.json("links") or [] if link.get("ifname") != "lo"), None)

    def dhcp_leases(self) -> set[str]:
        """The addresses a DHCP client (networkd's or dhclient) holds a lease for."""
        networkd = set(re.findall(r"^ADDRESS=(\S+)", self.out("networkd_leases"), re.M))
        return (
            networkd
            | networkd_dhcp_addresses(self.json("networkd_json"))
            | set(re.findall(r"fixed-address\s+([\d.]+);", self.out("dhclient_leases")))
        )

    def dhcp_dns(self) -> set[str]:
        """The DNS servers a DHCP lease (networkd's or dhclient's) gave."""
        networkd = {a for line in re.findall(r"^DNS=(.*)$", self.out("networkd_leases"), re.M) for a in line.split()}
        dhclient = {
            a.strip() for line in re.findall(r"domain-name-servers\s+([^;]+);", self.out("dhclient_leases")) for a in line.split(",")
        }
        return networkd | networkd_dhcp_dns(self.json("networkd_json")) | dhclient

    def nameservers_in_use(self) -> list[str]:
        """The servers the guest's lookups go to: /etc/resolv.conf's, through resolved's stub to its own."""
        listed = nameservers(self.out("resolv_conf"))
        if listed and set(listed) <= RESOLVED_STUBS:
            return nameservers(self.out("resolved_servers"))
        return listed

    def block_device(self, path: str) -> tuple[dict | None, dict | None]:
        """(the partition at `path`, the disk holding it) from lsblk."""
        devices = (self.json("block_devices") or {}).get("blockdevices", [])
        flat = [d for disk in devices for d in [disk, *disk.get("children", [])]]
        part = next((d for d in flat if d["path"] == path), None)
        disk = next((d for d in flat if part and d["name"] == part.get("pkname")), None)
        return part, disk

    def booted_at(self) -> int:
        return int(self.out("booted_at"))


# Each imports all of cloud-init, 3 s under emulation: they run beside the others (on
# the VM's other CPU), and are printed after them.
BESIDE = ("cloud_init_status", "cloud_init_schema")


def script() -> str:
    def printed(name: str, command: str) -> str:
        return f"printf '\\036%s\\n' {name}\n( {command} ) 2>&1\nprintf '\\n\\037%s\\n' $?\n"

    lines = ["d=$(mktemp -d)\n"]
    lines += [f'( ( {FACTS[name]} ) >"$d/{name}" 2>&1; echo $? >"$d/{name}.rc" ) &\n' for name in BESIDE]
    lines += [printed(name, command) for name, command in FACTS.items() if name not in BESIDE]
    lines.append("wait\n")
    lines += [printed(name, f'cat "$d/{name}"; exit $(cat "$d/{name}.rc")') for name in BESIDE]
    lines.append('rm -rf "$d"\n')
    return "".join(lines)


def parse(output: str) -> Facts:
    facts = Facts()
    for chunk in output.split(START)[1:]:
        name, _, rest = chunk.partition("\n")
        body, _, rc = rest.rpartition(END)
        facts[name] = Fact(body.strip(), int(rc.strip() or -1))
    return facts


def gather(machine) -> Facts:  # type: ignore[no-untyped-def]
    """Every fact, in one command (one SSH connection) as root."""
    result = machine.run(["sh", "-c", script()], timeout=300)
    facts = parse(result.stdout)
    missing = set(FACTS) - set(facts)
    assert not missing, f"the facts script stopped early (exit {result.returncode}): {sorted(missing)}\n{result.stderr}"
    return facts


# -- boot time ----------------------------------------------------------------

UNITS = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def seconds(text: str) -> float:
    """systemd's time span ("1min 25.147s", "812ms") in seconds."""
    return sum(float(n) * UNITS[unit] for n, unit in re.findall(r"([\d.]+)(h|min|ms|us|µs|s)\b", text))


def systemd_boot_split(text: str) -> dict[str, float]:
    """`systemd-analyze time`: {"firmware"?, "loader"?, "kernel", "initrd"?, "userspace", "total"}."""
    line = next((line for line in text.splitlines() if line.startswith("Startup finished in ")), "")
    split = {stage: round(seconds(span), 3) for span, stage in re.findall(r"([\dhminsµu. ]+?) \((\w+)\)", line)}
    if "=" in line:
        split["total"] = round(seconds(line.rsplit("=", 1)[1]), 3)
    return split


def cloud_init_seconds(stages: dict | None) -> float | None:
    """From the first stage's start to the last one's end, by cloud-init's own status.json."""
    times = [v for v in (stages or {}).get("v1", {}).values() if isinstance(v, dict) and v.get("start") and v.get("finished")]
    if not times:
        return None
    return round(max(t["finished"] for t in times) - min(t["start"] for t in times), 3)


# -- profile requirements, as a booted VM shows them ----------------------------


def _version(text: str) -> tuple[int, ...]:
    match = re.search(r"(\d+(?:\.\d+)+)", text)
    return tuple(int(x) for x in match.group(1).split(".")) if match else ()


def booted_unix(facts: Facts) -> tuple[bool, str]:
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)', facts.out("os_release"), re.M)
    return bool(match), match.group(1) if match else "no os-release"


def booted_cloud_init(facts: Facts) -> tuple[bool, str]:
    version = _version(facts.out("cloud_init_version"))
    return bool(version) and version >= (0, 7, 7), facts.out("cloud_init_version") or "cloud-init is not installed"


def booted_sshd(facts: Facts) -> tuple[bool, str]:
    unit, _, state = facts.out("sshd_unit").partition("\n")
    return state.strip() == "active", f"{unit or 'sshd'}.service {state.strip() or 'missing'}"


def booted_sshd_option(option: str) -> Callable[[Facts], tuple[bool, str]]:
    def check(facts: Facts) -> tuple[bool, str]:
        value = facts.sshd_config().get(option.lower(), "")
        return value == "no", f"sshd -T: {option} {value or '(unset)'}"

    return check


def booted_dhcp(facts: Facts) -> tuple[bool, str]:
    nic = facts.first_nic() or {}
    leased = {a["local"] for a in nic.get("addr_info", []) if a.get("family") == "inet" and a.get("dynamic")} & facts.dhcp_leases()
    return bool(leased), f"{nic.get('ifname', 'no NIC')}: " + (", ".join(sorted(leased)) + " by DHCP" if leased else "no DHCP lease")


def booted_serial_console(facts: Facts) -> tuple[bool, str]:
    found = re.search(r"(^|\s)(console=ttyS0\S*)", facts.out("cmdline"))
    return bool(found), found.group(2) if found else f"no console=ttyS0 in {facts.out('cmdline')!r}"


def booted_virtio_drivers(facts: Facts) -> tuple[bool, str]:
    missing = [line.split()[0] for line in facts.out("virtio_modules").splitlines() if "not found" in line.lower()]
    return not missing, "missing: " + ", ".join(missing) if missing else "virtio_scsi, virtio_net, virtio_pci"


# A profile requirement (by its tree check) -> the same requirement read from the booted VM.
BOOTED: dict[Callable, Callable[[Facts], tuple[bool, str]]] = {
    profiles.check_unix: booted_unix,
    profiles.check_cloud_init: booted_cloud_init,
    profiles.check_sshd: booted_sshd,
    profiles.check_password_auth_off: booted_sshd_option("PasswordAuthentication"),
    profiles.check_root_login_off: booted_sshd_option("PermitRootLogin"),
    profiles.check_dhcp: booted_dhcp,
    profiles.check_no_ipv6_needed: booted_dhcp,
    profiles.check_serial_console: booted_serial_console,
    profiles.check_virtio_drivers: booted_virtio_drivers,
}
