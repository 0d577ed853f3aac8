"""Images whose PID 1 is not systemd, promoted to a disk and booted in QEMU (issue 26).

One boot of debian-bookworm-sysvinit serves every assertion (a TCG boot takes minutes):
its VM keeps sysvinit as PID 1, gets its address from ifupdown's dhclient, answers SSH,
runs cloud-init from its /etc/init.d scripts, and passes racker's full-boot checks, the
systemd-only ones skipping with the reason. Then each property is broken in the running
VM and its check must go red. The unit tests beside need no boot.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_vm_boot import DISK, GROWN, run_checks

from racker import engines, images, prepare, promote, store
from racker.errors import PrepareError
from racker.machines import inits
from racker.machines.nspawn import Machine
from racker.vm.qemu import VM, WAIT_BOOTED

# The full-boot checks that mean something only under systemd: skipped, saying so.
SYSTEMD_ONLY = {"test_machine_id_made_on_this_boot", "test_no_failed_units", "test_time_sync_active", "test_boot_time_recorded"}
# Skipped whatever the init: no --profile was given; `cloud-init schema --system` where this cloud-init lacks it.
MAY_SKIP = {"test_profile_requirements_met", "test_cloud_init_schema_valid"}

# Each check broken in the running sysvinit VM by one command, and what its failure says.
BREAKS: dict[str, tuple[str, str]] = {
    # The leased address made permanent, as a static one is: what DHCP gave is gone.
    "test_first_nic_configured_by_dhcp": (
        "ip -o -4 addr show scope global | while read -r _ dev _ cidr _; do"
        " ip addr change $cidr dev $dev valid_lft forever preferred_lft forever; done",
        "to be leased (dynamic)",
    ),
    # Reloaded through the init script, as the image's own init runs it.
    "test_ssh_password_and_root_login_refused": (
        "printf 'PasswordAuthentication yes\\nPermitRootLogin yes\\n' >/etc/ssh/sshd_config.d/00-racker-broken.conf"
        " && /etc/init.d/ssh reload >/dev/null",
        "expected sshd -T: passwordauthentication no, saw 'yes'",
    ),
    "test_cloud_init_applied_the_seed": ("hostname racker-broken", "saw 'racker-broken'"),
}


@pytest.mark.slow
@pytest.mark.qemu
def test_sysvinit_image_boots_as_a_cloud_vm(tmp_path: Path) -> None:
    # In the shared store, as test_vm_boot's VMs: the checks attach to it from a pytest of their own.
    image = prepare.prepare(images.pull("debian-bookworm-sysvinit"))
    # Prepared around its own init: sysvinit stays PID 1, nothing of systemd's came in.
    assert isinstance(inits.detect(image.rootfs), inits.SysVinit)
    assert not {"systemd", "systemd-sysv", "dbus"} & set(image.manifest["prepared"]["packages"])
    assert not (image.rootfs / "lib/systemd/systemd").exists()
    assert "iface racker-nic inet dhcp" in (image.rootfs / "etc/network/interfaces").read_text()
    assert "getty -L ttyS0" in (image.rootfs / "etc/inittab").read_text()
    result = promote.promote(image, tmp_path / "sysvinit.raw", promote.Options(size=DISK))
    # A sysvinit boot runs its rcS scripts one by one (udev's settle alone takes a minute under a loaded TCG).
    with VM(result.path, image=image.name, disk_size=GROWN, boot_timeout=900) as vm:
        # Ready by its init's own word: runlevel 2 reached, its rc scripts (cloud-final among them) done.
        assert vm.system_state == "running"
        assert vm.check_output(["cat", "/proc/1/comm"]).strip() == "init"
        assert vm.check_output(["runlevel"]).split()[-1] == "2"
        assert vm.run(["test", "-e", "/run/systemd/system"]).returncode == 1
        assert vm.check_output(["sh", "-c", "ls /var/lib/dhcp/dhclient*.leases"]).strip()
        done, found = run_checks(vm, tmp_path)
        outcomes = {name: r["outcome"] for name, r in found.items()}
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        for name in SYSTEMD_ONLY:
            assert outcomes[name] == "skip" and "systemd" in found[name]["message"], (name, found[name])
        passed = set(found) - SYSTEMD_ONLY - MAY_SKIP
        assert {n: outcomes[n] for n in passed} == dict.fromkeys(passed, "pass"), outcomes
        assert {"test_sshd_active_and_listening", "test_cloud_init_done_without_errors", "test_root_fills_its_disk"} <= passed

        vm.check_output(["sh", "-c", "\n".join(command for command, _ in BREAKS.values())])
        done, found = run_checks(vm, tmp_path)
        assert done.returncode == 1, done.stdout[-3000:]
        for name, (_command, message) in BREAKS.items():
            assert found[name]["outcome"] == "fail" and message in found[name]["message"], (name, found[name])


def test_runit_image_is_refused_for_vms_in_one_line(tmp_path: Path) -> None:
    """Debian's cloud-init has no runit service: said before anything is built."""
    root = tmp_path / "rootfs"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin/runit-init").write_bytes(b"\x7fELF runit")
    (root / "sbin/init").symlink_to("runit-init")
    image = store.StoredImage("runit-test", "sha256:" + "0" * 64, "", "", 0, path=tmp_path)
    with pytest.raises(PrepareError, match="its init is runit, and Debian's cloud-init ships no runit service"):
        prepare.prepare(image)


