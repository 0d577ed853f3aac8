"""Output formats: a raw disk converted by qemu-img, packed for GCE, boxed for Vagrant or an
OVF importer (boxes.py), or split for Firecracker."""

from __future__ import annotations

import functools
import lzma
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from racker import proc
from racker.errors import PromoteError
from racker.promote import headers


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    qemu_format: str = ""  # qemu-img's name, for disk formats
    options: tuple[str, ...] = ()
    disk: bool = True  # a whole partitioned disk (False: Firecracker's bare rootfs)
    names_itself: bool = False  # the file's own header names the file: written under its final name
    package: str = ""  # the disk goes into a box or appliance (boxes.PACKERS), converted to qemu_format
    # The platform the format is for: the drivers row (prepare.INITRAMFS_MODULES) its kernel
    # and initramfs must have, and the cloud-init datasources it implies, listed first.
    drivers: str = "virtio-pci"
    datasources: tuple[str, ...] = ()
    # --compress: "clusters" (qcow2 compresses its clusters on request), "always" (the
    # format is compressed by itself), "" (an uncompressed format: nothing to ask for).
    compression: str = ""


STREAM_OPTIMIZED = ("-o", "subformat=streamOptimized,adapter_type=ide")

FORMATS: dict[str, Format] = {
    "raw": Format("raw", ".raw", "raw"),
    "qcow2": Format("qcow2", ".qcow2", "qcow2", ("-o", "compat=1.1"), compression="clusters"),
    # What OVA/vSphere import takes. The IDE adapter: Debian's cloud kernel has
    # ata_piix, and neither mptspi nor mptsas for an LSI Logic one.
    "vmdk": Format("vmdk", ".vmdk", "vmdk", STREAM_OPTIMIZED, names_itself=True, compression="always"),
    # Azure takes fixed VHDs only, of a whole number of MiB (disk.plan's sizes are):
    # force_size keeps that size exact instead of rounding it to a CHS geometry.
    "vhd": Format("vhd", ".vhd", "vpc", ("-o", "subformat=fixed,force_size=on"), drivers="hyperv", datasources=("Azure",)),
    "vhdx": Format("vhdx", ".vhdx", "vhdx", ("-o", "subformat=dynamic"), drivers="hyperv"),  # Hyper-V: no datasource of its own
    "vdi": Format("vdi", ".vdi", "vdi", drivers="sata"),  # VirtualBox
    "gce": Format("gce", ".tar.gz", "raw", datasources=("GCE",), compression="always"),
    # vagrant-libvirt's box: a qcow2 on virtio (its Vagrantfile says so).
    "vagrant-libvirt": Format("vagrant-libvirt", ".box", "qcow2", ("-o", "compat=1.1"), package="vagrant-libvirt"),
    # VirtualBox's box and an OVA: the vmdk above, behind the SATA (AHCI) controller
    # and E1000 NIC their OVF describes, as VirtualBox's own exports have them.
    "vagrant-virtualbox": Format(
        "vagrant-virtualbox", ".box", "vmdk", STREAM_OPTIMIZED, package="vagrant-virtualbox", drivers="sata", compression="always"
    ),
    "ova": Format("ova", ".ova", "vmdk", STREAM_OPTIMIZED, package="ova", drivers="sata", compression="always"),
    "firecracker": Format("firecracker", ".ext4", disk=False, drivers="virtio-mmio"),
}

# What `qemu-img info` calls each format, to tell them apart on the way back in.
QEMU_NAMES = {f.qemu_format: f.name for f in FORMATS.values() if f.qemu_format and f.name != "gce" and not f.package}


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise PromoteError(f"unknown format {name!r}", hint="one of: " + ", ".join(FORMATS)) from None


def check_compress(fmt: Format) -> None:
    """--compress asked for explicitly: a format that cannot be compressed says so."""
    if not fmt.compression:
        raise PromoteError(
            f"{fmt.name} is an uncompressed format (clouds import it as it is): --compress cannot apply",
            hint="use --format qcow2 (compressed clusters) or vmdk (streamOptimized), or leave --compress out",
        )


@functools.cache
def qcow2_compression() -> tuple[str, ...]:
    """qemu-img convert arguments for compressed qcow2 clusters: zstd where this
    qemu-img makes it (5.1 and later, built with zstd; any QEMU since reads it),
    zlib otherwise. -W lets the coroutines (-m, 8 by default) write clusters out
    of order, so they compress in parallel rather than one after another."""
    zstd = ("-o", "compression_type=zstd")
    with tempfile.TemporaryDirectory(prefix="racker-qcow2-") as tmp:
        probe = proc.run(["qemu-img", "create", "-q", "-f", "qcow2", *zstd, f"{tmp}/probe.qcow2", "1M"], check=False, timeout=60)
    return ("-c", "-W", *(zstd if probe.succeeded else ()))


