"""Prepare: make a stored image able to boot as a VM, as a new image in the store.

A copy of the image gets, from the distribution's own packages (installed
inside systemd-nspawn with the distribution's own package manager): a kernel
and a small initramfs, cloud-init, sshd, sudo, udev and a DHCP client setup,
then the configuration a cloud image needs (cloud-init datasources, sshd
hardening, locale, no machine-id, no SSH host keys). The result is committed
as `<image>+vm`; the source image is never modified.

What to install is data: a row per package manager in PROFILES, overridable
per distribution id. Any number of processes may prepare the same image at
once: one builds it under a lock, the others find it done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from racker import fingerprint, machines, proc, progress, store
from racker.errors import PrepareError, ToolFailed, UnknownInit
from racker.machines import inits
from racker.prepare import build_leftovers
from racker.store import distros, imagetree, reproducible
from racker.store.refs import PREPARED


@dataclass(frozen=True)
class VmPackages:
    """What one family of distributions needs to boot in a VM."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()  # installed where the archive has them
    kernels: dict[str, str] = field(default_factory=dict)  # flavour (Drivers.kernel) -> its package ({arch}: Debian's)
    # Debian architecture -> what a VM of that architecture needs besides: arm64 boots UEFI only,
    # and promote builds its GRUB from the image's own arm64-efi modules.
    arch_packages: dict[str, tuple[str, ...]] = field(default_factory=dict)
    initramfs_conf: dict[str, str] = field(default_factory=dict)
    # Files written before the kernel is installed, so the initramfs is built once.
    pre_files: dict[str, str] = field(default_factory=dict)


# Kernels a VM may get, by flavour: each package row names its own (VmPackages.kernels).
# "cloud" is small and boots fastest; "generic" has every driver, for platforms the cloud one lacks.
CLOUD_KERNEL = "cloud"


@dataclass(frozen=True)
class Drivers:
    """What one platform's root disk and first NIC sit behind, and the kernel flavour that has them."""

    modules: tuple[str, ...]
    kernel: str = CLOUD_KERNEL


# The drivers a VM's root disk and first NIC may sit behind, one row per
# platform. The hook puts them in the initramfs; udev loads only those whose
# hardware is there (listing them in /etc/initramfs-tools/modules would load
# every one at boot). A module the kernel lacks is skipped: Debian's cloud
# kernel has no ahci and no e1000 (VirtualBox's defaults), so that row takes
# the generic kernel; it builds ext4 in.
INITRAMFS_MODULES: dict[str, Drivers] = {
    "virtio-pci": Drivers(("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net")),  # QEMU, DigitalOcean, GCE
    # Firecracker, QEMU microvm: no PCI; the devices are found through ACPI
    # (the cloud kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES).
    "virtio-mmio": Drivers(("virtio_mmio", "virtio_blk", "virtio_net", "ext4")),
    "gce": Drivers(("nvme",)),
    # VirtualBox, imports that present SATA. sr_mod: the cloud-init seed on an
    # optical drive must be there before ds-identify looks, early in the boot.
    "sata": Drivers(("ahci", "ata_piix", "sd_mod", "sr_mod", "e1000"), kernel="generic"),
    "hyperv": Drivers(("hv_vmbus", "hv_storvsc", "hv_netvsc", "sd_mod")),  # Azure, Hyper-V
    "ext4": Drivers(("crc32c_generic",)),
}

INITRAMFS_HOOK = f"""\
#!/bin/sh
# Written by racker prepare: root-disk and NIC drivers in the initramfs, loaded by udev on demand.
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for module in {" ".join(dict.fromkeys(m for row in INITRAMFS_MODULES.values() for m in row.modules))}; do
    manual_add_modules "$module"
done
"""

PACKAGES: dict[str, VmPackages] = {
    "apt": VmPackages(
        required=(
            "initramfs-tools",
            "systemd-sysv",
            "udev",
            "dbus",
            "openssh-server",
            "openssh-client",  # sid's server no longer pulls it in; the full-boot checks ask sshd from inside
            "sudo",
            "cloud-init",
            "cloud-guest-utils",
            "fdisk",
            "e2fsprogs",
            "iproute2",
            "procps",
        ),
        # systemd-timesyncd: a package of its own since bullseye; a time-sync service, as
        # the distributions' cloud images have (and the gcp profile's NTP drop-in configures).
        # systemd-resolved: a package of its own since bookworm (part of systemd before); DNS from
        # the DHCP lease, as Debian's cloud images have it (see CLOUD_DNS below).
        optional=("gdisk", "systemd-timesyncd", "systemd-resolved"),
        kernels={CLOUD_KERNEL: "linux-image-cloud-{arch}", "generic": "linux-image-{arch}"},
        arch_packages={"arm64": ("grub-efi-arm64-bin",)},
        pre_files={
            # A small initramfs: only the modules a VM's root disk needs, not every driver.
            "etc/initramfs-tools/conf.d/racker.conf": "MODULES=list\nCOMPRESS=gzip\n",
            "etc/initramfs-tools/hooks/racker": INITRAMFS_HOOK,
            # Nothing starts during installation inside the container.
            "usr/sbin/policy-rc.d": "#!/bin/sh\nexit 101\n",
        },
    ),
}

