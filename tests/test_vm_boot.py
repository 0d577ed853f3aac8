"""Real QEMU boots of promoted disks: every catalogue release, BIOS and UEFI, and every output
format, each on the stand-in for its platform; six boots in all (MATRIX, and the Firecracker rootfs).

A format is booted as one release's case of the matrix, with its cloud profile and on its
platform's board, so that each boot the matrix needs anyway covers a format too. Formats that
are the booted raw disk converted (no datasource, kernel or board of their own) are compared with
that disk instead of booted (SAME_DISK_FORMATS).

What only a real boot shows is asserted by racker's built-in full-boot
checks (racker.checks.test_vm), the ones users run, against each test's VM:
sshd, cloud-init, DHCP, the root grown to the disk, identity and health, and
a cloud profile's requirements. Prepared images and cached disks stay in the store, so a second
run boots at once.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_promote import assert_firecracker_config

from conftest import CATALOG_IMAGES, ROOT, racker
from racker import images, machines, prepare, promote, store
from racker.checks import guest
from racker.report import SEVERITY
from racker.report.results import read_tests
from racker.sources import bootstrap, diskfile, ext
from racker.vm.qemu import VM

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

GiB = 1024**3
DISK = 2 * GiB  # what promote writes
GROWN = 3 * GiB  # what the VM's overlay offers: the root must grow to fill it


@dataclass(frozen=True)
class Case:
    """One boot of the matrix: a catalogue release and its firmware, promoted to `fmt` with
    `profile`, and booted on the board and with the kernel that format's platform has."""

    name: str
    firmware: str
    fmt: str = "raw"
    profile: str = "generic"

    @property
    def id(self) -> str:
        # Not "debian-bookworm-…": the scheduler would take that for a racker target's id and
        # send every such test to one worker; each boot here is a scope of its own.
        return "-".join([self.name.removeprefix("debian-"), self.firmware, *([self.fmt] if self.fmt != "raw" else [])])

    @property
    def board(self) -> str:
        return PLATFORM_BOARD.get(self.fmt, "pc")

    @property
    def kernel(self) -> str:
        """The kernel the format's platform needs drivers from: a vdi gets the generic one (ahci, e1000)."""
        return prepare.kernel_for(promote.formats.get(self.fmt).drivers)


# Every release once, the firmware alternating, and bookworm with both: five boots. Besides the
# checks users run (sshd, cloud-init, DHCP, the root grown, identity, health, and the requirements
# of the disk's profile that a boot shows), each covers:
# - bookworm, bios, raw: started and stopped by the CLI (racker vm start boots the image's cached
#   disk), each check broken once (BREAKS); vmdk, vhdx and qcow2 compared with its disk.
# - bookworm, uefi, vdi: VirtualBox's SATA and e1000 with the generic kernel, DigitalOcean's
#   profile (a vdi is one of its formats), the user-data modules (USER_DATA_CASE).
# - bullseye, uefi, gce with gcp: GCE's tar.gz, the profile's NTP drop-in. The one profile bullseye
#   meets: it has no security suite (digitalocean) and cloud-init 20.4 (azure wants 21.2).
# - sid, bios, raw: sid's cloud-init keeps its version where racker does not read it, so no profile takes it.
# - trixie, uefi, a fixed vhd with azure, on Hyper-V's SCSI stand-in.
# The Firecracker rootfs boots on its own (test_the_firecracker_rootfs_boots_on_its_stand_in).
BOOKWORM_BIOS = Case("debian-bookworm", "bios")
BOOKWORM_UEFI = Case("debian-bookworm", "uefi", "vdi", "digitalocean")
BULLSEYE_UEFI = Case("debian-bullseye", "uefi", "gce", "gcp")
SID_BIOS = Case("debian-sid", "bios")
TRIXIE_UEFI = Case("debian-trixie", "uefi", "vhd", "azure")
MATRIX = [BOOKWORM_BIOS, BOOKWORM_UEFI, BULLSEYE_UEFI, SID_BIOS, TRIXIE_UEFI]