def convert(
    raw: Path, fmt: Format, output: Path, final_name: str = "", *, compress: bool = False, seed: str = "", epoch: int | None = None
) -> None:
    """qemu-img convert a raw disk to `fmt` (zero blocks stay unallocated);
    `compress`: compressed qcow2 clusters (other formats are compressed always or never).
    `seed` (the image's digest) and `epoch` (its SOURCE_DATE_EPOCH): the ids and times qemu-img
    draws at random in the format's header follow them instead (headers.settle), so that one
    image makes the same bytes in any format.

    A format whose header names the file (a VMDK descriptor's extent) is written
    under `final_name` in a directory beside `raw`, then moved to `output` (a
    temporary name), so that it names the file the user gets, not the temporary one.
    """
    target = output
    if fmt.names_itself and final_name:
        named = raw.parent / "named"
        named.mkdir(exist_ok=True)
        target = named / final_name
    extra = qcow2_compression() if compress and fmt.compression == "clusters" else ()
    proc.run(["qemu-img", "convert", "-f", "raw", "-O", fmt.qemu_format, *fmt.options, *extra, str(raw), str(target)], timeout=1800)
    headers.settle(target, fmt.qemu_format, seed, epoch)
    if target != output:
        shutil.move(target, output)


def pack_gce(raw: Path, output: Path, epoch: int | None = None) -> None:
    """GCE import's layout: a file named disk.raw in a sparse, oldgnu-format tar.gz;
    dated `epoch` (the image's SOURCE_DATE_EPOCH), so that one image makes the same bytes."""
    staged = raw.parent / "disk.raw"
    if raw != staged:
        raw.rename(staged)
    if epoch is not None:
        os.utime(staged, (epoch, epoch))
    proc.run(["tar", "--format=oldgnu", "--sparse", "-czf", str(output), "-C", str(staged.parent), "disk.raw"], timeout=1800)


# Firecracker's kernel arguments (the console is the profile's): reboot by keyboard
# controller, no PCI. Firecracker itself adds root=/dev/vda and rw for the root
# drive, and finds the virtio-mmio devices for the guest (through ACPI, which
# Debian's cloud kernel needs: it reads no virtio_mmio.device= arguments).
FIRECRACKER_BOOT_ARGS = "reboot=k panic=1 pci=off"
FIRECRACKER_TAP = "tap0"  # a placeholder: the tap device the user creates on the host


def firecracker_config(rootfs: Path, vmlinux: Path, initrd: Path, cmdline: str, *, vcpus: int = 2, memory_mib: int = 1024) -> dict:
    """A `firecracker --config-file` document booting these files (absolute paths, as
    Firecracker resolves relative ones from its own working directory)."""
    return {
        "boot-source": {
            "kernel_image_path": str(vmlinux),
            "initrd_path": str(initrd),
            "boot_args": f"{FIRECRACKER_BOOT_ARGS} {cmdline}".strip(),
        },
        "drives": [{"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": True, "is_read_only": False}],
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": memory_mib},
        "network-interfaces": [{"iface_id": "eth0", "guest_mac": "06:00:ac:10:00:02", "host_dev_name": FIRECRACKER_TAP}],
    }


# Compressed payload magics inside a bzImage, as Linux's scripts/extract-vmlinux looks for them.
_MAGICS = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x5d\x00\x00", "lzma"),
)

# Decompressed by a host tool: (argv prefix, package).
_TOOLS = {"zstd": ("zstd", "-d", "-c", "-q"), "lz4": ("lz4", "-d", "-c", "-q")}


def extract_vmlinux(vmlinuz: Path, output: Path, work: Path) -> None:
    """Write the uncompressed ELF kernel inside a bzImage (what Firecracker boots)."""
    data = vmlinuz.read_bytes()
    if data[:4] == b"\x7fELF":
        output.write_bytes(data)
        return
    for magic, kind in _MAGICS:
        start = data.find(magic)
        while start != -1:
            payload = _decompress(data[start:], kind, work)
            if payload is not None and payload[:4] == b"\x7fELF":
                output.write_bytes(payload)
                return
            start = data.find(magic, start + 1)
    raise PromoteError(f"no uncompressed kernel could be extracted from {vmlinuz.name}")


def _decompress(blob: bytes, kind: str, work: Path) -> bytes | None:
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
        if kind in ("xz", "lzma"):
            decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
            return decompressor.decompress(blob)
        if kind in _TOOLS:
            packed = work / f"vmlinux.{kind}"
            packed.write_bytes(blob)
            try:
                # Both complain about the bzImage's trailing bytes, after the whole kernel is out.
                result = proc.run([*_TOOLS[kind], str(packed)], check=False, timeout=120)
            finally:
                packed.unlink()
            return result.stdout_bytes or None
    except (OSError, EOFError, lzma.LZMAError, zlib.error):
        return None
    return None
