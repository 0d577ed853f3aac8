"""Snapshot keys, staleness and collection, without a VM (the real saves and restores: test_vm_warm)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from racker import store
from racker.cli import main as racker_main
from racker.upkeep import gc
from racker.vm import snapshots

QEMU = "QEMU emulator version 7.2.22"


@pytest.fixture(autouse=True)
def _own_store(private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "qemu_version", lambda: QEMU)


def _key(disk: Path, **changes: object) -> snapshots.Key:
    key = snapshots.Key(
        disk=str(disk),
        disk_id=snapshots.disk_identity(disk),
        qemu=QEMU,
        machine="q35",
        cpu="max",
        memory=1024,
        cpus=2,
        firmware="bios",
        accel="tcg",
        disk_size=0,
        kernel="",
    )
    return dataclasses.replace(key, **changes)


def _snapshot(key: snapshots.Key, digest: str = "sha256:aa") -> Path:
    path = snapshots.directory() / key.id
    path.mkdir(parents=True)
    (path / snapshots.STATE).write_bytes(b"state")
    store.write_json(path / snapshots.KEY, {"key": dataclasses.asdict(key), "image": "img", "digest": digest, "created": time.time()})
    return path


def test_every_part_of_the_key_makes_another_snapshot(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"x")
    base = _key(disk)
    changes = {"qemu": "QEMU 8", "machine": "pc", "cpu": "host", "memory": 2048, "cpus": 4, "firmware": "uefi", "accel": "kvm"}
    ids = {base.id} | {_key(disk, **{name: value}).id for name, value in changes.items()}
    assert len(ids) == len(changes) + 1
    _snapshot(base)
    assert snapshots.find(base) is not None and snapshots.find(_key(disk, memory=2048)) is None


def test_a_changed_disk_or_qemu_makes_a_snapshot_stale_and_gc_removes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disks = [tmp_path / f"{name}.raw" for name in ("kept", "rebuilt", "gone", "other-qemu")]
    for disk in disks:
        disk.write_bytes(b"x")
    kept, rebuilt, gone, other_qemu = (_snapshot(_key(disk)) for disk in disks)
    (tmp_path / "rebuilt.raw").unlink()
    (tmp_path / "rebuilt.raw").write_bytes(b"new disk, same name")
    (tmp_path / "gone.raw").unlink()
    data = json.loads((other_qemu / snapshots.KEY).read_text())
    data["key"]["qemu"] = "QEMU emulator version 6.2"
    store.write_json(other_qemu / snapshots.KEY, data)
    killed_save = snapshots.directory() / f".{'0' * 20}.dead.partial"
    killed_save.mkdir()
    saving_now = snapshots.directory() / f".{'1' * 20}.live.partial"
    saving_now.mkdir()
    with store.locked(snapshots.lock_name("1" * 20)):
        removed = gc.collect()
    assert sorted(p.name for p in snapshots.directory().iterdir()) == sorted([kept.name, saving_now.name]), removed
    assert sum("stale snapshot" in line for line in removed) == 3 and any("unfinished snapshot" in line for line in removed)
    assert not rebuilt.exists() and not gone.exists()


def test_rmi_removes_the_image_s_snapshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/os-release").write_text("ID=debian\n")
    image = store.commit("snapped", rootfs, source="test", recipe="", manifest={})
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"x")
    mine, other = _snapshot(_key(disk), digest=image.digest), _snapshot(_key(disk, memory=512))
    assert racker_main(["rmi", image.name]) == 0
    assert not mine.exists() and other.exists()
    assert racker_main(["vm", "snapshots", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [row["id"] for row in listed] == [other.name] and listed[0]["size"] > 0 and listed[0]["age_s"] >= 0
