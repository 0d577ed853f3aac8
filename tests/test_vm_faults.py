"""Bad disks are refused before any work; hung, crashed, interrupted or killed VMs leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HANG_SECTOR, assert_vm_gone, racker, write_hang_disk
from racker import machines, proc
from racker.cpu import accel
from racker.errors import BadDisk, BootTimeout, VMError, VMLaunchFailure
from racker.upkeep import gc
from racker.vm.qemu import VM

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


@pytest.fixture(autouse=True)
def _own_store(private_store: dict) -> None:
    """VMs here are made, killed and collected in a store of their own, never a user's."""


def test_backing_file_is_refused_before_any_work(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    write_hang_disk(base)
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(evil)], check=True)
    vm = VM(evil)
    with pytest.raises(BadDisk, match="backing file"):
        vm.start()
    assert machines.load("qemu", vm.name) is None and not vm.rundir.exists()
    result = racker("vm", "start", str(evil))
    assert result.returncode == 125 and "backing file" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_machine_type_and_a_microvm_without_a_kernel_are_refused(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(HANG_SECTOR)
    with pytest.raises(VMError, match="unknown machine type 'vbox'") as raised:
        VM(disk, machine="vbox")
    assert "microvm" in (raised.value.hint or "")
    with pytest.raises(VMError, match="boots only a kernel given directly"):
        VM(disk, machine="microvm")


def test_a_disk_that_cannot_boot_is_refused(tmp_path: Path) -> None:
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    with pytest.raises(BadDisk, match="not bootable"):
        VM(blank).start()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BadDisk):
        VM(text).start()


def test_a_hung_boot_times_out_with_the_console_tail(hang_disk: Path) -> None:
    vm = VM(hang_disk, boot_timeout=8, accelerator="tcg")
    started = time.monotonic()
    with pytest.raises(BootTimeout) as raised:
        vm.start()
    assert time.monotonic() - started < 30
    assert "racker-hang" in (raised.value.hint or "")
    assert_vm_gone(vm.name)


def test_qmp_works_however_deep_the_store_is(hang_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QMP's socket is abstract: a RACKER_HOME past the 108-byte limit of a socket path does not matter."""
    monkeypatch.setenv("RACKER_HOME", str(tmp_path / ("a-long-directory-name-" * 5) / "store"))
    vm = VM(hang_disk, name="a-rather-long-vm-name-too", boot_timeout=5, accelerator="tcg")
    with pytest.raises(BootTimeout) as raised:
        vm.start()
    assert "racker-hang" in (raised.value.hint or ""), "QEMU ran and was stopped through QMP"
    assert_vm_gone(vm.name)


def test_a_crashed_qemu_is_an_error_with_nothing_left(hang_disk: Path) -> None:
    vm = VM(hang_disk, boot_timeout=60, accelerator="tcg")

    def kill_qemu_soon() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = machines.load("qemu", vm.name)
            if state and state.pid and b"racker-hang" in _read(vm.console_log):
                os.kill(state.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    import threading

    killer = threading.Thread(target=kill_qemu_soon)
    killer.start()
    with pytest.raises(VMLaunchFailure, match="QEMU exited") as raised:
        vm.start()
    killer.join()
    assert "racker-hang" in (raised.value.hint or "")
    assert_vm_gone(vm.name)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _spawn_racker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "racker", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_vm(name: str, timeout: float = 60) -> machines.State:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = machines.load("qemu", name)
        if state and state.pid and proc.alive(state.pid, state.pid_start, state.boot_id):
            return state
        time.sleep(0.05)
    raise AssertionError(f"VM {name} never started")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_booting_leaves_nothing(hang_disk: Path, signum: int) -> None:
    name = f"sig-{signum}-{os.getpid()}"
    child = _spawn_racker("vm", "run", "--accel", "tcg", "--name", name, "--timeout", "120", str(hang_disk), "--", "true")
    try:
        state = _wait_for_vm(name)
        assert 0 < int(state.extra["ssh_port"]) < 65536
        child.send_signal(signum)
        _out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum or (signum == signal.SIGINT and child.returncode == 130), err
    assert "Traceback" not in err
    assert_vm_gone(name)


def test_gc_cleans_up_after_kill_9(hang_disk: Path) -> None:
    name = f"killed-{os.getpid()}"
    child = _spawn_racker("--debug", "vm", "run", "--accel", "tcg", "--name", name, "--timeout", "120", str(hang_disk), "--", "true")
    state = _wait_for_vm(name)
    child.kill()
    _out, err = child.communicate(timeout=10)
    assert f"run: /usr/bin/qemu-system-x86_64 -name {name}," in err, "--debug shows every command, QEMU's too"
    assert machines.load("qemu", name) is not None, "the record survives a kill -9 until gc"
    removed = gc.collect()
    assert any(name in line for line in removed), removed
    assert not proc.alive(state.pid, state.pid_start, state.boot_id)
    assert_vm_gone(name)


def test_kvm_probe_boots_a_real_kernel_and_tcg_passes() -> None:
    kernel = accel.probe_kernel()
    assert kernel is not None
    assert accel.probe_boots("tcg", kernel, timeout=30), "a real kernel must print its banner under TCG"
    if accel.kvm_device_opens() and not accel.kvm_works():
        # This host: /dev/kvm opens but a nested guest hangs. The probe must say so.
        started = time.monotonic()
        assert not accel.probe_boots("kvm", kernel)
        assert time.monotonic() - started < accel.PROBE_TIMEOUT + 3
    assert accel.choose("tcg") == "tcg" and accel.choose("kvm") == "kvm"
