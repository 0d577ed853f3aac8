"""Cloud profiles: what a cloud's import needs written into the image, then verified.

Each profile is data: files to write into the disk's tree, kernel command line
options, and the published requirements as checks. A check reads the product,
never the request: the staged tree (before the disk is built) or the built
output itself (before it is renamed into place).

Sources: DigitalOcean's custom image requirements (docs.digitalocean.com,
products/images/custom-images/details/features and limits) and its image check
script (github.com/digitalocean/marketplace-partners, scripts/99-img-check.sh);
Azure's "Prepare a Debian VHD for Azure" and generic Linux guidance
(learn.microsoft.com, azure/virtual-machines/linux); and GCE's
requirements for importing a boot disk (cloud.google.com, compute/docs/import/
importing-virtual-disks and configuring-imported-images).
"""

from __future__ import annotations

import re
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from racker.errors import PromoteError
from racker.promote import bootloader, readback
from racker.store import imagetree

GiB = 1024**3


@dataclass(frozen=True)
class Built:
    """What a disk check reads: the output file as built, before it is renamed into place."""

    path: Path
    work: Path  # scratch space for what a check reads out of the disk


@dataclass(frozen=True)
class Result:
    requirement: str
    ok: bool
    detail: str
    blocking: bool = True  # False: a warning (shown, the output kept), as the cloud's own check warns


TreeCheck = Callable[[Path], tuple[bool, str]]
DiskCheck = Callable[[Built], tuple[bool, str]]


@dataclass(frozen=True)
class Requirement:
    """One published requirement, and the check that reads the product for it.

    `reads` says what the check reads: "tree", the staged root (checked before
    the disk is built, to fail fast), or "disk", the built output (checked
    before it is renamed into place). `formats`, when set, are the output
    formats the requirement accepts: a request for another fails before any work.
    `blocking` False: the cloud's own check only warns; unmet, it is shown and
    the output kept.
    """

    text: str
    check: TreeCheck | DiskCheck
    reads: str = "tree"
    formats: tuple[str, ...] = ()
    blocking: bool = True


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    files: dict[str, str] = field(default_factory=dict)
    cmdline: str = "console=tty0 console=ttyS0,115200n8"
    requirements: tuple[Requirement, ...] = ()
    firmware: tuple[str, ...] = ("bios", "uefi")

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats the cloud imports; empty: any."""
        return tuple(f for r in self.requirements for f in r.formats)


# -- reading the tree -------------------------------------------------------


# Every read resolves inside the tree (imagetree): the image's links never lead to the host.


def _read(tree: Path, rel: str) -> str:
    """The file's text, or "" when it is missing or not a regular file."""
    try:
        return imagetree.Tree(tree).read_text(rel, errors="replace")
    except OSError:
        return ""


def _exists(tree: Path, *rels: str) -> str | None:
    inside = imagetree.Tree(tree)
    return next((rel for rel in rels if inside.lexists(rel)), None)


def _glob(tree: Path, pattern: str) -> list[str]:
    return imagetree.Tree(tree).glob(pattern)


def datasource_list(tree: Path) -> list[str]:
    """cloud-init's effective datasource_list: the last one set in cloud.cfg, then cloud.cfg.d/*.cfg."""
    files = ["etc/cloud/cloud.cfg", *_glob(tree, "etc/cloud/cloud.cfg.d/*.cfg")]
    found: list[str] = []
    for rel in files:
        text = _read(tree, rel)
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
                for rel in _glob(tree, pattern):
                    lines += _read(tree, rel).splitlines()
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
    """The version of the image's cloud-init, read from its files: version.py holds it, or, in a
    cloud-init built with Meson (25.1 and later; Debian sid), the meson_versions.py it imports."""
    for package in ("usr/lib/python3/dist-packages/cloudinit", *_glob(tree, "usr/lib/python3*/site-packages/cloudinit")):
        for rel, variable in (("version.py", "__VERSION__"), ("meson_versions.py", "UPSTREAM_VERSION")):
            match = re.search(rf"{variable}\s*=\s*['\"]([\d.]+)['\"]", _read(tree, f"{package}/{rel}"), re.MULTILINE)
            if match:
                return tuple(int(x) for x in match.group(1).split(".") if x.isdigit())
    return None


def unit_enabled(tree: Path, unit: str) -> bool:
    # The links point at absolute paths inside the image: test the link, never follow it.
    return bool(_glob(tree, f"etc/systemd/system/*.wants/{unit}"))


