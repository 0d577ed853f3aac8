"""Cloud profiles: what a cloud's import needs written into the image, then verified.

Each profile is data: files to write into the disk's tree, kernel command line
options, and the published requirements as checks. A check reads the staged
tree and the disk's plan; it never trusts that `apply` did its job.

Sources: DigitalOcean's custom image requirements (docs.digitalocean.com,
products/images/custom-images/details/features and limits), and GCE's
requirements for importing a boot disk (cloud.google.com, compute/docs/import/
importing-virtual-disks and configuring-imported-images).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from racker.errors import PromoteError

GiB = 1024**3


@dataclass(frozen=True)
class Target:
    """What a check looks at: the staged root tree and the disk about to be built."""

    tree: Path
    fmt: str
    firmware: str
    size: int
    cmdline: str
    bootloader: str = "grub"


@dataclass(frozen=True)
class Result:
    requirement: str
    ok: bool
    detail: str


Check = Callable[[Target], tuple[bool, str]]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    files: dict[str, str] = field(default_factory=dict)
    cmdline: str = "console=tty0 console=ttyS0,115200n8"
    checks: tuple[tuple[str, Check], ...] = ()
    formats: tuple[str, ...] = ()  # formats the cloud imports; empty: any
    firmware: tuple[str, ...] = ("bios", "uefi")


# -- reading the tree -------------------------------------------------------


def _read(tree: Path, rel: str) -> str:
    path = tree / rel
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def _exists(tree: Path, *rels: str) -> str | None:
    for rel in rels:
        path = tree / rel
        if path.exists() or path.is_symlink():
            return rel
    return None


def datasource_list(tree: Path) -> list[str]:
    """cloud-init's effective datasource_list: the last one set in cloud.cfg, then cloud.cfg.d/*.cfg."""
    files = [tree / "etc/cloud/cloud.cfg", *sorted((tree / "etc/cloud/cloud.cfg.d").glob("*.cfg"))]
    found: list[str] = []
    for path in files:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for match in re.finditer(r"^datasource_list\s*:\s*\[([^\]]*)\]", text, re.MULTILINE):
            found = [item.strip().strip("'\"") for item in match.group(1).split(",") if item.strip()]
    return found


def sshd_option(tree: Path, option: str) -> str:
    """The value sshd uses: the first one set, reading Include'd drop-ins where they are included."""
    text = _read(tree, "etc/ssh/sshd_config")
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0].lower() == "include":
            for pattern in words[1:]:
                for path in sorted(tree.glob(pattern.lstrip("/"))):
                    lines += path.read_text(errors="replace").splitlines()
        else:
            lines.append(line)
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0].lower() == option.lower():
            return words[1].lower()
        if words and words[0].lower() == "match":
            break
    return ""


def cloud_init_version(tree: Path) -> tuple[int, ...] | None:
    for rel in (
        "usr/lib/python3/dist-packages/cloudinit/version.py",
        *(str(p.relative_to(tree)) for p in tree.glob("usr/lib/python3*/site-packages/cloudinit/version.py")),
    ):
        match = re.search(r"__VERSION__\s*=\s*['\"]([\d.]+)", _read(tree, rel))
        if match:
            return tuple(int(x) for x in match.group(1).split(".") if x.isdigit())
    return None


def unit_enabled(tree: Path, unit: str) -> bool:
    # The links point at absolute paths inside the image: test the link, never follow it.
    wants = tree / "etc/systemd/system"
    return any(os.path.lexists(directory / unit) for directory in wants.glob("*.wants"))


def dhcp_first_nic(tree: Path) -> tuple[bool, str]:
    for path in sorted((tree / "etc/systemd/network").glob("*.network")):
        text = path.read_text(errors="replace")
        if re.search(r"^DHCP\s*=\s*(yes|ipv4|true)", text, re.MULTILINE | re.IGNORECASE) and re.search(
            r"^Name=.*\b(en\*|eth\*|eth0)", text, re.MULTILINE
        ):
            return True, f"systemd-networkd: {path.name}"
    interfaces = _read(tree, "etc/network/interfaces")
    if re.search(r"^iface\s+\S+\s+inet\s+dhcp", interfaces, re.MULTILINE):
        return True, "ifupdown: /etc/network/interfaces"
    return False, "no DHCP configuration for the first NIC"


# -- checks -----------------------------------------------------------------


def check_unix(t: Target) -> tuple[bool, str]:
    rel = _exists(t.tree, "etc/os-release", "usr/lib/os-release")
    if not rel:
        return False, "no os-release"
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)', _read(t.tree, rel), re.MULTILINE)
    return True, match.group(1) if match else "Linux"


def check_cloud_init(t: Target) -> tuple[bool, str]:
    version = cloud_init_version(t.tree)
    if version is None:
        return False, "cloud-init is not installed"
    text = ".".join(map(str, version))
    return version >= (0, 7, 7), f"cloud-init {text}"


def check_datasource_order(t: Target) -> tuple[bool, str]:
    sources = datasource_list(t.tree)
    if not sources:
        return False, "no datasource_list: cloud-init's default order lists NoCloud first"
    if "NoCloud" in sources and "ConfigDrive" in sources and sources.index("NoCloud") < sources.index("ConfigDrive"):
        return False, f"NoCloud before ConfigDrive: {sources}"
    if "ConfigDrive" not in sources:
        return False, f"ConfigDrive missing: {sources}"
    return True, ", ".join(sources)


def check_sshd(t: Target) -> tuple[bool, str]:
    if not _exists(t.tree, "usr/sbin/sshd"):
        return False, "openssh-server is not installed"
    if not (unit_enabled(t.tree, "ssh.service") or unit_enabled(t.tree, "sshd.service")):
        return False, "sshd is not enabled at boot"
    return True, "installed, enabled at boot"


