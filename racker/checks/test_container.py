"""Container-level checks: what every image must do when booted under systemd-nspawn.

Each failure message says what was expected and what was seen.
"""

from __future__ import annotations

import uuid

import pytest

from racker.store import distros


@pytest.mark.racker(needs=["systemd"])
def test_system_reaches_running(host) -> None:
    state = host.run("systemctl is-system-running --wait").stdout.strip()
    failed = host.run("systemctl --failed --no-legend --plain").stdout.strip()
    assert state == "running", f"expected the system to be 'running', saw {state!r}; failed units:\n{failed or '(none listed)'}"


@pytest.mark.racker(needs=["systemd"])
def test_journald_records_messages(host) -> None:
    marker = f"racker-check-{uuid.uuid4().hex}"
    host.check_output("logger -t racker-check %s", marker)
    found = host.run("journalctl --sync; journalctl -t racker-check --no-pager -o cat")
    assert marker in found.stdout, f"expected journald to hold {marker!r}; journalctl printed:\n{found.stdout}{found.stderr}"


def test_hostname_is_set(host, racker_machine) -> None:
    name = host.check_output("hostname")
    assert name not in ("", "localhost", "(none)"), f"expected a real hostname, saw {name!r}"
    # A warm VM keeps the hostname of the VM its snapshot was saved from (racker.vm.snapshots).
    assert name == racker_machine.hostname, f"expected the hostname {racker_machine.hostname!r} given at boot, saw {name!r}"


def test_package_manager_works_offline(host, racker_image) -> None:
    recipe = distros.RECIPES.get(racker_image.manifest.get("distro", {}).get("package_manager") or "")
    assert recipe is not None, f"expected a known package manager, saw distro {racker_image.manifest.get('distro')}"
    command = " ".join([*recipe.query, recipe.base_package])
    result = host.run(command)
    assert result.rc == 0, f"expected `{command}` to find {recipe.base_package!r}; exit {result.rc}: {result.stderr.strip()}"


def test_sshd_is_installed_and_enabled(host) -> None:
    assert host.exists("sshd") or host.file("/usr/sbin/sshd").exists, "expected sshd to be installed; no sshd binary found"
    # Asked through what the image has: testinfra's service module picks systemctl, rc-service
    # (OpenRC) or service (sysvinit) by what is there.
    systemd = host.file("/run/systemd/system").is_directory
    names = [name for name in ("ssh", "sshd") if _service_exists(host, name, systemd)]
    kind = "an ssh.service or sshd.service unit" if systemd else "an /etc/init.d/ssh or /etc/init.d/sshd script"
    assert names, f"expected {kind}; found neither"
    service = host.service(names[0])
    status = f"systemctl status {names[0]}" if systemd else f"{type(service).__name__}: {names[0]} status"
    assert service.is_enabled, f"expected the {names[0]} service to be enabled in the boot's runlevel ({type(service).__name__})"
    assert service.is_running, f"expected the {names[0]} service to be running; {status}:\n{_status(host, names[0], systemd)}"


def _service_exists(host, name: str, systemd: bool) -> bool:  # type: ignore[no-untyped-def]
    if systemd:
        return host.run("systemctl cat %s.service", name).rc == 0
    return host.file(f"/etc/init.d/{name}").exists


def _status(host, name: str, systemd: bool) -> str:  # type: ignore[no-untyped-def]
    result = host.run("systemctl status %s", name) if systemd else host.run("/etc/init.d/%s status", name)
    return (result.stdout + result.stderr).strip()


@pytest.mark.racker(needs=["loopback"])
def test_loopback_networking(host) -> None:
    lo = host.interface("lo")
    assert lo.exists, "expected a loopback interface 'lo'"
    assert "127.0.0.1" in lo.addresses, f"expected 127.0.0.1 on lo, saw {lo.addresses}"
    assert host.socket("tcp://0.0.0.0:22").is_listening or host.socket("tcp://:::22").is_listening, "expected sshd listening on port 22"
    banner = host.run("timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/22; head -c 8 <&3'")
    assert banner.stdout.startswith("SSH-2.0"), f"expected an SSH banner over 127.0.0.1:22, saw {banner.stdout!r} {banner.stderr.strip()!r}"
