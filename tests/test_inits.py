"""Images whose PID 1 is not systemd: sysvinit and OpenRC under nspawn (racker.machines.inits).

The unit tests read hand-made trees; the others boot the catalogue's
debian-bookworm-sysvinit and debian-bookworm-openrc for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, racker
from racker import images, machines, store
from racker.errors import UnknownInit
from racker.machines import inits
from racker.machines.nspawn import Machine
from racker.store import imagetree

IMAGES = ["debian-bookworm-sysvinit", "debian-bookworm-openrc", "debian-bookworm-runit"]
# What each image's console shows when its init shuts it down by its own path (not nspawn's SIGKILL).
SYSV_HALT = ("INIT: Sending processes configured via /etc/inittab the TERM signal", "Will now halt")
HALTED = {
    "debian-bookworm-sysvinit": SYSV_HALT,
    "debian-bookworm-openrc": SYSV_HALT,
    "debian-bookworm-runit": ("runit: leave stage: /etc/runit/3", "runit: power off"),
}
SYSVINIT_INITTAB = "id:2:initdefault:\nsi::sysinit:/etc/init.d/rcS\nl0:0:wait:/etc/init.d/rc 0\nl2:2:wait:/etc/init.d/rc 2\n"


def _tree(root: Path, files: dict[str, str | bytes], links: dict[str, str] | None = None) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for rel, target in (links or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target)
    return root


# -- which init: read from the image's files -----------------------------------


def test_inittab_gives_the_default_runlevel_and_its_wait_entries() -> None:
    assert inits.parse_inittab(SYSVINIT_INITTAB + "# l3:3:wait:x\n1:2345:respawn:/sbin/getty 38400 tty1\n") == ("2", ("/etc/init.d/rc 2",))
    assert inits.parse_inittab("l2:2:wait:/etc/init.d/rc 2\n") == ("", ())


def test_systemd_is_found_where_nspawn_finds_it_first(tmp_path: Path) -> None:
    # A sysvinit /sbin/init beside an installed systemd: nspawn --boot runs systemd.
    root = _tree(tmp_path, {"lib/systemd/systemd": b"\x7fELF", "sbin/init": b"\x7fELF INIT_VERSION=sysvinit-3.06"})
    assert isinstance(inits.detect(root), inits.Systemd)
    linked = _tree(
        tmp_path / "b", {"usr/lib/systemd/systemd": b"\x7fELF"}, {"sbin": "usr/sbin", "usr/sbin/init": "/usr/lib/systemd/systemd"}
    )
    assert isinstance(inits.detect(linked, ["/sbin/init"]), inits.Systemd)


def test_sysvinit_and_openrc_are_told_apart_by_what_runs_the_runlevels(tmp_path: Path) -> None:
    sysv = _tree(tmp_path / "sysv", {"sbin/init": b"\x7fELF..INIT_VERSION=sysvinit-3.06..", "etc/inittab": SYSVINIT_INITTAB})
    found = inits.detect(sysv)
    assert type(found) is inits.SysVinit and (found.runlevel, found.waits) == ("2", ("/etc/init.d/rc 2",))
    assert found.nspawn_options() == ["--notify-ready=no", "--kill-signal=SIGKILL"] and found.halt == ("telinit", "0")
    openrc = _tree(tmp_path / "openrc", {"sbin/openrc": b"\x7fELF", "etc/init.d/rc": "#!/bin/sh\nexec /sbin/openrc default\n"})
    _tree(openrc, {"sbin/init": b"\x7fELF INIT_VERSION=sysvinit-3.06", "etc/inittab": SYSVINIT_INITTAB})
    assert type(inits.detect(openrc)) is inits.OpenRC
    assert inits.named("openrc") == inits.OpenRC() and inits.named("gone") == inits.Systemd()


@pytest.mark.parametrize(
    ("init", "said"),
    [
        ("#!/bin/sh\nexec sleep infinity\n", "is a script (#!/bin/sh), not an init racker can boot"),
        (b"\x7fELF...BusyBox v1.36...", "is BusyBox's init"),
        (b"\x7fELF...", "is a program racker does not recognise"),
    ],
)
def test_an_unknown_init_is_one_line(tmp_path: Path, init: str | bytes, said: str) -> None:
    root = _tree(tmp_path, {"sbin/init": init})
    with pytest.raises(UnknownInit, match=re.escape(said)) as raised:
        inits.detect(root)
    assert "\n" not in str(raised.value)


def test_an_inittab_without_initdefault_is_refused_not_asked_on_the_console(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"sbin/init": b"INIT_VERSION=sysvinit-3.06", "etc/inittab": "l2:2:wait:/etc/init.d/rc 2\n"})
    with pytest.raises(UnknownInit, match="no default runlevel"):
        inits.detect(root)


def test_no_init_at_all_is_none_and_a_missing_configured_one_is_refused(tmp_path: Path) -> None:
    assert inits.detect(_tree(tmp_path, {"bin/sh": b""})) is None
    with pytest.raises(UnknownInit, match="not in the image"):
        inits.detect(tmp_path, ["/sbin/init"])


def test_links_in_the_image_resolve_inside_it(tmp_path: Path) -> None:
    """inits.detect reads an image's init through imagetree: no link leads it out of the tree."""
    outside = tmp_path / "host-secret"
    outside.write_text("#!/bin/sh\n")
    root = _tree(tmp_path / "r", {"usr/sbin/real": "x"}, {"sbin": "/usr/sbin", "up": "../../..", "abs": str(outside), "loop": "/loop"})
    tree = imagetree.Tree(root)
    assert tree.resolve("sbin/real") == "usr/sbin/real"
    assert not tree.exists("up/host-secret")  # `..` stops at the top
    assert not tree.exists("abs")
    assert not tree.exists("loop/x")
    with pytest.raises(UnknownInit, match="not in the image"):  # the host's file is not what the image's /sbin/init names
        inits.detect(_tree(tmp_path / "s", {}, {"sbin/init": str(outside)}), ["/sbin/init"])


