"""The machines QEMU emulates: each platform's board, its CPU model under TCG, its firmware."""

from __future__ import annotations

import os
from dataclasses import dataclass

from racker.errors import ToolMissing, VMError

# No built-in SATA controller or SMBus: every extra device is one more driver
# for the guest to load while it boots.
MACHINE = "q35,sata=off,smbus=off,vmport=off"


@dataclass(frozen=True)
class Board:
    """A machine QEMU emulates, with the controllers a platform attaches disks and the NIC to."""

    machine: str
    disk: str  # the -device of drive number {i} (0: the boot disk, 1: the seed), with id {drive}
    nic: str
    rng: str = ""  # a hardware RNG, where the platform offers one
    seed: str = ""  # the -device of the (read-only) NoCloud seed, if not as a disk
    controllers: tuple[str, ...] = ()  # -devices the disks sit on
    firmware: bool = True  # False: boots only a kernel given directly
    # False: no HPET or PM timer to calibrate the TSC against. Under TCG on a busy
    # host the PIT alone fails, and the kernel hangs with no TSC rate; it is given one.
    tsc_reference: bool = True
    serial_bus: str = "virtio-serial-pci"  # for a warm VM's agent port (racker.vm.guest_agent)
    # Another architecture's board: its QEMU, the CPU its TCG emulates, and its UEFI firmware
    # (code, variables) in place of OVMF. Such a board never runs under KVM here.
    binary: str = "qemu-system-x86_64"
    foreign_cpu: str = ""
    uefi: tuple[str, str] = ()


# The stand-ins for where each output is booted; "pc" is racker's own.
BOARDS: dict[str, Board] = {
    "pc": Board(MACHINE, "virtio-blk-pci,drive={drive}", "virtio-net-pci", "virtio-rng-pci"),
    # Firecracker's machine: virtio-mmio devices only, no PCI, described to the guest by ACPI.
    "microvm": Board(
        "microvm,acpi=on",
        "virtio-blk-device,drive={drive}",
        "virtio-net-device",
        "virtio-rng-device",
        firmware=False,
        tsc_reference=False,
        serial_bus="virtio-serial-device",
    ),
    # VirtualBox's defaults: an AHCI (SATA) controller and an Intel PRO/1000 (e1000).
    # The seed as an optical drive, as VirtualBox attaches cloud-init's ISO.
    "sata": Board(
        MACHINE, "ide-hd,drive={drive},bus=ahci0.{i}", "e1000", seed="ide-cd,drive={drive},bus=ahci0.{i}", controllers=("ahci,id=ahci0",)
    ),
    # Azure/Hyper-V's synthetic SCSI, as close as QEMU gets: a SCSI disk on virtio-scsi.
    "scsi": Board(
        MACHINE, "scsi-hd,drive={drive},bus=scsi0.0,lun={i}", "virtio-net-pci", "virtio-rng-pci", controllers=("virtio-scsi-pci,id=scsi0",)
    ),
    # arm64: QEMU's generic board, UEFI (AAVMF) only. pauth-impdef: QEMU's own pointer-authentication
    # hash, far cheaper under TCG than the architected QARMA one, and just as good to a guest.
    "virt": Board(
        "virt",
        "virtio-blk-pci,drive={drive}",
        "virtio-net-pci",
        "virtio-rng-pci",
        tsc_reference=False,
        binary="qemu-system-aarch64",
        foreign_cpu="max,pauth-impdef=on",
        uefi=("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
    ),
}
# How much longer a boot takes on another architecture's board than on the host's, under TCG.
FOREIGN_SLOWDOWN = 3.0
# Debian architecture -> the board its disks boot on, where it is not the host's own ("pc").
ARCH_BOARDS = {"arm64": "virt"}


def board_for(arch: str, firmware: str | None = None) -> tuple[str, str]:
    """The board (BOARDS' name) and firmware an image of `arch` boots with: another
    architecture's board boots UEFI only; the host's, `firmware` (default bios)."""
    machine = ARCH_BOARDS.get(arch, "pc")
    if machine != "pc":
        if firmware not in (None, "uefi"):
            raise VMError(f"an {arch} VM boots with UEFI only", hint="leave --firmware out")
        return machine, "uefi"
    return machine, firmware or "bios"


def host_tsc_khz() -> int | None:
    """The host CPU's rate in kHz, which a TCG guest's TSC runs at (QEMU reads the host's TSC)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "cpu MHz":
                    return round(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return None


def board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise VMError(f"unknown machine type {name!r}", hint="one of: " + ", ".join(BOARDS)) from None


OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")


def ovmf() -> tuple[str, str]:
    for code, variables in zip(OVMF_CODE, OVMF_VARS, strict=True):
        if os.path.isfile(code) and os.path.isfile(variables):
            return code, variables
    raise ToolMissing("OVMF (UEFI firmware for QEMU)", "ovmf")
