"""Many machines on one host: a boot that hits a host limit says which, stop takes many names."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import racker

pytestmark = pytest.mark.slow

INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


@contextlib.contextmanager
def sysctl(path: Path, value: int) -> Iterator[None]:
    """The setting at `value` for the block, restored even if the block fails."""
    old = path.read_text()
    try:
        path.write_text(f"{value}\n")
        yield
    finally:
        path.write_text(old)


def _leftovers(store: Path) -> list[str]:
    return [str(p) for sub in ("machines", "run/nspawn") if (store / sub).is_dir() for p in (store / sub).iterdir()]


@pytest.mark.hostwide
def test_a_boot_out_of_inotify_instances_names_the_limit(share_image, private_store) -> None:  # type: ignore[no-untyped-def]
    share_image("debian-bookworm")
    before = INSTANCES.read_text()
    # Every machine runs as root, so the limit is the whole host's: kept low for one failing boot only.
    with sysctl(INSTANCES, 1):
        failed = racker("run", "--timeout", "30", "debian-bookworm", "--", "true", timeout=60)
    assert INSTANCES.read_text() == before
    assert failed.returncode == 125, failed.stderr
    first = failed.stderr.splitlines()[0]
    assert "ran out of inotify instances (fs.inotify.max_user_instances=1)" in first, failed.stderr
    assert "sysctl -w fs.inotify.max_user_instances=" in failed.stderr
    assert "Too many open files" in failed.stderr  # what the machine said, from its console
    assert _leftovers(Path(private_store["RACKER_HOME"])) == []


def _booting(store: Path) -> int:
    """Machines of the store whose nspawn runs but whose `racker start` has not handed them over yet."""
    count = 0
    for record in (store / "machines").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(record.read_text())
            count += bool(state["pid"] and state["owner"])
    return count


def test_parallel_starts_overlap_and_stop_takes_many_names(share_image, private_store) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    import time

    from conftest import ROOT

    share_image("debian-bookworm")
    store = Path(private_store["RACKER_HOME"])
    names = [f"d{i}-{os.getpid()}" for i in range(12)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "racker", "start", "debian-bookworm", "--name"]
    starts = [subprocess.Popen([*argv, name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    try:
        peak = 0
        while any(p.poll() is None for p in starts):
            peak = max(peak, _booting(store))
            time.sleep(0.05)
        assert [p.returncode for p in starts] == [0] * len(names), [p.stderr.read() for p in starts if p.returncode]  # type: ignore[union-attr]
        # No lock is held across a boot: the machines boot at the same time, not one after another.
        assert peak >= len(names) // 2, f"at most {peak} of {len(names)} machines booted at once"
        running = {m["name"] for m in json.loads(racker("ps", "--json").stdout)}
        assert running == set(names)
        assert all(racker("exec", name, "--", "true").returncode == 0 for name in names[:3])

        stopped = racker("stop", names[0], "no-such-machine", names[1], "also-missing")
        assert stopped.returncode == 125
        assert stopped.stdout.split() == names[:2], stopped.stdout  # the ones after a missing name too
        assert "'no-such-machine', 'also-missing'" in stopped.stderr.splitlines()[0], stopped.stderr
        assert {m["name"] for m in json.loads(racker("ps", "--json").stdout)} == set(names[2:])

        everything = racker("stop", "--all")
        assert everything.returncode == 0, everything.stderr
        assert sorted(everything.stdout.split()) == sorted(names[2:])
    finally:
        for p in starts:
            p.kill()
            p.wait()
        if racker("stop", "--all").returncode != 0:
            for name in names:  # a stop that cannot take --all must not leave the machines running
                racker("stop", name)
    assert json.loads(racker("ps", "--json").stdout) == []
    assert _leftovers(store) == []
    from racker.machines import cgroups

    assert cgroups.machine_names() == set()
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _in_store(int(p), store)]


def _in_store(pid: int, store: Path) -> bool:
    """A process (an nspawn, a machine's init) working from this store."""
    try:
        return str(store) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@contextlib.contextmanager
def limits_restored() -> Iterator[None]:
    """Every sysctl racker knows as it was, after the block, however it ends."""
    from racker.machines import limits

    saved = {limit.path: limit.path.read_text() for limit in limits.LIMITS if limit.sysctl}
    try:
        yield
    finally:
        for path, value in saved.items():
            if path.read_text() != value:  # some are read-only in a container
                path.write_text(value)


@pytest.mark.hostwide  # lowers the host's inotify instances; other workers' machines also change the count it reads
def test_doctor_names_the_binding_limit_and_fix_raises_it(private_store) -> None:  # type: ignore[no-untyped-def]
    from racker.machines import limits

    used = limits.inotify_instances()
    with limits_restored():
        INSTANCES.write_text(f"{used + 3 * 7}\n")  # room for three machines of typical cost
        report = racker("doctor", "--json", "--no-probe")
        fixed = racker("doctor", "--fix", "--no-probe")
        after = int(INSTANCES.read_text())
    machines_check = next(c for c in json.loads(report.stdout) if c["name"] == "machines")
    assert "about 3 more" in machines_check["detail"] and "inotify instances binds first" in machines_check["detail"], machines_check
    assert fixed.returncode == 0, fixed.stderr
    assert f"set fs.inotify.max_user_instances: {used + 21} -> {after}" in fixed.stdout, fixed.stdout
    assert after >= used + limits.TARGET_MACHINES * 7
    assert "/etc/sysctl.d/" in fixed.stdout
    row = next(line for line in fixed.stdout.splitlines() if "more  inotify instances:" in line)
    assert int(row.split()[0]) >= limits.TARGET_MACHINES, row  # the report after the fix counts the new limit
