"""Promote: the logic with fakes, and real disks built and read back (one nspawn check of a
round trip, no VM here).

Real boots are in test_vm_boot.py. Every test that builds a disk does it in a
private store: a small image made here, or the shared store's prepared
bookworm linked in (share_image).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

import pytest

from conftest import passes_checks, racker, tree_snapshot
from racker import fingerprint, prepare, promote, store
from racker.errors import BadDisk, PrepareError, PromoteError, RequirementsFailed
from racker.prepare import build_leftovers
from racker.promote import app, bootloader, boxes, disk, formats, profiles, readback, vagrant
from racker.sources import diskfile, partitions
from racker.store import distros
from racker.vm import disks, seed

MiB = 1024**2
GiB = 1024**3


# -- sizes and layouts ------------------------------------------------------


SIZES = [("4G", 4 * GiB), ("512M", 512 * MiB), ("2.5G", int(2.5 * GiB)), ("1024", 1024), ("3GiB", 3 * GiB)]


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_parse_size(text: str, size: int) -> None:
    assert disk.parse_size(text) == size


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(PromoteError, match="cannot read disk size"):
        disk.parse_size("big")


def test_plan_refuses_a_disk_too_small_with_the_size_to_use() -> None:
    with pytest.raises(PromoteError, match="too small") as raised:
        disk.plan("bios", 512 * MiB, 600 * MiB)
    assert "--size" in (raised.value.hint or "")


def test_bios_plan_is_one_partition_after_a_1mib_gap() -> None:
    layout = disk.plan("bios", 2 * GiB, 400 * MiB)
    assert layout.root_offset == MiB and layout.root_offset + layout.root_size == 2 * GiB
    script = layout.sfdisk_script()
    assert "label: dos" in script and "bootable" in script and "type=83" in script


def test_uefi_plan_has_an_esp_and_leaves_room_for_the_backup_gpt() -> None:
    layout = disk.plan("uefi", 2 * GiB, 400 * MiB)
    assert layout.esp_offset == MiB and layout.root_offset == MiB + disk.ESP_SIZE
    assert layout.root_offset + layout.root_size <= 2 * GiB - disk.GPT_TRAILER
    assert disk.ESP_TYPE in layout.sfdisk_script() and disk.ROOT_TYPE_GPT in layout.sfdisk_script()


# -- what a disk boots with -------------------------------------------------


def _mbr(code: bytes, ptype: int) -> bytes:
    sector = bytearray(512)
    sector[: len(code)] = code
    sector[446 + 4] = ptype
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _reader(disk: bytes):  # type: ignore[no-untyped-def]
    return lambda offset, length: disk[offset : offset + length]


def _gpt_disk(type_guid: str, sectors: int = 64) -> bytes:
    """A protective MBR, a GPT header with its CRCs and one partition of `type_guid` (sectors 34-40)."""
    entries = bytearray(128 * 128)
    entries[:16] = uuid.UUID(type_guid).bytes_le
    entries[16:32] = uuid.uuid4().bytes_le
    struct.pack_into("<QQ", entries, 32, 34, 40)
    header = bytearray(512)
    header[:8] = b"EFI PART"
    struct.pack_into("<IIII", header, 8, 0x10000, 92, 0, 0)
    struct.pack_into("<QQQQ", header, 24, 1, sectors - 1, 34, sectors - 34)
    struct.pack_into("<QIII", header, 72, 2, 128, 128, zlib.crc32(bytes(entries)))
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:92])))
    disk = _mbr(b"", 0xEE) + bytes(header) + bytes(entries)
    return disk + bytes(sectors * 512 - len(disk))


def test_boot_firmware_reads_mbr_and_gpt() -> None:
    bios = _mbr(b"\xeb\x63", 0x83) + bytes(512)
    assert disks.boot_firmware(_reader(bios), len(bios)) == "bios"
    with pytest.raises(BadDisk, match="no boot code"):
        disks.boot_firmware(_reader(_mbr(b"", 0x83) + bytes(512)), 1024)
    with pytest.raises(BadDisk, match="no boot sector"):
        disks.boot_firmware(_reader(bytes(1024)), 1024)
    uefi = _gpt_disk(partitions.GPT_ESP)
    assert disks.boot_firmware(_reader(uefi), len(uefi)) == "uefi"
    with pytest.raises(BadDisk, match="neither an EFI system partition nor a BIOS boot partition"):
        disks.boot_firmware(_reader(_gpt_disk(partitions.GPT_ROOT_X86_64)), 64 * 512)
    # A GPT whose CRCs do not match (and no backup) is read by no firmware: one line, not a guess.
    corrupt = bytearray(uefi)
    corrupt[512 + 16] ^= 1
    with pytest.raises(BadDisk, match="is not bootable: the disk's GPT is corrupt"):
        disks.boot_firmware(_reader(bytes(corrupt)), len(corrupt))


# -- images to promote ------------------------------------------------------

KERNEL = "6.1.0-9-cloud-amd64"
ROOT_UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"


def cpio(names: list[str]) -> bytes:
    """A gzip'd newc cpio archive of empty files, as an initramfs is."""
    import gzip

    out = b""
    for i, name in enumerate([*names, "TRAILER!!!"]):
        encoded = name.encode() + b"\0"
        fields = [i + 1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4)
    return gzip.compress(out + b"\0" * (-len(out) % 512))


# Every platform's drivers are in the kernel: built in, but for the two a check reads as files.
BUILTIN = sorted({m for row in prepare.INITRAMFS_MODULES.values() for m in row.modules} - {"virtio_scsi", "virtio_net"})
INITRAMFS = [f"usr/lib/modules/{KERNEL}/kernel/drivers/{m}.ko" for m in ("hv/hv_vmbus", "scsi/hv_storvsc", "net/hyperv/hv_netvsc")]

# A small root tree that meets every tree requirement of every profile (with the
# profile's own files written, as promote writes them), with a kernel and an
# initramfs that promote finds (not bootable: no test boots it).
GOOD_TREE = {
    "etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n',
    "usr/lib/python3/dist-packages/cloudinit/version.py": '__VERSION__ = "22.4.2"\n',
    "usr/sbin/sshd": "#!/bin/sh\n",
    "etc/ssh/sshd_config": "Include /etc/ssh/sshd_config.d/*.conf\n",
    "etc/ssh/sshd_config.d/50-racker.conf": "PasswordAuthentication no\nPermitRootLogin no\n",
    "etc/systemd/network/99-racker-dhcp.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
    "etc/cloud/cloud.cfg.d/90-racker.cfg": "datasource_list: [ConfigDrive, NoCloud]\n",
    f"lib/modules/{KERNEL}/modules.builtin": "".join(f"kernel/drivers/{m}.ko\n" for m in BUILTIN),
    f"lib/modules/{KERNEL}/kernel/drivers/scsi/virtio_scsi.ko": "",
    f"lib/modules/{KERNEL}/kernel/drivers/net/virtio_net.ko": "",
    f"boot/vmlinuz-{KERNEL}": "not a kernel",
    f"boot/initrd.img-{KERNEL}": cpio(["usr", *INITRAMFS]),
    "usr/lib/udev/rules.d/66-azure-ephemeral.rules": "# cloud-init's\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/bash\ndebian:x:1000:1000::/home/debian:/bin/bash\n",
    "etc/shadow": "root:*:20000:0:99999:7:::\ndebian:!:20000:0:99999:7:::\n",
    "etc/apt/sources.list.d/debian.sources": "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
    "Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n",
    "var/log/dpkg.log": "",
    # What promote writes; the staged tree has it before the disk is built.
    "boot/grub/grub.cfg": bootloader.grub_cfg(ROOT_UUID, f"boot/vmlinuz-{KERNEL}", f"boot/initrd.img-{KERNEL}", "rw console=ttyS0,38400n8"),
}
GOOD_LINKS = {"etc/systemd/system/multi-user.target.wants/ssh.service": "/lib/systemd/system/ssh.service"}