# Images whose PID 1 is sysvinit or OpenRC keep it: the same row without systemd (systemd-sysv would
# replace sysvinit-core, and networkd would have no one to start it). Their network is ifupdown's,
# with dhclient for DHCP; bookworm's cloud-init ships /etc/init.d scripts (cloud-init-local,
# cloud-init, cloud-config, cloud-final) that sysv-rc and OpenRC run.
RC_PACKAGES: dict[str, VmPackages] = {
    "apt": dataclasses.replace(
        PACKAGES["apt"],
        required=(*(p for p in PACKAGES["apt"].required if p not in ("systemd-sysv", "dbus")), "ifupdown", "isc-dhcp-client"),
        optional=("gdisk",),
    ),
}

# os-release ID -> overrides of the package row (e.g. Ubuntu's kernel is another package).
DISTRO_PACKAGES: dict[str, VmPackages] = {}

# What an image without an init (most container images) gets to boot under
# systemd-nspawn: systemd as init, D-Bus, sshd, and the tools checks call.
# Rows other than apt's are unverified (distros.Recipe.verified): no mirror of
# those distributions is reachable from CI yet.
_RPM_BOOT = VmPackages(required=("systemd", "dbus", "openssh-server", "iproute", "procps-ng"))
BOOT_PACKAGES: dict[str, VmPackages] = {
    "apt": VmPackages(
        required=("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "procps"),
        pre_files={"usr/sbin/policy-rc.d": "#!/bin/sh\nexit 101\n"},  # nothing starts while installing
    ),
    "dnf": _RPM_BOOT,
    "microdnf": _RPM_BOOT,
    "yum": _RPM_BOOT,
    "zypper": VmPackages(required=("systemd", "systemd-sysvinit", "dbus-1", "openssh-server", "iproute2", "procps")),
    # OpenRC, not systemd: boots /sbin/init (see the apk recipe's quirks).
    "apk": VmPackages(
        required=("openrc", "openssh-server", "iproute2", "procps"),
        pre_files={"etc/rc.conf": 'rc_sys="lxc"\n'},
    ),
    "pacman": VmPackages(required=("systemd", "systemd-sysvcompat", "dbus", "openssh", "iproute2", "procps-ng")),
}
BOOTABLE = "+boot"

# Configuration written into every prepared image (path relative to the root).
CLOUD_CFG = """\
# Written by racker prepare. ConfigDrive must come before NoCloud (DigitalOcean).
datasource_list: [ConfigDrive, NoCloud]
# The network is the distribution's own: systemd-networkd, DHCP on the first NIC.
network: {config: disabled}
locale: C.UTF-8
ssh_pwauth: false
disable_root: true
ssh_deletekeys: true
# RSA keys take seconds to make under emulation; ed25519 and ECDSA are what clients use.
ssh_genkeytypes: [ed25519, ecdsa]
manage_etc_hosts: localhost
growpart: {mode: auto, devices: ['/']}
resize_rootfs: true
# cloud-init's own module lists stay whole: users' user-data (packages, chpasswd,
# ntp, apt, ca_certs...) must take effect. Boot speed is the test seed's business.
"""

NETWORK = """\
# Written by racker prepare: DHCP on the first Ethernet NIC.
[Match]
Name=en* eth*
Type=ether

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseDomains=yes
"""

SSHD = """\
# Written by racker prepare: keys only, and no root.
PasswordAuthentication no
KbdInteractiveAuthentication no
ChallengeResponseAuthentication no
PermitRootLogin no
UseDNS no
"""

# sshd waits for cloud-init's host keys; without them (no cloud-init run, as under nspawn, or a
# promoted disk, which holds none) it makes its own, before the unit's own `sshd -t`, which fails
# without keys: the list is reset so that the key step comes first.
SSH_DROPIN = """\
[Unit]
After=cloud-init.service

[Service]
ExecStartPre=
ExecStartPre=-/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A'
ExecStartPre=/usr/sbin/sshd -t
"""

# One configured NIC is enough to call the network online.
WAIT_ONLINE_DROPIN = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20
"""

CONFIG_FILES: dict[str, str] = {
    "etc/cloud/cloud.cfg.d/90-racker.cfg": CLOUD_CFG,
    "etc/systemd/network/99-racker-dhcp.network": NETWORK,
    "etc/ssh/sshd_config.d/50-racker.conf": SSHD,
    "etc/systemd/system/ssh.service.d/racker.conf": SSH_DROPIN,
    "etc/systemd/system/systemd-networkd-wait-online.service.d/racker.conf": WAIT_ONLINE_DROPIN,
    "etc/default/locale": "LANG=C.UTF-8\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
}

# -- images whose init is sysvinit or OpenRC (issue 26) -----------------------------------
# ifupdown: DHCP on the first Ethernet NIC, whatever udev names it (eth0, ens3, enp0s2): a pattern
# (interfaces(5), PATTERN MATCHING INTERFACES) mapped to one logical interface. `auto`: the
# networking script brings it up at boot, before cloud-init's init stage ($network) asks for it.
RC_INTERFACES = """\
# Written by racker prepare: DHCP on the first Ethernet NIC, whatever udev names it.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto /en*/1=racker-nic /eth*/1=racker-nic
allow-hotplug /en*/1=racker-nic /eth*/1=racker-nic
iface racker-nic inet dhcp
"""

# The init script sources this file: sshd -t (its start's first step) fails without host keys,
# which cloud-init's init stage (X-Start-Before: sshd) makes; without a cloud-init run, sshd makes them.
RC_SSH_DEFAULTS = """\
# Written by racker prepare: host keys, if cloud-init has not made them, before sshd -t needs them.
ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A >/dev/null
"""

# A login prompt on the board's first serial port, where the kernel's console is (promote's cmdline).
RC_GETTY = "T0:2345:respawn:/sbin/getty -L {tty} 115200 vt100"
SERIAL_TTYS = {"arm64": "ttyAMA0"}  # Debian architecture -> its board's first serial port; else ttyS0

# Started at boot through the init's own links (update-rc.d: insserv's under sysv-rc, rc-update's
# under OpenRC), as the packages' scripts did; said again in case a package left one out.
RC_SERVICES = ("udev", "networking", "ssh", "cloud-init-local", "cloud-init", "cloud-config", "cloud-final")

RC_CONFIG_FILES: dict[str, str] = {
    "etc/cloud/cloud.cfg.d/90-racker.cfg": CLOUD_CFG,
    "etc/network/interfaces": RC_INTERFACES,
    "etc/ssh/sshd_config.d/50-racker.conf": SSHD,
    "etc/default/ssh": RC_SSH_DEFAULTS,
    "etc/default/locale": "LANG=C.UTF-8\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
}

ENABLE_UNITS = ("systemd-networkd.service", "ssh.service")
OPTIONAL_ENABLE_UNITS = ("systemd-resolved.service", "systemd-timesyncd.service")
# Units a VM does not need at boot; each costs seconds under emulation.
MASK_UNITS = (
    "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer",
    "fstrim.timer", "e2scrub_all.timer", "dpkg-db-backup.timer",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "dev-hugepages.mount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "systemd-pstore.service",
    "modprobe@drm.service", "modprobe@fuse.service", "modprobe@loop.service", "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service", "cloud-init-hotplugd.socket",
)  # fmt: skip

# What building the image leaves behind and a cloud image does not ship (globs,
# relative to the root): install logs, apt's lists and caches (`apt update` makes
# them again), debconf's backups.
LEFTOVERS = (
    "var/log/dpkg.log", "var/log/alternatives.log", "var/log/apt/history.log", "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz", "var/lib/apt/lists/*_*", "var/lib/apt/lists/partial/*", "var/cache/apt/*.bin",
    "var/cache/debconf/*-old",
)  # fmt: skip

# Generators a cloud VM does not need: systemd >= 256's ssh generator probes
# AF_VSOCK (loading the vsock modules) to offer sshd on sockets no cloud uses.
MASK_GENERATORS = ("systemd-ssh-generator",)


def prepared_name(name: str, kernel: str = CLOUD_KERNEL) -> str:
    """NAME+vm, or NAME+vm-FLAVOUR for another kernel than the cloud one: a separate image."""
    base = name.removesuffix(PREPARED)
    return base + PREPARED + ("" if kernel == CLOUD_KERNEL else f"-{kernel}")


def kernel_for(drivers: str) -> str:
    """The kernel flavour a platform's drivers row needs."""
    return INITRAMFS_MODULES[drivers].kernel


def packages_for(distro: distros.Distro, table: dict[str, VmPackages] | None = None, what: str = "VMs") -> VmPackages:
    table = PACKAGES if table is None else table
    if table is PACKAGES and distro.id in DISTRO_PACKAGES:
        return DISTRO_PACKAGES[distro.id]
    if distro.recipe is None or distro.recipe.manager not in table:
        manager = distro.recipe.manager if distro.recipe else "no package manager"
        raise PrepareError(f"cannot prepare {distro.pretty_name} for {what} yet ({manager})", hint="supported: " + ", ".join(table))
    return table[distro.recipe.manager]


def recipe_key(image: store.StoredImage, level: str = "vm", kernel: str = CLOUD_KERNEL) -> str:
    """What a prepared image depends on: its source digest, the kernel flavour, and the
    code and tables of prepare and distros (packages, files, units enabled and masked,
    generators, package-manager recipes). Any change there makes a new key, so a new image."""
    flavour = "" if kernel == CLOUD_KERNEL else f"\0{kernel}"
    text = f"{image.digest}\0{level}{flavour}\0{fingerprint.fingerprint(sys.modules[__name__], distros, build_leftovers)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_prepared(image: store.StoredImage, kernel: str | None = None) -> bool:
    """Prepared as a VM (with the `kernel` flavour, when one is asked for; older images had the cloud one)."""
    prepared = image.manifest.get("prepared")
    if not prepared or prepared.get("for", "vm") != "vm":
        return False
    return kernel is None or prepared.get("kernel_flavour", CLOUD_KERNEL) == kernel


def prepare(image: store.StoredImage, *, kernel: str = CLOUD_KERNEL, force: bool = False) -> store.StoredImage:
    """The image prepared to boot as a VM (NAME+vm, NAME+vm-generic for the generic kernel):
    kernel, initramfs, cloud-init, sshd, DHCP; built first if missing or stale."""
    if is_prepared(image, kernel):
        return image
    if is_prepared(image):  # prepared with another kernel: prepare its source again
        origin = image.manifest["prepared"]["from"]
        source = store.lookup(origin)
        if source is None:
            raise PrepareError(f"{image.name} has another kernel and its source {origin} is gone", hint=f"racker pull {origin}")
        image = source
    table = RC_PACKAGES if _keeps_its_rc_init(image) else PACKAGES
    return _prepared(image, "vm", prepared_name(image.name, kernel), table, force=force, kernel=kernel)


def _keeps_its_rc_init(image: store.StoredImage) -> bool:
    """Whether the image's init is sysvinit or OpenRC, which its VM keeps (RC_PACKAGES): installing
    systemd would boot another system than the image's and report that one. runit is refused in one
    line: Debian's cloud-init has no runit service, so the seed's user and key would never arrive."""
    try:
        init = inits.detect(image.rootfs)
    except UnknownInit:
        return False  # no init racker knows: systemd-sysv becomes its init, as for images with none
    if isinstance(init, inits.Runit):
        raise PrepareError(
            f"cannot prepare {image.name} for VMs: its init is runit, and Debian's cloud-init ships no runit service"
            " (only systemd units and /etc/init.d scripts), so no boot would take the seed's user and SSH key",
            hint="it boots under nspawn (racker run, racker check --engine nspawn)",
        )
    return init is not None and not isinstance(init, inits.Systemd)


def bootable(image: store.StoredImage, *, force: bool = False) -> store.StoredImage:
    """An image systemd-nspawn can boot: `image` itself if its init is one racker knows
    (systemd, sysvinit, OpenRC: racker.machines.inits), else NAME+boot, with its distribution's systemd,
    D-Bus and sshd installed (the original untouched). An init racker does not know is
    UnknownInit: installing systemd over it would boot another system than the image's."""
    if inits.detect(image.rootfs) is not None:
        return image
    return _prepared(image, "boot", image.name + BOOTABLE, BOOT_PACKAGES, force=force)


def _prepared(
    image: store.StoredImage, level: str, name: str, table: dict[str, VmPackages], *, force: bool, kernel: str = CLOUD_KERNEL
) -> store.StoredImage:
    recipe = recipe_key(image, level, kernel)
    found = store.lookup(name)
    if found is not None and found.recipe == recipe and not force:
        return found
    with store.locked(f"image-{name}"):
        found = store.lookup(name)
        if found is not None and found.recipe == recipe and not force:
            return found
        twin = None if force else _prepared_twin(recipe, level)
        if twin is not None:  # the same filesystem, prepared under another name: name it again
            manifest = _prepared_manifest(image, name, dict(twin.manifest["prepared"], **{"from": image.name}), twin.manifest["distro"])
            return store.name_image(name, twin, source=f"prepare:{image.name}", recipe=recipe, manifest=manifest)
        distro = distros.detect(image.rootfs)
        packages = packages_for(distro, table, "VMs" if level == "vm" else "booting under systemd-nspawn")
        if level == "vm":
            packages = _with_kernel(packages, kernel, distro, image_architecture(image))
        with progress.step(f"preparing {name}"), store.workdir("prepare") as work:
            rootfs = work / "rootfs"
            with progress.step("copying"), store.reading(image) as source:
                proc.run(["cp", "-a", "--reflink=auto", str(source), str(rootfs)], timeout=600)
            own_links = build_leftovers.kernel_links(rootfs)  # the image's own stay; the kernel package's go
            # The source's clock (its archive's Release date): what the package scripts stamp
            # (shadow's last-change day, the initramfs's mtimes) is the same at every prepare.
            epoch = reproducible.of(image.manifest)
            installed = _install(rootfs, distro, packages, epoch)
            if epoch is not None:
                recompile_python(rootfs, epoch)
            verified = bool(distro.recipe and distro.recipe.verified)
            record = {"for": level, "from": image.name, "from_digest": image.digest, "packages": installed, "recipe_verified": verified}
            if level == "vm":
                configure(rootfs, own_links, epoch, image_architecture(image))
                record["kernel"] = find_kernel(rootfs).version
                record["kernel_flavour"] = kernel
            manifest = _prepared_manifest(image, name, record, distros.detect(rootfs).as_json())
            if epoch is not None:
                reproducible.clamp_mtimes(rootfs, epoch)
            with progress.step("storing"):
                return store.commit(name, rootfs, source=f"prepare:{image.name}", recipe=recipe, manifest=manifest)


def image_architecture(image: store.StoredImage) -> str:
    """The image's architecture in Debian's words: the platform its manifest records, else the host's."""
    from racker.store import platforms

    arch = (platforms.of_manifest(image.manifest) or platforms.host()).architecture
    return {"386": "i386", "arm": "armhf"}.get(arch, arch)


def _with_kernel(packages: VmPackages, kernel: str, distro: distros.Distro, arch: str) -> VmPackages:
    """The package row with the kernel of flavour `kernel` for `arch` installed first, and what `arch` needs besides."""
    if kernel not in packages.kernels:
        raise PrepareError(f"no {kernel} kernel for {distro.pretty_name}", hint="kernels: " + ", ".join(packages.kernels))
    extra = packages.arch_packages.get(arch, ())
    return dataclasses.replace(packages, required=(packages.kernels[kernel].format(arch=arch), *packages.required, *extra))


def _prepared_twin(recipe: str, level: str) -> store.StoredImage | None:
    """An image prepared from the same digest by the same code under another name
    (docker://debian:bookworm and its oci-archive: export, say): the recipe key says so."""
    for candidate in store.images():
        prepared = candidate.manifest.get("prepared") or {}
        if candidate.recipe == recipe and prepared.get("for", "vm") == level and "distro" in candidate.manifest:
            return candidate
    return None


def _prepared_manifest(image: store.StoredImage, name: str, record: dict, distro: dict) -> dict:
    """The source image's manifest (its config: Entrypoint, Env… stay its own), as prepared."""
    manifest = dict(image.manifest, name=name, prepared=record, distro=distro)
    for key in ("digest", "size", "created", "source"):
        manifest.pop(key, None)
    return manifest


def _install(rootfs: Path, distro: distros.Distro, packages: VmPackages, epoch: int | None = None) -> list[str]:
    with imagetree.refused(PrepareError, "cannot prepare the image"):
        return _install_packages(rootfs, distro, packages, epoch)


def _install_packages(rootfs: Path, distro: distros.Distro, packages: VmPackages, epoch: int | None = None) -> list[str]:
    recipe = distro.recipe
    assert recipe is not None
    if not recipe.verified:
        progress.warn(f"the {recipe.manager} recipe is unverified (no {distro.id} mirror was reachable when it was written)")
    tree = imagetree.Tree(rootfs)
    for rel, text in packages.pre_files.items():
        write_file(rootfs, rel, text, mode=0o755 if text.startswith("#!") else 0o644)
    resolv = "etc/resolv.conf"
    saved_resolv = _save_link_or_file(tree, resolv)
    env = {**recipe.env, **reproducible.environment(epoch)}
    try:
        with progress.step("updating the package index"):
            in_container(rootfs, recipe.update, env=env)
        wanted = list(packages.required)
        for optional in packages.optional:
            if recipe.available and in_container(rootfs, (*recipe.available, optional), env=env, check=False).succeeded:
                wanted.append(optional)
        with progress.step(f"installing {len(wanted)} packages"):
            in_container(rootfs, (*recipe.install, *wanted), env=env, timeout=1800)
        if recipe.clean:
            in_container(rootfs, recipe.clean, env=env)
    finally:
        tree.unlink("usr/sbin/policy-rc.d", missing_ok=True)
        _restore_link_or_file(tree, resolv, saved_resolv)
    return wanted


# Recompiles the .pyc files already there (none added), each in its own invalidation mode,
# in one process whose string hash is fixed (PYTHONHASHSEED in the environment).
RECOMPILE_PYC = """
import os, py_compile, sys
modes = {0: py_compile.PycInvalidationMode.TIMESTAMP, 1: py_compile.PycInvalidationMode.UNCHECKED_HASH,
         3: py_compile.PycInvalidationMode.CHECKED_HASH}
tag = sys.implementation.cache_tag
for top in sys.argv[1:]:
    for directory, dirs, files in os.walk(top):
        dirs.sort()
        if os.path.basename(directory) != "__pycache__":
            continue
        for name in sorted(files):
            if not name.endswith("." + tag + ".pyc"):
                continue
            source = os.path.join(os.path.dirname(directory), name[: -len("." + tag + ".pyc")] + ".py")
            pyc = os.path.join(directory, name)
            with open(pyc, "rb") as handle:
                flags = int.from_bytes(handle.read(8)[4:8], "little")
            if os.path.isfile(source) and flags in modes:
                py_compile.compile(source, cfile=pyc, invalidation_mode=modes[flags], doraise=False)
"""


def recompile_python(rootfs: Path, epoch: int) -> None:
    """Python before 3.11 marshals a frozenset constant in its string-hash order, and the packages'
    postinsts compile the standard library with `python3.N -E`, which ignores PYTHONHASHSEED: its
    .pyc files differed from build to build (bullseye's 3.9). They are compiled again with one seed."""
    tree = imagetree.Tree(rootfs)
    for lib in tree.glob("usr/lib/python3.*"):
        minor = lib.rsplit(".", 1)[-1]
        if not (minor.isdigit() and int(minor) < 11 and tree.is_file(f"usr/bin/python3.{minor}")):
            continue
        tops = [f"/{lib}", *(["/usr/lib/python3/dist-packages"] if tree.is_dir("usr/lib/python3/dist-packages") else [])]
        with progress.step(f"compiling python3.{minor}'s .pyc files with one string hash"):
            in_container(rootfs, (f"/usr/bin/python3.{minor}", "-c", RECOMPILE_PYC, *tops), env=reproducible.environment(epoch))


def configure(rootfs: Path, own_links: frozenset[str] = frozenset(), epoch: int | None = None, arch: str = "amd64") -> None:
    """Write the configuration every cloud VM needs and enable its services, by the image's own
    init's means; then DNS from the platform and nothing of the build (the last step:
    in_container puts the host's resolv.conf in)."""
    with imagetree.refused(PrepareError, "cannot configure the image"):
        try:
            init = inits.detect(rootfs)
        except UnknownInit:
            init = None  # prepare() gave it systemd-sysv, as an image without an init
        if init is None or isinstance(init, inits.Systemd):
            _configure(rootfs, own_links, epoch)
        else:
            _configure_rc(rootfs, own_links, epoch, SERIAL_TTYS.get(arch, "ttyS0"))


def _configure_rc(rootfs: Path, own_links: frozenset[str], epoch: int | None, tty: str) -> None:
    """sysvinit or OpenRC: ifupdown, init.d links, a getty in inittab; nothing of systemd's."""
    tree = imagetree.Tree(rootfs)
    for rel, text in RC_CONFIG_FILES.items():
        write_file(rootfs, rel, text)
    inittab = [line for line in tree.read_text("etc/inittab").splitlines() if not line.startswith("T0:")]
    write_file(rootfs, "etc/inittab", "\n".join([*inittab, RC_GETTY.format(tty=tty)]) + "\n")
    clock = reproducible.environment(epoch)
    for service in RC_SERVICES:
        if tree.is_file(f"etc/init.d/{service}"):
            in_container(rootfs, ("update-rc.d", service, "defaults"), env=clock)
    _first_boot_makes(tree)
    remove_leftovers(rootfs)
    cloud_dns(rootfs, dhclient=True)
    remove_build_leftovers(rootfs, own_links)


def _configure(rootfs: Path, own_links: frozenset[str], epoch: int | None) -> None:
    tree = imagetree.Tree(rootfs)
    for rel, text in CONFIG_FILES.items():
        write_file(rootfs, rel, text)
    units = [u for u in ENABLE_UNITS if _unit_exists(tree, u)]
    units += [u for u in OPTIONAL_ENABLE_UNITS if _unit_exists(tree, u)]
    clock = reproducible.environment(epoch)
    in_container(rootfs, ("systemctl", "enable", *units), env=clock)
    in_container(rootfs, ("systemctl", "mask", *MASK_UNITS), env=clock)
    for generator in MASK_GENERATORS:
        link = f"etc/systemd/system-generators/{generator}"
        tree.mkdir("etc/systemd/system-generators")
        if not tree.is_symlink(link):
            tree.symlink("/dev/null", link)
    mark_updated(rootfs)
    _first_boot_makes(tree)
    remove_leftovers(rootfs)
    cloud_dns(rootfs)
    remove_build_leftovers(rootfs, own_links)


def _first_boot_makes(tree: imagetree.Tree) -> None:
    """First boot makes these: an empty machine-id, no SSH host keys, no apt lists."""
    for key in tree.glob("etc/ssh/ssh_host_*"):
        tree.unlink(key)
    tree.write_text("etc/machine-id", "", mode=0o444)
    dbus_id = "var/lib/dbus/machine-id"
    if tree.lexists(dbus_id):
        tree.symlink("/etc/machine-id", dbus_id, replace=True)
    for stale in ("var/lib/cloud", "etc/hostname"):
        tree.rmtree(stale)


def remove_leftovers(rootfs: Path) -> None:
    """Unlink the build's LEFTOVERS (in a hard-linked tree, the link only: the store keeps its copy)."""
    tree = imagetree.Tree(rootfs)
    for pattern in LEFTOVERS:
        for rel in tree.glob(pattern):
            if tree.is_symlink(rel) or tree.is_file(rel):
                tree.unlink(rel)


# -- DNS from the platform, nothing of the build host or the build (issue 28) ------------
# Debian's cloud images (debian-cloud-images, bookworm's SYSTEM_BOOT class: 20-enable-systemd-resolved)
# install systemd-resolved, enable it and link /etc/resolv.conf to the file it writes of the servers
# the network gave (not its 127.0.0.53 stub); networkd hands resolved its DHCP lease's DNS. They
# leave out libnss-resolve (debian-cloud, 2024-03), and so does this.
RESOLV_CONF = "etc/resolv.conf"
CLOUD_DNS = "/run/systemd/resolve/resolv.conf"
RESOLVED_UNIT = "systemd-resolved.service"


def cloud_dns(rootfs: Path, *, dhclient: bool = False) -> None:
    """/etc/resolv.conf as the distribution's cloud images have it: resolved's list of the DHCP
    lease's servers; without resolved, an empty file (never the build host's resolvers), which
    dhclient (`dhclient`: the image's DHCP client) fills with its lease's."""
    tree = imagetree.Tree(rootfs)  # /etc may be a link: it resolves inside the image
    if tree.is_dir(RESOLV_CONF) and not tree.is_symlink(RESOLV_CONF):
        raise PrepareError(f"/{RESOLV_CONF} is a directory in the image")
    tree.unlink(RESOLV_CONF, missing_ok=True)
    if _unit_exists(tree, RESOLVED_UNIT) and not dhclient:
        tree.symlink(CLOUD_DNS, RESOLV_CONF)
    elif dhclient:
        tree.write_text(RESOLV_CONF, "")
    else:
        progress.warn(f"no {RESOLVED_UNIT} in the image: /{RESOLV_CONF} is left empty, DHCP's DNS servers will not reach it")
        tree.write_text(RESOLV_CONF, "")


def remove_build_leftovers(rootfs: Path, own_links: frozenset[str] = frozenset()) -> None:
    """What the build left (build_leftovers.RULES: /run, /tmp, apt's lists and caches, the kernel
    package's links at / but the image's own) and apt proxy settings of the build host."""
    build_leftovers.remove(rootfs, keep=own_links)
    tree = imagetree.Tree(rootfs)
    for rel in build_leftovers.host_traces_apt_proxy(rootfs):
        text = tree.read_text(rel)
        tree.write_bytes(rel, build_leftovers.APT_PROXY.sub("", text).encode(), tree.stat(rel).st_mode & 0o7777)


def mark_updated(rootfs: Path) -> None:
    """Write now what systemd-update-done writes at first boot: /etc and /var are
    up to date with /usr, so every first boot need not rerun ldconfig and the catalog."""
    tree = imagetree.Tree(rootfs)
    usr = tree.stat("usr").st_mtime_ns
    for directory in ("etc", "var"):
        write_file(rootfs, f"{directory}/.updated", f"# Written by racker prepare, as systemd-update-done does.\nTIMESTAMP_NSEC={usr}\n")
        tree.utime(f"{directory}/.updated", ns=(usr, usr))


def _unit_exists(tree: imagetree.Tree, unit: str) -> bool:
    return any(tree.exists(f"{d}/{unit}") for d in ("lib/systemd/system", "usr/lib/systemd/system", "etc/systemd/system"))


def _save_link_or_file(tree: imagetree.Tree, rel: str) -> tuple[str, str | bytes] | None:
    if tree.is_symlink(rel):
        return ("link", tree.readlink(rel))
    if tree.is_file(rel):
        return ("file", tree.read_bytes(rel))
    return None


def _restore_link_or_file(tree: imagetree.Tree, rel: str, saved: tuple[str, str | bytes] | None) -> None:
    tree.unlink(rel, missing_ok=True)
    if saved is None:
        return
    kind, value = saved
    if kind == "link":
        tree.symlink(value, rel)  # type: ignore[arg-type]
    else:
        tree.write_bytes(rel, value)  # type: ignore[arg-type]


def write_file(rootfs: Path, rel: str, text: str, mode: int = 0o644) -> None:
    """Replace a file inside a root filesystem, its directories resolved inside it; never write through a link."""
    try:
        imagetree.Tree(rootfs).write_text(rel, text, mode)
    except OSError as err:
        raise PrepareError(f"cannot write /{rel} in the image: {err.strerror}") from None


def in_container(
    rootfs: Path,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 900,
) -> proc.Result:
    """Run one command inside the image with systemd-nspawn, sharing the host's network.

    The machine gets a name of its own: left to itself nspawn names it after the directory,
    `rootfs` for every image in the store, and two prepares at once would share (and remove
    under each other) /run/systemd/nspawn/propagate/rootfs."""
    name = machines.unique_name("racker-prepare")
    nspawn = [
        "systemd-nspawn", "--quiet", f"--directory={rootfs}", f"--machine={name}", "--register=no", "--keep-unit",
        "--console=pipe", "--resolv-conf=replace-host", "--link-journal=no", "--timezone=off",
        *(f"--setenv={k}={v}" for k, v in (env or {}).items()),
        "--", *argv,
    ]  # fmt: skip
    try:
        result = proc.run(nspawn, timeout=timeout, check=False)
    finally:
        machines.remove_propagate_dir(name)  # nspawn cannot where /run is no tmpfs, nor when killed
    # Where /run is no tmpfs, nspawn ends every run with this line: it would hide the real
    # error, the last line of stderr, that ToolFailed's message shows.
    lines = result.stderr_bytes.splitlines(keepends=True)
    result.stderr_bytes = b"".join(line for line in lines if not line.startswith(NSPAWN_PROPAGATE_NOISE))
    result.__dict__.pop("stderr", None)  # decoded anew
    if check and result.failed:
        raise ToolFailed(nspawn, result.returncode, result.stderr)
    return result


NSPAWN_PROPAGATE_NOISE = b"Attempted to remove disk file system under"


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: str  # paths relative to the root
    initrd: str


def find_kernel(rootfs: Path) -> Kernel:
    """The newest kernel and its initramfs in /boot; PrepareError when there is none."""
    tree = imagetree.Tree(rootfs)
    found = []
    for vmlinuz in tree.glob("boot/vmlinuz-*") if tree.is_dir("boot") else []:
        version = vmlinuz.removeprefix("boot/vmlinuz-")
        for initrd in (f"initrd.img-{version}", f"initramfs-{version}.img"):
            if tree.is_file(f"boot/{initrd}"):
                found.append(Kernel(version, vmlinuz, f"boot/{initrd}"))
    if not found:
        hint = "prepare the image first: racker promote does it for you"
        raise PrepareError(f"no kernel with an initramfs in {rootfs / 'boot'}", hint=hint)
    return max(found, key=lambda k: _version_key(k.version))


def kernel_modules(rootfs: Path, kernel: Kernel) -> set[str]:
    """The modules `kernel` has, built in or as files (names with _, as modprobe takes them)."""
    tree = imagetree.Tree(rootfs)
    directory = f"lib/modules/{kernel.version}"
    builtin = f"{directory}/modules.builtin"
    names = [Path(line).name for line in tree.read_text(builtin).splitlines()] if tree.is_file(builtin) else []
    names += [Path(rel).name for rel in tree.walk_files(directory) if ".ko" in Path(rel).name]
    return {name.split(".ko")[0].replace("-", "_") for name in names}


def missing_drivers(rootfs: Path, kernel: Kernel, drivers: str) -> list[str]:
    """The modules of a platform's drivers row that `kernel` lacks."""
    present = kernel_modules(rootfs, kernel)
    return [m for m in INITRAMFS_MODULES[drivers].modules if m not in present]


def _version_key(version: str) -> list[tuple[int, str]]:
    import re

    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]
