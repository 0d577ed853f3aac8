"""Warm VMs (issue 16): one real first boot of debian-bookworm saves a snapshot; clones restore it.

That first boot is the run's (conftest's first_boot, which every warm VM of the disk
in the suite restores from): two warm VMs of the same disk started at once (concurrent
first boots), one boots cold and saves, the other waits on the key's lock and restores.
It is made afresh in every run, never kept, since this module is about it. Every other
VM here is a restore, or a hang disk that never boots; each test has a store of its own,
holding that snapshot.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_vm_gone, started_at_once, warm_store, write_hang_disk
from racker import machines, store
from racker.errors import BootTimeout
from racker.vm import qemu, snapshots, warm
from racker.vm.qemu import VM

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.xdist_group("warm-vms")]


@pytest.fixture
def saved(first_boot: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A store of the test's own holding the run's snapshot; the first boot's facts, and the cold VM's."""
    home = tmp_path / "store"
    monkeypatch.setenv("RACKER_HOME", str(home))
    snapshot = warm_store(home, first_boot)
    cold = first_boot["restored_from"].index("")
    return {
        "disk": Path(first_boot["disk"]),
        "snapshot": snapshot,
        "identity": first_boot["identities"][cold],
        "hostname": first_boot["hostnames"][cold],
        "cold_seconds": first_boot["seconds"][cold],
    }


def test_concurrent_first_boots_boot_cold_once_and_save_one_snapshot(first_boot: dict) -> None:
    """Of two first boots of one disk at once, one booted cold and saved; the other waited and restored that."""
    assert sorted(first_boot["restored_from"]) == ["", *first_boot["saved"]], "one cold boot, one restore of its snapshot"
    assert len(first_boot["saved"]) == 1, "concurrent first boots must save one snapshot"
    cold, restored = first_boot["restored_from"].index(""), first_boot["restored_from"].index(first_boot["saved"][0])
    # After the save the cold VM runs on, and the restored one is the same machine.
    assert first_boot["identities"][restored] == first_boot["identities"][cold]
    assert first_boot["hostnames"][cold] == first_boot["names"][cold]
    for name in first_boot["names"]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RACKER_HOME", first_boot["home"])
            assert_vm_gone(name)


def test_clones_restore_side_by_side_with_the_snapshotted_identity_and_the_host_clock(saved: dict) -> None:
    snapshot: snapshots.Snapshot = saved["snapshot"]
    frozen = (snapshot.path / snapshots.OVERLAY).stat().st_mtime_ns
    time.sleep(max(0.0, snapshot.created + 8 - time.time()))  # a guest clock left at the save's time would show
    clones = [VM(saved["disk"], warm=True) for _ in range(2)]
    with started_at_once(clones) as seconds:
        assert all(vm.restored_from == snapshot.id for vm in clones)
        assert max(seconds) < saved["cold_seconds"] / 5, (seconds, saved["cold_seconds"])
        # Ready, clock stepped, commands answered, and no SSH yet: the snapshot's agent answers on its port.
        for vm in clones:
            assert vm.state.extra["agent"] and qemu.SSH_MASTER not in machines.helpers(vm.state), machines.helpers(vm.state)
        # Another process finds the agent held by this one and goes over SSH.
        other = subprocess.run(
            [sys.executable, "-c",
             f"from racker.vm.qemu import VM; print(VM.attach({clones[0].name!r}).check_output(['id', '-u']), end='')"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (other.returncode, other.stdout) == (0, "0\n"), other.stderr
        assert qemu.SSH_MASTER in machines.helpers(machines.load("qemu", clones[0].name)), "the other process used SSH"
        assert clones[0].check_output(["id", "-u"]) == "0\n", "and this one still has its agent"
        ports = {vm.endpoint.port for vm in clones if vm.endpoint}
        assert len(ports) == 2 and len({vm.rundir for vm in clones}) == 2 and len({vm.qmp_path() for vm in clones}) == 2
        for vm in clones:
            # The snapshotted VM's identity, and the host's time, not the save's.
            assert vm.check_output(["cat", "/etc/machine-id", "/etc/ssh/ssh_host_ed25519_key.pub"]) == saved["identity"]
            assert abs(int(vm.check_output(["date", "+%s"])) - time.time()) < 5
            assert vm.check_output(["hostname"]).strip() == vm.hostname == saved["hostname"] != vm.name
        # Each on its own overlay: a write in one is not in the other, nor in the snapshot.
        clones[0].run_expect([0], ["sh", "-c", "echo one >/var/tmp/clone && sync"])
        assert clones[1].run_expect([1], ["test", "-e", "/var/tmp/clone"])
        assert (snapshot.path / snapshots.OVERLAY).stat().st_mtime_ns == frozen
    for vm in clones:
        assert_vm_gone(vm.name)
    listed = subprocess.run([sys.executable, "-m", "racker", "vm", "snapshots"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and snapshot.id in listed.stdout and "M " in listed.stdout, listed.stdout + listed.stderr


def test_an_interrupted_save_leaves_no_half_snapshot_and_the_vm_runs_on(saved: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    real = warm.WarmBoot._wait_migrated

    def interrupted(vm: VM) -> None:
        real(vm)  # the state is written, in the hidden directory
        raise KeyboardInterrupt

    monkeypatch.setattr(warm.WarmBoot, "_wait_migrated", interrupted)
    with VM(saved["disk"], warm=True) as vm:
        assert vm.restored_from == saved["snapshot"].id
        other = dataclasses.replace(vm.snapshot_key("bios"), memory=2048)
        with pytest.raises(KeyboardInterrupt):
            vm.save_snapshot(other)
        assert vm.check_output(["echo", "alive"]) == "alive\n", "the VM runs on after an interrupted save"
    assert sorted(p.name for p in snapshots.directory().iterdir()) == [saved["snapshot"].id]


def test_a_corrupt_snapshot_is_discarded_with_a_warning_and_the_vm_boots_cold(
    saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real snapshot's stream, truncated, as the snapshot of a disk that only hangs:
    the restore fails, and the cold boot it falls back to is the hang (no second real boot)."""
    disk = write_hang_disk(tmp_path / "hang.raw")
    vm = VM(disk, warm=True, boot_timeout=10)
    key = vm.snapshot_key("bios")
    broken = snapshots.directory() / key.id
    shutil.copytree(saved["snapshot"].path, broken)
    with open(broken / snapshots.STATE, "r+b") as state:
        state.truncate(os.path.getsize(broken / snapshots.STATE) // 2)
    store.write_json(broken / snapshots.KEY, {"key": dataclasses.asdict(key), "image": "hang", "digest": "", "created": time.time()})
    assert snapshots.find(key) is not None
    with pytest.raises(BootTimeout) as raised:
        vm.start()
    assert "racker-hang" in (raised.value.hint or ""), "after the failed restore the disk itself was booted"
    assert f"snapshot {key.id} of hang.raw did not restore" in capsys.readouterr().err
    assert not broken.exists() and snapshots.find(key) is None
    assert not [p for p in snapshots.directory().iterdir() if p.name.startswith(".")], "nothing half removed"
    assert_vm_gone(vm.name)