# Each check of racker.checks.test_vm, broken in a running VM by one command, and what its failure says.
BREAKS: dict[str, tuple[str, str]] = {
    "test_ssh_password_and_root_login_refused": (
        "printf 'PasswordAuthentication yes\\nPermitRootLogin yes\\n' >/etc/ssh/sshd_config.d/00-racker-broken.conf"
        " && systemctl reload ssh",
        "expected sshd -T: passwordauthentication no, saw 'yes'",
    ),
    "test_no_failed_units": ("systemd-run --unit=racker-broken --quiet false", "racker-broken.service loaded failed"),
    "test_cloud_init_done_without_errors": (
        "echo 'Traceback (most recent call last): racker-broken' >>/var/log/cloud-init.log",
        "expected no Traceback in /var/log/cloud-init.log",
    ),
    "test_cloud_init_applied_the_seed": ("hostname racker-broken", "saw 'racker-broken'"),
    "test_time_sync_active": ("systemctl stop systemd-timesyncd", "expected systemd-timesyncd active"),
    "test_fstab_names_root_by_uuid": ("sed -i 's|^UUID=[^ ]* / |/dev/vda1 / |' /etc/fstab", "saw '/dev/vda1'"),
    "test_machine_id_made_on_this_boot": ("touch -d @1000 /etc/machine-id", "expected /etc/machine-id made on this boot"),
    "test_host_keys_made_on_this_boot": (
        "touch -d @1000 /etc/ssh/ssh_host_ed25519_key",
        "older (shipped in the image): /etc/ssh/ssh_host_ed25519_key",
    ),
    # A nameserver baked into the image, as the build host's was (issue 28): not what DHCP gave, and silent.
    "test_nameserver_from_dhcp_answers": (
        "rm -f /etc/resolv.conf && echo 'nameserver 192.0.2.53' >/etc/resolv.conf",
        "expected the nameservers in use to be those DHCP gave (10.0.2.3), saw ['192.0.2.53']",
    ),
    # The leased address made permanent, as a static one is (no lifetime): what DHCP gave is gone,
    # whichever record of the lease (files, networkd's JSON) the guest keeps.
    "test_first_nic_configured_by_dhcp": (
        "ip -o -4 addr show scope global | while read -r _ dev _ cidr _; do"
        " ip addr change $cidr dev $dev valid_lft forever preferred_lft forever; done",
        "to be leased (dynamic)",
    ),
}


