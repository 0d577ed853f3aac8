"""Full-boot checks: what only a real boot of the image's disk shows (the qemu engine).

sshd, cloud-init, DHCP, the root filesystem, the machine's identity and
health, and a cloud profile's requirements where the disk was promoted with
one. Under nspawn they are skipped, with the reason.

The facts they read are gathered in one SSH round trip per VM (guest.FACTS):
every new connection costs a second of emulated handshake under TCG. Each
failure message says what was expected and what was seen.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from racker.checks import guest
from racker.promote import profiles
from racker.pytest.plugin import machine_scope
from racker.vm import seed

# Every check here reads a real boot: skipped where the engine has none (nspawn).
pytestmark = pytest.mark.racker(needs=["full-boot", "first-boot", "ssh", "cloud-init", "network"])

# cloud-init's recoverable errors (WARNING, DEPRECATED…) a healthy boot may show: (level, pattern, why).
RECOVERABLE_ALLOWED: tuple[tuple[str, str, str], ...] = (
    # racker's seed is NoCloud; a profile's list puts the cloud's own datasources first.
    ("WARNING", r"^No (local )?datasource found", "a profile lists its cloud's datasource before NoCloud"),
)

# What the root filesystem must fill of its disk once growpart and resize2fs have run.
FILLS = 0.9


@pytest.fixture(scope=machine_scope)
def facts(racker_machine) -> guest.Facts:  # type: ignore[no-untyped-def]
    return guest.gather(racker_machine)


# -- sshd -------------------------------------------------------------------


def test_sshd_active_and_listening(facts: guest.Facts) -> None:
    unit, _, state = facts.out("sshd_unit").partition("\n")
    assert unit, f"expected an ssh or sshd service (systemd unit or /etc/init.d script); found neither\n{facts.shown('sshd_unit')}"
    assert state.strip() == "active", f"expected the {unit} service active, saw {state.strip()!r}"
    assert facts.out("listening_22"), (
        f"expected sshd listening on TCP port 22; `ss -Htln sport = :22` shows nothing\n{facts.shown('listening_22')}"
    )


def test_ssh_key_login_works(racker_machine, facts: guest.Facts) -> None:  # type: ignore[no-untyped-def]
    key = (racker_machine.rundir / "id_ed25519.pub").read_text().split()[1]
    assert key in facts.out("authorized_keys"), (
        f"expected the seed's key in {seed.USER}'s authorized_keys, saw:\n{facts.out('authorized_keys')}"
    )
    login = racker_machine.run(["id", "-un"], root=False, timeout=60)
    assert login.returncode == 0 and login.stdout.strip() == seed.USER, (
        f"expected a key login as {seed.USER}; exit {login.returncode}: {login.stdout.strip()} {login.stderr.strip()}"
    )


def test_ssh_password_and_root_login_refused(facts: guest.Facts) -> None:
    config = facts.sshd_config()
    assert config.get("passwordauthentication") == "no", (
        f"expected sshd -T: passwordauthentication no, saw {config.get('passwordauthentication')!r}"
    )
    assert config.get("kbdinteractiveauthentication", "no") == "no" or config.get("usepam") == "no", (
        f"expected no keyboard-interactive login (a password by another name), saw kbdinteractiveauthentication "
        f"{config.get('kbdinteractiveauthentication')!r} with usepam {config.get('usepam')!r}"
    )
    assert config.get("permitrootlogin") == "no", f"expected sshd -T: permitrootlogin no, saw {config.get('permitrootlogin')!r}"
    # What the server offers a client, asked from inside the guest (no penalty on our own address).
    methods = re.search(r"Permission denied \(([^)]*)\)", facts.out("ssh_methods"))
    assert methods, f"expected sshd to refuse a login without credentials, saw:\n{facts.shown('ssh_methods')}"
    offered = methods.group(1).split(",")
    assert not {"password", "keyboard-interactive"} & set(offered), f"expected sshd to offer no password login, it offers {offered}"


# -- cloud-init ---------------------------------------------------------------


def test_cloud_init_done_without_errors(facts: guest.Facts) -> None:
    status = facts.cloud_init_status()
    assert status.get("status") == "done", f"expected cloud-init status done, saw {status.get('status')!r}: {status.get('detail', '')}"
    assert not status.get("errors"), "expected no cloud-init errors, saw:\n" + "\n".join(map(str, status["errors"]))
    unexpected = [
        f"{level}: {message}"
        for level, messages in (status.get("recoverable_errors") or {}).items()
        for message in messages
        if not any(level == allowed and re.search(pattern, message) for allowed, pattern, _why in RECOVERABLE_ALLOWED)
    ]
    assert not unexpected, "expected only allowed recoverable errors from cloud-init, saw:\n" + "\n".join(unexpected)
    assert not facts.out("cloud_init_tracebacks"), (
        f"expected no Traceback in /var/log/cloud-init.log, saw:\n{facts.out('cloud_init_tracebacks')}"
    )


def test_cloud_init_applied_the_seed(racker_machine, facts: guest.Facts) -> None:  # type: ignore[no-untyped-def]
    assert facts.out("hostname") == racker_machine.name, (
        f"expected the seed's hostname {racker_machine.name!r}, saw {facts.out('hostname')!r}"
    )
    key = (racker_machine.rundir / "id_ed25519.pub").read_text().split()[1]
    assert key in facts.out("authorized_keys"), f"expected the seed's SSH key in ~{seed.USER}/.ssh/authorized_keys"


def test_cloud_init_schema_valid(facts: guest.Facts) -> None:
    result = facts["cloud_init_schema"]
    if result.rc == 2 and re.search(r"unrecognized arguments|invalid choice|usage:", result.out):
        pytest.skip(f"this cloud-init has no `schema --system` ({facts.out('cloud_init_version')})")
    assert result.rc == 0, (
        f"expected `cloud-init schema --system` to find the system's cloud-config valid, saw:\n{facts.shown('cloud_init_schema')}"
    )


# -- DHCP -----------------------------------------------------------------------


def test_first_nic_configured_by_dhcp(facts: guest.Facts) -> None:
    nic = facts.first_nic()
    assert nic, f"expected a network interface besides lo, saw:\n{facts.out('links')}"
    name = nic["ifname"]
    ipv4 = [a for a in nic.get("addr_info", []) if a.get("family") == "inet"]
    assert ipv4, f"expected an IPv4 address on {name}, saw none"
    assert any(a.get("dynamic") for a in ipv4), f"expected {name}'s IPv4 address to be leased (dynamic), saw {ipv4}"
    leased = facts.dhcp_leases()
    local = {a["local"] for a in ipv4}
    assert local & set(leased), f"expected a DHCP lease (networkd or dhclient) for {sorted(local)}, saw leases for {sorted(leased)}"
    routes = [r for r in facts.json("default_route") or [] if r.get("dev") == name]
    assert routes, f"expected a default route through {name}, saw {facts.out('default_route')}"


def test_nameserver_from_dhcp_answers(facts: guest.Facts) -> None:
    """The nameserver in use is the one the platform's DHCP gave (not one baked into the image), and it answers."""
    given = facts.dhcp_dns()
    assert given, f"expected the DHCP lease to give a nameserver, saw none\n{facts.shown('networkd_leases')}"
    in_use = facts.nameservers_in_use()
    assert in_use and set(in_use) <= given, (
        f"expected the nameservers in use to be those DHCP gave ({', '.join(sorted(given))}), saw {in_use or 'none'}:\n"
        f"{facts.shown('resolv_conf')}"
    )
    answer = facts.out("dns_answer")
    assert re.match(r"answer rcode=[03]\b", answer), f"expected the nameserver to answer a DNS query (NOERROR or NXDOMAIN), saw {answer!r}"


