"""Real QEMU boots of promoted disks: every catalogue image, BIOS and UEFI, and every output format.

What only a real boot shows is asserted over SSH with the VM's own key:
sshd, cloud-init done without errors, a DHCP address on the first NIC, a
writable root mounted read-write, the root grown to the disk, a fresh
machine-id. Prepared images and cached disks stay in the store, so a second
run boots at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from test_promote import HOSTILE_ENV

from conftest import CATALOG_IMAGES
from racker import images, machines, prepare, promote, store
from racker.qemu import VM

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

GiB = 1024**3
DISK = 2 * GiB  # what promote writes
GROWN = 3 * GiB  # what the VM's overlay offers: the root must grow to fill it

MATRIX = [
    pytest.param(name, firmware, id=f"{name}-{firmware}", marks=pytest.mark.xdist_group(name))
    for name in CATALOG_IMAGES
    for firmware in ("bios", "uefi")
]

# One SSH round trip for every fact the checks need (each handshake costs under emulation).
FACTS = r"""
set -u
echo "state=$(systemctl is-system-running)"
echo "sshd=$(systemctl is-active ssh)"
echo "cloudinit=$(cloud-init status | sed -n 's/^status: //p')"
echo "ci_errors=$(python3 -c 'import json; print(len(json.load(open("/run/cloud-init/result.json"))["v1"]["errors"]))')"
nic=$(ip -o link show | awk -F': ' '$2 != "lo" {print $2; exit}')
echo "nic=$nic"
echo "addr=$(ip -o -4 addr show dev "$nic" | awk '{print $4}' | head -1)"
echo "dynamic=$(ip -o -4 addr show dev "$nic" | grep -c dynamic)"
echo "root_opts=$(findmnt -no OPTIONS /)"
echo "root_source=$(findmnt -no SOURCE /)"
touch /racker-write-test && rm /racker-write-test && echo "root_writable=yes"
echo "root_size=$(df -B1 --output=size / | tail -1 | tr -d ' ')"
echo "disk_size=$(lsblk -b -dno SIZE /dev/vda)"
echo "machine_id=$(cat /etc/machine-id)"
echo "host_keys=$(ls /etc/ssh/ssh_host_*_key | wc -l)"
echo "cmdline=$(cat /proc/cmdline)"
# sshd -T prints lower-case keys, or (OpenSSH 10) the configuration's own spelling.
echo "pwauth=$(sshd -T 2>/dev/null | awk 'tolower($1) == "passwordauthentication" {print tolower($2)}')"
echo "rootlogin=$(sshd -T 2>/dev/null | awk 'tolower($1) == "permitrootlogin" {print tolower($2)}')"
echo "failed=$(systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
"""


def facts(vm: VM) -> dict[str, str]:
    result = vm.run(["sh", "-c", FACTS], timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def assert_cloud_vm(vm: VM, image: store.StoredImage) -> dict[str, str]:
    found = facts(vm)
    errors = vm.run(["journalctl", "-b", "-p", "err", "--no-pager"]).stdout[-3000:] if found["state"] != "running" else ""
    assert found["state"] == "running", f"failed units: {found['failed']}\n{errors}"
    assert found["sshd"] == "active"
    assert found["cloudinit"] == "done" and found["ci_errors"] == "0", found
    assert found["addr"].startswith("10.0.2.15/"), found  # QEMU user networking's DHCP lease
    assert found["dynamic"] == "1", "the address is not from DHCP"
    assert found["root_opts"].split(",")[0] == "rw", found["root_opts"]
    assert found.get("root_writable") == "yes"
    assert int(found["disk_size"]) == GROWN
    assert int(found["root_size"]) > 0.9 * GROWN, f"root not grown: {found['root_size']} of {GROWN}"
    assert re.fullmatch(r"[0-9a-f]{32}", found["machine_id"]), found["machine_id"]
    assert (image.rootfs / "etc/machine-id").read_text() == "", "the image must ship an empty machine-id"
    assert not list((image.rootfs / "etc/ssh").glob("ssh_host_*")), "the image must ship no SSH host keys"
    assert int(found["host_keys"]) >= 1
    assert "console=ttyS0" in found["cmdline"]
    assert found["pwauth"] == "no" and found["rootlogin"] == "no"
    return found


@pytest.fixture(scope="session")
def prepared():
    cache: dict[str, store.StoredImage] = {}

    def get(name: str) -> store.StoredImage:
        if name not in cache:
            cache[name] = prepare.prepare(images.pull(name))
        return cache[name]

    return get


@pytest.mark.parametrize(("name", "firmware"), MATRIX)
def test_promoted_disk_boots_as_a_cloud_vm(name: str, firmware: str, prepared, tmp_path: Path) -> None:
    image = prepared(name)
    result = promote.promote(image, tmp_path / f"{name}.raw", promote.Options(firmware=firmware, size=DISK))
    assert result.path.stat().st_size == DISK
    with VM(result.path, image=image.name, disk_size=GROWN) as vm:
        found = assert_cloud_vm(vm, image)
        assert vm.state is not None and vm.state.extra["firmware"] == firmware
        console = vm.console_log.read_text(errors="replace")
        assert "Linux version" in console
        rundir = vm.rundir
    assert not rundir.exists()
    assert machines.load("qemu", vm.name) is None
    assert found["root_source"].startswith("/dev/vda")


CONVERTED = ["qcow2", "vmdk", "vhd", "vhdx", "vdi", "gce", "firecracker"]


@pytest.mark.xdist_group("debian-bookworm")
@pytest.mark.parametrize("fmt", CONVERTED)
def test_every_output_format_boots(fmt: str, prepared, tmp_path: Path) -> None:
    image = prepared("debian-bookworm")
    output = tmp_path / f"bookworm{promote.formats.get(fmt).suffix}"
    result = promote.promote(image, output, promote.Options(fmt=fmt, size=DISK))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(output)], capture_output=True, text=True, check=True).stdout)
    options: dict = {}
    if fmt == "gce":
        # As GCE expects it: a sparse oldgnu tar.gz holding one file, disk.raw.
        listing = subprocess.run(["tar", "-tvzf", str(output)], capture_output=True, text=True, check=True).stdout.split()
        assert listing[-1] == "disk.raw" and int(listing[2]) % GiB == 0
        subprocess.run(["tar", "-xSzf", str(output), "-C", str(tmp_path)], check=True)
        boot = tmp_path / "disk.raw"
    elif fmt == "firecracker":
        assert info["format"] == "raw"
        vmlinux, initrd = result.extra["vmlinux"], result.extra["initrd"]
        assert vmlinux.read_bytes()[:4] == b"\x7fELF", "Firecracker needs an uncompressed ELF kernel"
        # Firecracker's own boot, imitated: the ELF kernel straight onto the bare ext4.
        options = {"kernel": vmlinux, "initrd": initrd, "append": "root=/dev/vda rw console=ttyS0"}
        boot = output
    else:
        assert info["format"] == promote.formats.get(fmt).qemu_format
        boot = output
    with VM(boot, image=image.name, disk_size=GROWN if fmt != "firecracker" else None, **options) as vm:
        found = facts(vm)
        assert found["state"] == "running", found["failed"]
        assert found["cloudinit"] == "done" and found["ci_errors"] == "0"
        assert found["root_opts"].split(",")[0] == "rw" and found.get("root_writable") == "yes"


def test_promote_never_writes_the_store_image(prepared, tmp_path: Path) -> None:
    image = prepared("debian-bookworm")
    before = store.tree_digest(image.rootfs)
    promote.promote(image, tmp_path / "a.qcow2", promote.Options(fmt="qcow2", firmware="uefi", profile="digitalocean", size=DISK))
    assert store.tree_digest(image.rootfs) == before == image.digest


@pytest.mark.xdist_group("debian-bookworm")
def test_vm_cli_lifecycle_start_ps_ssh_console_stop(prepared) -> None:
    from conftest import racker

    prepared("debian-bookworm")
    name = f"cli-{os.getpid()}"
    started = racker("vm", "start", "debian-bookworm", "--name", name, timeout=900)
    assert started.returncode == 0, started.stderr
    try:
        assert started.stdout.strip() == name
        listed = json.loads(racker("vm", "ps", "--json").stdout)
        mine = [vm for vm in listed if vm["name"] == name]
        assert mine and mine[0]["ssh_port"] and mine[0]["firmware"] == "bios"
        ran = racker("vm", "ssh", name, "--", "sh", "-c", "hostname; exit 3")
        assert ran.returncode == 3 and ran.stdout.strip() == name
        assert "Linux version" in racker("vm", "console", name).stdout
    finally:
        stopped = racker("vm", "stop", name)
    assert stopped.returncode == 0, stopped.stderr
    assert machines.load("qemu", name) is None
    assert racker("vm", "ssh", name, "--", "true").returncode == 125


@pytest.mark.xdist_group("debian-bookworm")
def test_app_image_runs_its_entrypoint_as_a_service(share_image, tmp_path: Path) -> None:
    """A Dockerfile-style service (ENTRYPOINT, CMD, ENV, WORKDIR, USER) really runs in the VM,
    with its environment and its arguments exactly as the image gives them."""
    share_image("debian-bookworm")
    base = share_image("debian-bookworm", prepared=True)  # in this test's private store
    # A directory whose name holds what quoting can get wrong, served by http.server --directory.
    served = "/srv/www/$HOME ${HOME} $$ 100% %n \"q\" 'q' back\\slash\\ new\nline ;"
    with store.workdir("test-app") as work:
        rootfs = work / "rootfs"
        subprocess.run(["cp", "-al", str(base.rootfs), str(rootfs)], check=True)
        (rootfs / served.lstrip("/")).mkdir(parents=True)
        (rootfs / served.lstrip("/") / "index.html").write_text("hello from the app\n")
        config = {
            "Entrypoint": ["/usr/bin/python3", "-m", "http.server"],
            "Cmd": ["8080", "--bind", "127.0.0.1", "--directory", served],
            "Env": ["GREETING=hello world", "PATH=/usr/local/bin:/usr/bin:/bin", *(f"{k}={v}" for k, v in HOSTILE_ENV)],
            "WorkingDir": "/srv/www",
            "User": "nobody",
        }
        manifest = dict(base.manifest, name="racker-test-app", config=config)
        for key in ("digest", "size", "created", "source"):
            manifest.pop(key, None)
        image = store.commit("racker-test-app", rootfs, source="test:app", recipe="1", manifest=manifest)
    result = promote.promote(image, tmp_path / "app.qcow2", promote.Options(fmt="qcow2", app=True, size=DISK))
    with VM(result.path, image=image.name) as vm:
        assert vm.run(["systemctl", "is-active", "racker-app"]).stdout.strip() == "active"
        pid = vm.check_output(["systemctl", "show", "-p", "MainPID", "--value", "racker-app"]).strip()
        environ = vm.check_output(["cat", f"/proc/{pid}/environ"]).split("\0")
        assert "GREETING=hello world" in environ
        for key, value in HOSTILE_ENV:
            assert f"{key}={value}" in environ, [e for e in environ if e.startswith(key)]
        cmdline = vm.check_output(["cat", f"/proc/{pid}/cmdline"]).split("\0")
        assert cmdline == [*config["Entrypoint"], *config["Cmd"], ""]
        fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/index.html').read().decode())"
        assert vm.run(["python3", "-c", fetch]).stdout.strip() == "hello from the app"
        assert vm.check_output(["readlink", f"/proc/{pid}/cwd"]).strip() == "/srv/www"
        assert vm.check_output(["ps", "-o", "user=", "-p", pid]).strip() == "nobody"