def run_checks(vm: VM, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, dict]]:
    """racker.checks.test_vm, as a user runs it, against this running VM: {check name: its result}."""
    results = tmp_path / f"checks-{len(list(tmp_path.glob('checks-*')))}.jsonl"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "racker.checks.test_vm"]
    argv += [f"--racker-attach={vm.name}", f"--racker-results={results}", "-q", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    records = read_tests(results) if results.exists() else []
    by_check: dict[str, dict] = {}
    for record in records:  # a parametrised check: its worst outcome, as `racker check` shows it
        seen = by_check.get(record["check"])
        if seen is None or SEVERITY[record["outcome"]] > SEVERITY[seen["outcome"]]:
            by_check[record["check"]] = record
    return done, by_check


def assert_checks_pass(vm: VM, tmp_path: Path, *args: str) -> dict[str, dict]:
    done, found = run_checks(vm, tmp_path, *args)
    failed = {name: r["message"] for name, r in found.items() if r["outcome"] in ("fail", "error")}
    assert done.returncode == 0 and found and not failed, failed or done.stdout[-3000:] + done.stderr[-2000:]
    return found


def assert_broken_checks_fail(vm: VM, tmp_path: Path) -> None:
    """Break each property in the running VM: its own check fails, saying what it saw; the others still pass."""
    vm.check_output(["sh", "-c", "\n".join(command for command, _ in BREAKS.values())])
    done, found = run_checks(vm, tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    for name, (_command, message) in BREAKS.items():
        assert found[name]["outcome"] == "fail", (name, found[name])
        assert message in found[name]["message"], (name, found[name]["message"])
    assert {n for n, r in found.items() if r["outcome"] == "fail"} == set(BREAKS)


# What building an image leaves behind, and a promoted disk must not hold (issue 12): (directory, glob).
BUILD_LEFTOVERS = (
    ("/var/log", "dpkg.log"), ("/var/log", "alternatives.log"), ("/var/log/apt", "history.log"),
    ("/var/log/apt", "term.log"), ("/var/lib/apt/lists", "*_*"), ("/var/cache/apt", "*.bin"),
    ("/var/cache/debconf", "*-old"),
)  # fmt: skip


def disk_names(fs: str, directory: str, work: Path) -> list[str]:
    """The names in a directory of the disk's root filesystem (debugfs `ls -p`: /inode/mode/uid/gid/name/size/)."""
    ((_request, output),) = ext.debugfs(fs, [f'ls -p "{directory}"'], work, timeout=60)
    return [line.split("/")[5] for line in output.splitlines() if line.count("/") >= 6]


def assert_cloud_defaults_on_disk(raw: Path, root_offset: int, name: str, work: Path) -> None:
    """Read back from the disk as built (`raw`: it, or its raw image): the release's security suite
    in apt's sources, no build leftovers."""
    fs = ext.device(raw, root_offset)
    sources = (ext.read_file(fs, "/etc/apt/sources.list", work) or b"").decode()
    suite = name.removeprefix("debian-")
    if ("debian", suite) not in bootstrap.SECURITY_SUITES:  # sid; bullseye, past its LTS
        assert "-security" not in sources, sources
    else:  # on the host of the image's main mirror, as Debian's cloud images list it
        host = bootstrap.mirror("debian").removesuffix("/").rpartition("/")[0]
        assert f"deb {host}/debian-security {suite}-security main" in sources.splitlines(), sources
    left = {f"{d}/{n}" for d, pattern in BUILD_LEFTOVERS for n in fnmatch.filter(disk_names(fs, d, work), pattern)}
    assert not left, f"build leftovers in the promoted disk: {sorted(left)}"


# The MATRIX case whose seed carries USER_DATA's modules too, asserted in its one boot:
# what racker's cut-down module lists used to accept and silently ignore.
USER_DATA_CASE = BOOKWORM_UEFI
REPO = "/opt/racker-repo"  # a flat apt repository the seed itself carries (no archive needed)
NTP_SERVER = "ntp.racker.test"
HELLO_CONTROL = "Package: racker-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: racker <racker@localhost>\nDescription: racker test\n"

USER_DATA_FACTS = """\
echo "package=$(dpkg-query -W -f='${Status}' racker-hello 2>&1) $(cat /usr/share/racker-hello/hello 2>&1)"
echo "shadow=$(getent shadow racker-pw | cut -d: -f2)"
echo "ntp=$(timedatectl show-timesync -p SystemNTPServers --value 2>&1)"
echo "apt_source=$(cat /etc/apt/sources.list.d/racker-test.list 2>&1 | grep -v '^#')"
echo "apt_conf=$(apt-config dump APT::Racker-Test 2>&1)"
echo "deferred=$(cat /var/lib/racker-deferred 2>&1)"
"""


def user_data(work: Path) -> tuple[dict, dict[str, str]]:
    """(cloud-config, what the booted VM then shows, by USER_DATA_FACTS line)."""
    pkg = work / "racker-hello"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(HELLO_CONTROL)
    (pkg / "usr/share/racker-hello").mkdir(parents=True)
    (pkg / "usr/share/racker-hello/hello").write_text("hello-from-user-data\n")
    deb = work / "racker-hello_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    data = deb.read_bytes()
    index = HELLO_CONTROL + f"Filename: ./{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
    subject = ["-subj", "/CN=racker user-data CA", "-days", "2", "-nodes", "-keyout", str(work / "ca.key")]
    ca = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", *subject],
                        check=True, capture_output=True, text=True).stdout  # fmt: skip
    hashed = subprocess.run(["openssl", "passwd", "-6", "-salt", "rackersalt", "not-a-secret"], check=True, capture_output=True, text=True)
    config = {
        "write_files": [
            {"path": f"{REPO}/{deb.name}", "encoding": "b64", "content": base64.b64encode(data).decode()},
            {"path": f"{REPO}/Packages", "content": index},
            {"path": "/var/lib/racker-deferred", "content": "written-late\n", "defer": True},
        ],
        "apt": {
            "preserve_sources_list": False,
            "sources_list": "# racker's test: only the repository its seed carries (see sources.list.d)\n",
            "sources": {"racker-test.list": {"source": f"deb [trusted=yes] file:{REPO} ./"}},
            "conf": 'APT::Racker-Test "written-by-user-data";\n',
        },
        "packages": ["racker-hello"],
        "users": [{"name": "racker-pw", "lock_passwd": False, "shell": "/bin/bash"}],
        "chpasswd": {"expire": False, "users": [{"name": "racker-pw", "password": hashed.stdout.strip(), "type": "hash"}]},
        "ntp": {"enabled": True, "servers": [NTP_SERVER]},
        "ca_certs": {"trusted": [ca]},
    }
    expected = {
        "package": "install ok installed hello-from-user-data",
        "shadow": hashed.stdout.strip(),
        "ntp": NTP_SERVER,
        "apt_source": f"deb [trusted=yes] file:{REPO} ./",
        "apt_conf": 'APT::Racker-Test "written-by-user-data";',
        "deferred": "written-late",
    }
    return config, expected | {"ca": "".join(ca.split("-----")[2].split())}


def assert_user_data_applied(vm: VM, expected: dict[str, str]) -> None:
    found = dict(line.split("=", 1) for line in vm.check_output(["sh", "-c", USER_DATA_FACTS]).splitlines() if "=" in line)
    assert {k: found.get(k) for k in expected if k != "ca"} == {k: v for k, v in expected.items() if k != "ca"}
    bundle = "".join(vm.check_output(["cat", "/etc/ssl/certs/ca-certificates.crt"]).split())
    assert expected["ca"] in bundle, "ca_certs: the user-data's CA is not in the system's bundle"


# Formats whose disk is the raw disk converted: no datasource of their own, the cloud kernel,
# racker's own board. Each is compared, sector by sector, with the raw disk that SAME_DISK_CASE
# boots (qemu-img reads it through the block driver QEMU would boot it with) instead of booting it.
# Format -> promote's compress: qcow2's clusters compressed, as a cloud profile's upload has them.
SAME_DISK_FORMATS = {"vmdk": None, "vhdx": None, "qcow2": True}
SAME_DISK_CASE = BOOKWORM_BIOS


def assert_formats_hold_the_booted_disk(image: store.StoredImage, booted: Path, work: Path) -> None:
    for fmt, compress in SAME_DISK_FORMATS.items():
        spec = promote.formats.get(fmt)
        assert not spec.datasources and prepare.kernel_for(spec.drivers) == prepare.CLOUD_KERNEL and fmt not in PLATFORM_BOARD, (
            f"{fmt} is no longer the booted raw disk converted: boot it as a case of MATRIX"
        )
        output = work / f"same-disk{spec.suffix}"
        promote.promote(image, output, promote.Options(fmt=fmt, firmware=SAME_DISK_CASE.firmware, size=DISK, compress=compress))
        info = json.loads(
            subprocess.run(["qemu-img", "info", "--output=json", str(output)], capture_output=True, text=True, check=True).stdout
        )
        assert info["format"] == spec.qemu_format and info["virtual-size"] == DISK, info
        compared = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", spec.qemu_format, str(booted), str(output)], capture_output=True, text=True
        )
        assert compared.returncode == 0, f"{fmt}: {compared.stdout}{compared.stderr}"