def dhcp_first_nic(tree: Path) -> tuple[bool, str]:
    for rel in _glob(tree, "etc/systemd/network/*.network"):
        text = _read(tree, rel)
        if re.search(r"^DHCP\s*=\s*(yes|ipv4|true)", text, re.MULTILINE | re.IGNORECASE) and re.search(
            r"^Name=.*\b(en\*|eth\*|eth0)", text, re.MULTILINE
        ):
            return True, f"systemd-networkd: {Path(rel).name}"
    interfaces = _read(tree, "etc/network/interfaces")
    if re.search(r"^iface\s+\S+\s+inet\s+dhcp", interfaces, re.MULTILINE):
        return True, "ifupdown: /etc/network/interfaces"
    return False, "no DHCP configuration for the first NIC"


# -- tree checks: the staged root, before the disk is built ---------------


def check_unix(tree: Path) -> tuple[bool, str]:
    rel = _exists(tree, "etc/os-release", "usr/lib/os-release")
    if not rel:
        return False, "no os-release"
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)', _read(tree, rel), re.MULTILINE)
    return True, match.group(1) if match else "Linux"


def check_cloud_init(tree: Path) -> tuple[bool, str]:
    version = cloud_init_version(tree)
    if version is None:
        return False, "cloud-init is not installed"
    text = ".".join(map(str, version))
    return version >= (0, 7, 7), f"cloud-init {text}"


def check_datasource_order(tree: Path) -> tuple[bool, str]:
    sources = datasource_list(tree)
    if not sources:
        return False, "no datasource_list: cloud-init's default order lists NoCloud first"
    if "NoCloud" in sources and "ConfigDrive" in sources and sources.index("NoCloud") < sources.index("ConfigDrive"):
        return False, f"NoCloud before ConfigDrive: {sources}"
    if "ConfigDrive" not in sources:
        return False, f"ConfigDrive missing: {sources}"
    return True, ", ".join(sources)


def check_sshd(tree: Path) -> tuple[bool, str]:
    if not _exists(tree, "usr/sbin/sshd"):
        return False, "openssh-server is not installed"
    if not (unit_enabled(tree, "ssh.service") or unit_enabled(tree, "sshd.service")):
        return False, "sshd is not enabled at boot"
    return True, "installed, enabled at boot"


def check_password_auth_off(tree: Path) -> tuple[bool, str]:
    value = sshd_option(tree, "PasswordAuthentication")
    return value == "no", f"PasswordAuthentication {value or 'yes (default)'}"


def check_root_login_off(tree: Path) -> tuple[bool, str]:
    value = sshd_option(tree, "PermitRootLogin")
    return value == "no", f"PermitRootLogin {value or 'prohibit-password (default)'}"


def check_dhcp(tree: Path) -> tuple[bool, str]:
    return dhcp_first_nic(tree)


def check_serial_console(tree: Path) -> tuple[bool, str]:
    """Every kernel the staged grub.cfg boots logs to ttyS0."""
    lines = [line.strip() for line in _read(tree, "boot/grub/grub.cfg").splitlines() if re.match(r"\s*linux(16|efi)?\s", line)]
    if not lines:
        return False, "no linux line in /boot/grub/grub.cfg"
    missing = [line for line in lines if not re.search(r"(^|\s)console=ttyS0(\s|,|$)", line)]
    return not missing, f"not on ttyS0: {missing[0]}" if missing else lines[0].split(None, 2)[-1]


def check_virtio_drivers(tree: Path) -> tuple[bool, str]:
    needed = ("virtio_scsi", "virtio_net", "virtio_pci")
    modules = _glob(tree, "lib/modules/*/modules.builtin") + _glob(tree, "usr/lib/modules/*/modules.builtin")
    if not modules:
        return False, "no kernel modules in /lib/modules"
    directory = str(Path(modules[0]).parent)
    present = {Path(p).name.split(".")[0] for p in imagetree.Tree(tree).walk_files(directory) if ".ko" in Path(p).name} | {
        Path(line).name.split(".")[0] for line in _read(tree, modules[0]).splitlines()
    }
    missing = [m for m in needed if m not in present]
    return not missing, "missing: " + ", ".join(missing) if missing else ", ".join(needed)