# -- the root filesystem --------------------------------------------------------


def test_root_writable(facts: guest.Facts) -> None:
    (root,) = facts.json("root_mount")["filesystems"]
    assert root["options"].split(",")[0] == "rw", f"expected / mounted read-write, saw {root['options']}"
    assert facts.out("root_write") == "racker-write-check", f"expected a file written on / to read back, saw:\n{facts.shown('root_write')}"


def test_fstab_names_root_by_uuid(facts: guest.Facts) -> None:
    (root,) = facts.json("root_mount")["filesystems"]
    entries = [line.split() for line in facts.out("fstab").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    spec = next((fields[0] for fields in entries if len(fields) > 1 and fields[1] == "/"), None)
    assert spec == f"UUID={root['uuid']}", f"expected fstab to name / as UUID={root['uuid']}, saw {spec!r}"


def test_root_fills_its_disk(facts: guest.Facts) -> None:
    (root,) = facts.json("root_mount")["filesystems"]
    part, disk = facts.block_device(root["source"])
    assert part and disk, f"expected / on a partition of a disk, saw {root['source']}"
    assert part["size"] >= FILLS * disk["size"], (
        f"expected growpart to grow {part['path']} to its disk: {part['size']} bytes of {disk['size']} (at least {FILLS:.0%})"
    )
    assert root["size"] >= FILLS * disk["size"], (
        f"expected the root filesystem resized to its partition: {root['size']} bytes on a {disk['size']}-byte disk (at least {FILLS:.0%})"
    )


# -- identity and health ----------------------------------------------------------


# systemd makes /etc/machine-id at first boot; sysvinit and OpenRC images have none to make.
@pytest.mark.racker(needs=["systemd"])
def test_machine_id_made_on_this_boot(facts: guest.Facts) -> None:
    machine_id, _, mtime = facts.out("machine_id").partition("\n")
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id), f"expected a machine-id in /etc/machine-id, saw {machine_id!r}"
    assert int(mtime) >= facts.booted_at(), (
        f"expected /etc/machine-id made on this boot; it is older (shipped in the image?), mtime {mtime}"
    )


