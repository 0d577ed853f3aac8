"""Every RACKER_* environment variable racker reads, declared once: its type, default and meaning.

A setting is read when it is used (`settings.HOME.get()`), never at import, so that
setting one later (a test's monkeypatch, a fixture's private store) takes effect.
An empty variable counts as unset, except where a setting says otherwise.
An unreadable value is one BadSetting naming the variable.

`racker config` lists them with their values; `python -m racker.settings --markdown`
writes the table in docs/settings.md (a test keeps the two equal).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from racker import sizes
from racker.errors import BadSetting

T = TypeVar("T")


@dataclass(frozen=True)
class Setting(Generic[T]):
    name: str
    kind: str  # what the value is, for a person: "path", "seconds", "0 or 1"…
    default: str  # as it would be written in the environment; "" for none
    meaning: str
    parse: Callable[[str], T]
    example: str = ""  # a valid value, for the hint of an invalid one
    empty_is_unset: bool = True

    def text(self) -> str | None:
        """The variable as set, or None where it counts as unset."""
        text = os.environ.get(self.name)
        if text is None or (self.empty_is_unset and not text.strip()):
            return None
        return text

    def source(self) -> str:
        return "environment" if self.text() is not None else "default"

    def get(self) -> T | None:
        """The value now: the environment's, else the default's; None where neither says anything."""
        text = self.text()
        if text is None:
            return self.parse(self.default) if self.default else None
        try:
            return self.parse(text)
        except ValueError as error:
            hint = f"e.g. {self.name}={self.example or self.default}" if self.example or self.default else None
            raise BadSetting(f"{self.name}={text!r} is not {self.kind}{_detail(error)}", hint=hint) from None

    def value(self) -> T:
        """get(), for a setting with a default (never None)."""
        found = self.get()
        assert found is not None, f"{self.name} has no default"
        return found


def _detail(error: ValueError) -> str:
    said = str(error)
    return f" ({said})" if said and "invalid literal" not in said and "could not convert" not in said else ""


# -- how values are read ---------------------------------------------------------


def _path(text: str) -> Path:
    return Path(text.strip())


def _text(text: str) -> str:
    return text.strip()


def _seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise ValueError("it must be more than 0")
    return seconds


def _flag(text: str) -> bool:
    if text.strip() not in ("0", "1"):
        raise ValueError("")
    return text.strip() == "1"


def _size(text: str) -> int:
    return sizes.parse(text)


def _paths(text: str) -> list[Path]:
    return [Path(d) for d in text.split(":") if d]


def _hosts(text: str) -> set[str]:
    return {h.strip() for h in text.split(",") if h.strip()}


def _port_range(text: str) -> range:
    low, _, high = text.partition("-")
    ports = range(int(low), int(high or low) + 1)
    if not ports or ports.start < 1 or ports.stop > 65536:
        raise ValueError("")
    return ports


def _network(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text.strip())


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return text.strip()

    return parse


# -- the settings -----------------------------------------------------------------
# Grouped as the pipeline: the store, host tools, sources, machines, VMs, the test suite.

HOME = Setting(
    "RACKER_HOME", "a path", "/var/lib/racker", "The store: images, refs, locks, caches and the records of running machines.", _path
)
CATALOG = Setting(
    "RACKER_CATALOG",
    "a path",
    "",
    "A directory of catalogue files, searched before the source tree's images/ and the installed copy.",
    _path,
)
PATH = Setting(
    "RACKER_PATH",
    "a search path",
    "",
    "Where host tools are looked for, replacing the default (/usr/local/sbin:…:/bin, then $PATH) entirely.",
    _text,
    example="/usr/sbin:/usr/bin",
)
DEBUG = Setting("RACKER_DEBUG", "0 or 1", "0", "1: every command racker runs is shown on stderr (as --debug).", _flag)
PROGRESS = Setting(
    "RACKER_PROGRESS",
    "0 or 1",
    "",
    "1: progress is shown even without a terminal; 0: never. Unset: on a terminal, outside CI.",
    _flag,
    example="0",
)
EXTRACT_LIMIT = Setting(
    "RACKER_EXTRACT_LIMIT",
    "a size",
    "64G",
    "The most one archive (a layer, a tarball, a filesystem copied out of a disk) may unpack to; more is refused as a bomb.",
    _size,
)
UPSTREAM_TIMEOUT = Setting(
    "RACKER_UPSTREAM_TIMEOUT", "a number of seconds", "30", "How long an upstream may take to answer a refresh's question.", _seconds
)
DEBIAN_MIRROR = Setting(
    "RACKER_DEBIAN_MIRROR", "a URL", "http://deb.debian.org/debian", "The Debian archive bootstrap:debian/… images are built from.", _text
)
UBUNTU_MIRROR = Setting(
    "RACKER_UBUNTU_MIRROR",
    "a URL",
    "http://archive.ubuntu.com/ubuntu",
    "The Ubuntu archive bootstrap:ubuntu/… images are built from.",
    _text,
)
ARCHIVE_KEYRING = Setting(
    "RACKER_ARCHIVE_KEYRING",
    "a path",
    "",
    "The keyring a bootstrap's archive must be signed with (a mirror of one's own); unset: the distribution's keyring.",
    _path,
    example="/etc/apt/keyrings/mirror.gpg",
)
BUILD_CA = Setting(
    "RACKER_BUILD_CA",
    "a path",
    "",
    "A CA bundle lent to Dockerfile builds (a CI behind a TLS-intercepting proxy); set alone, it turns host_ca on.",
    _path,
    example="/path/to/bundle.pem",
)
INSECURE_REGISTRIES = Setting(
    "RACKER_INSECURE_REGISTRIES",
    "a list of host[:port], comma-separated",
    "",
    "Registries pulled from without verifying TLS (loopback ones never are).",
    _hosts,
    example="registry.lan:5000",
)
VAGRANT_SERVER = Setting(
    "RACKER_VAGRANT_SERVER",
    "a URL",
    "https://vagrantcloud.com",
    "The Vagrant Cloud (or a mirror) vagrant: references ask; credentials in it are sent, never shown.",
    _text,
)
BINFMT_DIRS = Setting(
    "RACKER_BINFMT_DIRS",
    "a list of paths, colon-separated",
    "/etc/binfmt.d:/run/binfmt.d:/usr/lib/binfmt.d",
    "Where qemu-user's binfmt lines are looked for, for images of another architecture; set empty: nowhere.",
    _paths,
    empty_is_unset=False,
)
BOOT_TIMEOUT = Setting(
    "RACKER_BOOT_TIMEOUT", "a number of seconds", "60", "How long an nspawn machine may take to boot (--timeout).", _seconds
)
NSPAWN_UNIFIED = Setting(
    "RACKER_NSPAWN_UNIFIED",
    "0 or 1",
    "1",
    "1: machines get the unified cgroup hierarchy (v2) on a hybrid host; 0: nspawn's own choice, for systemd older than 230.",
    _flag,
)
NETWORK_RANGE = Setting(
    "RACKER_NETWORK_RANGE",
    "an IPv4 network",
    "10.213.0.0/16",
    "The range machines' private networks (a /24 each) are taken from.",
    _network,
)
NETWORK_DIR = Setting("RACKER_NETWORK_DIR", "a path", "/run/racker/network", "Where networks' state and address claims are kept.", _path)
VM_BOOT_TIMEOUT = Setting(
    "RACKER_VM_BOOT_TIMEOUT",
    "a number of seconds",
    "240",
    "How long a VM may take to boot until SSH answers (--timeout): a budget of host CPU; "
    "a still-busy guest a busy host starved gets more, up to 3 times.",
    _seconds,
)
# The default is "max", less what makes guests slow or
# crash there. Each choice was measured with bench/bench_boot.py --baseline-cpu.
# - cx16: QEMU 7.2's TCG gets Linux >= 6.8's per-CPU cmpxchg128 (SLUB) wrong,
#   and trixie's kernel double-faults in __kmalloc at boot. (This also means
#   no x86-64-v2 guests, such as RHEL 9, under TCG with QEMU 7.2.)
# - svm: the guest would load KVM, a second of emulated work at every boot.
# - la57: four-level page tables, which TCG walks faster than five.
# - erms, fsrm: TCG runs rep movsb/stosb one byte per step (about 40 MB/s here);
#   without them the kernel and glibc copy and clear memory with wide moves. 3 s.
# - avx, avx2: boots are 2 s shorter without them (glibc then picks its SSE2
#   string functions over the AVX2 ones).
# - aes, pclmulqdq: udev would load seven crypto modules for them, each running
#   its self-tests. 0.7 s.
TCG_CPU = Setting(
    "RACKER_TCG_CPU",
    "a QEMU -cpu model",
    "max,cx16=off,svm=off,la57=off,erms=off,fsrm=off,avx=off,avx2=off,aes=off,pclmulqdq=off",
    "The CPU QEMU emulates under TCG (software emulation).",
    _text,
)
SSH_PORTS = Setting(
    "RACKER_SSH_PORTS",
    "a port range",
    "",
    "LOW-HIGH: the host ports VMs' SSH forwards may take (a firewall's opening); unset: any free port.",
    _port_range,
    example="20000-20999",
)
SEED_MODULES = Setting(
    "RACKER_SEED_MODULES",
    "all or minimal",
    "all",
    "minimal: cloud-init runs only the modules racker's seed needs (racker's own test suite sets it, for faster boots).",
    _one_of("all", "minimal"),
)
ACCEL_WARNED = Setting(
    "RACKER_ACCEL_WARNED",
    "0 or 1",
    "0",
    "Set by racker itself: the warning that VMs run under TCG was given, so pytest-xdist workers give it once.",
    _flag,
)
TEST_HOME = Setting(
    "RACKER_TEST_HOME",
    "a path",
    "/var/lib/racker-tests",
    "racker's own test suite: the shared store of catalogue images its tests reuse.",
    _path,
)

SETTINGS: tuple[Setting[Any], ...] = tuple(v for v in list(globals().values()) if isinstance(v, Setting))


def named(name: str) -> Setting[Any]:
    for setting in SETTINGS:
        if setting.name == name:
            return setting
    raise KeyError(name)


# -- listing them ------------------------------------------------------------------


def listing() -> list[dict[str, str]]:
    """Every setting with its value now and where that came from ("environment" or "default"),
    and the error of one racker cannot read."""
    from racker import redact

    rows = []
    for setting in SETTINGS:
        text = setting.text()
        value = setting.default if text is None else text
        row = {
            "name": setting.name,
            "value": redact.url(value) if "URL" in setting.kind else value,
            "source": setting.source(),
            "default": setting.default,
            "meaning": setting.meaning,
        }
        try:
            setting.get()
        except BadSetting as error:
            row["error"] = redact.text(str(error))
        rows.append(row)
    return rows


def markdown() -> str:
    """The settings table of docs/settings.md."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated from racker/settings.py by `python -m racker.settings --markdown`: edit that, not this. -->",
        "",
        "racker reads these environment variables when it uses them. An empty one counts as unset",
        "(except RACKER_BINFMT_DIRS), and a value racker cannot read is an error naming the variable.",
        "`racker config` shows each one's value now and where it came from.",
        "",
        "| variable | value | default | meaning |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default else "(none)"
        lines.append(f"| `{setting.name}` | {setting.kind} | {default} | {setting.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m racker.settings --markdown")
    sys.stdout.write(markdown())
