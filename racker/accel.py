"""Does a KVM guest really run here? An openable /dev/kvm is not proof.

Under nested virtualisation a KVM guest can hang at its first instruction.
So we boot a 512-byte boot sector that writes "OK" to the serial port, with
a few seconds' timeout, and cache the answer per kernel and QEMU binary.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from racker import proc, progress, store

PROBE_TIMEOUT = 5.0

# 16-bit real mode, loaded by the BIOS at 0x7c00:
#   mov dx,0x3f8; mov al,'O'; out dx,al; mov al,'K'; out dx,al; mov al,10; out dx,al
#   cli; hlt; jmp $-1
_BOOT_CODE = bytes.fromhex("baf803b04feeb04beeb00aeefaf4ebfd")
BOOT_SECTOR = _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b"\x55\xaa"


def kvm_device_opens() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def _cache_key(qemu: str) -> str:
    info = os.stat(qemu)
    return f"{platform.release()}|{qemu}|{info.st_mtime_ns}"


def probe_boots(accel: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot the probe sector with `accel`; True if it printed OK in time."""
    qemu = proc.require("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="racker-kvm-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(BOOT_SECTOR)
        serial = Path(tmp) / "serial.log"
        argv = [
            qemu, "-accel", accel, "-m", "16", "-display", "none", "-monitor", "none",
            "-no-reboot", "-nodefaults", "-serial", f"file:{serial}",
            "-drive", f"file={disk},format=raw,if=ide",
        ]  # fmt: skip
        with proc.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as child:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if serial.exists() and b"OK" in serial.read_bytes():
                    proc.terminate(child, grace=1)
                    return True
                if child.poll() is not None:
                    return False
                time.sleep(0.05)
            proc.terminate(child, grace=1)
    return False


def kvm_works() -> bool:
    """Whether QEMU guests should use KVM here; probed once, then cached."""
    if not kvm_device_opens():
        return False
    qemu = proc.require("qemu-system-x86_64")
    cache = store.home() / "cache" / "kvm.json"
    key = _cache_key(qemu)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return bool(cached["works"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    works = probe_boots("kvm")
    store.write_json(cache, {"key": key, "works": works})
    return works


_warned = False


def choose(requested: str | None = None) -> str:
    """The accelerator to use: the one asked for, else KVM if a guest really runs, else TCG."""
    global _warned
    if requested:
        return requested
    if kvm_works():
        return "kvm"
    if not _warned:
        why = "a KVM guest does not run here" if kvm_device_opens() else "/dev/kvm is not available"
        progress.warn(f"{why}; using TCG (software emulation, slower)")
        _warned = True
    return "tcg"