def check_no_ipv6_needed(tree: Path) -> tuple[bool, str]:
    for rel in _glob(tree, "etc/systemd/network/*.network"):
        if re.search(r"^DHCP\s*=\s*ipv6", _read(tree, rel), re.MULTILINE):
            return False, f"{Path(rel).name} wants DHCPv6 only"
    return True, "IPv4 DHCP (the cloud has no IPv6 here)"


# -- disk checks: the built output, before it is renamed into place ----------


def _format_in(allowed: tuple[str, ...]) -> DiskCheck:
    def check(built: Built) -> tuple[bool, str]:
        found = readback.probe_format(built.path)
        return found in allowed, f"{found} (accepted: {', '.join(allowed)})"

    return check


def _size_at_most(limit: int) -> DiskCheck:
    def check(built: Built) -> tuple[bool, str]:
        size = readback.virtual_size(built.path)
        return size <= limit, f"{size / GiB:.1f} GiB (limit {limit / GiB:.0f} GiB)"

    return check


def check_whole_gib(built: Built) -> tuple[bool, str]:
    size = readback.virtual_size(built.path)
    return size % GiB == 0, f"{size} bytes" + ("" if size % GiB == 0 else " is not a whole number of GiB")


def check_gce_tar(built: Built) -> tuple[bool, str]:
    """GCE's import: a gzip'd tar holding one file, disk.raw, stored as an old-GNU
    sparse member (type S): what `tar --format=oldgnu --sparse` writes. POSIX
    tars store sparse files otherwise (pax headers), and GCE refuses them."""
    found = readback.probe_format(built.path)
    if found != "tar.gz":
        return False, f"not a tar.gz: {found}"
    members = readback.tar_members(built.path)
    names = [m.name for m in members]
    if names != ["disk.raw"]:
        return False, f"holds {names}, not only disk.raw"
    if members[0].type != tarfile.GNUTYPE_SPARSE:
        return False, "disk.raw is not an old-GNU sparse member"
    return True, f"disk.raw, {members[0].size / GiB:.1f} GiB, sparse (oldgnu)"


def check_grub(built: Built) -> tuple[bool, str]:
    """GRUB boots the disk: its boot.img in the MBR and core.img after it (BIOS), or a GRUB EFI binary on the ESP."""
    head = readback.read_disk(built.path, 0, 2 * readback.SECTOR, built.work)
    table, _partitions = readback.disk_table(built.path, built.work)
    if table == "gpt":
        binary = readback.esp_file(built.path, "EFI/BOOT/BOOTX64.EFI", built.work)
        if binary is None:
            return False, "no EFI/BOOT/BOOTX64.EFI on an EFI system partition"
        if binary[:2] != b"MZ" or b"GRUB" not in binary:
            return False, "EFI/BOOT/BOOTX64.EFI is not a GRUB EFI binary"
        return True, "GRUB EFI binary on the ESP (uefi)"
    if table == "dos":
        grub = bootloader.GRUB_LIB / "i386-pc"
        boot, diskboot = (grub / "boot.img").read_bytes(), (grub / "diskboot.img").read_bytes()
        mbr, core = head[: readback.SECTOR], head[readback.SECTOR :]
        # What grub-bios-setup changes in boot.img: the LBA of core.img and the drive check.
        patched = {*range(bootloader.KERNEL_SECTOR_OFFSET, bootloader.KERNEL_SECTOR_OFFSET + 8), bootloader.BOOT_DRIVE_CHECK_OFFSET,
                   bootloader.BOOT_DRIVE_CHECK_OFFSET + 1}  # fmt: skip
        if any(mbr[i] != boot[i] for i in range(bootloader.MBR_CODE_SIZE) if i not in patched):
            return False, "the MBR holds no GRUB boot.img"
        lba = struct.unpack_from("<Q", mbr, bootloader.KERNEL_SECTOR_OFFSET)[0]
        if lba != 1 or core[: bootloader.DISKBOOT_BLOCKLIST] != diskboot[: bootloader.DISKBOOT_BLOCKLIST]:
            return False, f"no GRUB core.img where boot.img loads it (LBA {lba})"
        return True, "GRUB boot.img in the MBR, core.img at LBA 1 (bios)"
    return False, "no partition table"


# -- Azure: learn.microsoft.com, "Prepare a Debian VHD for Azure" and "Information
# for non-endorsed distributions" (azure/virtual-machines/linux/create-upload-generic).