@pytest.fixture(scope="session")
def prepared():
    cache: dict[tuple[str, str], store.StoredImage] = {}

    def get(name: str, kernel: str = prepare.CLOUD_KERNEL) -> store.StoredImage:
        if (name, kernel) not in cache:
            cache[name, kernel] = prepare.prepare(images.pull(name), kernel=kernel)
        return cache[name, kernel]

    return get


# The MATRIX case booted by `racker vm start IMAGE` (the image's cached disk: the disk promote
# writes here, byte for byte) and stopped by `racker vm stop`: the CLI's lifecycle is asserted on
# its one boot, beside everything the library's boots assert.
CLI_CASE = BOOKWORM_BIOS


@contextlib.contextmanager
def started_by_the_cli(name: str, image: store.StoredImage, promoted: Path) -> Iterator[VM]:
    cached = promote.cached_disk(image, CLI_CASE.firmware)
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(promoted), str(cached)], capture_output=True, text=True)
    assert same.returncode == 0, f"racker vm start boots another disk than promote writes: {same.stdout}{same.stderr}"
    vm_name = f"cli-{os.getpid()}"
    started = racker("vm", "start", name, "--name", vm_name, "--disk-size", f"{GROWN // GiB}G", "--timeout", "800", timeout=900)
    assert started.returncode == 0, started.stderr
    try:
        assert started.stdout.strip() == vm_name
        yield VM.attach(vm_name)
    finally:
        stopped = racker("vm", "stop", vm_name)
    assert stopped.returncode == 0, stopped.stderr
    assert racker("vm", "ssh", vm_name, "--", "true").returncode == 125


