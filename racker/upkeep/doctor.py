"""Host prerequisites, each with its state and the package that provides it."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from racker import proc


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    package: str = ""
    required: bool = True

    def as_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "package": self.package, "required": self.required}


# (tool, needed for what, required for the core loop)
TOOLS = [
    ("systemd-nspawn", "booting machines", True),
    ("nsenter", "entering machines", True),
    ("mmdebstrap", "bootstrap: images", True),
    ("skopeo", "docker:// images", False),
    ("umoci", "docker:// images", False),
    ("qemu-system-x86_64", "booting disks", False),
    ("qemu-system-aarch64", "booting arm64 disks", False),
    ("qemu-img", "disk formats", False),
    ("sfdisk", "partitioning disks", False),
    ("mkfs.ext4", "root filesystems", False),
    ("mcopy", "EFI system partitions", False),
]


def checks(probe_kvm: bool = True) -> list[Check]:
    found = []
    for tool, purpose, required in TOOLS:
        path = proc.which(tool)
        found.append(Check(tool, path is not None, path or f"missing ({purpose})", proc.TOOL_PACKAGES.get(tool, ""), required))
    found.append(_kvm(probe_kvm))
    found += foreign_platforms()
    loops = glob.glob("/dev/loop[0-9]*")
    found.append(
        Check(
            "loop devices",
            bool(loops),
            f"{len(loops)} present (racker does not need them)" if loops else "none (racker does not need them)",
            required=False,
        )
    )
    machined = os.path.isdir("/run/systemd/system")
    found.append(
        Check(
            "machined",
            True,
            "present: machines are registered with machinectl"
            if machined
            else "absent (PID 1 is not systemd): racker's own registry and nsenter are used",
            required=False,
        )
    )
    return found


# The other architectures racker runs images of (qemu-user under nspawn), and the firmware their VMs boot.
FOREIGN = ("linux/arm64", "linux/riscv64")
FIRMWARE = {"linux/arm64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64")}


def foreign_platforms() -> list[Check]:
    """For each foreign platform: can its programs run here (binfmt_misc), and can its disks boot."""
    from racker.cpu import emulation
    from racker.store import platforms

    found = []
    for text in FOREIGN:
        platform = platforms.parse(text)
        if emulation.native(platform):
            continue
        state = emulation.status(platform)
        detail = state.missing or f"runs through qemu-{state.qemu} (binfmt_misc, F flag)"
        found.append(Check(f"{text} (nspawn)", not state.missing, detail, state.package, required=False))
        if text in FIRMWARE:
            firmware, firmware_package = FIRMWARE[text]
            there = os.path.exists(firmware)
            found.append(
                Check(
                    f"{text} (vm)",
                    there,
                    firmware if there else f"missing UEFI firmware {firmware}",
                    "" if there else firmware_package,
                    False,
                )
            )
    return found


def fix_platforms() -> list[str]:
    """Register the binfmt_misc handler of each foreign platform that has its emulator but no handler."""
    from racker.cpu import emulation
    from racker.store import platforms

    lines = []
    for text in FOREIGN:
        platform = platforms.parse(text)
        try:
            if emulation.register(platform):
                lines.append(f"registered the binfmt_misc handler qemu-{emulation.qemu_name(platform)} (F flag) for {text}")
        except emulation.CannotEmulate as err:
            lines.append(f"{text}: {err}")
    return lines


def _kvm(probe: bool) -> Check:
    from racker.cpu import accel

    if not accel.kvm_device_opens():
        return Check("kvm", False, "/dev/kvm cannot be opened: QEMU will use TCG", required=False)
    if not probe or proc.which("qemu-system-x86_64") is None:
        return Check("kvm", True, "/dev/kvm opens (guest not probed)", required=False)
    if accel.kvm_works():
        return Check("kvm", True, "a KVM guest boots: QEMU will use KVM", required=False)
    return Check("kvm", False, f"/dev/kvm opens but {accel.why_no_kvm()}: QEMU will use TCG", required=False)


def machine_costs() -> dict[str, float]:
    """Each limit's use per machine, measured on this store's running machines ({} if none runs)."""
    from racker import machines
    from racker.machines import limits

    running = [s for s in machines.all_states("nspawn") if s.leader and not machines.is_stale(s)]
    return limits.machine_costs((s.leader, s.pid, s.extra.get("cgroup")) for s in running)


def capacity(costs: dict[str, float]) -> tuple[Check, list[str]]:
    """How many more machines the host holds at its current limits, and which limit binds first;
    with one line per limit."""
    from racker.machines import limits

    rows = limits.headroom(costs)
    first = rows[0]
    basis = "measured on running machines" if costs else "typical costs: start a machine to measure"
    room = first.machines
    detail = f"about {room} more at the current limits; {first.limit.name} binds first ({basis})"
    hint = "" if room is None or room >= limits.TARGET_MACHINES else "racker doctor --fix raises them"
    return Check("machines", room is None or room >= 1, detail + (f"; {hint}" if hint else ""), required=False), [r.line() for r in rows]


def fix(costs: dict[str, float]) -> list[str]:
    """Raise the sysctl limits to hold TARGET_MACHINES more machines; one line per change, and how to keep them."""
    from racker.machines import limits

    changed = limits.fix(costs)
    lines = [f"set {limit.sysctl}: {old} -> {new}" for limit, old, new in changed]
    if changed:
        lines.append(f"for the running system only; to keep them after a reboot, put these lines in {limits.SYSCTL_D}:")
        lines += [f"  {limit.sysctl} = {new}" for limit, _old, new in changed]
    else:
        lines.append(f"no change: the limits racker knows already hold {limits.TARGET_MACHINES} more machines")
    return lines
