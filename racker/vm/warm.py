"""Warm boots: a VM restored from its disk's snapshot, or booted cold and saved as one.

The snapshot files themselves are racker.vm.snapshots; this is how a VM uses
them. WarmBoot is a part of racker.vm.qemu.VM, kept here so the VM's lifecycle
reads apart from the save and restore around it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict

from racker import machines, proc, progress, store
from racker.errors import ChannelUnavailable, VMError, VMLaunchFailure
from racker.vm import guest_agent, snapshots


class WarmBoot:
    """The warm half of a VM (racker.vm.qemu.VM): what it needs of the VM is the VM's own."""

    def snapshot_key(self, firmware: str) -> snapshots.Key:
        return snapshots.Key(
            disk=str(self.disk),
            disk_id=snapshots.disk_identity(self.disk),
            qemu=snapshots.qemu_version(),
            machine=self.board.machine,
            cpu="host" if self.accelerator() == "kvm" else self.tcg_cpu,
            memory=self.memory,
            cpus=self.cpus,
            firmware=firmware,
            accel=self.accelerator(),
            disk_size=self.disk_size or 0,
            kernel=f"{self.kernel or ''} {self.initrd or ''} {self.append}".strip(),
        )

    def warm_boot(self, info: object, firmware: str, deadline: float) -> None:
        """Restore the disk's snapshot if there is one; else boot cold, wait for ready and save one.

        Only the first boot takes the key's lock: a second first boot of the same
        disk waits for it and then restores what the first saved; clones of a
        saved snapshot restore side by side without it.
        """
        key = self.snapshot_key(firmware)
        if self._try_restore(key, firmware, deadline):
            return
        with store.locked(snapshots.lock_name(key.id)):
            if self._try_restore(key, firmware, deadline):
                return
            self._cold_boot(info, firmware, deadline)
            self.save_snapshot(key)
        self._run_on()
        for other in snapshots.all_snapshots():  # older snapshots of this disk, now never restored
            if other.key.disk == key.disk and other.id != key.id and other.stale():
                snapshots.discard(other.path)

    def seed_boot(self, info: object, firmware: str, deadline: float) -> None:
        """Boot cold; once ready, save the disk's snapshot unless there is one or another VM
        saves it now. The VM is a real first boot all the same, paused for the save."""
        self._cold_boot(info, firmware, deadline)
        key = self.snapshot_key(firmware)
        with store.locked_if_free(snapshots.lock_name(key.id)) as free:
            if not free or snapshots.find(key) is not None:
                return
            self.save_snapshot(key)
        self._run_on()

    def _run_on(self) -> None:
        """After its save: the VM's clock lost the pause; without an agent, SSH again."""
        assert self.state is not None
        if not self.state.extra.get("agent"):
            self.reconnect(time.monotonic() + 60)  # the save closed it: commands go on SSH
        self.step_clock()

    def _try_restore(self, key: snapshots.Key, firmware: str, deadline: float) -> bool:
        snapshot = snapshots.find(key)
        if snapshot is None:
            return False
        try:
            self._restore(snapshot, firmware, deadline)
        except snapshots.SnapshotBroken as broken:
            progress.warn(f"snapshot {snapshot.id} of {self.image} did not restore ({broken}); discarded it, booting cold")
            snapshots.discard(snapshot.path)
            self._reset()
            return False
        return True

    def save_snapshot(self, key: snapshots.Key) -> snapshots.Snapshot:
        """Save the ready VM's state and overlay as the key's snapshot, and let it run on.

        Written into a hidden snapshots.directory and renamed into place: Ctrl-C or a crash
        while saving leaves no half snapshot (gc removes a killed save's leftovers).
        """
        # Root's alone: a guest's memory holds its secrets, and the login key is here.
        store.private_dir(snapshots.directory())
        final = snapshots.directory() / key.id
        partial = snapshots.directory() / f".{key.id}.{uuid.uuid4().hex[:8]}{snapshots.PARTIAL}"
        partial.mkdir(mode=0o700)
        try:
            with progress.step(f"saving a snapshot of {self.name}"):
                agent = guest_agent.start_in_guest(self)
                self.close_connection()  # no TCP connection of ours inside the saved state
                self.qmp("stop")
                try:
                    # QEMU runs the exec: URI with /bin/sh -c: the path is quoted at this one boundary.
                    self.qmp("migrate", uri=f"exec:zstd -1 -q -T2 -o {proc.quote(str(partial / snapshots.STATE))}")
                    self._wait_migrated()
                    # Migration has flushed and released the overlay: this copy is the state the memory matches.
                    argv = ["cp", "--sparse=always", str(self.rundir / "overlay.qcow2"), str(partial / snapshots.OVERLAY)]
                    proc.run(argv, timeout=snapshots.SAVE_TIMEOUT, umask=proc.PRIVATE)
                    for name in snapshots.KEPT:
                        if (self.rundir / name).exists():
                            store.copy_private(self.rundir / name, partial / name)
                finally:
                    self.qmp("cont")
                record = {
                    "key": asdict(key),
                    "image": self.image,
                    "digest": self.digest or store.digest_of(self.disk) or "",
                    "created": time.time(),
                    "agent": agent,
                    "hostname": self.hostname,
                }
                store.write_json(partial / snapshots.KEY, record)
                try:
                    os.rename(partial, final)
                except OSError:  # one is there already (saved without the lock): keep that one
                    store.remove_tree(partial)
        except BaseException:
            store.remove_tree(partial)
            raise
        snapshot = snapshots.read(final)
        assert snapshot is not None
        return snapshot

    def _wait_migrated(self) -> None:
        deadline = time.monotonic() + snapshots.SAVE_TIMEOUT
        while time.monotonic() < deadline:
            status = self.qmp("query-migrate")
            state = status.get("status") if isinstance(status, dict) else None
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                raise VMError(f"saving the snapshot of VM {self.name!r} failed: {status.get('error-desc', state)}")  # type: ignore[union-attr]
            time.sleep(0.05)
        raise VMError(f"saving the snapshot of VM {self.name!r} took over {snapshots.SAVE_TIMEOUT:.0f}s")

    def _wait_loaded(self, deadline: float) -> None:
        """Wait until QEMU has loaded the state (it stays paused: the state was saved paused);
        snapshots.SnapshotBroken if QEMU gave up on it."""
        while time.monotonic() < deadline:
            if not self._alive():
                log = (self.rundir / "qemu.log").read_text(errors="replace").strip().splitlines()
                raise snapshots.SnapshotBroken(log[-1] if log else "QEMU exited while loading it")
            try:
                status = self.qmp("query-status")
            except VMError:
                raise
            except Exception:  # QMP dropped: QEMU is exiting; the next round sees it
                time.sleep(0.05)
                continue
            if isinstance(status, dict) and status.get("status") not in ("inmigrate", "prelaunch"):
                return
            time.sleep(0.02)
        raise snapshots.SnapshotBroken("QEMU did not finish loading it in time")

    def _restore(self, snapshot: snapshots.Snapshot, firmware: str, deadline: float) -> None:
        """Start from a snapshot: its key, seed and UEFI variables, a fresh overlay over its
        frozen one, QEMU loading its state; ready once the guest's clock is the host's."""
        assert self.state is not None
        for name in snapshots.KEPT:
            if (snapshot.path / name).exists():
                store.copy_private(snapshot.path / name, self.rundir / name)
        overlay = snapshot.path / snapshots.OVERLAY
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(overlay), "-F", "qcow2", str(self.rundir / "overlay.qcow2")]
        proc.run(argv, umask=proc.PRIVATE)
        if firmware == "uefi":
            self.state.extra["ovmf"] = self._uefi_firmware()[0]
        self.state.extra.update(firmware=firmware, format="qcow2", machine=self.machine, snapshot=snapshot.id)
        machines.save(self.state)
        self._incoming = snapshots.incoming(snapshot)
        try:
            self._launch(firmware)
        except VMLaunchFailure as failed:
            raise snapshots.SnapshotBroken(failed.output.splitlines()[-1] if failed.output else str(failed)) from None
        finally:
            self._incoming = ""
        self._wait_loaded(deadline)
        self.state.extra["agent"] = snapshot.agent
        self.restored_hostname = snapshot.hostname
        self.qmp("cont")  # the state was saved paused
        # Its clock stood still since the save: step it to ours before anyone reads it. The
        # first root command opens a root channel (the agent's at once; without one an SSH
        # handshake and a sudo, seconds); the step is sent on the open channel, so it lands
        # one round trip after the time it carries.
        try:
            guest_agent.channel(self).run(["true"], timeout=30)
        except ChannelUnavailable:
            self.reconnect(deadline)
        self.step_clock()
        self.system_state = "running"
        self.restored_from = snapshot.id
        self.state.extra["system_state"] = self.system_state
        machines.save(self.state)