def assert_cli_lifecycle(vm: VM) -> None:
    """racker vm ps, ssh (the command's exit code passes through) and console, on a VM racker vm start left running."""
    listed = json.loads(racker("vm", "ps", "--json").stdout)
    mine = [v for v in listed if v["name"] == vm.name]
    assert mine and mine[0]["ssh_port"] and mine[0]["firmware"] == "bios", listed
    ran = racker("vm", "ssh", vm.name, "--", "sh", "-c", "hostname; exit 3")
    assert ran.returncode == 3 and ran.stdout.strip() == vm.name, (ran.returncode, ran.stdout, ran.stderr)
    assert "Linux version" in racker("vm", "console", vm.name).stdout


# Each format booted on the stand-in for its platform (boards.BOARDS); others on racker's own.
PLATFORM_BOARD = {"firecracker": "microvm", "vhd": "scsi", "vdi": "sata"}
# Where the booted guest finds its root disk and which driver runs its NIC, on each stand-in.
PLACED_ON = {
    "pc": ("/virtio", "virtio_net"),
    "microvm": ("/platform/LNRO0005:", "virtio_net"),  # a virtio-mmio transport, as ACPI describes it
    "scsi": ("/host0/target0:0:0/0:0:0:0/block/sd", "virtio_net"),  # LUN 0 (sda or sdb), as Hyper-V's storvsc presents it
    "sata": ("/ata1/host0/target0:0:0/0:0:0:0/block/sd", "e1000"),  # AHCI port 0 (ata1), VirtualBox's SATA and PRO/1000
}

# Where the root disk and the NIC sit: the controller and driver a platform presents.
PLACEMENT = r"""
root_disk=$(lsblk -no pkname "$(findmnt -no SOURCE /)" | head -1)
echo "root_source=$(findmnt -no SOURCE /)"
echo "root_device=$(readlink -f "/sys/class/block/${root_disk:-$(basename "$(findmnt -no SOURCE /)")}")"
nic=$(ip -o link show | awk -F': ' '$2 != "lo" {print $2; exit}')
echo "nic_driver=$(basename "$(readlink -f "/sys/class/net/$nic/device/driver")")"
echo "addr=$(ip -o -4 addr show dev "$nic" | awk '{print $4}' | head -1)"
echo "pci_devices=$(ls /sys/bus/pci/devices | wc -l)"
"""


def assert_placed_as_its_platform(vm: VM, board: str) -> None:
    result = vm.run(["sh", "-c", PLACEMENT], timeout=120)
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert found["addr"].startswith("10.0.2.15/"), found  # QEMU user networking's DHCP lease
    disk, nic = PLACED_ON[board]
    assert disk in found["root_device"] and found["nic_driver"] == nic, found
    if board == "microvm":
        assert found["pci_devices"] == "0", found


