"""The machine registry: process identity, names that stay inside it, atomic claims, damaged records.

racker runs as root and signals and deletes what its records name: none of
that may reach a process or a path it did not make.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import racker, racker_here
from racker import machines, proc
from racker.errors import BadSetting, MachineError, NameTaken
from racker.machines import cgroups
from racker.upkeep import gc
from racker.vm import ports


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process racker did not start, which nothing racker does may signal."""
    child = subprocess.Popen(["sleep", "300"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _dead_owner() -> tuple[int, int]:
    """(pid, start time) of a process that has exited: a record's owner that died."""
    child = subprocess.Popen(["true"])
    started = proc.start_time(child.pid)
    child.wait()
    return child.pid, started


def _stale_record(name: str, pid: int, started: int, *, boot: str | None = None, **extra: object) -> machines.State:
    """A record whose owner died, naming `pid` as its nspawn process and leader."""
    owner, owner_start = _dead_owner()
    state = machines.State(
        name=name,
        kind="nspawn",
        image="x",
        boot_id=proc.boot_id() if boot is None else boot,
        pid=pid,
        pid_start=started,
        leader=pid,
        leader_start=started,
        owner=owner,
        owner_start=owner_start,
        token="t",
        extra=dict(extra),
    )
    machines.save(state)
    return state


def test_gc_never_signals_a_pid_whose_start_time_or_boot_differs(private_store: dict, bystander) -> None:
    started = proc.start_time(bystander.pid)
    _stale_record("reused-pid", bystander.pid, started - 1)  # the pid now belongs to another process
    _stale_record("other-boot", bystander.pid, started, boot="00000000-0000-0000-0000-000000000000")  # recorded before a reboot
    removed = gc.collect()
    assert bystander.poll() is None, "gc killed a process racker did not start"
    assert "removed stale nspawn record reused-pid" in removed and "removed stale nspawn record other-boot" in removed
    assert not any("killed" in line for line in removed), removed


def test_gc_kills_the_process_a_stale_record_really_names(private_store: dict, bystander) -> None:
    _stale_record("mine", bystander.pid, proc.start_time(bystander.pid))
    removed = gc.collect()
    assert bystander.wait(10) == -9
    assert f"killed nspawn machine mine (pid {bystander.pid})" in removed


def test_signal_process_checks_identity(bystander) -> None:
    import signal

    started = proc.start_time(bystander.pid)
    assert not proc.signal_process(bystander.pid, started + 1, proc.boot_id(), signal.SIGTERM)
    assert not proc.signal_process(bystander.pid, started, "another-boot", signal.SIGTERM)
    assert bystander.poll() is None
    assert proc.signal_process(bystander.pid, started, proc.boot_id(), signal.SIGTERM)
    assert bystander.wait(10) == -signal.SIGTERM


@pytest.mark.parametrize("name", ["../x", "../refs/foo", "../../x/evil", ".hidden", "a/b", "", "-rf", "x" * 65])
def test_names_are_checked_where_they_become_paths(private_store: dict, name: str) -> None:
    with pytest.raises(MachineError, match="invalid machine name"):
        machines.record_path("nspawn", name)
    with pytest.raises(MachineError, match="invalid machine name"):
        machines.run_dir("nspawn", name)


@pytest.mark.parametrize(
    "argv",
    [
        ("stop", "../x"),
        ("stop", "../refs/foo"),
        ("exec", "../x", "--", "true"),
        ("vm", "stop", "../x"),
        ("vm", "ssh", "../x", "--", "true"),
        ("vm", "console", "../x"),
    ],
)
def test_commands_refuse_names_outside_the_registry(private_store: dict, argv: tuple[str, ...]) -> None:
    home = Path(private_store["RACKER_HOME"])
    outside = home / "refs" / "foo.json"
    outside.parent.mkdir(parents=True)
    outside.write_text(json.dumps({"digest": "sha256:0", "name": "../refs/foo", "kind": "nspawn", "image": "x"}))
    (home / "x.json").write_text(json.dumps({"name": "../x", "kind": "nspawn", "image": "x"}))
    result = racker_here(*argv)
    assert result.returncode == 125, result
    assert result.stderr.startswith("racker: error: invalid machine name"), result.stderr
    assert "Traceback" not in result.stderr
    assert outside.exists() and (home / "x.json").exists()


def test_a_crafted_record_signals_and_deletes_nothing_it_names(private_store: dict, bystander, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    record = machines.record_path("nspawn", "evil")
    # A record of the right shape, but its pid's start time is not the process's and
    # its cgroup and run directory are somebody else's.
    data = {
        "name": "evil",
        "kind": "nspawn",
        "image": "x",
        "boot_id": proc.boot_id(),
        "pid": bystander.pid,
        "pid_start": 1,
        "leader": bystander.pid,
        "leader_start": 1,
        "rundir": str(victim),
        "extra": {"cgroup": str(victim)},
    }
    record.write_text(json.dumps(data))
    result = racker("stop", "evil", env=private_store)
    assert "Traceback" not in result.stderr
    assert bystander.poll() is None, "racker stop signalled a process the record does not really own"
    assert (victim / "keep").exists(), "racker stop deleted a directory a record named"
    record.write_text(json.dumps(data))
    gc.collect()
    assert bystander.poll() is None and (victim / "keep").exists()


@pytest.mark.parametrize("text", ["[1, 2]", '{"digest": "sha256:0"}', "not json", '{"name": "other", "kind": "nspawn", "image": "x"}'])
def test_a_damaged_record_is_one_line_and_gc_removes_it(private_store: dict, text: str) -> None:
    record = machines.record_path("nspawn", "broken")
    record.write_text(text)
    stopped = racker_here("stop", "broken")
    assert stopped.returncode == 125 and stopped.stderr.startswith("racker: error: the record of 'broken'"), stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert racker_here("ps").returncode == 0
    collected = racker_here("gc")
    assert "removed damaged nspawn record broken" in collected.stdout, collected
    assert not record.exists()


def _claim_at_once(home: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    os.environ["RACKER_HOME"] = home
    state = machines.new_state("nspawn", "contested", "x")
    barrier.wait()
    try:
        machines.claim(state)
        results.put("won")
    except NameTaken:
        results.put("taken")
    except Exception as error:
        results.put(f"error: {error!r}")
    barrier.wait()  # winners stay alive (their claim live) until everyone has tried


def test_exactly_one_of_many_concurrent_claims_wins(private_store: dict) -> None:
    context = multiprocessing.get_context("fork")
    for _round in range(10):
        barrier, results = context.Barrier(8), context.Queue()
        workers = [context.Process(target=_claim_at_once, args=(private_store["RACKER_HOME"], barrier, results)) for _ in range(8)]
        for worker in workers:
            worker.start()
        outcomes = sorted(results.get(timeout=60) for _ in workers)
        for worker in workers:
            worker.join(30)
        assert outcomes == ["taken"] * 7 + ["won"], outcomes
        machines.record_path("nspawn", "contested").unlink()


def test_a_stale_claim_is_reaped_and_taken_over(private_store: dict, bystander) -> None:
    _stale_record("box", bystander.pid, proc.start_time(bystander.pid))
    machines.run_dir("nspawn", "box").mkdir(parents=True)
    state = machines.new_state("nspawn", "box", "x")
    machines.claim(state)
    assert bystander.wait(10) == -9, "the stale machine's process must go with its record"
    assert not machines.run_dir("nspawn", "box").exists()
    assert machines.load("nspawn", "box").token == state.token  # type: ignore[union-attr]
    with pytest.raises(NameTaken):
        machines.claim(machines.new_state("nspawn", "box", "x"))
    machines.release(state)
    assert machines.load("nspawn", "box") is None


def test_release_leaves_a_later_claim_of_the_name_alone(private_store: dict) -> None:
    first = machines.new_state("nspawn", "box", "x")
    machines.claim(first)
    machines.record_path("nspawn", "box").unlink()  # as if gc reaped it
    second = machines.new_state("nspawn", "box", "x")
    machines.claim(second)
    machines.release(first)
    assert machines.load("nspawn", "box").token == second.token  # type: ignore[union-attr]


def test_cgroups_outside_the_store_are_never_removed(private_store: dict, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cg"
    elsewhere.mkdir()
    cgroups.remove(elsewhere)
    assert elsewhere.exists()


def _free_run_of_ports(count: int) -> range:
    """`count` consecutive ports on 127.0.0.1 that nothing listens on now."""
    import random
    import socket

    for _attempt in range(100):
        start = random.randrange(40000, 60000)
        ports = range(start, start + count)
        try:
            with contextlib.ExitStack() as probes:
                for port in ports:
                    probe = probes.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            return ports
        except OSError:
            continue
    raise AssertionError("no free run of ports")


def _allocate_at_once(home: str, barrier, results) -> None:  # type: ignore[no-untyped-def]

    os.environ["RACKER_HOME"] = home
    state = machines.new_state("qemu", f"port-{os.getpid()}", "x")
    machines.claim(state)
    state.pid, state.pid_start = state.owner, state.owner_start  # stands in for its QEMU
    barrier.wait()
    try:
        with ports.ssh_port(state) as port:
            results.put(port)
    except Exception as error:
        results.put(f"error: {error!r}")
    barrier.wait()  # every VM holds its port until all have one
    machines.release(state)


def test_concurrent_vms_are_given_distinct_ports(private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real allocators in parallel processes, with exactly as many ports as VMs: any overlap is a collision."""
    context = multiprocessing.get_context("fork")
    for _round in range(3):
        ports = _free_run_of_ports(6)
        monkeypatch.setenv("RACKER_SSH_PORTS", f"{ports.start}-{ports.stop - 1}")
        barrier, results = context.Barrier(6), context.Queue()
        workers = [context.Process(target=_allocate_at_once, args=(private_store["RACKER_HOME"], barrier, results)) for _ in range(6)]
        for worker in workers:
            worker.start()
        given = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
        assert sorted(given) == list(ports), given


def test_a_bad_port_range_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("RACKER_SSH_PORTS", "lots")
    with pytest.raises(BadSetting, match="RACKER_SSH_PORTS='lots' is not a port range"):
        ports.free_port(set())
