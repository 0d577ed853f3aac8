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


def _kvm(probe: bool) -> Check:
    from racker import accel

    if not accel.kvm_device_opens():
        return Check("kvm", False, "/dev/kvm cannot be opened: QEMU will use TCG", required=False)
    if not probe or proc.which("qemu-system-x86_64") is None:
        return Check("kvm", True, "/dev/kvm opens (guest not probed)", required=False)
    if accel.kvm_works():
        return Check("kvm", True, "a KVM guest boots: QEMU will use KVM", required=False)
    return Check("kvm", False, f"/dev/kvm opens but {accel.why_no_kvm()}: QEMU will use TCG", required=False)