# The MATRIX case each check of racker.checks.test_vm is broken in, once (BREAKS).
BREAKS_CASE = BOOKWORM_BIOS
# The MATRIX case that shows promote never writes the store image, even with a profile's
# requirements read from a staged copy of its tree.
TREE_KEPT_CASE = BOOKWORM_UEFI


def disk_as_booted(result: promote.Promoted, work: Path) -> tuple[Path, Path]:
    """(what QEMU boots, a raw image of it for debugfs), once the output is checked as its platform
    takes it: each format's own shape, read by qemu-img as the format it claims."""
    spec = promote.formats.get(result.fmt)
    if result.fmt == "raw":
        assert result.path.stat().st_size == DISK
        return result.path, result.path
    if result.fmt == "gce":  # as GCE expects it: a sparse oldgnu tar.gz holding one file, disk.raw
        listing = subprocess.run(["tar", "-tvzf", str(result.path)], capture_output=True, text=True, check=True).stdout.split()
        assert listing[-1] == "disk.raw" and int(listing[2]) % GiB == 0
        subprocess.run(["tar", "-xSzf", str(result.path), "-C", str(work)], check=True)
        return work / "disk.raw", work / "disk.raw"
    if result.fmt == "vhd":  # the raw disk and a footer: debugfs reads it as it is
        assert diskfile.is_fixed_vhd(result.path), "Azure takes fixed VHDs only"
        return result.path, result.path
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(result.path)], capture_output=True, text=True, check=True).stdout
    )
    assert info["format"] == spec.qemu_format and info["virtual-size"] == DISK, info
    raw = work / "as-raw.raw"
    subprocess.run(["qemu-img", "convert", "-f", spec.qemu_format, "-O", "raw", str(result.path), str(raw)], check=True)
    return result.path, raw


@pytest.mark.parametrize("case", MATRIX, ids=lambda case: case.id)
def test_promoted_disk_boots_as_a_cloud_vm(case: Case, prepared, tmp_path: Path) -> None:
    """Each release once (bookworm with both firmwares), each booted as one output format on its
    platform's board with its cloud's profile (see MATRIX): the checks users run pass on every boot,
    and each case asserts what it covers besides."""
    image = prepared(case.name, case.kernel)
    before = store.tree_digest(image.rootfs) if case == TREE_KEPT_CASE else None
    options = promote.Options(fmt=case.fmt, firmware=case.firmware, size=DISK, profile=case.profile)
    result = promote.promote(image, tmp_path / f"{case.id}{promote.formats.get(case.fmt).suffix}", options)
    if before is not None:  # promote never writes the store image (its tree staged for a profile's checks)
        assert case.profile != "generic" and store.tree_digest(image.rootfs) == before == image.digest
    boot, raw = disk_as_booted(result, tmp_path)
    # What only the image can tell: it ships no machine-id and no host keys (the checks see them made at boot).
    assert (image.rootfs / "etc/machine-id").read_text() == "", "the image must ship an empty machine-id"
    assert not list((image.rootfs / "etc/ssh").glob("ssh_host_*")), "the image must ship no SSH host keys"
    assert_cloud_defaults_on_disk(raw, result.layout.root_offset, case.name, tmp_path)
    config, expected = user_data(tmp_path) if case == USER_DATA_CASE else (None, {})
    if case == CLI_CASE:
        booting = started_by_the_cli(case.name, image, result.path)
    else:
        booting = VM(boot, image=image.name, disk_size=GROWN, user_data=config, machine=case.board)
    with booting as vm:
        # The checks users run, on this one boot: sshd, cloud-init, DHCP, root grown to GROWN, identity,
        # health, and the requirements of the profile the disk was promoted with that a boot shows.
        checks = assert_checks_pass(vm, tmp_path)
        boot_seconds = checks["test_boot_time_recorded"]["properties"]["boot_seconds"]
        assert {"kernel", "userspace", "total", "cloud_init"} <= set(boot_seconds), boot_seconds
        assert vm.state is not None and vm.state.extra["firmware"] == case.firmware
        assert "Linux version" in vm.console_log.read_text(errors="replace")
        assert_placed_as_its_platform(vm, case.board)
        if case.profile != "generic":
            assert checks["test_profile_requirements_met"]["outcome"] == "pass", checks["test_profile_requirements_met"]
        if case.profile == "gcp":  # the gcp profile's NTP drop-in configures the time-sync service that runs
            servers = vm.check_output(["timedatectl", "show-timesync", "-p", "SystemNTPServers", "--value"]).split()
            assert servers == ["metadata.google.internal"], servers
        if expected:
            assert_user_data_applied(vm, expected)
        if case == CLI_CASE:
            assert_cli_lifecycle(vm)
        if case == BREAKS_CASE:
            assert_broken_checks_fail(vm, tmp_path)
        rundir = vm.rundir
    assert not rundir.exists()
    assert machines.load("qemu", vm.name) is None
    if case == SAME_DISK_CASE:
        assert_formats_hold_the_booted_disk(image, result.path, tmp_path)


