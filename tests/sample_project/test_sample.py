import os
import time

import pytest


def test_is_debian(os_release):
    assert os_release["ID"] == "debian"


def test_root_user(host):
    root = host.user("root")
    assert root.uid == 0
    assert root.home == "/root"


def test_openssh_package_and_service(host):
    assert host.package("openssh-server").is_installed
    ssh = host.service("ssh")
    assert ssh.is_enabled
    assert ssh.is_running


def test_processes_and_mounts(host):
    assert host.process.filter(comm="systemd")
    assert host.mount_point("/").exists
    assert host.file("/etc/passwd").mode == 0o644


def test_command_results(host):
    result = host.run("echo out; echo err >&2; exit 3")
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")


@pytest.mark.racker(needs=["full-boot"])
def test_bootloader_installed(host):
    assert host.file("/boot/grub/grub.cfg").exists


@pytest.mark.skipif(not os.environ.get("SAMPLE_SLOW"), reason="only when a test needs a long-running check")
def test_slow(host):
    time.sleep(float(os.environ["SAMPLE_SLOW"]))