def write_tree(root: Path, files: dict[str, str | bytes], links: dict[str, str] | None = None) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for rel, target in (links or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    return root


def commit_image(
    name: str, files: dict[str, str | bytes], links: dict[str, str] | None = None, config: dict | None = None
) -> store.StoredImage:
    """A small image in the (private) store, as a pull would leave it."""
    with store.workdir("test") as work:
        rootfs = write_tree(work / "rootfs", files, links)
        manifest = {"name": name, **({"config": config} if config else {})}
        return store.commit(name, rootfs, source="test:", recipe="-", manifest=manifest)


@pytest.fixture
def small_image(private_store: dict[str, str]) -> store.StoredImage:
    return commit_image("small", GOOD_TREE, GOOD_LINKS)


@pytest.fixture
def bookworm_vm(share_image) -> store.StoredImage:
    """The prepared bookworm, in this test's private store."""
    share_image("debian-bookworm")
    return share_image("debian-bookworm", prepared=True)


def debugfs(path: Path, offset: int, request: str) -> bytes:
    """debugfs on the ext4 at `offset` in a disk file, read-only."""
    return subprocess.run(["debugfs", "-R", request, f"{path}?offset={offset}"], capture_output=True, check=True).stdout


# -- the store image is never written ---------------------------------------


@pytest.mark.slow  # builds disks
def test_promote_writes_nothing_into_the_store_image(private_store: dict, tmp_path: Path) -> None:
    """The image already holds every file promote writes into its staged copy
    (hard links to the store's files): GRUB's modules for both platforms, grub.cfg,
    fstab, each profile's files, an app's unit and its link. Promote must replace
    each of them in the copy, never write into the store's."""
    shipped: dict[str, str | bytes] = {"etc/fstab": "the image's own fstab\n", "boot/grub/grub.cfg": "the image's own grub.cfg\n"}
    for platform in ("i386-pc", "x86_64-efi"):
        for module in ("normal.mod", "linux.mod", "search.mod", "moddep.lst", "command.lst", "boot.img"):
            if (bootloader.GRUB_LIB / platform / module).exists():
                shipped[f"boot/grub/{platform}/{module}"] = f"the image's own {platform}/{module}\n"
    for profile in profiles.PROFILES.values():
        shipped.update({rel: f"the image's own {rel}\n" for rel in profile.files})
    shipped[f"etc/systemd/system/{app.UNIT}"] = "the image's own unit\n"
    links = {**GOOD_LINKS, f"etc/systemd/system/multi-user.target.wants/{app.UNIT}": "/the/image's/own/unit"}
    config = {"Entrypoint": ["/bin/sleep"], "Cmd": ["infinity"]}
    image = commit_image("ships-grub", {**GOOD_TREE, **shipped}, links, config)
    before = tree_snapshot(image.rootfs, times=True)
    promoted = [
        promote.promote(image, tmp_path / "bios.raw"),
        promote.promote(image, tmp_path / "uefi.tar.gz", promote.Options(fmt="gce", firmware="uefi", profile="gcp", app=True)),
        promote.promote(image, tmp_path / "do.qcow2", promote.Options(fmt="qcow2", profile="digitalocean", app=True)),
    ]
    assert tree_snapshot(image.rootfs, times=True) == before
    # And the disk has what promote wrote: the host's GRUB modules, not the image's.
    modules = debugfs(promoted[0].path, promoted[0].layout.root_offset, "cat /boot/grub/i386-pc/normal.mod")
    assert modules == (bootloader.GRUB_LIB / "i386-pc/normal.mod").read_bytes()


@pytest.mark.slow  # builds disks
def test_a_disk_without_tree_checks_is_built_from_the_store_tree_with_promotes_files_over_it(
    private_store: dict, tmp_path: Path, monkeypatch
) -> None:
    """The floor: no staged copy of the tree when no profile check reads one. mkfs
    reads the store's tree, debugfs replaces the image's own files (one of them
    hard-linked, one under a symlinked directory) and the filesystem stays clean."""
    shipped = {"etc/fstab": "the image's own fstab\n", "boot/grub/grub.cfg": "the image's own grub.cfg\n", "usr/lib/x": "x\n"}
    image = commit_image("ships-fstab", {**GOOD_TREE, **shipped}, {**GOOD_LINKS, "libexec": "usr/lib"})
    os.link(image.rootfs / "etc/fstab", image.rootfs / "etc/fstab.linked")
    profile = profiles.Profile("overlay", "a file under a symlinked directory", files={"libexec/racker-profile.conf": "mine\n"})
    monkeypatch.setitem(profiles.PROFILES, "overlay", profile)
    monkeypatch.setattr(promote, "stage", lambda *args: pytest.fail("staged a tree that no check reads"))
    result = promote.promote(image, tmp_path / "x.raw", promote.Options(size=GiB, profile="overlay"))
    offset = result.layout.root_offset
    assert debugfs(result.path, offset, "cat /etc/fstab").decode().startswith("# Written by racker promote.\nUUID=")
    assert debugfs(result.path, offset, "cat /etc/fstab.linked") == b"the image's own fstab\n"
    assert b"menuentry 'racker'" in debugfs(result.path, offset, "cat /boot/grub/grub.cfg")
    assert debugfs(result.path, offset, "cat /usr/lib/racker-profile.conf") == b"mine\n"
    assert "Mode:  0644" in debugfs(result.path, offset, "stat /etc/fstab").decode()
    listed = debugfs(result.path, offset, "ls -l /boot/grub/i386-pc").decode()
    assert all(f" {m}" in listed for m in ("normal.mod", "boot.img", "moddep.lst")), listed
    fsck = subprocess.run(["e2fsck", "-fn", f"{result.path}?offset={offset}"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.slow  # builds disks
def test_a_file_promote_cannot_write_into_the_disk_is_one_line_and_leaves_nothing(private_store: dict, tmp_path: Path) -> None:
    image = commit_image("fstab-dir", {**GOOD_TREE, "etc/fstab/oops": "a directory where fstab goes\n"}, GOOD_LINKS)
    out = tmp_path / "out"
    with pytest.raises(PromoteError, match="debugfs could not write promote's files into the disk") as raised:
        promote.promote(image, out / "x.raw", promote.Options(size=GiB))
    assert "\n" not in str(raised.value)
    assert list(out.iterdir()) == []


# -- keys: prepared images and cached disks ---------------------------------


def _add(value):  # type: ignore[no-untyped-def]
    """`value` with one more entry, of its own kind."""
    if isinstance(value, tuple):
        return (*value, "racker-test.service")
    if isinstance(value, dict):
        return {**value, "racker-test": next(iter(value.values()))}
    return value + "\n# changed\n"


def _replace_first(**changes):  # type: ignore[no-untyped-def]
    """A dict of dataclasses with its first row changed."""

    def change(table: dict) -> dict:
        key = next(iter(table))
        return {**table, key: dataclasses.replace(table[key], **changes)}

    return change


PREPARE_TABLES = [
    (prepare, "MASK_UNITS", _add),
    (prepare, "ENABLE_UNITS", _add),
    (prepare, "OPTIONAL_ENABLE_UNITS", _add),
    (prepare, "MASK_GENERATORS", _add),
    (prepare, "CONFIG_FILES", _add),
    (prepare, "SSHD", _add),
    (prepare, "PACKAGES", _replace_first(optional=("racker-test",))),
    (prepare, "DISTRO_PACKAGES", lambda table: {"ubuntu": prepare.PACKAGES["apt"]}),
    (distros, "RECIPES", _replace_first(install=("apt-get", "install", "-y"))),
    (distros, "FAMILIES", _add),
    (build_leftovers, "RULES", _add),
]


@pytest.mark.parametrize(("module", "name", "change"), PREPARE_TABLES, ids=[f"{m.__name__}.{n}" for m, n, _ in PREPARE_TABLES])
def test_prepare_key_follows_what_prepare_works_from(module, name: str, change, monkeypatch: pytest.MonkeyPatch) -> None:
    image = store.StoredImage("x", "sha256:" + "1" * 64, "", "", 0)
    before = prepare.recipe_key(image)
    assert prepare.recipe_key(image) == before
    monkeypatch.setattr(module, name, change(getattr(module, name)))
    assert prepare.recipe_key(image) != before
    assert prepare.recipe_key(dataclasses.replace(image, digest="sha256:" + "2" * 64)) != prepare.recipe_key(image)


DISK_TABLES = [
    (bootloader, "SHARED_MODULES", _add),
    (bootloader, "BIOS_MODULES", _add),
    (bootloader, "EFI_MODULES", _add),
    (disk, "EXT4_FEATURES", lambda value: value + ",^64bit"),
    (disk, "ESP_SIZE", lambda value: value * 2),
    (formats, "FORMATS", _replace_first(options=("-o", "preallocation=full"))),
    (profiles, "PROFILES", lambda table: {**table, "generic": dataclasses.replace(table["generic"], cmdline="console=ttyS1")}),
    (promote, "DEFAULT_SIZE", lambda value: value * 2),
]


@pytest.mark.parametrize(("module", "name", "change"), DISK_TABLES, ids=[f"{m.__name__}.{n}" for m, n, _ in DISK_TABLES])
def test_cached_disk_key_follows_what_promote_works_from(module, name: str, change, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = "sha256:" + "1" * 64
    cached = Path(promote.cached_disk_name(digest, "bios"))
    assert not promote.is_stale_cached_disk(cached)
    monkeypatch.setattr(module, name, change(getattr(module, name)))
    assert promote.cached_disk_name(digest, "bios") != cached.name
    assert promote.is_stale_cached_disk(cached), "gc must see the old disk as stale"


def test_cached_disk_key_follows_what_a_profile_check_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A requirement made by a factory (_format_in(DO_FORMATS)) counts with what it captured."""
    before = promote.disk_key()
    do = profiles.PROFILES["digitalocean"]
    requirements = tuple(dataclasses.replace(r, check=profiles._format_in(("raw",))) if r.formats else r for r in do.requirements)
    monkeypatch.setitem(profiles.PROFILES, "digitalocean", dataclasses.replace(do, requirements=requirements))
    assert promote.disk_key() != before


def test_cached_disks_of_the_old_hand_bumped_versions_are_stale() -> None:
    assert promote.is_stale_cached_disk(Path("sha256-ab-bios-v2.raw"))
    assert not promote.is_stale_cached_disk(Path("sha256-ab-bios.img"))


def _load(path: Path, source: str, name: str = "racker_fingerprint_subject"):  # type: ignore[no-untyped-def]
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fingerprint_ignores_comments_docstrings_and_layout_not_code_or_data(tmp_path: Path) -> None:
    base = "X = (1, 2)\n\n\ndef f(a):\n    return a + 1\n"
    same = (
        '"""A docstring."""\n\n# A comment.\nX = (\n    1,\n    2,  # two\n)\n\n\n'
        'def f(a):\n    """Adds one."""\n    return (a\n            + 1)\n'
    )
    fingerprints = [
        fingerprint.fingerprint(_load(tmp_path / f"m{i}.py", source))
        for i, source in enumerate([base, same, base.replace("+ 1", "+ 2"), base.replace("(1, 2)", "(1, 3)")])
    ]
    assert fingerprints[0] == fingerprints[1]
    assert len(set(fingerprints)) == 3


def test_a_comment_in_prepare_changes_no_key_and_a_unit_does(tmp_path: Path) -> None:
    source = Path(prepare.__file__).read_text()
    image = store.StoredImage("x", "sha256:" + "1" * 64, "", "", 0)
    key = prepare.recipe_key(image)
    commented = _load(tmp_path / "commented.py", "# A new comment.\n" + source.replace("\n\n\n", "\n\n\n# here too\n"), prepare.__name__)
    assert fingerprint.fingerprint(commented, distros) == fingerprint.fingerprint(prepare, distros)
    masked = _load(tmp_path / "masked.py", source.replace('"man-db.timer",', '"man-db.timer", "racker-test.timer",'), prepare.__name__)
    assert fingerprint.fingerprint(masked, distros) != fingerprint.fingerprint(prepare, distros)
    assert prepare.recipe_key(image) == key


def test_fingerprint_refuses_a_value_it_cannot_serialise_faithfully() -> None:
    with pytest.raises(TypeError, match="cannot serialise"):
        fingerprint.canonical(object())
    assert fingerprint.canonical({"b": (1,), "a": [Path("/x")]}) == fingerprint.canonical({"a": [Path("/x")], "b": (1,)})
    assert fingerprint.canonical((1,)) != fingerprint.canonical([1])


# -- profiles: every requirement is checked on the product ------------------


def _unlink(rel: str) -> Callable[[Path], None]:
    return lambda tree: (tree / rel).unlink()


def _rewrite(rel: str, text: str) -> Callable[[Path], None]:
    return lambda tree: write_tree(tree, {rel: text})


# Requirement -> how to break it in a tree that meets every tree requirement.
TREE_BREAKERS: dict[str, Callable[[Path], None]] = {
    "Unix-like operating system": _unlink("etc/os-release"),
    "cloud-init 0.7.7 or newer installed": _rewrite("usr/lib/python3/dist-packages/cloudinit/version.py", '__VERSION__ = "0.7.5"\n'),
    "sshd installed and started at boot": _unlink("etc/systemd/system/multi-user.target.wants/ssh.service"),
    "SSH password authentication disabled": _rewrite("etc/ssh/sshd_config.d/50-racker.conf", "PasswordAuthentication yes\n"),
    "DHCP on the first NIC": lambda tree: [  # a profile may bring its own .network: every one says no
        write_tree(tree, {str(p.relative_to(tree)): "[Match]\nName=en*\n\n[Network]\nDHCP=no\n"})
        for p in (tree / "etc/systemd/network").glob("*.network")
    ],
    "NoCloud not listed before ConfigDrive": _rewrite("etc/cloud/cloud.cfg.d/99-user.cfg", "datasource_list: [NoCloud, ConfigDrive]\n"),
    "IPv4 only (no IPv6 support)": _rewrite("etc/systemd/network/50-v6.network", "[Match]\nName=en*\n\n[Network]\nDHCP=ipv6\n"),
    "serial console on ttyS0": _rewrite(
        "boot/grub/grub.cfg", bootloader.grub_cfg(ROOT_UUID, f"boot/vmlinuz-{KERNEL}", f"boot/initrd.img-{KERNEL}", "rw console=tty0")
    ),
    "virtio-scsi and virtio-net drivers": _unlink(f"lib/modules/{KERNEL}/kernel/drivers/scsi/virtio_scsi.ko"),
    "root login over SSH disabled": _rewrite("etc/ssh/sshd_config.d/50-racker.conf", "PasswordAuthentication no\nPermitRootLogin yes\n"),
    # DigitalOcean's image check
    "no password set for root or users": _rewrite("etc/shadow", "root:$6$salt$hash:20000:0:99999:7:::\ndebian:!:20000::::::\n"),
    "no SSH authorized_keys or private keys left": _rewrite(
        "home/debian/.ssh/authorized_keys", "ssh-ed25519 " + "A" * 68 + " left@behind\n"
    ),
    "bash history cleared": _rewrite("root/.bash_history", "echo secret\n" * 20),
    "log files cleared": _rewrite("var/log/dpkg.log", "2026-11-30 10:58:00 install linux-image-cloud-amd64 <none> 6.1\n"),
    "security updates visible: the security suite in apt's sources": _rewrite(
        "etc/apt/sources.list.d/debian.sources", "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n"
    ),
    "no DigitalOcean monitoring agent": _rewrite("var/opt/digitalocean/do-agent/config", "\n"),
    # Azure
    "hv_vmbus, hv_storvsc and hv_netvsc in the initramfs": _rewrite(f"boot/initrd.img-{KERNEL}", cpio(INITRAMFS[:2])),
    "Azure datasource first in cloud-init's datasource_list": _rewrite(
        "etc/cloud/cloud.cfg.d/99-user.cfg", "datasource_list: [NoCloud, Azure]\n"
    ),
    "kernel command line: console=ttyS0 earlyprintk=ttyS0": _rewrite(
        "boot/grub/grub.cfg",
        bootloader.grub_cfg(ROOT_UUID, f"boot/vmlinuz-{KERNEL}", f"boot/initrd.img-{KERNEL}", "rw console=ttyS0"),
    ),
    "no swap on the OS disk": _rewrite("etc/fstab", "UUID=x / ext4 rw 0 1\n/swapfile none swap sw 0 0\n"),
    "sshd ClientAliveInterval 180": _unlink("etc/ssh/sshd_config.d/40-racker-azure.conf"),
    "provisioned by cloud-init 21.2 or newer, with its Azure udev rules": _unlink("usr/lib/udev/rules.d/66-azure-ephemeral.rules"),
}


class Products:
    """Small real outputs for the disk checks: disks that GRUB boots, packed as a
    cloud imports them, and the same broken on purpose."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def path(self, suffix: str) -> Path:
        self.count += 1
        return self.directory / f"product{self.count}{suffix}"

    def disk(self, firmware: str = "bios", size: int = GiB, grub: bool = True) -> Path:
        layout = disk.plan(firmware, size, 0)
        raw = self.path(".raw")
        disk.create(raw, layout)
        if firmware == "uefi":
            disk.make_esp(raw, layout)
        if grub and firmware == "bios":
            bootloader.install_bios(raw, layout.root_uuid, layout.root_offset // disk.SECTOR, self.directory)
        if grub and firmware == "uefi":
            bootloader.install_efi(raw, layout.esp_offset, bootloader.build_efi_binary(layout.root_uuid, self.directory))
        return raw

    def convert(self, raw: Path, fmt: str) -> Path:
        output = self.path(formats.get(fmt).suffix)
        formats.convert(raw, formats.get(fmt), output)
        return output

    def tar(self, raw: Path, *options: str, name: str = "disk.raw", extra: bool = False) -> Path:
        """raw packed as GCE imports it (tar --format=oldgnu --sparse -cz), unless `options` say otherwise."""
        directory = self.path(".d")
        directory.mkdir()
        os.link(raw, directory / name)
        if extra:
            (directory / "README").write_text("not a disk\n")
        output = self.path(".tar.gz")
        names = sorted(p.name for p in directory.iterdir())
        subprocess.run(
            ["tar", *(options or ("--format=oldgnu", "--sparse")), "-czf", str(output), "-C", str(directory), *names], check=True
        )
        return output

    def qcow2_of_size(self, size: int) -> Path:
        output = self.path(".qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(output), str(size)], check=True)
        return output

    def good(self, profile: str) -> Path:
        """What promote makes for the profile: a qcow2 for DigitalOcean, GCE's tar.gz for gcp."""
        return {
            "digitalocean": lambda: self.convert(self.disk(), "qcow2"),
            "gcp": lambda: self.tar(self.disk()),
            "azure": lambda: self.convert(self.disk(), "vhd"),
        }[profile]()

    def misaligned(self) -> Path:
        """A fixed VHD whose one partition starts a sector past 1 MiB."""
        raw = self.path(".raw")
        with open(raw, "wb") as handle:
            handle.truncate(64 * MiB)
        subprocess.run(["sfdisk", "--quiet", str(raw)], input=b"label: dos\nstart=2049, type=83\n", check=True)
        return self.convert(raw, "vhd")


# Requirement -> ways to break it in the product, each named.
DISK_BREAKERS: dict[str, Callable[[Products], dict[str, Path]]] = {
    "image format raw, qcow2, VHDX, VDI or VMDK": lambda p: {
        "vhd": p.convert(p.disk(), "vhd"),
        "tar.gz": p.tar(p.disk()),
    },
    "100 GB or less uncompressed": lambda p: {"100 GB and a sector": p.qcow2_of_size(100 * 10**9 + 512)},
    "packed as disk.raw in a sparse oldgnu tar.gz": lambda p: {
        "posix tar": p.tar(p.disk(), "--format=posix", "--sparse"),
        "not sparse": p.tar(p.disk(size=256 * MiB), "--format=oldgnu"),
        "named root.raw": p.tar(p.disk(), name="root.raw"),
        "a second file": p.tar(p.disk(), extra=True),
        "qcow2": p.convert(p.disk(), "qcow2"),
    },
    "GRUB bootloader": lambda p: {
        "bios, no boot code": p.tar(p.disk(grub=False)),
        "uefi, empty ESP": p.tar(p.disk("uefi", grub=False)),
    },
    "disk size a whole number of GB": lambda p: {"1 GiB and 1 MiB": p.tar(p.disk(size=GiB + MiB))},
    "fixed VHD": lambda p: {"vhdx": p.convert(p.disk(), "vhdx"), "qcow2": p.convert(p.disk(), "qcow2")},
    "virtual size a whole number of MiB": lambda p: {"1 GiB and a sector": p.qcow2_of_size(GiB + 512)},
    "partitions aligned to 1 MiB": lambda p: {"a sector past 1 MiB": p.misaligned(), "no partitions": p.qcow2_of_size(GiB)},
}

REQUIREMENTS = [(p.name, r) for p in profiles.PROFILES.values() for r in p.requirements]


def good_tree(profile: str) -> dict[str, str | bytes]:
    """GOOD_TREE as promote stages it for `profile`: the profile's files and its kernel command line."""
    wanted = profiles.get(profile)
    grub = bootloader.grub_cfg(ROOT_UUID, f"boot/vmlinuz-{KERNEL}", f"boot/initrd.img-{KERNEL}", f"rw {wanted.cmdline}")
    return {**GOOD_TREE, **wanted.files, "boot/grub/grub.cfg": grub}


def test_every_requirement_of_every_profile_has_a_breaking_case() -> None:
    texts = {r.text for _profile, r in REQUIREMENTS}
    assert {r.reads for _profile, r in REQUIREMENTS} <= {"tree", "disk"}
    assert texts - set(TREE_BREAKERS) - set(DISK_BREAKERS) == set(), (
        "a requirement no test breaks: add it to TREE_BREAKERS or DISK_BREAKERS"
    )
    assert set(TREE_BREAKERS) | set(DISK_BREAKERS) <= texts, "a breaking case for a requirement no profile has"


@pytest.mark.parametrize(
    ("profile", "requirement"),
    # A requirement that reads the disk is checked on disks built for it: not the unit tier.
    [pytest.param(p, r, id=f"{p}-{r.text}", marks=[pytest.mark.slow] if r.reads == "disk" else []) for p, r in REQUIREMENTS],
)
def test_requirement_passes_on_a_good_product_and_fails_on_a_broken_one(
    profile: str, requirement: profiles.Requirement, tmp_path: Path
) -> None:
    if requirement.reads == "tree":
        assert requirement.text in TREE_BREAKERS, f"no test breaks {requirement.text!r}"
        good = write_tree(tmp_path / "good", good_tree(profile), GOOD_LINKS)
        ok, detail = requirement.check(good)
        assert ok, detail
        broken = write_tree(tmp_path / "broken", good_tree(profile), GOOD_LINKS)
        TREE_BREAKERS[requirement.text](broken)
        ok, detail = requirement.check(broken)
        assert not ok, f"broken, yet passes: {detail}"
        return
    assert requirement.text in DISK_BREAKERS, f"no test breaks {requirement.text!r}"
    products = Products(tmp_path)
    ok, detail = requirement.check(profiles.Built(products.good(profile), tmp_path))
    assert ok, detail
    for way, broken_product in DISK_BREAKERS[requirement.text](products).items():
        ok, detail = requirement.check(profiles.Built(broken_product, tmp_path))
        assert not ok, f"{way}: broken, yet passes: {detail}"


@pytest.mark.slow  # builds disks
def test_grub_check_reads_an_efi_grub_on_the_esp_in_any_format(tmp_path: Path) -> None:
    products = Products(tmp_path)
    uefi, bios = products.disk("uefi"), products.disk("bios")
    for product in (products.tar(uefi), products.convert(uefi, "qcow2"), uefi, products.convert(bios, "vmdk")):
        ok, detail = profiles.check_grub(profiles.Built(product, tmp_path))
        assert ok, f"{product.name}: {detail}"
    assert readback.probe_format(products.convert(bios, "vhd")) == "vhd"


def test_datasource_list_last_setting_wins_in_file_order(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        {
            "etc/cloud/cloud.cfg": "datasource_list: [NoCloud, ConfigDrive]\n",
            "etc/cloud/cloud.cfg.d/90-a.cfg": "datasource_list: [ ConfigDrive, 'NoCloud' ]\n",
        },
    )
    assert profiles.datasource_list(tree) == ["ConfigDrive", "NoCloud"]
    assert profiles.check_datasource_order(tree)[0]
    (tree / "etc/cloud/cloud.cfg.d/99-b.cfg").write_text("datasource_list: [NoCloud, ConfigDrive]\n")
    assert not profiles.check_datasource_order(tree)[0]


# cloud-init 25.1 and later, built with Meson (Debian sid's 26.2): version.py only imports the version.
MESON_VERSION_PY = """try:
    from cloudinit import meson_versions  # type: ignore

    __VERSION__ = meson_versions.UPSTREAM_VERSION
except ImportError:
    __VERSION__ = "@MISSING_MESON_BUILD_ARTIFACT@"
"""


@pytest.mark.parametrize(
    ("files", "version"),
    [
        ({"version.py": '__VERSION__ = "22.4.2"\n'}, (22, 4, 2)),
        ({"version.py": MESON_VERSION_PY, "meson_versions.py": 'UPSTREAM_VERSION = "26.2"      # Required\n'}, (26, 2)),
        ({"version.py": MESON_VERSION_PY}, None),
        ({}, None),
    ],
    ids=["version.py", "meson", "meson-without-its-versions", "none"],
)
def test_cloud_init_version_is_read_from_the_image_however_it_was_built(tmp_path: Path, files: dict, version) -> None:  # type: ignore[no-untyped-def]
    tree = write_tree(tmp_path, {f"usr/lib/python3/dist-packages/cloudinit/{name}": text for name, text in files.items()})
    assert profiles.cloud_init_version(tree) == version


def test_sshd_option_reads_included_dropins_first(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        {
            "etc/ssh/sshd_config": "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication yes\n",
            "etc/ssh/sshd_config.d/50-x.conf": "PasswordAuthentication no\n",
        },
    )
    assert profiles.sshd_option(tree, "passwordauthentication") == "no"


def test_unknown_profile_and_format_are_one_line_errors() -> None:
    with pytest.raises(PromoteError, match="unknown profile"):
        profiles.get("aws")
    with pytest.raises(PromoteError, match="unknown format"):
        formats.get("iso")


def test_a_format_the_cloud_does_not_import_fails_before_any_work(small_image, tmp_path: Path, monkeypatch) -> None:
    assert [r.ok for r in profiles.check_request(profiles.get("digitalocean"), "vhd")] == [False]
    assert profiles.check_request(profiles.get("digitalocean"), "qcow2") == []
    assert profiles.check_request(profiles.get("generic"), "vhd") == []
    monkeypatch.setattr(promote, "stage", lambda *args: pytest.fail("staged a tree for a request that cannot succeed"))
    with pytest.raises(RequirementsFailed, match="image format raw, qcow2"):
        promote.promote(small_image, tmp_path / "x.vhd", promote.Options(fmt="vhd", profile="digitalocean"))


def test_a_failing_tree_check_fails_before_the_disk_is_built(private_store: dict, tmp_path: Path, monkeypatch) -> None:
    image = commit_image("no-cloud-init", {k: v for k, v in GOOD_TREE.items() if "cloudinit" not in k}, GOOD_LINKS)
    monkeypatch.setattr(disk, "create", lambda *args: pytest.fail("built a disk for a tree that fails its profile"))
    out = tmp_path / "out"
    with pytest.raises(RequirementsFailed, match="cloud-init") as raised:
        promote.promote(image, out / "x.qcow2", promote.Options(fmt="qcow2", profile="digitalocean"))
    assert {c.requirement for c in raised.value.checks} == {r.text for r in profiles.get("digitalocean").requirements if r.reads == "tree"}
    assert list(out.iterdir()) == []


@pytest.mark.slow  # builds disks
def test_a_failing_disk_check_leaves_no_output(small_image, tmp_path: Path, monkeypatch) -> None:
    def posix_tar(raw: Path, output: Path, epoch: int | None = None) -> None:
        subprocess.run(["tar", "--format=posix", "--sparse", "-czf", str(output), "-C", str(raw.parent), raw.name], check=True)

    monkeypatch.setattr(formats, "pack_gce", posix_tar)
    out = tmp_path / "out"
    with pytest.raises(RequirementsFailed, match=r"sparse oldgnu tar\.gz") as raised:
        promote.promote(small_image, out / "x.tar.gz", promote.Options(fmt="gce", profile="gcp"))
    assert [c.requirement for c in raised.value.checks] == [r.text for r in profiles.get("gcp").requirements], "the whole table, in order"
    assert list(out.iterdir()) == [], "no output, no .partial"


@pytest.mark.slow  # builds disks
@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_every_format_is_checked_before_it_is_in_place(small_image, tmp_path: Path, fmt: str, monkeypatch) -> None:
    """A disk requirement that reads the output fails: nothing is left where the output would be."""
    seen: list[Path] = []

    def refuse(built: profiles.Built) -> tuple[bool, str]:
        seen.append(built.path)
        assert built.path.is_file() and built.path.name.endswith(".partial")
        return False, "refused"

    strict = profiles.Profile("strict", "refuses every disk", requirements=(profiles.Requirement("refused", refuse, "disk"),))
    monkeypatch.setitem(profiles.PROFILES, "strict", strict)
    out = tmp_path / "out"
    with pytest.raises(RequirementsFailed, match="refused"):
        promote.promote(small_image, out / f"x{formats.get(fmt).suffix}", promote.Options(fmt=fmt, profile="strict"))
    assert len(seen) == 1
    assert list(out.iterdir()) == []


@pytest.mark.slow  # builds disks
@pytest.mark.parametrize(
    ("profile", "fmt", "firmware"),
    [
        ("gcp", "gce", "bios"),
        ("gcp", "gce", "uefi"),
        ("digitalocean", "qcow2", "bios"),
        ("digitalocean", "raw", "uefi"),
        ("azure", "vhd", "bios"),
        ("azure", "vhd", "uefi"),
    ],
)
def test_what_promote_builds_meets_its_profile(small_image, tmp_path: Path, profile: str, fmt: str, firmware: str) -> None:
    out = tmp_path / "out"
    options = promote.Options(fmt=fmt, firmware=firmware, profile=profile)
    result = promote.promote(small_image, out / f"x{formats.get(fmt).suffix}", options)
    assert [c.requirement for c in result.checks] == [r.text for r in profiles.get(profile).requirements]
    assert all(c.ok for c in result.checks), [c for c in result.checks if not c.ok]
    assert [p.name for p in out.iterdir()] == [result.path.name]


# -- --app ------------------------------------------------------------------


def test_app_unit_runs_entrypoint_and_cmd_with_env_workdir_user() -> None:
    image = store.StoredImage(
        "svc",
        "sha256:0",
        "",
        "",
        0,
        manifest={
            "config": {
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ['echo "$GREETING" 100% > out'],
                "Env": ["GREETING=hello world", "PATH=/usr/bin:/bin"],
                "WorkingDir": "/srv",
                "User": "nobody:nogroup",
            }
        },
    )
    unit = app.unit_text(app.spec(image))
    assert 'ExecStart="/bin/sh" "-c" "echo \\"$$GREETING\\" 100%% > out"' in unit
    assert 'Environment="GREETING=hello world"' in unit
    assert "WorkingDirectory=-/srv" in unit and "User=nobody" in unit and "Group=nogroup" in unit


def test_app_environment_is_quoted_as_systemd_reads_it() -> None:
    """Environment= expands % specifiers, never $: a `$` stays one `$`; ExecStart= expands both."""
    unit = app.unit_text(app.AppSpec(("/bin/echo", "$HOME 100%"), (("A", "x $HOME ${Y} $$ 100% \"q\" 's' \\ \n\tz"),)))
    assert 'Environment="A=x $HOME ${Y} $$ 100%% \\"q\\" \'s\' \\\\ \\n\\tz"' in unit
    assert 'ExecStart="/bin/echo" "$$HOME 100%%"' in unit
    assert "\x01" not in app.systemd_quote("a\x01b") and app.systemd_quote("a\x01b") == '"a\\x01b"'


# Values and arguments a shell, systemd's unquoting, its $ and % expansion and
# its C escapes would each change; the service must get them byte for byte.
HOSTILE_ENV = (
    ("DOLLARS", "$HOME ${HOME} $$ $"),
    ("PERCENT", "100% %n %% %"),
    ("QUOTES", '"double" \'single\' "unbalanced'),
    ("SPACES", "  two  spaces  "),
    ("BACKSLASHES", "C:\\dir\\n \\\\ \\"),
    ("NEWLINE", "one\ntwo"),
    ("TAB", "a\tb"),
    ("EMPTY", ""),
)
HOSTILE_ARGS = ("$HOME", "${HOME}", "$$", "100%", "%n", ";", "\"q\" 'q'", "back\\slash\\", "new\nline", " spaced ", "")


def _with_app_units(base: store.StoredImage, name: str, spec: app.AppSpec) -> store.StoredImage:
    """`base` with the units promote --app writes for `spec`, enabled, committed as `name`."""
    with store.workdir("test") as work:
        rootfs = work / "rootfs"
        subprocess.run(["cp", "-al", str(base.rootfs), str(rootfs)], check=True)
        for rel, text in app.unit_files(spec).items():
            prepare.write_file(rootfs, rel, text)
        app.enable(rootfs)
        return store.commit(name, rootfs, source="test:", recipe="-", manifest={})


@pytest.mark.slow
def test_app_unit_hands_the_service_its_env_and_argv_exactly(share_image) -> None:
    """The unit promote writes, run by a real systemd (an nspawn machine, in a second)."""
    from racker.machines.nspawn import Machine

    base = share_image("debian-bookworm")
    script = 'cat /proc/$$/environ >/run/app.environ.new; printf "%s\\0" "$0" "$@" >/run/app.argv; mv /run/app.environ.new /run/app.environ'
    spec = app.AppSpec(("/bin/sh", "-c", script, "app", *HOSTILE_ARGS), HOSTILE_ENV)
    image = _with_app_units(base, "app-env", spec)
    with Machine(image) as machine:
        wait = machine.run(["sh", "-c", "for i in $(seq 100); do [ -e /run/app.environ ] && exit 0; sleep 0.1; done; exit 1"])
        assert wait.returncode == 0, machine.run(["systemctl", "status", app.UNIT]).stdout
        environ = machine.run(["cat", "/run/app.environ"]).stdout.split("\0")
        argv = machine.run(["cat", "/run/app.argv"]).stdout.split("\0")
    for key, value in HOSTILE_ENV:
        assert f"{key}={value}" in environ, [e for e in environ if e.startswith(key)]
    assert argv == ["app", *HOSTILE_ARGS, ""]


def test_stopsignal_and_healthcheck_are_read_as_docker_writes_them() -> None:
    config = {
        "Entrypoint": ["/srv/app"],
        "StopSignal": "INT",
        "Healthcheck": {"Test": ["CMD-SHELL", "curl -f http://localhost/"], "Interval": 5_000_000_000, "Retries": 2},
    }
    found = app.spec(store.StoredImage("svc", "sha256:0", "", "", 0, manifest={"config": config}))
    assert found.stop_signal == "SIGINT"
    assert found.health == app.HealthCheck(("/bin/sh", "-c", "curl -f http://localhost/"), interval=5, timeout=30, retries=2)
    assert app.kill_signal("9") == "SIGKILL" and app.kill_signal("SIGTERM") == "SIGTERM"
    with pytest.raises(PromoteError, match="not a signal"):
        app.kill_signal("SIGNOPE")
    assert app.health_check({"Test": ["NONE"]}) is None
    assert "KillSignal=SIGINT" in app.unit_text(found)
    assert set(app.unit_files(found)) == {f"etc/systemd/system/{u}" for u in (app.UNIT, f"{app.HEALTH}.service", f"{app.HEALTH}.timer")}


@pytest.mark.slow
def test_a_failing_health_check_restarts_the_service_and_a_passing_one_does_not(share_image) -> None:
    """The health check units promote writes, run by a real systemd (an nspawn machine)."""
    from racker.machines.nspawn import Machine

    base = share_image("debian-bookworm")
    for name, test, restarted in (("sick", ["CMD", "false"], True), ("well", ["CMD-SHELL", "test -d /tmp"], False)):
        config = {
            "Entrypoint": ["/bin/sleep", "infinity"],
            "User": "nobody",
            "StopSignal": "SIGINT",
            "Healthcheck": {"Test": test, "Interval": 1_000_000_000, "Retries": 2},
        }
        spec = app.spec(store.StoredImage(name, "sha256:0", "", "", 0, manifest={"config": config}))
        image = _with_app_units(base, name, spec)
        with Machine(image) as machine:
            machine.run(["sleep", "15"])  # past systemd's start limit (5 starts in 10 s), which a restarted app must not hit
            shown = machine.run(["systemctl", "show", "-p", "KillSignal", "-p", "ActiveState", app.UNIT]).stdout
            runs = machine.run(["journalctl", "-u", f"{app.HEALTH}.service", "--no-pager", "-o", "cat"]).stdout
            starts = machine.run(["journalctl", "-u", app.UNIT, "--no-pager", "-o", "cat"]).stdout.count("Started racker-app.service")
            state = machine.run(["systemctl", "is-system-running"]).stdout.strip()
        facts = dict(line.split("=", 1) for line in shown.split())
        assert facts["KillSignal"] == "2" and facts["ActiveState"] == "active", shown
        assert (starts > 1) is restarted, (name, starts, runs)
        assert ("health check failed (2 of 2)" in runs) is restarted, runs
        assert state == "running", f"a failing check must not leave a failed unit: {state}"


def test_app_needs_an_entrypoint_or_cmd() -> None:
    with pytest.raises(PromoteError, match="no ENTRYPOINT or CMD"):
        app.spec(store.StoredImage("base", "sha256:0", "", "", 0, manifest={}))


# -- seed and grub config ---------------------------------------------------


def test_seed_user_data_is_cloud_config_with_the_key() -> None:
    text = seed.user_data("vm1", "ssh-ed25519 AAAA test\n")
    assert text.startswith("#cloud-config\n")
    data = json.loads(text.split("\n", 1)[1])
    assert data["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAA test"]
    assert data["hostname"] == "vm1"


def test_seed_user_data_adds_the_callers_cloud_config_beside_racker_s_own() -> None:
    extra = {"packages": ["curl"], "hostname": "theirs", "users": [{"name": "alice"}]}
    data = json.loads(seed.user_data("vm1", "ssh-ed25519 AAAA test\n", extra=extra).split("\n", 1)[1])
    assert data["packages"] == ["curl"]
    assert data["hostname"] == "vm1", "racker's hostname wins: it names the VM"
    assert [u["name"] for u in data["users"]] == [seed.USER, "alice"]


def test_the_test_seed_trims_cloud_init_modules_unless_user_data_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def config(**kwargs: dict) -> dict:
        return json.loads(seed.user_data("vm1", "ssh-ed25519 AAAA test\n", **kwargs).split("\n", 1)[1])

    monkeypatch.setenv("RACKER_SEED_MODULES", "minimal")  # as conftest sets it for racker's own boots
    assert config()["cloud_config_modules"] == seed.MINIMAL_MODULES["cloud_config_modules"]
    assert "cloud_config_modules" not in config(extra={"packages": ["curl"]}), "user-data needs cloud-init's full module set"
    monkeypatch.delenv("RACKER_SEED_MODULES")
    assert not {"cloud_init_modules", "cloud_config_modules", "cloud_final_modules"} & set(config()), "users' seeds trim nothing"


def test_grub_cfg_boots_at_once_with_a_serial_console() -> None:
    cfg = bootloader.grub_cfg("1234", "boot/vmlinuz-6", "boot/initrd.img-6", "rw console=ttyS0", "uefi")
    assert "set timeout=0" in cfg
    assert "terminal_output serial console" in cfg
    assert "terminal_input" not in cfg, "GRUB's serial input polls for seconds under emulation"
    assert "linux /boot/vmlinuz-6 root=UUID=1234 rw console=ttyS0" in cfg
    assert "initrd /boot/initrd.img-6" in cfg


def test_grub_cfg_for_bios_loads_the_kernel_where_it_runs() -> None:
    cfg = bootloader.grub_cfg("1234", "boot/vmlinuz-6", "boot/initrd.img-6", "rw", "bios")
    assert "linux16 /boot/vmlinuz-6 root=UUID=1234 rw" in cfg
    assert "initrd16 /boot/initrd.img-6" in cfg
    assert "linux16" in bootloader.BIOS_MODULES


# -- Firecracker's configuration --------------------------------------------

# Firecracker's documented configuration (its API's swagger, FullVmConfiguration):
# section -> (required properties, every property with its JSON type). Firecracker
# refuses unknown fields, so an unknown one fails here too.
FIRECRACKER_SECTIONS: dict[str, tuple[set[str], dict[str, type | tuple[type, ...]]]] = {
    "boot-source": ({"kernel_image_path"}, {"kernel_image_path": str, "initrd_path": str, "boot_args": str}),
    "drives": (
        # path_on_host and is_read_only: required for a virtio-block drive.
        {"drive_id", "is_root_device", "path_on_host", "is_read_only"},
        {
            "drive_id": str,
            "partuuid": str,
            "is_root_device": bool,
            "cache_type": str,
            "is_read_only": bool,
            "path_on_host": str,
            "rate_limiter": dict,
            "io_engine": str,
            "socket": str,
        },
    ),
    "machine-config": (
        {"vcpu_count", "mem_size_mib"},
        {"vcpu_count": int, "mem_size_mib": int, "smt": bool, "track_dirty_pages": bool, "huge_pages": str, "cpu_template": str},
    ),
    "network-interfaces": (
        {"iface_id", "host_dev_name"},
        {"iface_id": str, "host_dev_name": str, "guest_mac": str, "mtu": int, "rx_rate_limiter": dict, "tx_rate_limiter": dict},
    ),
}
FIRECRACKER_TOP = {"balloon", "drives", "boot-source", "cpu-config", "logger", "machine-config", "metrics",
                   "memory-hotplug", "mmds-config", "network-interfaces", "pmem", "vsock", "entropy"}  # fmt: skip


def assert_firecracker_config(document: dict) -> None:
    """`document` has the shape `firecracker --config-file` takes, and names files that exist."""
    assert set(document) <= FIRECRACKER_TOP, set(document) - FIRECRACKER_TOP
    assert {"boot-source", "drives", "machine-config"} <= set(document)
    for section, (required, properties) in FIRECRACKER_SECTIONS.items():
        entries = document.get(section, [])
        for entry in entries if isinstance(entries, list) else [entries]:
            assert required <= set(entry), f"{section} lacks {required - set(entry)}"
            assert set(entry) <= set(properties), f"{section} has unknown {set(entry) - set(properties)}"
            for key, value in entry.items():
                assert isinstance(value, properties[key]) and not (properties[key] is int and isinstance(value, bool)), (section, key)
    vcpus = document["machine-config"]["vcpu_count"]
    assert 1 <= vcpus <= 32 and (vcpus == 1 or vcpus % 2 == 0)
    assert [d["is_root_device"] for d in document["drives"]].count(True) == 1
    boot = document["boot-source"]
    for path in (boot["kernel_image_path"], boot.get("initrd_path"), *(d["path_on_host"] for d in document["drives"])):
        if path is not None:
            assert Path(path).is_absolute() and Path(path).is_file(), path
    assert "nomodule" not in boot["boot_args"], "the initramfs loads virtio_mmio and virtio_blk as modules"


def test_firecracker_config_has_firecrackers_documented_shape(tmp_path: Path) -> None:
    files = [tmp_path / name for name in ("x.ext4", "x.vmlinux", "x.initrd")]
    for path in files:
        path.write_bytes(b"")
    document = formats.firecracker_config(*files, "console=ttyS0")
    assert_firecracker_config(json.loads(json.dumps(document)))
    assert document["boot-source"]["boot_args"].endswith("console=ttyS0")
    assert document["network-interfaces"][0]["host_dev_name"] == formats.FIRECRACKER_TAP


# -- formats as their platforms import them ---------------------------------


def qemu_img_info(path: Path, *forced: str) -> dict:
    argv = ["qemu-img", "info", "--output=json", *forced, str(path)]
    return json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)


@pytest.mark.slow  # builds disks
def test_vmdk_is_stream_optimized_and_its_descriptor_names_the_final_file(small_image, tmp_path: Path) -> None:
    """What OVA/vSphere import takes: streamOptimized, its one extent named as the file is."""
    out = tmp_path / "out"
    result = promote.promote(small_image, out / "my disk.vmdk", promote.Options(fmt="vmdk"))
    info = qemu_img_info(result.path)
    assert info["format"] == "vmdk" and info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert all(extent["compressed"] for extent in info["format-specific"]["data"]["extents"])
    head = result.path.read_bytes()[: 64 * 1024]
    descriptor = head[head.index(b"# Disk DescriptorFile") :].split(b"\0", 1)[0].decode()
    assert 'createType="streamOptimized"' in descriptor
    extents = [line for line in descriptor.splitlines() if line.startswith("RW ")]
    assert len(extents) == 1 and extents[0].endswith(' SPARSE "my disk.vmdk"'), descriptor
    assert 'ddb.adapterType = "ide"' in descriptor
    assert [p.name for p in out.iterdir()] == ["my disk.vmdk"]


@pytest.mark.slow  # builds disks
def test_vhd_is_fixed_and_a_whole_number_of_mib_as_azure_takes_it(small_image, tmp_path: Path) -> None:
    size = 2 * GiB + 3 * MiB + 12345  # not a whole MiB: the disk is cut to one
    result = promote.promote(small_image, tmp_path / "x.vhd", promote.Options(fmt="vhd", size=size))
    # qemu-img probes a fixed VHD as raw (its one footer is at the end): read it as Azure does.
    info = qemu_img_info(result.path, "-f", "vpc")
    assert info["format"] == "vpc" and diskfile.is_fixed_vhd(result.path)
    virtual = info["virtual-size"]
    assert virtual % MiB == 0 and virtual == 2 * GiB + 3 * MiB
    # A fixed VHD is the raw disk and a 512-byte footer: cookie, disk type 2 (fixed), current size.
    with open(result.path, "rb") as handle:
        handle.seek(-512, os.SEEK_END)
        footer = handle.read()
    assert footer[:8] == b"conectix"
    assert struct.unpack_from(">I", footer, 60)[0] == 2, "disk type: 2 is fixed, 3 dynamic"
    assert struct.unpack_from(">Q", footer, 48)[0] == virtual
    assert result.path.stat().st_size == virtual + 512


def qemu_img_check(path: Path) -> dict:
    argv = ["qemu-img", "check", "--output=json", str(path)]
    return json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)


@pytest.mark.slow  # builds disks
def test_compressed_qcow2_has_compressed_clusters_and_the_same_content(small_image, tmp_path: Path) -> None:
    """--compress: zstd-compressed clusters (this QEMU has zstd), read back byte for byte as the uncompressed disk."""
    raw = promote.promote(small_image, tmp_path / "x.raw", promote.Options(size=GiB)).path
    qcow2 = formats.get("qcow2")
    plain, packed = tmp_path / "plain.qcow2", tmp_path / "packed.qcow2"
    formats.convert(raw, qcow2, plain)
    formats.convert(raw, qcow2, packed, compress=True)
    assert qemu_img_check(plain).get("compressed-clusters", 0) == 0
    check = qemu_img_check(packed)
    assert check["check-errors"] == 0 and check.get("corruptions", 0) == 0
    # The few clusters that do not shrink (none in this small tree) are stored as they are.
    assert check["compressed-clusters"] >= 0.9 * check["allocated-clusters"] > 0, check
    assert qemu_img_info(packed)["format-specific"]["data"]["compression-type"] == "zstd"
    assert packed.stat().st_size < plain.stat().st_size
    for other in (raw, plain):
        compared = subprocess.run(["qemu-img", "compare", str(other), str(packed)], capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.mark.slow  # builds disks
def test_compress_is_the_default_for_a_profiles_upload_only(small_image, tmp_path: Path) -> None:
    for profile, expected in (("generic", False), ("digitalocean", True)):
        result = promote.promote(small_image, tmp_path / f"{profile}.qcow2", promote.Options("qcow2", profile=profile))
        assert (qemu_img_check(result.path).get("compressed-clusters", 0) > 0) == expected, profile
    qcow2, raw = formats.get("qcow2"), formats.get("raw")
    assert promote.Options(profile="digitalocean", compress=False).compressed(qcow2) is False
    assert promote.Options(compress=True).compressed(qcow2) is True
    # A format compressed always or never is no error by default: a profile's raw upload stays raw.
    assert promote.Options(profile="digitalocean").compressed(raw) is False


@pytest.mark.parametrize("fmt", [f.name for f in formats.FORMATS.values() if not f.compression])
def test_compress_on_an_uncompressed_format_is_a_one_line_error_before_any_work(small_image, tmp_path: Path, fmt: str, monkeypatch) -> None:
    monkeypatch.setattr(promote, "stage", lambda *args: pytest.fail("staged a tree for a request that cannot succeed"))
    with pytest.raises(PromoteError, match=f"{fmt} is an uncompressed format") as raised:
        promote.promote(small_image, tmp_path / "out/x", promote.Options(fmt, compress=True))
    assert "\n" not in str(raised.value) and "qcow2" in raised.value.hint
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # builds disks
def test_a_format_implies_its_platforms_datasource_first_whatever_the_profile(small_image, tmp_path: Path) -> None:
    """GCE hands SSH keys to its own datasource only; Azure provisions through its own."""
    wanted = {"gce": "GCE, ConfigDrive, NoCloud", "vhd": "Azure, ConfigDrive, NoCloud", "qcow2": None}
    for fmt, sources in wanted.items():
        result = promote.promote(small_image, tmp_path / f"x{formats.get(fmt).suffix}", promote.Options(fmt=fmt))
        raw = result.path
        if fmt == "gce":
            subprocess.run(["tar", "-xSzf", str(result.path), "-C", str(tmp_path)], check=True)
            raw = tmp_path / "disk.raw"
        elif fmt == "qcow2":
            raw = tmp_path / "qcow2.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(result.path), str(raw)], check=True)
        listing = debugfs(raw, result.layout.root_offset, "ls -l /etc/cloud/cloud.cfg.d").decode()
        written = debugfs(raw, result.layout.root_offset, f"cat /etc/cloud/cloud.cfg.d/94-racker-{fmt}.cfg").decode()
        if sources is None:
            assert "94-racker" not in listing, listing
        else:
            assert f"datasource_list: [{sources}]" in written, (fmt, written)
    # A profile still has the last word: gcp lists GCE first itself.
    tree = write_tree(tmp_path / "tree", GOOD_TREE)
    assert promote.format_files(formats.get("gce"), tree)
    assert promote.format_files(formats.get("gce"), tmp_path / "empty") == {}, "no list: cloud-init's default has them all"


@pytest.mark.slow  # builds disks
def test_a_kernel_without_the_platforms_drivers_fails_before_any_work(private_store: dict, tmp_path: Path) -> None:
    """Debian's cloud kernel has no ahci or e1000: a vdi of it would stop at "UUID=... does not exist" in VirtualBox."""
    cloud_only = "".join(f"kernel/drivers/{m}.ko\n" for m in BUILTIN if m not in ("ahci", "e1000"))
    image = commit_image("cloud-kernel", {**GOOD_TREE, f"lib/modules/{KERNEL}/modules.builtin": cloud_only}, GOOD_LINKS)
    with pytest.raises(PromoteError, match=r"lacks ahci, e1000, which a vdi boots on") as raised:
        promote.promote(image, tmp_path / "out/x.vdi", promote.Options(fmt="vdi"))
    assert "generic kernel" in (raised.value.hint or "")
    assert not (tmp_path / "out").exists()
    assert promote.promote(image, tmp_path / "out/x.qcow2", promote.Options(fmt="qcow2")).path.is_file()


def test_the_generic_kernel_is_its_own_prepared_image() -> None:
    """A vdi's image (the generic kernel) is named and keyed apart: preparing it never replaces the cloud one."""
    sata = {n for n, f in formats.FORMATS.items() if f.drivers == "sata"}
    assert sata == {"vdi", "vagrant-virtualbox", "ova"}, "VirtualBox's formats"
    assert {prepare.kernel_for(formats.get(n).drivers) for n in sata} == {"generic"}
    assert {prepare.kernel_for(f.drivers) for n, f in formats.FORMATS.items() if n not in sata} == {prepare.CLOUD_KERNEL}
    assert prepare.prepared_name("debian-bookworm") == "debian-bookworm+vm"
    assert prepare.prepared_name("debian-bookworm", "generic") == "debian-bookworm+vm-generic"
    image = store.StoredImage("x", "sha256:" + "1" * 64, "", "", 0)
    assert prepare.recipe_key(image, kernel="generic") != prepare.recipe_key(image)
    cloud = dataclasses.replace(image, manifest={"prepared": {"for": "vm"}})  # older images: no flavour, the cloud kernel
    assert prepare.is_prepared(cloud, prepare.CLOUD_KERNEL) and not prepare.is_prepared(cloud, "generic")
    assert all(row.kernel in prepare.PACKAGES["apt"].kernels for row in prepare.INITRAMFS_MODULES.values())


# -- real disks, built and read back ----------------------------------------


@pytest.mark.slow
def test_bios_disk_layout_and_grub_are_where_bios_looks(bookworm_vm, tmp_path: Path) -> None:
    result = promote.promote(bookworm_vm, tmp_path / "d.raw", promote.Options(size=2 * GiB))
    raw = result.path.read_bytes()[: 2 * MiB]
    assert raw[510:512] == b"\x55\xaa"
    boot = (bootloader.GRUB_LIB / "i386-pc/boot.img").read_bytes()
    assert raw[:0x5C] == boot[:0x5C], "GRUB's boot.img is in the MBR"
    assert struct.unpack_from("<Q", raw, 0x5C)[0] == 1, "boot.img loads core.img from LBA 1"
    table = json.loads(subprocess.run(["sfdisk", "--json", str(result.path)], capture_output=True, text=True, check=True).stdout)
    part = table["partitiontable"]["partitions"][0]
    assert part["start"] == 2048 and part.get("bootable")
    # Read the root filesystem back without mounting it.
    fstab = debugfs(result.path, MiB, "cat /etc/fstab").decode()
    assert f"UUID={result.layout.root_uuid} / ext4 rw" in fstab
    assert result.path.stat().st_mode & 0o777 != 0o600


@pytest.mark.slow
def test_missing_kernel_fails_before_any_work(share_image, tmp_path: Path) -> None:
    plain = share_image("debian-bookworm")  # not prepared: no kernel
    started = time.monotonic()
    with pytest.raises(PrepareError, match="no kernel"):
        promote.promote(plain, tmp_path / "out/x.raw")
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out").exists()


def test_size_too_small_fails_before_any_work(small_image, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(PromoteError, match="too small"):
        promote.promote(small_image, tmp_path / "out/x.raw", promote.Options(size=100 * MiB))
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_failing_profile_prints_a_table_and_fails(bookworm_vm, private_store: dict, tmp_path: Path) -> None:
    result = racker(
        "promote", "debian-bookworm", "--profile", "digitalocean", "--format", "vhd", "-o", str(tmp_path / "x.vhd"), env=private_store
    )
    assert result.returncode == 125
    assert "FAIL" in result.stdout and "image format raw, qcow2, VHDX, VDI or VMDK" in result.stdout
    assert result.stderr.count("\n") <= 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "x.vhd").exists()


@pytest.mark.slow  # builds disks
def test_app_service_is_in_the_disk(private_store: dict, tmp_path: Path) -> None:
    config = {"Entrypoint": ["/usr/bin/python3", "-m", "http.server"], "Cmd": ["8080"], "Env": ["GREETING=hello $USER"]}
    image = commit_image("svc", GOOD_TREE, GOOD_LINKS, config)
    result = promote.promote(image, tmp_path / "x.raw", promote.Options(app=True))
    offset = result.layout.root_offset
    unit = debugfs(result.path, offset, f"cat /etc/systemd/system/{app.UNIT}").decode()
    assert unit == app.unit_text(app.spec(image))
    assert 'ExecStart="/usr/bin/python3" "-m" "http.server" "8080"' in unit
    link = debugfs(result.path, offset, f"stat /etc/systemd/system/multi-user.target.wants/{app.UNIT}").decode()
    assert "Type: symlink" in link and f'Fast link dest: "/etc/systemd/system/{app.UNIT}"' in link


def test_app_needs_an_entrypoint_or_cmd_before_any_work(small_image, tmp_path: Path) -> None:
    with pytest.raises(PromoteError, match="no ENTRYPOINT"):
        promote.promote(small_image, tmp_path / "x.raw", promote.Options(app=True))
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.slow
def test_gc_removes_what_a_killed_promote_was_writing(bookworm_vm, private_store: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "promote.log"
    with open(log, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "racker", "promote", "debian-bookworm", "--format", "qcow2", "-o", str(out / "x.qcow2")],
            env={**os.environ, **private_store},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 600
        while not (partials := list(out.glob(".x.qcow2.*.partial"))):
            assert child.poll() is None, f"promote ended before writing its output: {log.read_text()}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    [partial] = partials
    collected = racker("gc", env=private_store)
    assert collected.returncode == 0, collected.stderr
    assert not partial.exists()
    assert f"removed unfinished output {partial}" in collected.stdout
    assert list(out.iterdir()) == []


def test_requirements_failed_carries_checks() -> None:
    error = RequirementsFailed("x", [profiles.Result("r", False, "d")])
    assert error.checks[0].requirement == "r"


def test_app_finds_a_bare_entrypoint_on_the_image_path_as_docker_does(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "opt/venv/bin").mkdir(parents=True)
    (tree / "opt/venv/bin/serve").write_text("#!/bin/sh\n")
    spec = app.AppSpec(("serve", "--port", "80"), (("PATH", "/opt/venv/bin:/usr/bin"),))
    found = app.resolved(spec, tree)
    assert found.executable == "/opt/venv/bin/serve"
    assert 'ExecStart=@"/opt/venv/bin/serve" "serve" "--port" "80"' in app.unit_text(found)
    assert app.resolved(app.AppSpec(("/usr/bin/env", "x")), tree).executable == ""
    with pytest.raises(PromoteError, match="not on the image's PATH"):
        app.resolved(app.AppSpec(("serve",)), tree)  # Docker's default PATH has no /opt/venv/bin


@pytest.mark.slow
def test_app_unit_with_a_bare_entrypoint_runs_it_under_its_own_name(share_image) -> None:
    """systemd's ExecStart=@PATH NAME: the program found on the image's PATH, argv[0] as the image gave it."""
    from racker.machines.nspawn import Machine

    base = share_image("debian-bookworm")
    spec = app.resolved(
        app.AppSpec(("sh", "-c", "cat /proc/$$/cmdline > /run/app.cmdline.new; mv /run/app.cmdline.new /run/app.cmdline")), base.rootfs
    )
    image = _with_app_units(base, "app-bare", spec)
    with Machine(image) as machine:
        wait = machine.run(["sh", "-c", "for i in $(seq 100); do [ -e /run/app.cmdline ] && exit 0; sleep 0.1; done; exit 1"])
        assert wait.returncode == 0, machine.run(["systemctl", "status", app.UNIT]).stdout
        cmdline = machine.run(["cat", "/run/app.cmdline"]).stdout.split("\0")
    assert cmdline[:2] == ["sh", "-c"], cmdline


# -- Vagrant boxes and OVAs ---------------------------------------------------


ACCOUNTS = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n",
    "etc/group": "root:x:0:\nshadow:x:42:\nuser:x:1000:\nstaff:x:1001:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n",
    "etc/gshadow": "root:*::\nshadow:*::\nuser:!::\nstaff:*::\n",
}
OVF_NS = {"ovf": boxes.OVF, "rasd": boxes.RASD, "vssd": boxes.VSSD}


@pytest.fixture
def accounts_image(private_store: dict[str, str]) -> store.StoredImage:
    """small_image with account files, shadow ones root:shadow 0640 as on Debian."""
    image = commit_image("accounts", {**GOOD_TREE, **ACCOUNTS}, GOOD_LINKS)
    for rel in ("etc/shadow", "etc/gshadow"):
        os.chown(image.rootfs / rel, 0, 42)
        os.chmod(image.rootfs / rel, 0o640)
    return image


def members(path: Path) -> dict[str, bytes]:
    """A tar's regular members, in order: name -> content (every one a plain file owned by root)."""
    with tarfile.open(path) as archive:
        infos = archive.getmembers()
        assert all(i.isfile() and i.uid == 0 and "/" not in i.name for i in infos), [(i.name, i.type, i.uid) for i in infos]
        return {i.name: archive.extractfile(i).read() for i in infos}  # type: ignore[union-attr]


def assert_stream_optimized(vmdk: Path, name: str) -> None:
    info = qemu_img_info(vmdk)
    assert info["format"] == "vmdk" and info["format-specific"]["data"]["create-type"] == "streamOptimized"
    head = vmdk.read_bytes()[: 64 * 1024]
    descriptor = head[head.index(b"# Disk DescriptorFile") :].split(b"\0", 1)[0].decode()
    assert next(line for line in descriptor.splitlines() if line.startswith("RW ")).endswith(f' SPARSE "{name}"'), descriptor


def assert_ovf(text: bytes, files: dict[str, bytes], capacity: int) -> None:
    """What OVF importers resolve: one 1.0 Envelope; each Disk's file in References (size, present); every
    section's Info first; the disk Item on an AHCI controller Item; the NIC an E1000 on a declared network;
    CIM settings in their schema's (alphabetical) order; an OS type VirtualBox maps."""
    root = ElementTree.fromstring(text)
    ovf = f"{{{boxes.OVF}}}"
    assert root.tag == f"{ovf}Envelope" and root.get(f"{ovf}version") == "1.0"
    assert [child.tag for child in root] == [f"{ovf}{n}" for n in ("References", "DiskSection", "NetworkSection", "VirtualSystem")]
    refs_by_id = {f.get(f"{ovf}id"): f for f in root.findall("ovf:References/ovf:File", OVF_NS)}
    for file in refs_by_id.values():
        assert int(file.get(f"{ovf}size")) == len(files[file.get(f"{ovf}href")])
    disks = root.findall("ovf:DiskSection/ovf:Disk", OVF_NS)
    assert len(disks) == 1 and disks[0].get(f"{ovf}fileRef") in refs_by_id
    assert int(disks[0].get(f"{ovf}capacity")) == capacity and disks[0].get(f"{ovf}format").endswith("#streamOptimized")
    for section in root.iter():
        if section.tag.endswith("Section"):
            assert section[0].tag == f"{ovf}Info" and section[0].text, section.tag
    networks = {n.get(f"{ovf}name") for n in root.findall("ovf:NetworkSection/ovf:Network", OVF_NS)}
    system = root.find("ovf:VirtualSystem", OVF_NS)
    assert system is not None and system.get(f"{ovf}id")
    assert int(system.find("ovf:OperatingSystemSection", OVF_NS).get(f"{ovf}id")) in (96, 94, 101)  # type: ignore[union-attr]
    hardware = system.find("ovf:VirtualHardwareSection", OVF_NS)
    assert hardware.find("ovf:System/vssd:VirtualSystemType", OVF_NS).text  # type: ignore[union-attr]
    items = {}
    for item in hardware.findall("ovf:Item", OVF_NS):  # type: ignore[union-attr]
        names = [child.tag.split("}")[1] for child in item]
        assert names == sorted(names), names
        values = {name: child.text for name, child in zip(names, item, strict=True)}
        assert values["InstanceID"] not in items
        items[values["InstanceID"]] = values
    kinds = {v["ResourceType"]: v for v in items.values()}
    assert set(kinds) == {"3", "4", "10", "17", "20"}
    assert kinds["3"]["VirtualQuantity"] == "2" and kinds["4"]["VirtualQuantity"] == "1024"
    assert kinds["4"]["AllocationUnits"] == "byte * 2^20"
    disk = kinds["17"]
    assert disk["HostResource"] == f"ovf:/disk/{disks[0].get(f'{ovf}diskId')}"
    assert items[disk["Parent"]]["ResourceType"] == "20" and items[disk["Parent"]]["ResourceSubType"] == "AHCI"
    assert kinds["10"]["ResourceSubType"] == "E1000" and kinds["10"]["Connection"] in networks


@pytest.mark.slow  # builds disks
def test_boxes_and_ova_hold_what_their_importers_read(small_image, tmp_path: Path) -> None:
    out = tmp_path / "out"
    built = {fmt: promote.promote(small_image, out / f"{fmt}{formats.get(fmt).suffix}", promote.Options(fmt=fmt)) for fmt in boxes.PACKERS}
    capacity = built["ova"].layout.size
    assert sorted(p.name for p in out.iterdir()) == ["ova.ova", "vagrant-libvirt.box", "vagrant-virtualbox.box"]

    libvirt = built["vagrant-libvirt"].path
    assert libvirt.read_bytes()[:2] == b"\x1f\x8b", "a tar.gz"
    files = members(libvirt)
    assert list(files) == ["metadata.json", "Vagrantfile", "box.img"]
    assert json.loads(files["metadata.json"]) == {"provider": "libvirt", "format": "qcow2", "virtual_size": 2}
    vagrantfile = files["Vagrantfile"].decode()
    for line in ('libvirt.driver = "kvm"', 'libvirt.disk_bus = "virtio"', "libvirt.memory = 1024"):
        assert line in vagrantfile
    (tmp_path / "box.img").write_bytes(files["box.img"])
    info = qemu_img_info(tmp_path / "box.img")
    assert info["format"] == "qcow2" and info["virtual-size"] == capacity and "backing-filename" not in info

    files = members(built["vagrant-virtualbox"].path)
    assert list(files) == ["metadata.json", "Vagrantfile", "box.ovf", "box-disk001.vmdk"]
    assert json.loads(files["metadata.json"]) == {"provider": "virtualbox"}
    mac = boxes.mac_for(small_image.digest)
    assert re.fullmatch(r"080027[0-9A-F]{6}", mac) and f'config.vm.base_mac = "{mac}"' in files["Vagrantfile"].decode()
    assert_ovf(files["box.ovf"], files, capacity)
    (tmp_path / "box-disk001.vmdk").write_bytes(files["box-disk001.vmdk"])
    assert_stream_optimized(tmp_path / "box-disk001.vmdk", "box-disk001.vmdk")

    with tarfile.open(built["ova"].path) as archive:
        assert all(i.name.isascii() and len(i.name) < 100 for i in archive.getmembers())
    assert built["ova"].path.read_bytes()[257:263] == b"ustar\0", "POSIX ustar, as the OVF spec requires"
    files = members(built["ova"].path)
    assert list(files) == ["ova.ovf", "ova.mf", "ova-disk001.vmdk"], "the descriptor first, then the manifest"
    manifest = dict(re.fullmatch(r"SHA256\((.+)\)= ([0-9a-f]{64})", line).groups() for line in files["ova.mf"].decode().splitlines())  # type: ignore[union-attr]
    assert manifest == {name: hashlib.sha256(files[name]).hexdigest() for name in ("ova.ovf", "ova-disk001.vmdk")}
    assert_ovf(files["ova.ovf"], files, capacity)
    (tmp_path / "ova-disk001.vmdk").write_bytes(files["ova-disk001.vmdk"])
    assert_stream_optimized(tmp_path / "ova-disk001.vmdk", "ova-disk001.vmdk")


def debugfs_owner_mode(stat_output: str) -> tuple[int, int, str]:
    """uid, gid and permission bits from debugfs's `stat`."""
    user, group = re.search(r"User: +(\d+) +Group: +(\d+)", stat_output).groups()  # type: ignore[union-attr]
    return int(user), int(group), re.search(r"Mode: +(\d+)", stat_output).group(1)  # type: ignore[union-attr]


def test_an_appliance_is_named_as_tar_and_importers_take_it(small_image, tmp_path: Path) -> None:
    assert boxes.member_name("bookworm-bios.ova", ".ova") == "bookworm-bios"
    assert boxes.member_name("my disk (ü).ova", ".ova") == "my-disk"
    assert boxes.member_name("../..ova", ".ova") == "racker"
    assert len(boxes.member_name("x" * 300 + ".ova", ".ova")) == 64
    with pytest.raises(PromoteError, match="boots with BIOS"):
        promote.promote(small_image, tmp_path / "out/x.ova", promote.Options(fmt="ova", firmware="uefi"))
    assert not (tmp_path / "out").exists()


@pytest.mark.root  # the account files' owners, and the user's own
def test_vagrant_user_only_when_asked(accounts_image, tmp_path: Path) -> None:
    """--vagrant-user: user vagrant (the first free id, its own group), passwordless sudo, Vagrant's
    insecure keys readable by it alone; the account files keep their modes and owners. Without it:
    none of that. The store's image is never written either way."""
    before = tree_snapshot(accounts_image.rootfs, times=True)
    plain = promote.promote(accounts_image, tmp_path / "plain.raw")
    asked = promote.promote(accounts_image, tmp_path / "asked.raw", promote.Options(vagrant_user=True))
    assert tree_snapshot(accounts_image.rootfs, times=True) == before

    def read(result: promote.Promoted, path: str) -> str:
        return debugfs(result.path, result.layout.root_offset, f"cat {path}").decode()

    def stat_of(result: promote.Promoted, path: str) -> str:
        return debugfs(result.path, result.layout.root_offset, f"stat {path}").decode()

    def owner_mode(result: promote.Promoted, path: str) -> tuple[int, int, str]:
        return debugfs_owner_mode(stat_of(result, path))

    assert "vagrant" not in read(plain, "/etc/passwd") + read(plain, "/etc/shadow")
    assert stat_of(plain, "/etc/sudoers.d/vagrant") == stat_of(plain, "/home/vagrant") == "", "debugfs: not found"
    # 1000 is user's uid and 1001 a group's: 1002 is the first id free in both.
    assert read(asked, "/etc/passwd") == ACCOUNTS["etc/passwd"] + "vagrant:x:1002:1002:Vagrant:/home/vagrant:/bin/sh\n"
    assert read(asked, "/etc/group") == ACCOUNTS["etc/group"] + "vagrant:x:1002:\n"
    assert read(asked, "/etc/shadow") == ACCOUNTS["etc/shadow"] + "vagrant:*::0:99999:7:::\n"
    assert read(asked, "/etc/gshadow") == ACCOUNTS["etc/gshadow"] + "vagrant:!::\n"
    for rel in ("/etc/shadow", "/etc/gshadow"):
        assert owner_mode(asked, rel) == (0, 42, "0640"), rel
    assert read(asked, "/etc/sudoers.d/vagrant").splitlines()[1] == "vagrant ALL=(ALL) NOPASSWD: ALL"
    assert owner_mode(asked, "/etc/sudoers.d/vagrant") == (0, 0, "0440")
    keys = read(asked, "/home/vagrant/.ssh/authorized_keys").splitlines()
    assert [k.split()[0] for k in keys] == ["ssh-ed25519", "ssh-rsa"] and list(vagrant.INSECURE_KEYS) == keys
    for rel, mode in (("/home/vagrant", "0755"), ("/home/vagrant/.ssh", "0700"), ("/home/vagrant/.ssh/authorized_keys", "0600")):
        assert owner_mode(asked, rel) == (1002, 1002, mode), rel


@pytest.mark.root  # the user's files are chowned to it
def test_vagrant_user_already_in_the_image_keeps_its_ids(private_store: dict, tmp_path: Path) -> None:
    accounts = {**ACCOUNTS, "etc/passwd": ACCOUNTS["etc/passwd"] + "vagrant:x:900:901::/srv/vagrant:/bin/sh\n"}
    image = commit_image("has-vagrant", {**GOOD_TREE, **accounts}, GOOD_LINKS)
    result = promote.promote(image, tmp_path / "x.raw", promote.Options(vagrant_user=True))
    assert debugfs(result.path, result.layout.root_offset, "cat /etc/passwd").decode() == accounts["etc/passwd"]
    found = debugfs(result.path, result.layout.root_offset, "stat /srv/vagrant/.ssh/authorized_keys").decode()
    assert debugfs_owner_mode(found) == (900, 901, "0600")


def test_box_formats_run_on_the_platform_vdi_does() -> None:
    """VirtualBox's box and the OVA attach the disk and NIC as a vdi's VM does (SATA, E1000): whatever
    the image needs for that platform (its drivers, its kernel) is what they need."""
    sata = formats.get("vdi").drivers
    assert sata in prepare.INITRAMFS_MODULES and {"ahci", "e1000"} <= set(prepare.INITRAMFS_MODULES[sata].modules)
    assert formats.get("vagrant-virtualbox").drivers == formats.get("ova").drivers == sata
    assert formats.QEMU_NAMES["vmdk"] == "vmdk" and formats.QEMU_NAMES["qcow2"] == "qcow2", "a box is not what a bare disk is read back as"


def assert_same_files(source: dict, pulled: dict) -> None:
    missing, extra = sorted(set(source) - set(pulled)), sorted(set(pulled) - set(source))
    differ = {k: (source[k], pulled[k]) for k in sorted(set(source) & set(pulled)) if source[k] != pulled[k]}
    assert not missing and not extra and not differ, f"missing {missing[:10]}, extra {extra[:10]}, differ {list(differ.items())[:10]}"


# What promote writes into a disk, and what pull's normalise changes (no first boot has run).
PROMOTED = ("boot/grub", "lost+found", "etc/fstab", "etc/hostname", "etc/machine-id")
VAGRANT_FILES = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", vagrant.SUDOERS, vagrant.HOME)


@pytest.mark.root  # the pulled files keep their owners
def test_a_vagrant_libvirt_box_disk_pulls_back_to_the_same_files(accounts_image, tmp_path: Path) -> None:
    box = promote.promote(accounts_image, tmp_path / "x.box", promote.Options(fmt="vagrant-libvirt")).path
    with tarfile.open(box) as archive:
        archive.extract("box.img", tmp_path, filter="data")
    pulled = _pull(f"file:{tmp_path / 'box.img'}")
    assert pulled.manifest["disk"]["format"] == "qcow2"
    with store.reading(pulled) as rootfs:
        assert_same_files(tree_snapshot(accounts_image.rootfs, PROMOTED), tree_snapshot(rootfs, PROMOTED))


def _pull(reference: str) -> store.StoredImage:
    done = racker("pull", reference)
    assert done.returncode == 0, done.stderr
    image = store.lookup(reference)
    assert image is not None
    return image


@pytest.mark.slow
def test_a_box_and_an_ova_of_the_prepared_image_pull_back_to_the_same_files_and_pass_checks(
    bookworm_vm, share_image, private_store: dict, tmp_path: Path
) -> None:
    """racker promote --vagrant-user to an OVA and to a libvirt box; the OVA's manifest checked by hand;
    both pulled whole (`file:X.ova`, `file:X.box`, not their inner disks): every file of the prepared
    image, byte for byte, but what promote and pull write, and the vagrant user's files, which are the
    image's with the user added; one image, which boots under nspawn and passes racker's checks.
    The OVA is VirtualBox's platform: its image is the one prepared with the generic kernel (ahci, e1000)."""
    generic = share_image("debian-bookworm", prepared=True, kernel=prepare.kernel_for(formats.get("ova").drivers))
    ova, box = tmp_path / "bookworm.ova", tmp_path / "bookworm.box"
    for out, fmt in ((ova, "ova"), (box, "vagrant-libvirt")):
        done = racker("promote", "debian-bookworm", "--format", fmt, "--vagrant-user", "-o", str(out), env=private_store)
        assert done.returncode == 0, done.stderr
    with tarfile.open(ova) as archive:
        assert archive.getnames() == ["bookworm.ovf", "bookworm.mf", "bookworm-disk001.vmdk"]
        digests = {i.name: hashlib.file_digest(archive.extractfile(i), "sha256").hexdigest() for i in archive}  # type: ignore[arg-type]
        manifest = archive.extractfile("bookworm.mf").read().decode()  # type: ignore[union-attr]
    for line in manifest.splitlines():
        name, digest = re.fullmatch(r"SHA256\((.+)\)= ([0-9a-f]{64})", line).groups()  # type: ignore[union-attr]
        assert digests[name] == digest, name
    from_ova, from_box = _pull(f"file:{ova}"), _pull(f"file:{box}")
    assert (from_ova.manifest["ova"]["format"], from_box.manifest["box"]["format"]) == ("vmdk", "qcow2")
    skip = (*PROMOTED, *VAGRANT_FILES)
    prepared = tree_snapshot(bookworm_vm.rootfs, skip)
    with store.reading(from_box) as rootfs:
        assert_same_files(prepared, tree_snapshot(rootfs, skip))
    with store.reading(from_ova) as rootfs:
        assert_same_files(tree_snapshot(generic.rootfs, skip), tree_snapshot(rootfs, skip))
        for rel in VAGRANT_FILES[:4]:
            added = (rootfs / rel).read_text().removeprefix((generic.rootfs / rel).read_text())
            assert added.startswith("vagrant:") and added.count("\n") == 1, (rel, added)
        keys = rootfs / vagrant.HOME / ".ssh/authorized_keys"
        assert keys.read_text().splitlines() == list(vagrant.INSECURE_KEYS)
        fingerprints = subprocess.run(["ssh-keygen", "-l", "-f", str(keys)], capture_output=True, text=True, check=True).stdout
        assert [line.split()[-1] for line in fingerprints.splitlines()] == ["(ED25519)", "(RSA)"], "both keys parse"
    # The image's own sudo takes the rule: vagrant becomes root without a password.
    done = racker("run", "--no-boot", f"file:{box}", "--", "runuser", "-u", "vagrant", "--", "sudo", "-n", "id", "-u")
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stdout + done.stderr
    # A disk's fstab names host devices and promote leaves no ssh host keys: neither may fail a unit.
    passes_checks(f"file:{ova}")