def test_the_firecracker_rootfs_boots_on_its_stand_in(prepared, tmp_path: Path) -> None:
    """Firecracker's boot, on QEMU's microvm: the kernel, initrd and command line its configuration
    names (plus the root=/dev/vda rw Firecracker adds for the root drive), virtio-mmio devices only."""
    image = prepared("debian-bookworm", prepare.kernel_for(promote.formats.get("firecracker").drivers))
    output = tmp_path / f"bookworm{promote.formats.get('firecracker').suffix}"
    result = promote.promote(image, output, promote.Options(fmt="firecracker", size=DISK))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(output)], capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "raw"
    config = json.loads(result.extra["config"].read_text())
    assert_firecracker_config(config)
    source = config["boot-source"]
    assert [source["kernel_image_path"], source["initrd_path"], config["drives"][0]["path_on_host"]] == [
        str(result.extra["vmlinux"]), str(result.extra["initrd"]), str(output)
    ]  # fmt: skip
    assert result.extra["vmlinux"].read_bytes()[:4] == b"\x7fELF", "Firecracker needs an uncompressed ELF kernel"
    append = f"{source['boot_args']} root=/dev/vda rw"
    kernel, initrd = Path(source["kernel_image_path"]), Path(source["initrd_path"])
    with VM(output, image=image.name, machine=PLATFORM_BOARD["firecracker"], kernel=kernel, initrd=initrd, append=append) as vm:
        assert_placed_as_its_platform(vm, PLATFORM_BOARD["firecracker"])
        # A light look, the full checks being run by MATRIX on the same image: one SSH round trip.
        found = guest.gather(vm)
        assert found.out("system_state") == "running", found.out("failed_units")
        assert found.cloud_init_status().get("status") == "done" and not found.cloud_init_status().get("errors")
        assert found.out("root_write") == "racker-write-check"


def test_every_format_profile_and_board_is_booted_or_compared_with_a_booted_disk() -> None:
    """What the six boots stand for: a format, profile or board added later is booted too (a case of
    MATRIX), or shown to be the booted disk converted (SAME_DISK_FORMATS). Boxes and appliances
    hold one of those disks (test_promote pulls them back)."""
    disks = {name for name, spec in promote.formats.FORMATS.items() if not spec.package}
    assert disks == {c.fmt for c in MATRIX} | set(SAME_DISK_FORMATS) | {"firecracker"}
    assert set(promote.profiles.PROFILES) == {c.profile for c in MATRIX}
    assert set(PLACED_ON) == {c.board for c in MATRIX} | {PLATFORM_BOARD["firecracker"]}
    assert sorted(c.name for c in MATRIX if c.name != "debian-bookworm") == sorted(set(CATALOG_IMAGES) - {"debian-bookworm"})
    assert sorted(c.firmware for c in MATRIX if c.name == "debian-bookworm") == ["bios", "uefi"]