# -- real boots ----------------------------------------------------------------


@pytest.fixture(scope="module", params=IMAGES)
def image(request: pytest.FixtureRequest) -> store.StoredImage:
    """The catalogue image, built once in the shared store (~1.5 min the first time)."""
    return images.pull(request.param)


def _console(machine: Machine):  # type: ignore[no-untyped-def]
    """The console log, open: still readable after stop() removes the run directory."""
    return open(machine.console_log, "rb")


@pytest.mark.slow
@pytest.mark.root
def test_ready_by_its_own_init_then_exec_then_stopped_by_it(image: store.StoredImage) -> None:
    machine = Machine(image).start()
    try:
        expected = inits.detect(image.rootfs)
        assert machine.init == expected and not isinstance(expected, inits.Systemd)
        processes = machine.run(["ps", "ax"]).stdout
        if isinstance(expected, inits.SysVinit):
            # At handover the default runlevel is reached and its rc scripts have run: sshd (started
            # by them) answers at once, with no wait of ours.
            assert machine.run(["runlevel"]).stdout.split() == ["N", "2"]
            assert machine.run(["/etc/init.d/ssh", "status"]).returncode == 0, processes
            # PID 1 is the image's own /sbin/init (sysvinit shows its runlevel in its argv).
            assert machine.run(["readlink", "/proc/1/exe"]).stdout == machine.run(["readlink", "-f", "/sbin/init"]).stdout
            assert machine.run(["cat", "/proc/1/cmdline"]).stdout_bytes.startswith(b"init [2]")
        if isinstance(expected, inits.OpenRC):
            assert machine.run(["cat", "/run/openrc/softlevel"]).stdout.strip() == "default"
            assert machine.run(["ls", "-A", "/run/openrc/starting"]).stdout == ""
        if isinstance(expected, inits.Runit):
            # Stage 2 has exec'ed runsvdir: stage 1 and rc2's scripts are done, the services supervised.
            assert machine.run(["cat", "/proc/1/cmdline"]).stdout_bytes == b"runit\0"
            assert " runsvdir -P /etc/service" in processes and "/etc/runit/" not in processes, processes
        # No runtime mask: /run/systemd/system would tell every program that systemd is PID 1.
        assert machine.run(["test", "-e", "/run/systemd/system"]).returncode == 1
        result = machine.run(["sh", "-c", "cat; echo to-err >&2; exit 7"], input=b"in\n")
        assert (result.returncode, result.stdout, result.stderr.strip()) == (7, "in\n", "to-err")
        assert machine.boot_seconds < 30, machine.boot_seconds
        console = _console(machine)
    except BaseException:
        machine.stop()
        raise
    began = time.monotonic()
    machine.stop()
    took = time.monotonic() - began
    said = console.read().decode(errors="replace")
    console.close()
    # The init's own shutdown (sysvinit: init left its runlevel, ending inittab's processes, and
    # runlevel 0's scripts halted; runit: stage 3 ran, then runit powered off), not nspawn's SIGKILL.
    for line in HALTED[image.name]:
        assert line in said, said[-1500:]
    assert took < 8, f"stop took {took:.1f}s: the init's shutdown, or the kill after the 10 s grace?"
    assert machines.load("nspawn", machine.name) is None


