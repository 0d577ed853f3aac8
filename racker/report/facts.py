"""What a report says about the host and about each image, gathered where the tests run.

The plugin writes these into the results ("run" and "image" records), so that
a report built on another machine, from the results alone, still says which
QEMU ran, whether it had KVM, and which kernel, systemd and cloud-init an image
booted with.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from typing import Any

from racker import __version__, proc
from racker.cpu import accel
from racker.errors import RackerError
from racker.store import StoredImage

HOST_TOOLS = {"qemu": "qemu-system-x86_64", "nspawn": "systemd-nspawn"}

# One guest command for every fact, so that a VM pays one SSH round trip, not ten.
# A constant script: nothing of ours is interpolated into it.
GUEST_SCRIPT = r"""
v() { printf '%s=%s\n' "$1" "$2"; }
v kernel "$(ls -1 /lib/modules 2>/dev/null | sort -V | tail -n1)"
v running_kernel "$(uname -r)"
v systemd "$(systemctl --version 2>/dev/null | head -n1)"
command -v cloud-init >/dev/null 2>&1 && v cloud_init "$(cloud-init --version 2>&1 | head -n1)"
v os "$(. /etc/os-release 2>/dev/null; echo "$PRETTY_NAME")"
v boot "$(systemd-analyze time 2>/dev/null | head -n1)"
v cloud_init_start "$(systemctl show --value -p InactiveExitTimestampMonotonic cloud-init-local.service 2>/dev/null)"
v cloud_init_end "$(systemctl show --value -p ActiveEnterTimestampMonotonic cloud-final.service 2>/dev/null)"
v root "$(df -B1 --output=size,used / 2>/dev/null | tail -n1)"
"""

# systemd's time spans: "1min 2.345s", "345ms", "12us".
UNITS = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
SPAN = re.compile(r"(\d+(?:\.\d+)?)(h|min|ms|us|µs|s)\b")
PHASE = re.compile(r"((?:\d+(?:\.\d+)?(?:h|min|ms|us|µs|s)\s*)+)\((\w+)\)")


def _first_line(argv: list[str]) -> str:
    if proc.which(argv[0]) is None:
        return ""
    result = proc.run(argv, check=False, timeout=30)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else ""


def tool_version(name: str) -> str:
    """The first line of a host tool's --version ("" where it is missing): `name` of HOST_TOOLS."""
    return _first_line([HOST_TOOLS[name], "--version"])


def host() -> dict[str, Any]:
    """This host: racker, QEMU and nspawn versions, and whether VMs get KVM or TCG (never probed here)."""
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "racker": __version__,
        "python": platform.python_version(),
        **{name: tool_version(name) for name in HOST_TOOLS},
        "accel": accel.without_probing(),
        "cpus": os.cpu_count() or 0,
    }


def of_image(image: StoredImage) -> dict[str, Any]:
    """What the store knows about an image."""
    return {
        "digest": image.digest,
        "source": image.source,
        "created": image.created,
        "image_bytes": image.size,
        "os": image.manifest.get("distro", {}).get("pretty_name", ""),
    }


def seconds(span: str) -> float:
    """A systemd time span in seconds: "1min 2.5s" -> 62.5."""
    return round(sum(float(n) * UNITS[unit] for n, unit in SPAN.findall(span)), 3)


def boot_split(line: str) -> dict[str, float]:
    """`systemd-analyze time`'s first line as {phase: seconds}, its total included.

    "Startup finished in 1.5s (kernel) + 3.0s (userspace) = 4.5s" -> {"kernel": 1.5, "userspace": 3.0, "total": 4.5}
    """
    split = {phase: seconds(span) for span, phase in PHASE.findall(line)}
    if split and "=" in line:
        split["total"] = seconds(line.rsplit("=", 1)[1])
    return split


def parse_guest(text: str) -> dict[str, Any]:
    """GUEST_SCRIPT's output as facts."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    found: dict[str, Any] = {
        "kernel": values.get("kernel", ""),
        "running_kernel": values.get("running_kernel", ""),
        "systemd": values.get("systemd", "").removeprefix("systemd ").strip(),
        "cloud_init": values["cloud_init"].split()[-1] if values.get("cloud_init", "").strip() else "",
        "boot": boot_split(values.get("boot", "")),
    }
    if values.get("os"):
        found["os"] = values["os"]
    with contextlib.suppress(ValueError):
        start, end = int(values.get("cloud_init_start") or 0), int(values.get("cloud_init_end") or 0)
        if 0 < start < end:
            found["boot"]["cloud-init"] = round((end - start) / 1e6, 3)
    root = values.get("root", "").split()
    if len(root) == 2 and all(n.isdigit() for n in root):
        found["root_bytes"], found["root_used_bytes"] = int(root[0]), int(root[1])
    return found


def _engine_extras(machine: Any) -> dict[str, Any]:
    """A VM's accelerator (from its QEMU command line) and disk file."""
    extras: dict[str, Any] = {}
    argv = getattr(machine, "argv", None) or []
    if "-accel" in argv:
        extras["accel"] = argv[argv.index("-accel") + 1].split(",")[0]
    if hasattr(machine, "restored_from"):
        extras["restored_from"] = machine.restored_from  # a warm VM's snapshot; "" when it booted cold
    disk = getattr(machine, "disk", None)
    if disk is not None:
        with contextlib.suppress(OSError):
            extras["disk_bytes"] = os.stat(disk).st_size
    return extras


def of_machine(machine: Any) -> dict[str, Any]:
    """What a booted machine (nspawn or VM) says about itself; a failure to ask is a fact too, never an error."""
    found: dict[str, Any] = {"boot_seconds": round(getattr(machine, "boot_seconds", 0.0), 3), **_engine_extras(machine)}
    try:
        result = machine.run(["sh", "-c", GUEST_SCRIPT], timeout=60)
    except RackerError as error:
        return {**found, "facts_error": str(error)}
    return {**found, **parse_guest(result.stdout)}