MiB = 1024**2
AZURE_DRIVERS = ("hv_vmbus", "hv_storvsc", "hv_netvsc")
# Microsoft's list also has rootdelay=300: Debian's initramfs-tools sleeps that
# long on every boot (its init runs `sleep "$ROOTDELAY"`; measured: 300 s before
# root is mounted), and waits for the root disk without it. Left out on purpose.
AZURE_CMDLINE = ("console=ttyS0", "earlyprintk=ttyS0")


def check_fixed_vhd(built: Built) -> tuple[bool, str]:
    fixed = readback.is_fixed_vhd(built.path)
    return fixed, "fixed VHD" if fixed else f"{readback.probe_format(built.path)}, not a fixed VHD"


def check_whole_mib(built: Built) -> tuple[bool, str]:
    size = readback.virtual_size(built.path)
    return size % MiB == 0, f"{size} bytes" + ("" if size % MiB == 0 else " is not a whole number of MiB")


def check_mib_aligned(built: Built) -> tuple[bool, str]:
    starts = readback.partition_starts(built.path, built.work)
    if not starts:
        return False, "no partitions"
    odd = [start for start in starts if start % MiB]
    return not odd, f"partitions at {', '.join(str(s) for s in starts)} bytes" + (" (not 1 MiB aligned)" if odd else "")


def check_hyperv_initramfs(tree: Path) -> tuple[bool, str]:
    """Hyper-V's bus, disk and NIC drivers in the initramfs GRUB boots."""
    match = re.search(r"^\s*initrd\S*\s+/?(\S+)", _read(tree, "boot/grub/grub.cfg"), re.MULTILINE)
    if not match:
        return False, "no initrd line in /boot/grub/grub.cfg"
    try:
        names = {Path(n).name.split(".ko")[0] for n in readback.initramfs_files(imagetree.Tree(tree).read_bytes(match.group(1)))}
    except (PromoteError, OSError) as error:
        return False, f"{match.group(1)}: {error}"
    missing = [m for m in AZURE_DRIVERS if m not in names]
    return not missing, f"missing from {match.group(1)}: {', '.join(missing)}" if missing else ", ".join(AZURE_DRIVERS)


def check_azure_datasource_first(tree: Path) -> tuple[bool, str]:
    sources = datasource_list(tree)
    return bool(sources) and sources[0] == "Azure", ", ".join(sources) or "no datasource_list"


def check_azure_cmdline(tree: Path) -> tuple[bool, str]:
    lines = [line.strip() for line in _read(tree, "boot/grub/grub.cfg").splitlines() if re.match(r"\s*linux(16|efi)?\s", line)]
    if not lines:
        return False, "no linux line in /boot/grub/grub.cfg"
    for line in lines:
        words = {w.split(",")[0] for w in line.split()}
        missing = [option for option in AZURE_CMDLINE if option not in words]
        if missing:
            return False, f"missing {' '.join(missing)}: {line}"
    return True, " ".join(AZURE_CMDLINE)


def check_no_swap(tree: Path) -> tuple[bool, str]:
    entries = [line.split() for line in _read(tree, "etc/fstab").splitlines() if not line.lstrip().startswith("#")]
    found = [" ".join(words) for words in entries if len(words) > 2 and words[2] == "swap"]
    found += [Path(rel).name for rel in _glob(tree, "etc/systemd/system/*.wants/*.swap")]
    return not found, f"swap: {found[0]}" if found else "no swap in fstab or systemd"


def check_client_alive(tree: Path) -> tuple[bool, str]:
    value = sshd_option(tree, "ClientAliveInterval")
    return value == "180", f"ClientAliveInterval {value or '0 (default)'}"


def check_azure_provisioning(tree: Path) -> tuple[bool, str]:
    """cloud-init 21.2 or newer provisions on Azure without the Linux Agent; its udev rules name the disks."""
    version = cloud_init_version(tree)
    if version is None or version < (21, 2):
        return False, f"cloud-init {'.'.join(map(str, version)) if version else 'not installed'} (21.2 or newer provisions)"
    rules = _exists(tree, "lib/udev/rules.d/66-azure-ephemeral.rules", "usr/lib/udev/rules.d/66-azure-ephemeral.rules")
    if not rules:
        return False, "cloud-init has no Azure udev rules (66-azure-ephemeral.rules)"
    return True, f"cloud-init {'.'.join(map(str, version))}, {Path(rules).name}"


