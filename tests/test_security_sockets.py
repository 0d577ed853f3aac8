"""Issue 22, items 1, 3 and 4: racker's control channels are root's alone, each machine and VM
has a place of its own, and what is private stays so whatever the umask.

The VM part boots no debian-bookworm of its own: two VMs restored from the run's snapshot
(conftest's first_boot), one of which then saves a snapshot as a first boot does, beside an
nspawn machine, all started under umask 000 in a store of the module's own. Every assertion
about sockets and modes is made on those. What only a cold boot makes (its key and
overlay, QEMU's sockets on a cold launch) is checked on a disk that hangs at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_HOME, warm_store
from racker import images, machines, proc, store
from racker.errors import NameTaken
from racker.machines import nspawn
from racker.upkeep import gc
from racker.vm import snapshots
from racker.vm.qemu import VM

NOBODY = 65534


def _socket_probe():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("racker_bench_socket_probe", ROOT / "bench" / "socket_probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _private(path: Path) -> None:
    """Root's alone: no bit for group or others, owned by root."""
    info = os.lstat(path)
    assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{path} is {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}"


def _not_writable_by_others(path: Path) -> None:
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    assert mode & 0o022 == 0, f"{path} is {mode:o}: others may write there"


# -- the notify socket: only nspawn's own messages count ---------------------------------

SEND = "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(sys.argv[2].encode(), '\\0' + sys.argv[1])"


def test_a_notification_counts_only_from_the_process_racker_started() -> None:
    """A forged READY=1 naming another leader, sent by another process to the bound socket, is
    ignored; the expected sender's message is read, in the order sent."""
    name = f"racker-test/{os.urandom(6).hex()}/notify"
    with nspawn.notify_socket(name) as notify:
        forged = subprocess.run([sys.executable, "-c", SEND, name, "X_NSPAWN_LEADER_PID=1\nREADY=1"], timeout=30)
        assert forged.returncode == 0
        # The real one stays alive until read, as systemd-nspawn does.
        real = subprocess.Popen(
            [sys.executable, "-c", SEND + "; sys.stdin.read()", name, "X_NSPAWN_LEADER_PID=4242\nREADY=1"], stdin=subprocess.PIPE
        )
        try:
            notify.settimeout(10)
            assert nspawn.receive_notification(notify, real.pid) is None, "the forged message counted"
            assert nspawn.receive_notification(notify, real.pid) == {"X_NSPAWN_LEADER_PID": "4242", "READY": "1"}
        finally:
            real.communicate(b"", timeout=30)


@pytest.mark.root
def test_run_directories_are_keyed_by_kind_and_gc_finds_them_all(private_store: dict) -> None:
    assert machines.run_dir("qemu", "box") != machines.run_dir("nspawn", "box")
    left = [machines.run_dir("qemu", "gone-vm"), machines.run_dir("nspawn", "gone-box"), store.home() / "run" / "older-racker"]
    for path in left:
        path.mkdir(parents=True)
        (path / "console.log").write_text("x")
    removed = gc.collect()
    assert not any(path.exists() for path in left), removed
    assert all(any(str(path) in line for line in removed) for path in left), removed


# -- real machines ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
def test_a_forged_notification_during_a_real_boot_is_ignored(private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before nspawn even starts, user nobody sends READY=1 naming a process of its own as the
    leader: the machine's leader is still its own init, and `racker exec` enters that one."""
    os.environ["RACKER_HOME"] = str(SHARED_HOME)
    try:
        image = images.pull("debian-bookworm")
    finally:
        os.environ["RACKER_HOME"] = private_store["RACKER_HOME"]
    decoy = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "sleep", "300"])
    real_start = proc.start

    def forge_first(argv, **options):  # type: ignore[no-untyped-def]
        target = (options.get("env") or {}).get("NOTIFY_SOCKET", "")
        if target.startswith("@"):
            forger = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
            sent = subprocess.run(
                [*forger, "/usr/bin/python3", "-c", SEND, target[1:], f"X_NSPAWN_LEADER_PID={decoy.pid}\nREADY=1"], timeout=30
            )
            assert sent.returncode == 0
        return real_start(argv, **options)

    monkeypatch.setattr(nspawn.proc, "start", forge_first)
    try:
        with nspawn.Machine(image) as machine:
            assert machine.state is not None and machine.state.leader not in (0, decoy.pid)
            assert Path(f"/proc/{machine.state.leader}/comm").read_text().strip() == "systemd"
            assert machine.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    finally:
        decoy.kill()
        decoy.wait()