def test_qemu_offers_systemd_only_where_the_image_boots_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysv = tmp_path / "rootfs"
    (sysv / "sbin").mkdir(parents=True)
    (sysv / "sbin/init").write_bytes(b"\x7fELF INIT_VERSION=sysvinit-3.06")
    (sysv / "etc").mkdir()
    (sysv / "etc/inittab").write_text("id:2:initdefault:\nl2:2:wait:/etc/init.d/rc 2\n")
    image = store.StoredImage("sysv-test", "sha256:" + "0" * 64, "", "", 0, path=tmp_path)
    assert engines.get("qemu").unmet(["systemd", "ssh", "cloud-init"], image) == ["systemd"]
    assert engines.get("qemu").unmet(["systemd"], None) == []  # not known before the image is there
    # Its services start one after another: its VM gets twice the boot budget, which the setting still scales.
    monkeypatch.setenv("RACKER_VM_BOOT_TIMEOUT", "100")
    assert engines.vm_boot_timeout(image) == 200
    (sysv / "usr/lib/systemd").mkdir(parents=True)
    (sysv / "usr/lib/systemd/systemd").write_bytes(b"\x7fELF")
    assert engines.vm_boot_timeout(image) is None


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("name", ["debian-bookworm-sysvinit", "debian-bookworm-openrc"])
def test_vm_readiness_asks_the_guests_own_init(name: str) -> None:
    """qemu.WAIT_BOOTED, as the seed's user runs it over SSH (no /sbin in PATH), in a booted machine
    of the image: it answers "running" once the runlevel's rc is done, without systemd to ask."""
    with Machine(images.pull(name)) as machine:
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", "PATH=/usr/bin:/bin"]
        done = machine.run([*as_user, *WAIT_BOOTED], timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, "running"), done.stderr


# What OpenRC must have started in an OpenRC image's VM, by runlevel: ifupdown's networking among the
# boot scripts (Debian's rcS), sshd and cloud-init's four stages in the default runlevel.
OPENRC_VM_SERVICES = {
    "sysinit": ("networking",),
    "default": ("ssh", "cloud-init-local", "cloud-init", "cloud-config", "cloud-final"),
}


@pytest.mark.slow
@pytest.mark.root
def test_openrc_vm_image_starts_its_services_through_openrc() -> None:
    """The OpenRC image's +vm without a TCG boot (its QEMU boot is `racker check
    debian-bookworm-openrc --engine all`, which the nightly runs): booted under nspawn, OpenRC itself
    started what the VM needs from the runlevels update-rc.d filled, and the VM's readiness waited
    for them."""
    image = prepare.prepare(images.pull("debian-bookworm-openrc"))
    assert isinstance(inits.detect(image.rootfs), inits.OpenRC)
    assert not {"systemd", "systemd-sysv", "dbus"} & set(image.manifest["prepared"]["packages"])
    assert "getty -L ttyS0" in (image.rootfs / "etc/inittab").read_text()
    with Machine(image) as machine:
        done = machine.run(list(WAIT_BOOTED), timeout=120)
        assert (done.returncode, done.stdout.strip()) == (0, "running"), done.stderr
        for level, services in OPENRC_VM_SERVICES.items():
            status = machine.run(["rc-status", "--nocolor", level]).stdout
            for service in services:
                assert re.search(rf"^\s*{re.escape(service)}\s+\[\s*started\s*\]", status, re.MULTILINE), (level, service, status)
