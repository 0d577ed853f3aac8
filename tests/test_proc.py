"""The one place racker starts programs: logged, owned, and dead with racker."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import racker
from racker import errors, proc


def test_nothing_is_loaded_between_fork_and_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a library in the child of a multi-threaded process can deadlock: prctl is found in the parent."""
    proc._prctl()

    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("ctypes.CDLL called in the child")

    monkeypatch.setattr(ctypes, "CDLL", no_loading)
    assert proc.run(["true"]).succeeded


def test_a_child_dies_with_racker_even_by_kill_9(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "pid"
    script = (
        "import sys, time; from racker import proc;"
        f"child = proc.start(['sleep', '300']); open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(300)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    started = proc.start_time(child)
    parent.kill()
    parent.wait()
    assert proc.wait_exit(child, 10) or not proc.alive(child, started, proc.boot_id()), "the child outlived racker"


def test_interrupted_is_not_swallowed_by_broad_excepts() -> None:
    assert not issubclass(errors.Interrupted, Exception)
    with pytest.raises(errors.Interrupted), contextlib.suppress(Exception):
        raise errors.Interrupted(signal.SIGTERM)


@pytest.mark.slow
def test_debug_shows_every_command_a_machine_takes() -> None:
    result = racker("--debug", "run", "debian-bookworm", "--", "true")
    assert result.returncode == 0, result.stderr
    commands = [line.split()[2] for line in result.stderr.splitlines() if line.startswith("racker: run: ")]
    assert any(c.endswith("/systemd-nspawn") for c in commands), commands
    assert any(c.endswith("/nsenter") for c in commands), commands


def test_foreground_children_stay_in_our_process_group() -> None:
    with proc.spawn(["sleep", "30"], foreground=True) as child:
        assert os.getpgid(child.pid) == os.getpgrp()
    with proc.spawn(["sleep", "30"]) as child:
        assert os.getpgid(child.pid) == child.pid
    assert child.returncode is not None
