"""Every unix socket a racker store's machines and VMs listen on, tried as user nobody (issue 22).

    python bench/socket_probe.py          # the store of RACKER_HOME (default /var/lib/racker)

The sockets are found two ways: files of type socket under the store and /run/racker,
and /proc/net/unix's named sockets whose name holds a claim token of the store's
records (racker's abstract sockets were named after it) or that a process of the
records holds (QEMU, systemd-nspawn, an SSH master). A name a process bound
relative to its own directory (`ssh`, `/proc/self/fd/N/qmp`) is read through that
process's cwd or descriptor. Then a child running as uid and gid 65534 with no groups
connects to each: every one must refuse it. Run as root.

tests/test_security_sockets.py asserts it; bench/hostile.py reports its figure.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
RUN = Path("/run/racker")
_PROC_FD = re.compile(r"^/proc/self/fd/(\d+)(/.*)?$")
_TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}
_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags

# What the unprivileged child runs: plain Python, no racker, nothing of the prober's. A path
# past sun_path's 107 bytes is reached as racker reaches it, through a descriptor of its
# directory: the refusal must be the kernel's permission check, never the length.
_CHILD = r"""
import json, os, socket, sys
kinds = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
out = []
for target in json.load(sys.stdin):
    address, fd = target["address"], None
    try:
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif len(os.fsencode(address)) > 107:
            fd = os.open(os.path.dirname(address), os.O_PATH | os.O_DIRECTORY)
            address = "/proc/self/fd/%d/%s" % (fd, os.path.basename(address))
        with socket.socket(socket.AF_UNIX, kinds[target["type"]]) as sock:
            sock.settimeout(2)
            sock.connect(address)
        out.append([target["address"], False, "connected"])
    except OSError as error:
        out.append([target["address"], True, os.strerror(error.errno) if error.errno else str(error)])
    finally:
        if fd is not None:
            os.close(fd)
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True)
class Target:
    address: str  # a path, or @name for an abstract socket
    type: str  # stream, dgram or seqpacket
    why: str  # how it was found


@dataclass
class Probe:
    targets: list[Target] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # address: the error nobody got
    accepted: list[str] = field(default_factory=list)  # addresses nobody connected to

    def details(self) -> str:
        """One line per socket: its address, how it was found, and what nobody got."""
        return "\n".join(f"  {t.address} ({t.type}, {t.why}): {self.refused.get(t.address, 'CONNECTED')}" for t in self.targets)

    def line(self) -> str:
        return f"unix sockets probed as an unprivileged user: {len(self.targets)}, refused: {len(self.refused)}" + (
            f", ACCEPTED: {', '.join(self.accepted)}" if self.accepted else ""
        )


def _records(home: Path) -> tuple[set[int], set[str]]:
    """The pids (processes and helpers) and claim tokens the store's records name."""
    pids: set[int] = set()
    tokens: set[str] = set()
    for kind in ("machines", "vms"):
        for path in (home / kind).glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pids.update(p for p in (record.get("pid"), record.get("owner")) if isinstance(p, int) and p > 0)
            helpers = (record.get("extra") or {}).get("helpers") or {}
            pids.update(v[0] for v in helpers.values() if isinstance(v, list) and v and isinstance(v[0], int))
            if isinstance(record.get("token"), str) and record["token"]:
                tokens.add(record["token"])
    return pids, tokens


def _socket_owners() -> dict[int, list[int]]:
    """Socket inode: the pids holding it."""
    owners: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners.setdefault(int(link[8:-1]), []).append(int(entry))
    return owners


def _resolve(name: str, pid: int | None) -> str | None:
    """The path a socket's bound name means, seen from the process that bound it."""
    if name.startswith("@"):
        return name
    matched = _PROC_FD.match(name)
    if matched and pid is not None:
        try:
            return os.readlink(f"/proc/{pid}/fd/{matched.group(1)}") + (matched.group(2) or "")
        except OSError:
            return None
    if not name.startswith("/") and pid is not None:
        try:
            return os.path.join(os.readlink(f"/proc/{pid}/cwd"), name)
        except OSError:
            return None
    return name


def _inside(path: str, roots: list[Path]) -> bool:
    return any(path == str(root) or path.startswith(str(root).rstrip("/") + "/") for root in roots)


def racker_sockets(home: Path, extra_pids: set[int] = frozenset()) -> list[Target]:  # type: ignore[assignment]
    """Every unix socket of the store at `home` (and of `extra_pids`) that another process could connect to."""
    roots = [home.resolve(), RUN]
    pids, tokens = _records(home)
    pids |= set(extra_pids)
    owners = _socket_owners()
    found: dict[str, Target] = {}
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) < 8:
                continue  # unnamed: nothing can connect to it
            flags, kind, inode, name = int(fields[3], 16), int(fields[4], 16), int(fields[6]), " ".join(fields[7:])
            if kind not in _TYPES or (kind != 2 and not flags & _LISTENING):
                continue  # a connected end, not a listener
            holders = owners.get(inode, [])
            holder = next((p for p in holders if p in pids), holders[0] if holders else None)
            address = _resolve(name, holder)
            if address is None:
                continue
            ours = (
                any(p in pids for p in holders)
                or _inside(address, roots)
                or (address.startswith("@") and any(t in address for t in tokens))
            )
            if ours:
                found.setdefault(address, Target(address, _TYPES[kind], "/proc/net/unix"))
    for root in roots:
        for directory, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                try:
                    mode = os.lstat(path).st_mode
                except OSError:
                    continue
                if stat.S_ISSOCK(mode):
                    found.setdefault(path, Target(path, "stream", f"a socket file under {root}"))
    return sorted(found.values(), key=lambda t: t.address)


def probe(targets: list[Target], uid: int = NOBODY) -> Probe:
    """Connect to each target from a child running as `uid` (gid the same, no groups)."""
    result = Probe(targets=list(targets))
    if not targets:
        return result
    child = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _CHILD],
        input=json.dumps([{"address": t.address, "type": t.type} for t in targets]),
        capture_output=True,
        text=True,
        timeout=120,
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
    )
    if child.returncode != 0:
        raise RuntimeError(f"the probe as uid {uid} failed: {child.stderr.strip()}")
    for address, refused, why in json.loads(child.stdout):
        if refused:
            result.refused[address] = why
        else:
            result.accepted.append(address)
    return result


def probe_sockets_as_nobody(home: Path | None = None, extra_pids: set[int] = frozenset()) -> Probe:  # type: ignore[assignment]
    """Find the store's sockets, try each as nobody, print the figure (probed, refused) and return it."""
    from racker import store

    home = home or store.home()
    result = probe(racker_sockets(home, extra_pids))
    print(result.line())
    return result


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description="Try every socket of RACKER_HOME's machines and VMs as user nobody.").parse_args()
    found = probe_sockets_as_nobody()
    print(found.details())
    sys.exit(1 if found.accepted else 0)
