"""Warm VMs' snapshots on disk: the running state of a VM's first ready boot, kept for restoring.

How a VM boots from one and saves one is racker.vm.warm.

Under TCG a VM needs 30-60 s to be ready, nearly all of it the guest's own
first boot. After one VM of a disk is ready, its memory and device state are
saved by QEMU migration into a zstd-compressed file, beside a copy of its
overlay (the disk state that memory matches), its NoCloud seed and its SSH
key. A later `--warm` VM of the same disk starts QEMU with `-incoming` on that
file and a fresh overlay backed by the frozen one: ready in a few seconds, and
any number of clones side by side, each with its own overlay, SSH port, QMP
socket and serial log.

Why migration to a file and not an internal qcow2 snapshot (savevm/loadvm):
measured here under TCG both restore in about a second, but loadvm needs the
memory state inside each clone's own top image (a copy of ~230 MiB per clone;
an overlay backed by it cannot load it), savevm refuses a UEFI VM (its raw
pflash variables cannot hold a snapshot), and the zstd stream is a third of
the size (73 against 229 MiB for debian-bookworm).

What a restored VM keeps of the snapshotted one: its machine-id, SSH host
keys, hostname, guest address (10.0.2.15 behind QEMU's user network), the
login key, whatever the first boot wrote, and the agent racker starts just
before the save (racker.vm.guest_agent: root commands on a virtio-serial port,
no SSH handshake). It is told it was restored by having its clock stepped to
the host's at once (`date -s` over that port).
A test that needs a real first boot (cloud-init running, a fresh machine-id)
boots cold.

A snapshot is keyed by everything the saved state depends on (the disk's
identity, QEMU's version, machine type, CPU model, memory, CPUs, firmware,
accelerator, disk size, kernel); any change means another key, and snapshots
whose disk or QEMU changed are stale: `racker gc` removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from racker import proc, store
from racker.errors import VMError

FORMAT = 2  # bumped when what a snapshot holds or how it is restored changes
STATE = "state.zst"  # QEMU's migration stream, zstd-compressed
OVERLAY = "overlay.qcow2"  # the disk state the memory matches, backed by the disk
KEY = "key.json"
# Copied as they were when the state was saved: the seed and key the guest knows, its UEFI variables.
KEPT = ("seed.iso", "id_ed25519", "id_ed25519.pub", "OVMF_VARS.fd")
PARTIAL = ".partial"
SAVE_TIMEOUT = 300.0


class SnapshotBroken(VMError):
    """A snapshot QEMU could not restore (corrupt, truncated, or of another QEMU)."""


@dataclass(frozen=True)
class Key:
    """Everything a saved state depends on: the same key, the same VM."""

    disk: str
    disk_id: str  # the disk file's identity (see disk_identity)
    qemu: str
    machine: str
    cpu: str
    memory: int
    cpus: int
    firmware: str
    accel: str
    disk_size: int
    kernel: str
    format: int = FORMAT

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Snapshot:
    path: Path
    key: Key
    image: str
    digest: str
    created: float
    agent: bool = False  # saved with racker.vm.guest_agent running: restored clones answer on its port
    hostname: str = ""  # the snapshotted VM's, which its clones keep

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def state(self) -> Path:
        return self.path / STATE

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def stale(self) -> bool:
        """Its disk is gone or changed, or QEMU is another version: it can never be restored."""
        key = self.key
        return key.format != FORMAT or key.qemu != qemu_version() or disk_identity(Path(key.disk)) != key.disk_id


@cache
def qemu_version() -> str:
    return proc.run([proc.require("qemu-system-x86_64"), "--version"], timeout=30).stdout.splitlines()[0].strip()


def disk_identity(disk: Path) -> str:
    """The disk file's inode, size and modification time, "" if it is gone: hashing a 2 GB disk
    at every start would cost more than a restore. racker never writes a disk in place (VMs
    boot an overlay; promote writes a new file and renames it), so a changed disk is a new one."""
    try:
        st = disk.stat()
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def directory() -> Path:
    return store.home() / "snapshots"


def read(path: Path) -> Snapshot | None:
    try:
        data = json.loads((path / KEY).read_text())
        return Snapshot(
            path,
            Key(**data["key"]),
            data.get("image", ""),
            data.get("digest", ""),
            float(data["created"]),
            bool(data.get("agent")),
            data.get("hostname", ""),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find(key: Key) -> Snapshot | None:
    path = directory() / key.id
    found = read(path) if (path / STATE).is_file() else None
    return found if found is not None and found.key == key else None


def all_snapshots() -> list[Snapshot]:
    if not directory().is_dir():
        return []
    found = (read(path) for path in sorted(directory().iterdir()) if not path.name.startswith("."))
    return [snapshot for snapshot in found if snapshot is not None]


def discard(path: Path) -> None:
    """Remove a snapshot; clones restoring from it meanwhile keep the files they opened.
    Renamed out of the way first, so no one finds it half removed."""
    with contextlib.suppress(FileNotFoundError):
        doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL}")
        os.rename(path, doomed)
        store.remove_tree(doomed)


def lock_name(snapshot_id: str) -> str:
    return f"snapshot-{snapshot_id}"


def incoming(snapshot: Snapshot) -> str:
    """QEMU's -incoming for a snapshot: the stream decompressed into QEMU's stdin-like pipe."""
    return f"exec:zstd -dc -q {proc.quote(str(snapshot.state))}"


# -- listing and collecting ----------------------------------------------------


def collect() -> list[str]:
    """Remove stale snapshots and what killed saves left; for `racker gc`."""
    removed: list[str] = []
    if not directory().is_dir():
        return removed
    for path in sorted(directory().iterdir()):
        if path.name.endswith(PARTIAL):
            snapshot_id = path.name[1:].split(".", 1)[0]
            with store.locked_if_free(lock_name(snapshot_id)) as free:
                if free and path.exists():
                    store.remove_tree(path)
                    removed.append(f"removed unfinished snapshot {snapshot_id}")
            continue
        snapshot = read(path)
        if snapshot is None or snapshot.stale():
            discard(path)
            removed.append(f"removed stale snapshot {path.name}")
    return removed


def remove_image(digest: str) -> list[str]:
    """Remove the snapshots of an image's disks; for `racker rmi`."""
    removed = []
    for snapshot in all_snapshots():
        if snapshot.digest == digest:
            discard(snapshot.path)
            removed.append(snapshot.id)
    return removed
