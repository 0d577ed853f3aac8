"""Does a KVM guest really run here? An openable /dev/kvm is not proof.

Under nested virtualisation a KVM guest can hang at its first instructions,
and a toy guest (a boot sector writing to the serial port) can still pass.
So the probe boots a real Linux kernel with `-accel kvm` and requires it to
print its banner ("Linux version …") on the serial console within a few
seconds. The kernel comes from a prepared image in the store, the host's
/boot, or else Debian's linux-image package, fetched and unpacked in user
space. The answer is cached per host kernel, QEMU binary and probe kernel.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from racker import proc, progress, settings, store

PROBE_TIMEOUT = 5.0
PROBE_VERSION = "2"  # bumped: v1 booted a boot sector, which passes where real guests hang
BANNER = b"Linux version"
PROBE_PACKAGE = "linux-image-cloud-amd64"


def kvm_device_opens() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kernel() -> Path | None:
    """A bzImage to boot: from a prepared image, the host, or Debian's package (cached)."""
    candidates = sorted(glob.glob(str(store.home() / "images" / "*" / "rootfs" / "boot" / "vmlinuz-*")))
    candidates += sorted(glob.glob("/boot/vmlinuz-*"))
    cached = store.home() / "cache" / "probe-kernel" / "vmlinuz"
    candidates.append(str(cached))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.R_OK):
            return Path(candidate)
    return _download_kernel(cached)


def _download_kernel(target: Path) -> Path | None:
    """Debian's kernel package, unpacked without installing it (apt-get download + dpkg-deb -x)."""
    if proc.which("apt-get") is None or proc.which("dpkg-deb") is None:
        return None
    with store.locked("probe-kernel"):
        if target.is_file():
            return target
        with store.workdir("probe-kernel") as work:
            depends = proc.run(["apt-cache", "depends", PROBE_PACKAGE], check=False).stdout
            wanted = [line.split(":", 1)[1].strip() for line in depends.splitlines() if "Depends:" in line and "linux-image-" in line]
            versioned = wanted[0] if wanted else ""
            if not versioned:
                return None
            fetched = proc.run(["apt-get", "download", versioned], cwd=str(work), check=False, timeout=300)
            debs = list(work.glob("*.deb"))
            if fetched.failed or not debs:
                return None
            proc.run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], timeout=300)
            kernels = sorted((work / "root" / "boot").glob("vmlinuz-*"))
            if not kernels:
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(kernels[0], target)
    return target


def _cache_key(qemu: str) -> str:
    info = os.stat(qemu)
    return f"v{PROBE_VERSION}|{platform.release()}|{qemu}|{info.st_mtime_ns}"


def probe_boots(accel: str, kernel: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot `kernel` with `accel`; True if it printed its banner on the serial port in time."""
    qemu = proc.require("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="racker-accel-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            qemu, "-accel", accel, "-cpu", "host" if accel == "kvm" else "max", "-m", "256",
            "-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults", "-no-user-config",
            "-serial", f"file:{serial}", "-kernel", str(kernel),
            "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 root=/dev/null",
        ]  # fmt: skip
        with proc.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as child:
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:
                    if serial.exists() and BANNER in serial.read_bytes():
                        return True
                    if child.poll() is not None:
                        return False
                    time.sleep(0.05)
                return False
            finally:
                proc.terminate(child, grace=1)


def kvm_works() -> bool:
    """Whether QEMU guests should use KVM here; probed once, then cached."""
    if not kvm_device_opens():
        return False
    qemu = proc.require("qemu-system-x86_64")
    cached = _cached(qemu)
    if cached is not None:
        return cached
    cache = store.home() / "cache" / "kvm.json"
    key = _cache_key(qemu)
    kernel = probe_kernel()
    # No kernel to boot: KVM is not proven, and an unproven KVM can hang every VM.
    works = probe_boots("kvm", kernel) if kernel is not None else False
    store.write_json(cache, {"key": key, "works": works, "kernel": str(kernel) if kernel else None, "probed": store.now()})
    return works


def _cached(qemu: str) -> bool | None:
    """The probe's answer for this host and QEMU, if it has run."""
    try:
        cached = json.loads((store.home() / "cache" / "kvm.json").read_text())
        return bool(cached["works"]) if cached.get("key") == _cache_key(qemu) else None
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def without_probing() -> str:
    """What QEMU uses here, as far as is known without booting a probe: kvm, tcg, or unknown."""
    qemu = proc.which("qemu-system-x86_64")
    if qemu is None:
        return "none"
    if not kvm_device_opens():
        return "tcg"
    cached = _cached(qemu)
    return "unknown" if cached is None else ("kvm" if cached else "tcg")


_warned = False
# Ant Group's PVM: a KVM that runs without hardware virtualisation (in cloud VMs),
# but only guests whose kernel is built for it; firmware and distribution kernels hang.
PVM_MODULE = Path("/sys/module/kvm_pvm")


def why_no_kvm() -> str:
    if not kvm_device_opens():
        return "/dev/kvm is not available"
    if PVM_MODULE.is_dir():
        return "this host's KVM is PVM (kvm_pvm), which boots only kernels built as PVM guests"
    return "a KVM guest does not boot here (nested virtualisation?)"


def choose(requested: str | None = None) -> str:
    """The accelerator to use: the one asked for, else KVM if a guest really runs, else TCG."""
    global _warned
    if requested:
        if requested not in ("kvm", "tcg"):
            from racker.errors import VMError

            raise VMError(f"unknown accelerator {requested!r}: kvm or tcg")
        return requested
    if kvm_works():
        return "kvm"
    if not _warned and not _warned_before():
        progress.warn(f"{why_no_kvm()}; using TCG (software emulation, slower)")
    _warned = True
    return "tcg"


def _warned_before() -> bool:
    """Warn once per process; pytest-xdist workers share one warning through the environment."""
    if settings.ACCEL_WARNED.value():
        return True
    os.environ[settings.ACCEL_WARNED.name] = "1"
    return False