# -- DigitalOcean's image check (marketplace-partners, scripts/99-img-check.sh),
# what of it applies to a disk racker builds, read from the staged tree.

UNSET_PASSWORDS = ("!", "!!", "*")  # what the script takes for "no password"


def _people(tree: Path) -> list[tuple[str, str]]:
    """root and every user account (uid >= 1000, not nobody), with its home (relative to the root)."""
    people = [("root", "root")]
    for line in _read(tree, "etc/passwd").splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and fields[2].isdigit() and int(fields[2]) >= 1000 and fields[0] not in ("nobody", "nfsnobody"):
            people.append((fields[0], fields[5].strip("/")))
    return people


def _size(tree: Path, rel: str) -> int:
    """The size of a regular file inside the tree, -1 if there is none."""
    inside = imagetree.Tree(tree)
    return inside.stat(rel).st_size if inside.is_file(rel) else -1


def check_no_passwords(tree: Path) -> tuple[bool, str]:
    shadow = {f[0]: f[1] for f in (line.split(":") for line in _read(tree, "etc/shadow").splitlines()) if len(f) > 1}
    if "root" not in shadow:
        return False, "no root entry in /etc/shadow"
    set_ = [name for name, _home in _people(tree) if name in shadow and shadow[name] not in UNSET_PASSWORDS]
    return not set_, f"a password is set for {', '.join(set_)}" if set_ else "root and users have no password"


def check_no_ssh_keys(tree: Path) -> tuple[bool, str]:
    found = []
    for _name, home in _people(tree):
        keys, private = f"{home}/.ssh/authorized_keys", f"{home}/.ssh/id_rsa"
        if _size(tree, keys) > 50:
            found.append(keys)
        if _size(tree, private) > 0:
            found.append(private)
    return not found, f"left in the image: {', '.join(found)}" if found else "no authorized_keys or private keys"


def check_no_bash_history(tree: Path) -> tuple[bool, str]:
    found = [rel for _n, home in _people(tree) if _size(tree, rel := f"{home}/.bash_history") >= 200]
    return not found, f"left in the image: {', '.join(found)}" if found else "no bash history"


def check_logs_cleaned(tree: Path) -> tuple[bool, str]:
    found = [Path(rel).name for rel in _glob(tree, "var/log/*.log") if _size(tree, rel) > 50]
    found += [Path(rel).name for rel in _glob(tree, "var/log/*.[0-9]") + _glob(tree, "var/log/*-" + "[0-9]" * 8)]  # rotated archives
    return not found, f"in /var/log: {', '.join(found)}" if found else "/var/log holds no logs or archives"


def apt_suites(tree: Path) -> list[str]:
    """The suites apt fetches: sources.list and sources.list.d (one-line .list and deb822 .sources)."""
    suites: list[str] = []
    for rel in ["etc/apt/sources.list", *_glob(tree, "etc/apt/sources.list.d/*")]:
        text = _read(tree, rel)
        if rel.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                if re.search(r"^Enabled:\s*no", stanza, re.MULTILINE | re.IGNORECASE):
                    continue
                match = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
                suites += match.group(1).split() if match else []
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    suites.append(words[2])
    return suites


def check_security_suite(tree: Path) -> tuple[bool, str]:
    """The script fails on pending security updates; apt sees them only from the security suite."""
    suites = apt_suites(tree)
    security = [s for s in suites if s.endswith(("-security", "/updates"))]
    return bool(security), ", ".join(security) if security else f"no security suite in apt's sources ({', '.join(suites) or 'none'})"


def check_no_do_agent(tree: Path) -> tuple[bool, str]:
    found = _exists(tree, "var/opt/digitalocean/do-agent")
    return not found, "the DigitalOcean monitoring agent is in the image" if found else "no do-agent"


COMMON: tuple[Requirement, ...] = (
    Requirement("Unix-like operating system", check_unix),
    Requirement("cloud-init 0.7.7 or newer installed", check_cloud_init),
    Requirement("sshd installed and started at boot", check_sshd),
    Requirement("SSH password authentication disabled", check_password_auth_off),
    Requirement("DHCP on the first NIC", check_dhcp),
)

DO_FORMATS = ("raw", "qcow2", "vhdx", "vdi", "vmdk")
GCE_FORMATS = ("gce",)
AZURE_FORMATS = ("vhd",)

