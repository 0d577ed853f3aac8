"""Boxes and appliances: a converted disk packed with what its importer reads first.

    vagrant-libvirt     .box (tar.gz): metadata.json, Vagrantfile (the provider's defaults), box.img (qcow2)
    vagrant-virtualbox  .box (tar):    metadata.json, Vagrantfile (base_mac), box.ovf, box-disk001.vmdk
    ova                 .ova (tar):    NAME.ovf first, NAME.mf (SHA256), NAME-disk001.vmdk

The OVF is version 1.0, the one every importer reads; the vmdk is the
streamOptimized one that `--format vmdk` writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from gzip import GzipFile
from pathlib import Path
from typing import BinaryIO

from racker.promote import formats

GB = 1024**3
STREAM_OPTIMIZED_URL = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
NAMESPACES = {"ovf": OVF, "rasd": RASD, "vssd": VSSD}

# CIM_OperatingSystem.OsType, which VirtualBox maps back to its guest types
# (Debian_64, Ubuntu_64, Linux26_64); any other os-release ID is a 64-bit Linux.
OS_TYPES: dict[str, tuple[int, str]] = {"debian": (96, "Debian_64"), "ubuntu": (94, "Ubuntu_64")}
OTHER_LINUX = (101, "Linux26_64")

# CIM ResourceType numbers of the hardware items.
CPU, MEMORY, ETHERNET, DISK, SATA = 3, 4, 10, 17, 20


@dataclass(frozen=True)
class Appliance:
    """The machine a box or OVA describes around its disk."""

    name: str
    os_id: str  # os-release ID
    capacity: int  # the disk's virtual size, bytes
    mac: str  # 12 hex digits: Vagrant's base_mac
    seed: str = ""  # the image's digest: the disk's header ids follow it (headers.settle)
    epoch: int | None = None  # its SOURCE_DATE_EPOCH: the members' time
    memory_mib: int = 1024
    cpus: int = 2


def mac_for(digest: str) -> str:
    """A MAC in VirtualBox's range (08:00:27), the same for the same image: outputs stay reproducible."""
    return "080027" + hashlib.sha256(digest.encode()).hexdigest()[:6].upper()


def pack(raw: Path, fmt: formats.Format, output: Path, appliance: Appliance) -> None:
    """Write `fmt`'s box or appliance of the raw disk to `output`."""
    work = raw.parent / "pack"
    work.mkdir()
    PACKERS[fmt.package](raw, fmt, output, appliance, work)


def member_name(output_name: str, suffix: str) -> str:
    """The appliance's name, from its file's: what a POSIX tar member and every importer take (ASCII, short)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", output_name.removesuffix(suffix))[:64].strip(".-") or "racker"


def _vagrant_libvirt(raw: Path, fmt: formats.Format, output: Path, appliance: Appliance, work: Path) -> None:
    formats.convert(raw, fmt, work / "box.img", seed=appliance.seed)
    # virtual_size: whole GB, rounded up (vagrant-libvirt grows the domain's disk to it).
    metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": -(-appliance.capacity // GB)}
    _write(work, "metadata.json", json.dumps(metadata, indent=2) + "\n")
    _write(work, "Vagrantfile", libvirt_vagrantfile(appliance))
    # gzip at level 1: the qcow2 is most of it, and vagrant box add reads any tar.
    _tar(output, work, ["metadata.json", "Vagrantfile", "box.img"], appliance.epoch, gzip=True)


def _vagrant_virtualbox(raw: Path, fmt: formats.Format, output: Path, appliance: Appliance, work: Path) -> None:
    disk = "box-disk001.vmdk"
    formats.convert(raw, fmt, work / disk, disk, seed=appliance.seed)  # the descriptor names the file as the box holds it
    _write(work, "box.ovf", ovf(appliance, disk, (work / disk).stat().st_size))
    _write(work, "metadata.json", json.dumps({"provider": "virtualbox"}, indent=2) + "\n")
    _write(work, "Vagrantfile", virtualbox_vagrantfile(appliance))
    # Not gzipped: the streamOptimized vmdk is deflated already.
    _tar(output, work, ["metadata.json", "Vagrantfile", "box.ovf", disk], appliance.epoch)


def _ova(raw: Path, fmt: formats.Format, output: Path, appliance: Appliance, work: Path) -> None:
    descriptor, manifest, disk = f"{appliance.name}.ovf", f"{appliance.name}.mf", f"{appliance.name}-disk001.vmdk"
    formats.convert(raw, fmt, work / disk, disk, seed=appliance.seed)
    _write(work, descriptor, ovf(appliance, disk, (work / disk).stat().st_size))
    _write(work, manifest, "".join(f"SHA256({name})= {_sha256(work / name)}\n" for name in (descriptor, disk)))
    # The OVF spec's order: the descriptor first, then the manifest, then the files it references.
    _tar(output, work, [descriptor, manifest, disk], appliance.epoch, format=tarfile.USTAR_FORMAT)


PACKERS: dict[str, Callable[[Path, formats.Format, Path, Appliance, Path], None]] = {
    "vagrant-libvirt": _vagrant_libvirt,
    "vagrant-virtualbox": _vagrant_virtualbox,
    "ova": _ova,
}


def libvirt_vagrantfile(appliance: Appliance) -> str:
    """vagrant-libvirt's defaults for the box (its tools/create_box.sh), and the hardware the image was prepared for."""
    return f"""\
# Written by racker promote: defaults for this box; a project's Vagrantfile overrides them.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "kvm"
    libvirt.host = ""
    libvirt.connect_via_ssh = false
    libvirt.storage_pool_name = "default"
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
    libvirt.memory = {appliance.memory_mib}
    libvirt.cpus = {appliance.cpus}
  end
end
"""