@pytest.mark.slow
@pytest.mark.root
def test_the_cli_under_umask_0_keeps_the_store_and_run_directories_closed(private_store: dict) -> None:
    """`racker start` and `stop` run with umask 000: nothing it makes is writable by others,
    and what is the machine's is root's alone."""
    os.environ["RACKER_HOME"] = str(SHARED_HOME)
    try:
        images.pull("debian-bookworm")
    finally:
        os.environ["RACKER_HOME"] = private_store["RACKER_HOME"]
    store.link_from(SHARED_HOME, "debian-bookworm")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    name = f"umask-{os.urandom(3).hex()}"
    started = subprocess.run(
        [sys.executable, "-m", "racker", "start", "debian-bookworm", "--name", name],
        env=env, capture_output=True, text=True, timeout=300, umask=0,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        home = store.home()
        private = [machines.run_dir("nspawn", name), home / "locks"]
        for path in private:
            _private(path)
        for path in [home, *(p for p in home.rglob("*") if not p.is_relative_to(home / "images"))]:
            if not path.is_symlink() and path not in private:
                _not_writable_by_others(path)
    finally:
        subprocess.run([sys.executable, "-m", "racker", "stop", name], env=env, capture_output=True, timeout=120, umask=0)


@pytest.fixture(scope="module")
def running(first_boot: dict) -> Iterator[dict]:
    """Two VMs restored from the run's snapshot, the first having saved a snapshot of its
    own since, and an nspawn machine, all started under umask 000 in a store of the module's own.

    The store is in a directory every user may pass through (pytest's own temporary
    directories are 0700, which would keep nobody out whatever racker does)."""
    image = images.pull("debian-bookworm")  # the shared store, built under the usual umask
    disk = Path(first_boot["disk"])
    outer = Path(tempfile.mkdtemp(prefix="racker-sockets-", dir="/var/tmp"))
    os.chmod(outer, 0o755)
    home = outer / "store"
    old = os.umask(0)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as stack:
            patch.setenv("RACKER_HOME", str(home))
            restored = warm_store(home, first_boot)
            saving = stack.enter_context(VM(disk, warm=True))
            assert saving.restored_from == restored.id
            # The save a first boot makes once ready, under umask 000, as a snapshot of a key
            # no VM looks up (another memory size): a cold boot here would only repeat the run's.
            assert saving.state is not None
            key = dataclasses.replace(saving.snapshot_key(saving.state.extra["firmware"]), memory=saving.memory * 2)
            saved = saving.save_snapshot(key)
            warm = stack.enter_context(VM(disk, warm=True))
            assert warm.restored_from == restored.id
            machine = stack.enter_context(nspawn.Machine(image))
            for vm in (saving, warm):
                vm.run(["true"], root=False)  # over SSH: each has its connection master too
            yield {"home": home, "saving": saving, "warm": warm, "machine": machine, "disk": disk, "image": image, "saved": saved}
    finally:
        os.umask(old)
        store.remove_tree(outer)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.xdist_group("warm-vms")  # one worker sets `running` up, beside the other restores of first_boot
def test_every_socket_of_a_machine_and_of_vms_refuses_nobody(running: dict) -> None:
    probe = _socket_probe().probe_sockets_as_nobody(running["home"])
    print(probe.details())
    addresses = [t.address for t in probe.targets]
    for vm in (running["saving"], running["warm"]):
        # Every VM has two QMP monitors, the agent's port and an SSH master: all were found.
        mine = [a for a in addresses if str(vm.rundir) in a or vm.state.token in a]
        assert len(mine) >= 4, (vm.name, addresses)
    _refused_by_the_kernel(probe)
    for vm in (running["saving"], running["warm"]):
        for name in ("qmp", "qmp-shared", "agent", "ssh"):
            assert probe.refused.get(str(vm.rundir / name)) == os.strerror(errno.EACCES), probe.details()


def _refused_by_the_kernel(probe) -> None:  # type: ignore[no-untyped-def]
    """Every socket found refused nobody, by the kernel's permission check (or not on the host's
    filesystem at all: a name nspawn bound inside the container, ssh's temporary name), never for
    its length."""
    assert probe.targets and not probe.accepted, probe.line()
    assert len(probe.refused) == len(probe.targets)
    reasons = {os.strerror(errno.EACCES), os.strerror(errno.EPERM), os.strerror(errno.ECONNREFUSED), os.strerror(errno.ENOENT)}
    assert set(probe.refused.values()) <= reasons, probe.details()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.xdist_group("warm-vms")  # one worker sets `running` up, beside the other restores of first_boot
def test_what_is_private_is_root_s_alone_under_umask_0(running: dict) -> None:
    for vm in (running["saving"], running["warm"]):
        for path in (vm.rundir, vm.rundir / "id_ed25519", vm.rundir / "overlay.qcow2"):
            _private(path)
    _private(running["machine"].rundir)
    _private(snapshots.directory())
    assert running["saved"] in snapshots.all_snapshots(), "the snapshot saved under umask 000"
    for snapshot in snapshots.all_snapshots():
        _private(snapshot.path)
        for path in snapshot.path.iterdir():
            _private(path)


class Looked(Exception):
    """Raised where a cold boot would wait for the guest: what it made was looked at."""


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.qemu
def test_a_cold_boot_s_files_and_sockets_are_root_s_alone_under_umask_0(hang_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold boot makes the VM's key and overlay and launches QEMU without a snapshot:
    all looked at while it boots (a disk that only hangs), in a store others may pass through."""
    outer = Path(tempfile.mkdtemp(prefix="racker-sockets-", dir="/var/tmp"))
    os.chmod(outer, 0o755)
    monkeypatch.setenv("RACKER_HOME", str(outer / "store"))
    seen: list[Path] = []

    def look(vm: VM, deadline: float) -> None:
        # The seed too: its user-data may carry a caller's secrets (a password's hash, a CA).
        made = ("id_ed25519", "overlay.qcow2", "seed.iso", "seed.d", "seed.d/user-data", "seed.d/meta-data")
        for path in (vm.rundir, *(vm.rundir / name for name in made)):
            _private(path)
            seen.append(path)
        probe = _socket_probe().probe_sockets_as_nobody(outer / "store")
        _refused_by_the_kernel(probe)
        for name in ("qmp", "qmp-shared", "agent"):
            assert probe.refused.get(str(vm.rundir / name)) == os.strerror(errno.EACCES), probe.details()
            seen.append(vm.rundir / name)
        raise Looked

    monkeypatch.setattr(VM, "_wait_ready", look)
    old = os.umask(0)
    try:
        with pytest.raises(Looked):
            VM(hang_disk, warm=True, accelerator="tcg").start()  # warm: its launch has the agent's port too
    finally:
        os.umask(old)
        store.remove_tree(outer)
    assert len(seen) == 10


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.xdist_group("warm-vms")  # one worker sets `running` up, beside the other restores of first_boot
def test_a_name_is_claimed_across_kinds(running: dict) -> None:
    vm, machine = running["saving"], running["machine"]
    with pytest.raises(NameTaken, match="in use"):
        nspawn.Machine(running["image"], vm.name).start()
    with pytest.raises(NameTaken, match="in use"):
        VM(running["disk"], machine.name).start()
    assert vm.run(["true"]).returncode == 0 and machine.run(["true"]).returncode == 0, "both still run"
    assert vm.rundir.exists() and machine.rundir.exists()
