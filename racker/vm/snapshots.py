"""Warm VMs (issue 16): the running state of a VM's first ready boot, kept and restored.

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
import time
import uuid
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from racker import proc, progress, store
from racker.errors import VMError
from racker.vm import guest_agent

if TYPE_CHECKING:
    from racker.vm.qemu import VM

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


def key_for(vm: VM, firmware: str) -> Key:
    return Key(
        disk=str(vm.disk),
        disk_id=disk_identity(vm.disk),
        qemu=qemu_version(),
        machine=vm.board.machine,
        cpu="host" if vm._accel() == "kvm" else vm.tcg_cpu,
        memory=vm.memory,
        cpus=vm.cpus,
        firmware=firmware,
        accel=vm._accel(),
        disk_size=vm.disk_size or 0,
        kernel=f"{vm.kernel or ''} {vm.initrd or ''} {vm.append}".strip(),
    )


def _read(path: Path) -> Snapshot | None:
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
    found = _read(path) if (path / STATE).is_file() else None
    return found if found is not None and found.key == key else None


def all_snapshots() -> list[Snapshot]:
    if not directory().is_dir():
        return []
    found = (_read(path) for path in sorted(directory().iterdir()) if not path.name.startswith("."))
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


# -- warm start ---------------------------------------------------------------


def warm_boot(vm: VM, info: object, firmware: str, deadline: float) -> None:
    """Restore the disk's snapshot if there is one; else boot cold, wait for ready and save one.

    Only the first boot takes the key's lock: a second first boot of the same
    disk waits for it and then restores what the first saved; clones of a
    saved snapshot restore side by side without it.
    """
    key = key_for(vm, firmware)
    if _try_restore(vm, key, firmware, deadline):
        return
    with store.locked(lock_name(key.id)):
        if _try_restore(vm, key, firmware, deadline):
            return
        vm._cold_boot(info, firmware, deadline)
        save(vm, key)
    _run_on(vm)
    for other in all_snapshots():  # older snapshots of this disk, now never restored
        if other.key.disk == key.disk and other.id != key.id and other.stale():
            discard(other.path)


def seed(vm: VM, info: object, firmware: str, deadline: float) -> None:
    """Boot cold; once ready, save the disk's snapshot unless there is one or another VM
    saves it now. The VM is a real first boot all the same, paused for the save."""
    vm._cold_boot(info, firmware, deadline)
    key = key_for(vm, firmware)
    with store.locked_if_free(lock_name(key.id)) as free:
        if not free or find(key) is not None:
            return
        save(vm, key)
    _run_on(vm)


def _run_on(vm: VM) -> None:
    """After its save: the VM's clock lost the pause; without an agent, SSH again."""
    assert vm.state is not None
    if not vm.state.extra.get("agent"):
        vm.reconnect(time.monotonic() + 60)  # the save closed it: commands go on SSH
    vm.step_clock()


def _try_restore(vm: VM, key: Key, firmware: str, deadline: float) -> bool:
    snapshot = find(key)
    if snapshot is None:
        return False
    try:
        vm._restore(snapshot, firmware, deadline)
    except SnapshotBroken as broken:
        progress.warn(f"snapshot {snapshot.id} of {vm.image} did not restore ({broken}); discarded it, booting cold")
        discard(snapshot.path)
        vm._reset()
        return False
    return True


def save(vm: VM, key: Key) -> Snapshot:
    """Save the ready VM's state and overlay as the key's snapshot, and let it run on.

    Written into a hidden directory and renamed into place: Ctrl-C or a crash
    while saving leaves no half snapshot (gc removes a killed save's leftovers).
    """
    # Root's alone: a guest's memory holds its secrets, and the login key is here.
    store.private_dir(directory())
    final = directory() / key.id
    partial = directory() / f".{key.id}.{uuid.uuid4().hex[:8]}{PARTIAL}"
    partial.mkdir(mode=0o700)
    try:
        with progress.step(f"saving a snapshot of {vm.name}"):
            agent = guest_agent.start_in_guest(vm)
            vm.close_connection()  # no TCP connection of ours inside the saved state
            vm.qmp("stop")
            try:
                # QEMU runs the exec: URI with /bin/sh -c: the path is quoted at this one boundary.
                vm.qmp("migrate", uri=f"exec:zstd -1 -q -T2 -o {proc.quote(str(partial / STATE))}")
                _wait_migrated(vm)
                # Migration has flushed and released the overlay: this copy is the state the memory matches.
                argv = ["cp", "--sparse=always", str(vm.rundir / "overlay.qcow2"), str(partial / OVERLAY)]
                proc.run(argv, timeout=SAVE_TIMEOUT, umask=proc.PRIVATE)
                for name in KEPT:
                    if (vm.rundir / name).exists():
                        store.copy_private(vm.rundir / name, partial / name)
            finally:
                vm.qmp("cont")
            record = {
                "key": asdict(key),
                "image": vm.image,
                "digest": vm.digest or store.digest_of(vm.disk) or "",
                "created": time.time(),
                "agent": agent,
                "hostname": vm.hostname,
            }
            store.write_json(partial / KEY, record)
            try:
                os.rename(partial, final)
            except OSError:  # one is there already (saved without the lock): keep that one
                store.remove_tree(partial)
    except BaseException:
        store.remove_tree(partial)
        raise
    snapshot = _read(final)
    assert snapshot is not None
    return snapshot


def _wait_migrated(vm: VM) -> None:
    deadline = time.monotonic() + SAVE_TIMEOUT
    while time.monotonic() < deadline:
        status = vm.qmp("query-migrate")
        state = status.get("status") if isinstance(status, dict) else None
        if state == "completed":
            return
        if state in ("failed", "cancelled"):
            raise VMError(f"saving the snapshot of VM {vm.name!r} failed: {status.get('error-desc', state)}")  # type: ignore[union-attr]
        time.sleep(0.05)
    raise VMError(f"saving the snapshot of VM {vm.name!r} took over {SAVE_TIMEOUT:.0f}s")


def incoming(snapshot: Snapshot) -> str:
    """QEMU's -incoming for a snapshot: the stream decompressed into QEMU's stdin-like pipe."""
    return f"exec:zstd -dc -q {proc.quote(str(snapshot.state))}"


def wait_loaded(vm: VM, deadline: float) -> None:
    """Wait until QEMU has loaded the state (it stays paused: the state was saved paused);
    SnapshotBroken if QEMU gave up on it."""
    while time.monotonic() < deadline:
        if not vm._alive():
            log = (vm.rundir / "qemu.log").read_text(errors="replace").strip().splitlines()
            raise SnapshotBroken(log[-1] if log else "QEMU exited while loading it")
        try:
            status = vm.qmp("query-status")
        except VMError:
            raise
        except Exception:  # QMP dropped: QEMU is exiting; the next round sees it
            time.sleep(0.05)
            continue
        if isinstance(status, dict) and status.get("status") not in ("inmigrate", "prelaunch"):
            return
        time.sleep(0.02)
    raise SnapshotBroken("QEMU did not finish loading it in time")


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
        snapshot = _read(path)
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