@pytest.mark.slow
@pytest.mark.root
def test_start_exec_shell_stop_through_the_cli(image: store.StoredImage) -> None:
    name = f"i-{os.getpid()}"
    started = racker("start", image.name, "--name", name)
    assert started.returncode == 0, started.stderr
    try:
        assert name in [m["name"] for m in json.loads(racker("ps", "--json").stdout)]
        assert racker("exec", name, "--", "sh", "-c", "exit 5").returncode == 5
        shell = racker("shell", name, input="echo MARK-$((6*7)); exit 3\n")
        assert (shell.returncode, shell.stdout.strip()) == (3, "MARK-42"), shell.stderr
    finally:
        began = time.monotonic()
        stopped = racker("stop", name)  # another process: the init comes from the machine's record
        took = time.monotonic() - began
    assert stopped.returncode == 0, stopped.stderr
    assert took < 8, f"racker stop took {took:.1f}s"
    assert name not in [m["name"] for m in json.loads(racker("ps", "--json").stdout)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.root
def test_a_killed_racker_leaves_nothing_and_gc_cleans_up(share_image, image: store.StoredImage) -> None:  # type: ignore[no-untyped-def]
    share_image(image.name)
    name = f"k-{os.getpid()}"
    runner = subprocess.Popen(
        [sys.executable, "-m", "racker", "run", image.name, "--name", name, "--", "sleep", "600"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ((state := machines.load("nspawn", name)) and state.leader and "sleep 600" in _commands(state.leader)):
            assert runner.poll() is None, runner.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the machine did not start"
            time.sleep(0.2)
        runner.kill()  # kill -9: racker has no chance to stop anything
        runner.wait(10)
        # nspawn got SIGTERM (its parent died) and sends PID 1 SIGKILL: sysvinit ignores SIGRTMIN+3.
        began = time.monotonic()
        while _pid_alive(state.pid) or _pid_alive(state.leader):
            assert time.monotonic() - began < 10, "the machine outlived the racker that owned it"
            time.sleep(0.1)
        cleaned = racker("gc")
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"removed stale nspawn record {name}" in cleaned.stdout, cleaned.stdout
        assert machines.load("nspawn", name) is None
        assert not machines.run_dir("nspawn", name).exists()
        cgroup = state.extra.get("cgroup")
        assert not cgroup or not Path(cgroup).exists(), cgroup
        assert not Path(f"/run/systemd/nspawn/propagate/{name}").exists()
        assert not [line for line in Path("/proc/self/mounts").read_text().splitlines() if name in line]
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)
        racker("gc")


def _commands(leader: int) -> str:
    return "\n".join(" ".join(process.argv) for process in inits.machine_processes(leader))


@pytest.mark.slow
@pytest.mark.root
def test_an_unknown_init_is_one_line_at_once(private_store: dict[str, str], share_image) -> None:  # type: ignore[no-untyped-def]
    """An image whose /sbin/init is a script that sleeps: refused before anything boots, not a hang
    until the boot timeout (nor given systemd by prepare: that would boot another system)."""
    tiny = share_image("tiny")  # Essential packages: a shell and sleep, for the script to run
    with store.workdir("unknown-init") as work:
        rootfs = work / "rootfs"
        subprocess.run(["cp", "-a", "--reflink=auto", str(tiny.rootfs), str(rootfs)], check=True)
        imagetree.Tree(rootfs).write_text("sbin/init", "#!/bin/sh\nexec sleep 600\n", mode=0o755)  # /sbin -> usr/sbin, inside
        with store.locked("image-sleeper"):
            store.commit("sleeper", rootfs, source="test", recipe="", manifest={"name": "sleeper"})
    began = time.monotonic()
    result = racker("run", "--timeout", "30", "sleeper", "--", "true", timeout=60)
    took = time.monotonic() - began
    assert result.returncode != 0 and took < 10, (took, result.stderr)
    assert "/sbin/init is a script (#!/bin/sh), not an init racker can boot" in result.stderr.splitlines()[0], result.stderr
    assert "Traceback" not in result.stderr
    assert machines.all_states("nspawn") == []
    assert not any(store.home().joinpath("run").glob("*")), "a run directory was made"
    assert sorted(image.name for image in store.images()) == ["sleeper", "tiny"]  # no sleeper+boot was prepared
    # The library says the same, before it claims a name.
    sleeper = store.lookup("sleeper")
    assert sleeper is not None
    with pytest.raises(UnknownInit):
        Machine(sleeper).start()
    assert machines.all_states("nspawn") == []


@pytest.mark.slow
@pytest.mark.root
def test_racker_check_passes_with_systemd_checks_skipped_for_their_reason(image: store.StoredImage, tmp_path: Path) -> None:
    from racker.report.results import read_tests

    results = tmp_path / "results.jsonl"
    done = racker("check", image.name, "--results", str(results))
    records = [r for r in read_tests(results) if "test_vm.py" not in r["nodeid"]] if results.exists() else []
    outcomes = {r["check"].removeprefix("test_"): r["outcome"] for r in records}
    assert done.returncode == 0 and records, done.stdout[-3000:] + done.stderr[-2000:]
    skipped = {r["check"].removeprefix("test_"): r["message"] for r in records if r["outcome"] == "skip"}
    assert set(skipped) == {"system_reaches_running", "journald_records_messages"}, outcomes
    assert all("cannot provide: systemd" in message for message in skipped.values()), skipped
    assert {check for check, outcome in outcomes.items() if outcome == "pass"} >= {
        "sshd_is_installed_and_enabled",
        "loopback_networking",
        "hostname_is_set",
        "package_manager_works_offline",
    }, outcomes


def test_a_vm_of_a_sysvinit_image_keeps_sysvinit_not_given_systemd(private_store: dict[str, str]) -> None:
    from racker import prepare

    with store.workdir("sysv") as work:
        rootfs = _tree(work / "rootfs", {"sbin/init": b"\x7fELF INIT_VERSION=sysvinit-3.06", "etc/inittab": SYSVINIT_INITTAB})
        with store.locked("image-sysv"):
            image = store.commit("sysv", rootfs, source="test", recipe="", manifest={"name": "sysv"})
    assert prepare._keeps_its_rc_init(image)  # its VM gets prepare.RC_PACKAGES: no systemd-sysv
    assert "systemd-sysv" not in prepare.RC_PACKAGES["apt"].required and "ifupdown" in prepare.RC_PACKAGES["apt"].required
    assert prepare.bootable(image) == image  # nspawn boots it as it is


def test_the_nightly_carries_sysvinit_and_openrc_not_runit() -> None:
    """`racker nightly` takes sysvinit and OpenRC (both engines pass them); `--racker-images all`,
    the set users' own suites run on, keeps to the systemd images; runit, whose VM is refused,
    is named when asked for."""
    from racker import nightly
    from racker.store import catalog

    for name in IMAGES:
        assert catalog.get(name).options["default_set"] is False and name not in catalog.default_set()
    assert {"debian-bookworm-sysvinit", "debian-bookworm-openrc"} <= set(nightly.default_images())
    assert "debian-bookworm-runit" not in nightly.default_images()
    assert set(catalog.default_set()) < set(nightly.default_images())


def test_runit_is_told_by_what_init_resolves_to(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"lib/runit/runit-init": b"\x7fELF", "sbin/runit": b"\x7fELF"}, {"sbin/init": "/lib/runit/runit-init"})
    found = inits.detect(root)
    assert type(found) is inits.Runit and found.halt == ("/sbin/init", "0")
    assert found.nspawn_options() == ["--notify-ready=no", "--kill-signal=SIGKILL"]


@pytest.mark.parametrize("systemd", [False, True])
def test_a_bootstrapped_image_without_systemd_makes_host_keys_before_its_init_script_starts_sshd(tmp_path: Path, systemd: bool) -> None:
    """A bootstrap ships no host keys (reproducible digests); systemd images make them in ssh.service's
    drop-in, the others in /etc/default/ssh, which /etc/init.d/ssh sources before `sshd -t`."""
    from racker.sources import bootstrap

    files = {"etc/ssh/ssh_host_ed25519_key": "secret", "etc/default/ssh": "SSHD_OPTS=\n", "etc/init.d/ssh": "#!/bin/sh\n"}
    root = _tree(tmp_path, files | ({"usr/lib/systemd/systemd": b"\x7fELF"} if systemd else {}))
    bootstrap._no_host_keys(root)
    assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()
    assert "ssh-keygen -A" in (root / bootstrap.SSH_HOST_KEYS_DROPIN).read_text()
    defaults = (root / "etc/default/ssh").read_text()
    assert defaults == ("SSHD_OPTS=\n" if systemd else "SSHD_OPTS=\n" + bootstrap.SSH_HOST_KEYS_RC)