def test_host_keys_made_on_this_boot(facts: guest.Facts) -> None:
    keys = [line.split(None, 1) for line in facts.out("host_keys").splitlines() if line.strip()]
    assert keys, f"expected SSH host keys in /etc/ssh, saw none\n{facts.shown('host_keys')}"
    old = [path for mtime, path in keys if int(mtime) < facts.booted_at()]
    assert not old, f"expected SSH host keys made on this boot; older (shipped in the image): {', '.join(old)}"


@pytest.mark.racker(needs=["systemd"])
def test_no_failed_units(facts: guest.Facts) -> None:
    assert not facts.out("failed_units"), f"expected no failed units, saw:\n{facts.out('failed_units')}"
    assert facts.out("system_state") == "running", f"expected the system 'running', saw {facts.out('system_state')!r}"


@pytest.mark.racker(needs=["systemd"])  # systemd-timesyncd, which the VM of another init lacks
def test_time_sync_active(facts: guest.Facts) -> None:
    state = facts.out("time_sync").partition("\n")[0]
    assert state == "active", f"expected systemd-timesyncd active (a cloud VM keeps its clock in sync), saw:\n{facts.shown('time_sync')}"


def test_login_prompt_on_serial_console(racker_machine, facts: guest.Facts) -> None:  # type: ignore[no-untyped-def]
    # The board's first serial port: a PC's 16550 (ttyS0), arm64 virt's PL011 (ttyAMA0).
    assert re.search(r"(^|\s)console=(ttyS0|ttyAMA0)\b", facts.out("cmdline")), (
        f"expected console=ttyS0 (arm64: ttyAMA0) on the kernel command line, saw {facts.out('cmdline')!r}"
    )
    console = racker_machine.console_log.read_text(errors="replace")
    tail = "\n".join(console.splitlines()[-15:])
    assert re.search(r"\blogin: ", console), f"expected a login prompt on the serial console; its last lines:\n{tail}"


@pytest.mark.racker(needs=["systemd"])  # systemd-analyze's split of the boot
def test_boot_time_recorded(facts: guest.Facts, record_property) -> None:  # type: ignore[no-untyped-def]
    split = guest.systemd_boot_split(facts.out("boot_time"))
    assert "userspace" in split, f"expected `systemd-analyze time` to give the boot time split, saw:\n{facts.shown('boot_time')}"
    cloud_init = guest.cloud_init_seconds(facts.json("cloud_init_stages"))
    if cloud_init is not None:
        split["cloud_init"] = cloud_init
    record_property("boot_seconds", split)


# -- cloud profiles ---------------------------------------------------------


@pytest.mark.parametrize("profile", [name for name, p in profiles.PROFILES.items() if any(r.check in guest.BOOTED for r in p.requirements)])
def test_profile_requirements_met(profile: str, facts: guest.Facts) -> None:
    """The requirements of `racker promote --profile` that a boot shows, where the disk was promoted with it."""
    wanted = profiles.get(profile)
    shipped = dict(line.split()[::-1] for line in facts.out("profile_files").splitlines() if len(line.split()) == 2)
    if any(shipped.get("/" + rel) != hashlib.sha256(text.encode()).hexdigest() for rel, text in wanted.files.items()):
        pytest.skip(f"the disk was not promoted with --profile {profile}")
    results = [(r.text, *guest.BOOTED[r.check](facts)) for r in wanted.requirements if r.check in guest.BOOTED]
    failed = [f"{text}: {detail}" for text, ok, detail in results if not ok]
    assert not failed, f"expected the booted VM to meet {profile}'s requirements; it does not meet:\n" + "\n".join(failed)
