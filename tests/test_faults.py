"""Interrupts, kill -9, and boots that never finish: nothing may be left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import racker
from racker import images, machines, proc, store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bookworm():
    return images.pull("debian-bookworm")


def _machine_of(owner: int, timeout: float = 60) -> machines.State:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for state in machines.all_states("nspawn"):
            if state.owner == owner and state.leader:
                return state
        time.sleep(0.05)
    raise AssertionError("the machine never came up")


def _traces(state: machines.State) -> list[str]:
    """Everything that would show the machine still exists."""
    found = []
    for pid, started in ((state.pid, state.pid_start), (state.leader, state.leader_start)):
        if proc.alive(pid, started, state.boot_id):
            found.append(f"process {pid} alive")
    mounts = Path("/proc/mounts").read_text()
    if state.name in mounts:
        found.append("mount left")
    if state.rundir.exists():
        found.append(f"{state.rundir} left")
    if (machines.NSPAWN_PROPAGATE / state.name).exists():
        found.append("nspawn's propagate directory left")
    if machines.load("nspawn", state.name) is not None:
        found.append("registry record left")
    return found


def _gone(state: machines.State, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while _traces(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _traces(state)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_run_leaves_nothing(share_image, signum: int) -> None:
    share_image("debian-bookworm")
    run = subprocess.Popen([sys.executable, "-m", "racker", "run", "debian-bookworm", "--", "sleep", "300"], stdin=subprocess.DEVNULL)
    state = _machine_of(run.pid)
    run.send_signal(signum)
    assert run.wait(timeout=60) == 128 + signum
    assert _gone(state, timeout=1) == []


def test_kill_9_then_gc_leaves_nothing(share_image) -> None:
    """In a store of its own: gc on the shared one would clean up after other racker users too."""
    share_image("debian-bookworm")
    run = subprocess.Popen([sys.executable, "-m", "racker", "run", "debian-bookworm", "--", "sleep", "300"], stdin=subprocess.DEVNULL)
    state = _machine_of(run.pid)
    run.kill()
    run.wait()
    assert "registry record left" in _traces(state)  # only gc may decide it is stale
    # `racker ps` no longer lists a machine whose owner died.
    assert state.name not in racker("ps").stdout
    gc = racker("gc")
    assert gc.returncode == 0
    assert f"removed stale nspawn record {state.name}" in gc.stdout
    assert _gone(state) == []


def _make_hanging_image(bookworm) -> None:
    """An image whose boot blocks forever: a oneshot unit that the default target waits for."""
    with store.workdir("hang") as work:
        rootfs = work / "rootfs"
        proc.run(["cp", "-a", "--reflink=auto", str(bookworm.rootfs), str(rootfs)])
        unit = rootfs / "etc/systemd/system/hang.service"
        unit.write_text(
            "[Unit]\nBefore=multi-user.target\n[Service]\nType=oneshot\nExecStart=/bin/sleep infinity\nTimeoutStartSec=infinity\n"
        )
        wants = rootfs / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        os.symlink("/etc/systemd/system/hang.service", wants / "hang.service")
        store.commit("hang", rootfs, source="test:", recipe="hang", manifest={})


def test_boot_that_never_becomes_ready_times_out_with_console(bookworm, private_store: dict) -> None:
    _make_hanging_image(bookworm)
    # A name of this run's own: nspawn's propagate directory and the mounts are host-wide.
    name = f"hang-test-{os.getpid()}"
    started = time.monotonic()
    result = racker("run", "--timeout", "4", "--name", name, "hang", "--", "true", env=private_store)
    assert time.monotonic() - started < 30
    assert result.returncode == 125
    lines = result.stderr.splitlines()
    assert lines[0] == f"racker: error: machine '{name}' did not become ready within 4s"
    assert "last console lines:" in result.stderr
    assert any("hang.service" in line or "systemd" in line for line in lines[2:]), result.stderr
    assert racker("gc", env=private_store).stdout.strip() == "nothing to clean up"
    assert name not in Path("/proc/mounts").read_text()
    assert not (store.home() / "run" / "nspawn" / name).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_boot_leaves_nothing(bookworm, private_store: dict, signum: int) -> None:
    _make_hanging_image(bookworm)
    run = subprocess.Popen(
        [sys.executable, "-m", "racker", "run", "hang", "--", "true"], env={**os.environ, **private_store}, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    booting = None
    while booting is None and time.monotonic() < deadline:
        booting = next((s for s in machines.all_states("nspawn") if s.pid and s.owner == run.pid), None)
        time.sleep(0.05)
    assert booting is not None, "the boot never started"
    time.sleep(0.5)  # well into the boot, which never finishes
    run.send_signal(signum)
    assert run.wait(timeout=60) == 128 + signum
    assert _gone(booting, timeout=1) == []