PROFILES: dict[str, Profile] = {
    "generic": Profile("generic", "any cloud or hypervisor: ConfigDrive, then NoCloud"),
    "digitalocean": Profile(
        "digitalocean",
        "DigitalOcean custom image",
        files={
            "etc/cloud/cloud.cfg.d/95-racker-digitalocean.cfg": "# racker profile digitalocean: ConfigDrive must come before NoCloud\n"
            "datasource_list: [ConfigDrive, DigitalOcean, NoCloud]\n",
        },
        requirements=(
            *COMMON,
            Requirement("image format raw, qcow2, VHDX, VDI or VMDK", _format_in(DO_FORMATS), "disk", DO_FORMATS),
            Requirement("100 GB or less uncompressed", _size_at_most(100 * 10**9), "disk"),
            Requirement("NoCloud not listed before ConfigDrive", check_datasource_order),
            Requirement("IPv4 only (no IPv6 support)", check_no_ipv6_needed),
            # DigitalOcean's image check, as far as it reads what racker builds (not a firewall, which it only warns of).
            Requirement("no password set for root or users", check_no_passwords),
            Requirement("no SSH authorized_keys or private keys left", check_no_ssh_keys),
            Requirement("bash history cleared", check_no_bash_history),
            Requirement("log files cleared", check_logs_cleaned, blocking=False),  # the script warns
            Requirement("security updates visible: the security suite in apt's sources", check_security_suite),
            Requirement("no DigitalOcean monitoring agent", check_no_do_agent),
        ),
    ),
    "azure": Profile(
        "azure",
        "Microsoft Azure image (a fixed VHD)",
        files={
            "etc/cloud/cloud.cfg.d/95-racker-azure.cfg": "# racker profile azure: Azure's datasource first (NoCloud: racker's own seed)\n"
            "datasource_list: [Azure, NoCloud]\n",
            "etc/ssh/sshd_config.d/40-racker-azure.conf": "# racker profile azure: keep idle sessions through Azure's load balancer\n"
            "ClientAliveInterval 180\n",
        },
        cmdline="console=tty0 console=ttyS0,115200n8 earlyprintk=ttyS0,115200",
        requirements=(
            *COMMON,
            Requirement("fixed VHD", check_fixed_vhd, "disk", AZURE_FORMATS),
            Requirement("virtual size a whole number of MiB", check_whole_mib, "disk"),
            Requirement("partitions aligned to 1 MiB", check_mib_aligned, "disk"),
            Requirement("hv_vmbus, hv_storvsc and hv_netvsc in the initramfs", check_hyperv_initramfs),
            Requirement("Azure datasource first in cloud-init's datasource_list", check_azure_datasource_first),
            Requirement("kernel command line: console=ttyS0 earlyprintk=ttyS0", check_azure_cmdline),
            Requirement("no swap on the OS disk", check_no_swap),
            Requirement("sshd ClientAliveInterval 180", check_client_alive),
            Requirement("provisioned by cloud-init 21.2 or newer, with its Azure udev rules", check_azure_provisioning),
        ),
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
        requirements=(
            *COMMON,
            Requirement("packed as disk.raw in a sparse oldgnu tar.gz", check_gce_tar, "disk", GCE_FORMATS),
            Requirement("GRUB bootloader", check_grub, "disk"),
            Requirement("disk size a whole number of GB", check_whole_gib, "disk"),
            Requirement("serial console on ttyS0", check_serial_console),
            Requirement("virtio-scsi and virtio-net drivers", check_virtio_drivers),
            Requirement("root login over SSH disabled", check_root_login_off),
        ),
        firmware=("bios", "uefi"),
    ),
}


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise PromoteError(f"unknown profile {name!r}", hint="one of: " + ", ".join(PROFILES)) from None


def check_request(profile: Profile, fmt: str) -> list[Result]:
    """The requirements a request breaks by itself (a format the cloud does not import), known before any work."""
    return [
        Result(r.text, False, f"{fmt} asked for (accepted: {', '.join(r.formats)})")
        for r in profile.requirements
        if r.formats and fmt not in r.formats
    ]


def verify_tree(profile: Profile, tree: Path) -> list[Result]:
    return [Result(r.text, *r.check(tree), blocking=r.blocking) for r in profile.requirements if r.reads == "tree"]


def verify_disk(profile: Profile, built: Built) -> list[Result]:
    return [Result(r.text, *r.check(built), blocking=r.blocking) for r in profile.requirements if r.reads == "disk"]