def virtualbox_vagrantfile(appliance: Appliance) -> str:
    """As `vagrant package` writes it: the MAC Vagrant gives the first NIC after import."""
    return f"""\
# Written by racker promote, as `vagrant package` writes it: the MAC address of the box.
Vagrant.configure("2") do |config|
  config.vm.base_mac = "{appliance.mac}"
end
"""


def ovf(appliance: Appliance, disk: str, disk_size: int) -> str:
    """An OVF 1.0 descriptor: one virtual system with CPUs, memory, a SATA (AHCI) controller holding the disk, an E1000 NIC on NAT."""
    for prefix, uri in NAMESPACES.items():
        ET.register_namespace(prefix, uri)
    envelope = ET.Element(_q(OVF, "Envelope"), {_q(OVF, "version"): "1.0", "{http://www.w3.org/XML/1998/namespace}lang": "en-US"})
    references = ET.SubElement(envelope, _q(OVF, "References"))
    ET.SubElement(references, _q(OVF, "File"), {_q(OVF, "id"): "file1", _q(OVF, "href"): disk, _q(OVF, "size"): str(disk_size)})
    disks = _section(envelope, "DiskSection", "List of the virtual disks used in the package")
    ET.SubElement(
        disks,
        _q(OVF, "Disk"),
        {
            _q(OVF, "capacity"): str(appliance.capacity),
            _q(OVF, "diskId"): "vmdisk1",
            _q(OVF, "fileRef"): "file1",
            _q(OVF, "format"): STREAM_OPTIMIZED_URL,
        },
    )
    networks = _section(envelope, "NetworkSection", "Logical networks used in the package")
    network = ET.SubElement(networks, _q(OVF, "Network"), {_q(OVF, "name"): "NAT"})
    ET.SubElement(network, _q(OVF, "Description")).text = "Logical network used by this appliance."
    system = ET.SubElement(envelope, _q(OVF, "VirtualSystem"), {_q(OVF, "id"): appliance.name})
    ET.SubElement(system, _q(OVF, "Info")).text = "A virtual machine"
    ET.SubElement(system, _q(OVF, "Name")).text = appliance.name
    os_id, os_name = OS_TYPES.get(appliance.os_id, OTHER_LINUX)
    os_section = _section(system, "OperatingSystemSection", "The kind of installed guest operating system", {_q(OVF, "id"): str(os_id)})
    ET.SubElement(os_section, _q(OVF, "Description")).text = os_name
    hardware = _section(system, "VirtualHardwareSection", "Virtual hardware requirements for a virtual machine")
    _settings(
        ET.SubElement(hardware, _q(OVF, "System")),
        VSSD,
        ElementName="Virtual Hardware Family",
        InstanceID="0",
        VirtualSystemIdentifier=appliance.name,
        # VMware's importers refuse VirtualBox's own "virtualbox-2.2"; VirtualBox reads any.
        VirtualSystemType="vmx-10",
    )
    items = (
        dict(
            Caption=f"{appliance.cpus} virtual CPU", Description="Number of virtual CPUs", ResourceType=CPU, VirtualQuantity=appliance.cpus
        ),
        dict(
            AllocationUnits="byte * 2^20",
            Caption=f"{appliance.memory_mib} MB of memory",
            Description="Memory Size",
            ResourceType=MEMORY,
            VirtualQuantity=appliance.memory_mib,
        ),
        dict(Address=0, Caption="sataController0", Description="SATA Controller", ResourceSubType="AHCI", ResourceType=SATA),
        dict(AddressOnParent=0, Caption="disk1", Description="Disk Image", HostResource="ovf:/disk/vmdisk1", Parent=3, ResourceType=DISK),
        dict(
            AutomaticAllocation="true",
            Caption="Ethernet adapter on 'NAT'",
            Connection="NAT",
            ResourceSubType="E1000",
            ResourceType=ETHERNET,
        ),
    )
    for instance, item in enumerate(items, start=1):  # the controller is 3, the disk's Parent
        _settings(ET.SubElement(hardware, _q(OVF, "Item")), RASD, ElementName=item["Caption"], InstanceID=instance, **item)
    ET.indent(envelope)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(envelope, encoding="unicode") + "\n"


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def _section(parent: ET.Element, name: str, info: str, attributes: dict[str, str] | None = None) -> ET.Element:
    section = ET.SubElement(parent, _q(OVF, name), attributes or {})
    ET.SubElement(section, _q(OVF, "Info")).text = info
    return section


def _settings(parent: ET.Element, namespace: str, **values: object) -> None:
    """CIM settings in the alphabetical order their schemas' sequences require."""
    for name in sorted(values):
        ET.SubElement(parent, _q(namespace, name)).text = str(values[name])


def _write(work: Path, name: str, text: str) -> None:
    (work / name).write_text(text)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _tar(output: Path, work: Path, names: list[str], epoch: int | None, *, gzip: bool = False, format: int = tarfile.GNU_FORMAT) -> None:
    """The files as plain members, owned by root, in this order; dated `epoch` when the image has one
    (and so is the gzip header, which names no file): one image makes the same bytes."""

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o644
        if epoch is not None:
            info.mtime = epoch
        return info

    with open(output, "wb") as raw, contextlib.ExitStack() as stack:
        stream: BinaryIO = raw
        if gzip:
            stream = stack.enter_context(GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=epoch))
        with tarfile.open(fileobj=stream, mode="w", format=format) as archive:
            for name in names:
                archive.add(work / name, arcname=name, filter=plain)