def check_password_auth_off(t: Target) -> tuple[bool, str]:
    value = sshd_option(t.tree, "PasswordAuthentication")
    return value == "no", f"PasswordAuthentication {value or 'yes (default)'}"


def check_root_login_off(t: Target) -> tuple[bool, str]:
    value = sshd_option(t.tree, "PermitRootLogin")
    return value == "no", f"PermitRootLogin {value or 'prohibit-password (default)'}"


def check_dhcp(t: Target) -> tuple[bool, str]:
    return dhcp_first_nic(t.tree)


def _format_in(allowed: tuple[str, ...]) -> Check:
    def check(t: Target) -> tuple[bool, str]:
        return t.fmt in allowed, f"{t.fmt} (accepted: {', '.join(allowed)})"

    return check


def _size_at_most(limit: int) -> Check:
    def check(t: Target) -> tuple[bool, str]:
        return t.size <= limit, f"{t.size / GiB:.1f} GiB (limit {limit / GiB:.0f} GiB)"

    return check


def check_whole_gib(t: Target) -> tuple[bool, str]:
    return t.size % GiB == 0, f"{t.size} bytes" + ("" if t.size % GiB == 0 else " is not a whole number of GiB")


def check_grub(t: Target) -> tuple[bool, str]:
    return t.bootloader == "grub", f"{t.bootloader} ({t.firmware})"


def check_serial_console(t: Target) -> tuple[bool, str]:
    ok = re.search(r"(^|\s)console=ttyS0", t.cmdline) is not None
    return ok, t.cmdline


def check_virtio_drivers(t: Target) -> tuple[bool, str]:
    needed = ("virtio_scsi", "virtio_net", "virtio_pci")
    modules = list(t.tree.glob("lib/modules/*/modules.builtin")) + list(t.tree.glob("usr/lib/modules/*/modules.builtin"))
    if not modules:
        return False, "no kernel modules in /lib/modules"
    directory = modules[0].parent
    present = {p.name.split(".")[0] for p in directory.rglob("*.ko*")} | {
        Path(line).name.split(".")[0] for line in modules[0].read_text().splitlines()
    }
    missing = [m for m in needed if m not in present]
    return not missing, "missing: " + ", ".join(missing) if missing else ", ".join(needed)


def check_no_ipv6_needed(t: Target) -> tuple[bool, str]:
    for path in (t.tree / "etc/systemd/network").glob("*.network"):
        if re.search(r"^DHCP\s*=\s*ipv6", path.read_text(), re.MULTILINE):
            return False, f"{path.name} wants DHCPv6 only"
    return True, "IPv4 DHCP (the cloud has no IPv6 here)"


COMMON_CHECKS: tuple[tuple[str, Check], ...] = (
    ("Unix-like operating system", check_unix),
    ("cloud-init 0.7.7 or newer installed", check_cloud_init),
    ("sshd installed and started at boot", check_sshd),
    ("SSH password authentication disabled", check_password_auth_off),
    ("DHCP on the first NIC", check_dhcp),
)

DO_FORMATS = ("raw", "qcow2", "vhdx", "vdi", "vmdk")
GCE_FORMATS = ("gce",)

PROFILES: dict[str, Profile] = {
    "generic": Profile("generic", "any cloud or hypervisor: ConfigDrive, then NoCloud"),
    "digitalocean": Profile(
        "digitalocean",
        "DigitalOcean custom image",
        files={
            "etc/cloud/cloud.cfg.d/95-racker-digitalocean.cfg": "# racker profile digitalocean: ConfigDrive must come before NoCloud\n"
            "datasource_list: [ConfigDrive, DigitalOcean, NoCloud]\n",
        },
        checks=(
            *COMMON_CHECKS,
            ("image format raw, qcow2, VHDX, VDI or VMDK", _format_in(DO_FORMATS)),
            ("100 GB or less uncompressed", _size_at_most(100 * 10**9)),
            ("NoCloud not listed before ConfigDrive", check_datasource_order),
            ("IPv4 only (no IPv6 support)", check_no_ipv6_needed),
        ),
        formats=DO_FORMATS,
    ),
    "gcp": Profile(
        "gcp",
        "Google Compute Engine image import",
        files={
            "etc/cloud/cloud.cfg.d/95-racker-gcp.cfg": "# racker profile gcp\ndatasource_list: [GCE, ConfigDrive, NoCloud]\n",
            "etc/systemd/timesyncd.conf.d/racker-gcp.conf": "[Time]\nNTP=metadata.google.internal\n",
            "etc/systemd/network/98-racker-gcp.network": (
                "# racker profile gcp: DHCP on the first NIC with the MTU GCE gives (1460)\n"
                "[Match]\nName=en* eth*\nType=ether\n\n"
                "[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n\n[DHCPv4]\nUseMTU=yes\n"
            ),
        },
        cmdline="console=ttyS0,38400n8",
        checks=(
            *COMMON_CHECKS,
            ("packed as disk.raw in a sparse oldgnu tar.gz", _format_in(GCE_FORMATS)),
            ("GRUB bootloader", check_grub),
            ("disk size a whole number of GB", check_whole_gib),
            ("serial console on ttyS0", check_serial_console),
            ("virtio-scsi and virtio-net drivers", check_virtio_drivers),
            ("root login over SSH disabled", check_root_login_off),
        ),
        formats=GCE_FORMATS,
        firmware=("bios", "uefi"),
    ),
}


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise PromoteError(f"unknown profile {name!r}", hint="one of: " + ", ".join(PROFILES)) from None


def verify(profile: Profile, target: Target) -> list[Result]:
    return [Result(requirement, *check(target)) for requirement, check in profile.checks]
