"""The pytest plugin, driven the way a user drives it: pytest -n 2 in a project of theirs.

Every test runs in a private store holding the catalogue images (hard links to
the shared store's): they boot machines, gc, and build cached disks there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CATALOG_IMAGES, ROOT, racker
from racker import machines, proc, report
from racker.report import html as report_html
from racker.report.results import read_tests
from racker.vm import snapshots

pytestmark = pytest.mark.slow
SAMPLE = Path(__file__).parent / "sample_project"


@pytest.fixture(autouse=True)
def catalogue_store(share_image, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private store with the catalogue images, and the catalogue itself (no `tiny`: "all" means the catalogue)."""
    monkeypatch.delenv("RACKER_CATALOG")
    for name in CATALOG_IMAGES:
        share_image(name)
    return {"RACKER_HOME": os.environ["RACKER_HOME"]}


def _env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a pytest run of ours: this tree's racker, not whichever one is installed
    (its cwd is the sample project, so it would import the installed one)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def run_sample(tmp_path: Path, *args: str, env: dict | None = None, wait: bool = True):
    results = tmp_path / "results.jsonl"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-n",
        "2",
        f"--racker-results={results}",
        f"--junitxml={tmp_path / 'junit.xml'}",
        *args,
    ]
    if not wait:
        return subprocess.Popen(argv, cwd=SAMPLE, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), results
    done = subprocess.run(argv, cwd=SAMPLE, env=_env(env), capture_output=True, text=True, timeout=600)
    return done, read_tests(results)


def image_records(tmp_path: Path) -> list[dict]:
    """The "image" records (facts) of run_sample's results."""
    return [r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines()) if r.get("kind") == "image"]


def by_outcome(records: list[dict]) -> dict[str, set[str]]:
    outcomes: dict[str, set[str]] = {}
    for r in records:
        outcomes.setdefault(r["outcome"], set()).add(r["nodeid"])
    return outcomes


def test_sample_project_passes_on_every_image(tmp_path: Path) -> None:
    done, records = run_sample(tmp_path, "-v")
    assert done.returncode == 0, done.stdout + done.stderr
    # All tests of one image run on one worker, so each image boots once.
    placed = set(re.findall(r"^\[(gw\d+)\] .*\[(debian-\w+)\]\s*$", done.stdout, re.MULTILINE))
    assert sorted(image for _worker, image in placed) == sorted(CATALOG_IMAGES), placed
    outcomes = by_outcome(records)
    assert set(outcomes) == {"pass", "skip"}
    assert len(outcomes["pass"]) == 5 * len(CATALOG_IMAGES)
    assert {r["image"] for r in records} == set(CATALOG_IMAGES)
    # Stable, sorted ids that name the image.
    assert "test_sample.py::test_root_user[debian-bookworm]" in outcomes["pass"]
    full_boot = [r for r in records if r["check"] == "test_bootloader_installed"]
    assert len(full_boot) == len(CATALOG_IMAGES)
    assert all(r["outcome"] == "skip" and r["message"] == "nspawn cannot provide: full-boot" for r in full_boot)
    junit = (tmp_path / "junit.xml").read_text()
    assert 'name="racker_image" value="debian-sid"' in junit
    # What each worker learnt about its image reached the controller's results, for the report.
    facts = {r["image"]: r for r in image_records(tmp_path)}
    assert sorted(facts) == sorted(CATALOG_IMAGES)
    assert all(f["engine"] == "nspawn" and f["digest"].startswith("sha256:") and f["systemd"] for f in facts.values())
    assert 'name="racker_facts"' in junit
    assert machines.all_states("nspawn") == []


def test_failing_check_and_harness_error_are_told_apart(tmp_path: Path) -> None:
    done, records = run_sample(
        tmp_path, "--racker-images=debian-bookworm,no-such-image", "-k", "nginx or root_user", env={"SAMPLE_FAIL": "1"}
    )
    assert done.returncode == 1
    result = {(r["check"], r["image"]): r for r in records}
    failed = result[("test_nginx_is_installed", "debian-bookworm")]
    assert failed["outcome"] == "fail"
    assert "expected nginx to be installed" in failed["message"]
    assert result[("test_root_user", "debian-bookworm")]["outcome"] == "pass"
    broken = result[("test_root_user", "no-such-image")]
    assert broken["outcome"] == "error", "an image that cannot be had is the harness's error, not a failing check"
    assert "unknown image 'no-such-image'" in broken["message"]
    # Neither is retried: a check's failure never, and a missing image is no error a new machine mends.
    assert "attempts" not in failed and "attempts" not in broken
    # The failure's evidence, beside the results: the console, the journal, the commands with their output.
    evidence = failed["evidence"]
    assert {"console.log", "commands.txt"} <= set(evidence) and {"journal.export", "journal.txt"} & set(evidence), evidence
    assert "dpkg-query" in (tmp_path / evidence["commands.txt"]).read_text()
    assert "evidence" not in result[("test_root_user", "debian-bookworm")]
    # The failure report carries the command the check ran and the machine's journal.
    assert "racker: command (1)" in done.stdout and "dpkg-query" in done.stdout
    assert "racker: journal of debian-bookworm-" in done.stdout
    assert "Reached target" in done.stdout or "Startup finished" in done.stdout


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether `pid` is `ancestor` or one of its descendants (children, their children…)."""
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def test_descends_from_tells_a_worker_from_any_other_process() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 30; true"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        grandchildren: list[str] = []
        while not grandchildren and time.monotonic() < deadline:
            grandchildren = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
            time.sleep(0.05)
        assert grandchildren, "the child never started sleep"
        assert descends_from(int(grandchildren[0]), child.pid)
        assert descends_from(child.pid, os.getpid())
        assert not descends_from(os.getpid(), child.pid)
        assert not descends_from(os.getppid(), child.pid)
        assert not descends_from(1, child.pid)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the shell and its sleep
        child.wait()


def test_killed_worker_leaves_nothing_gc_cannot_clean(tmp_path: Path) -> None:
    # Two images, so each worker takes one: the victim's and a survivor's run in parallel.
    args = ("-k", "slow", "--racker-images=debian-bookworm,debian-sid", "--max-worker-restart=0")
    run, _results = run_sample(tmp_path, *args, env={"SAMPLE_SLOW": "20"}, wait=False)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and run.poll() is None:
            for state in machines.all_states("nspawn"):
                # A machine of an xdist worker of the run started here: never another process's.
                if state.leader and state.owner != run.pid and descends_from(state.owner, run.pid):
                    victim = state
            time.sleep(0.2)
        assert victim is not None, "no worker of this run booted a machine"
        # Kill through a pidfd, after checking once more that it is still that worker:
        # its pid cannot be reused by another process in between.
        pidfd = os.pidfd_open(victim.owner)
        try:
            assert proc.alive(victim.owner, victim.owner_start, victim.boot_id), "the worker exited before the kill"
            assert descends_from(victim.owner, run.pid), f"pid {victim.owner} is not a worker of this run"
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
        output, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.communicate(timeout=60)
    assert run.returncode != 0, output
    assert "crashed" in output or "node down" in output, output
    gc = racker("gc")
    assert gc.returncode == 0, gc.stderr
    assert f"removed stale nspawn record {victim.name}" in gc.stdout, gc.stdout
    assert [s.name for s in machines.all_states("nspawn")] == []
    assert victim.name not in Path("/proc/mounts").read_text()
    assert not proc.alive(victim.pid, victim.pid_start, victim.boot_id)
    # The next run is unaffected.
    done, records = run_sample(tmp_path, "-k", "root_user")
    assert done.returncode == 0, done.stdout
    assert {r["outcome"] for r in records} == {"pass"}


def test_checks_run_from_the_installed_package(tmp_path: Path) -> None:
    results = tmp_path / "checks.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "racker.checks",
            "--racker-images=all",
            "-n",
            "2",
            f"--racker-results={results}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout
    records = read_tests(results)
    container = [r for r in records if "test_container.py" in r["nodeid"]]
    assert len(container) == 6 * len(CATALOG_IMAGES)
    assert {r["outcome"] for r in container} == {"pass"}
    # The full-boot checks need the qemu engine: under nspawn each is skipped, saying why.
    full_boot = [r for r in records if "test_vm.py" in r["nodeid"]]
    assert full_boot and {r["outcome"] for r in full_boot} == {"skip"}
    assert {r["message"] for r in full_boot} == {"nspawn cannot provide: full-boot, first-boot, ssh, cloud-init, network"}


def test_racker_check_prints_a_result_table() -> None:
    done = racker("check", "debian-sid")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CHECK"))
    assert lines[start].split() == ["CHECK", "debian-sid/nspawn"]
    rows = dict(line.split() for line in lines[start + 1 :])
    assert [c for c, outcome in rows.items() if outcome == "pass"] == [
        "hostname_is_set", "journald_records_messages", "loopback_networking",
        "package_manager_works_offline", "sshd_is_installed_and_enabled", "system_reaches_running",
    ]  # fmt: skip
    assert rows["sshd_active_and_listening"] == rows["profile_requirements_met"] == "skip"


@pytest.mark.qemu
def test_qemu_engine_runs_what_nspawn_cannot(tmp_path: Path, share_image) -> None:
    """Two engines: ids name the engine too, and a full-boot test runs in the VM only. One real
    boot serves the run: the first-boot test's VM, which saves the snapshot the others restore."""
    share_image("debian-bookworm", prepared=True)  # prepared once, in the shared store
    chosen = "bootloader or root_user or cloud_init_finished"
    done, records = run_sample(tmp_path, "--racker-engines=nspawn,qemu", "--racker-images=debian-bookworm", "-k", chosen)
    assert done.returncode == 0, done.stdout + done.stderr
    outcomes = {r["nodeid"]: (r["engine"], r["outcome"]) for r in records}
    assert outcomes == {
        "test_sample.py::test_root_user[debian-bookworm-nspawn]": ("nspawn", "pass"),
        "test_sample.py::test_root_user[debian-bookworm-qemu]": ("qemu", "pass"),
        "test_sample.py::test_bootloader_installed[debian-bookworm-nspawn]": ("nspawn", "skip"),
        "test_sample.py::test_bootloader_installed[debian-bookworm-qemu]": ("qemu", "pass"),
        "test_vm_first_boot.py::test_cloud_init_finished_this_boot[debian-bookworm-nspawn]": ("nspawn", "skip"),
        "test_vm_first_boot.py::test_cloud_init_finished_this_boot[debian-bookworm-qemu]": ("qemu", "pass"),
    }
    vm = next(r for r in image_records(tmp_path) if r["engine"] == "qemu")
    assert vm["accel"] in ("kvm", "tcg") and vm["kernel"] == vm["running_kernel"] and vm["disk_bytes"] > 0, vm
    assert {"kernel", "userspace"} <= set(vm["boot"]), vm
    # The first-boot test ran first (though its module sorts after test_sample.py) on a cold VM
    # that saved the disk's snapshot; the warm VM of the other tests restored it, in the same run.
    (snapshot,) = snapshots.all_snapshots()
    # The warm VM's facts (the snapshot's boot) never overwrite the night's cold boot: the last
    # record still tells that boot, and so does the report made from these results.
    last = [r for r in image_records(tmp_path) if r["engine"] == "qemu"][-1]  # facts are sent again as they grow
    assert vm["restored_from"] == "" and (last["restored_from"], last["boot"]) == ("", vm["boot"]), (vm, last)
    made = report.build([tmp_path / "results.jsonl"])
    assert report_html.boot(made["images"]["debian-bookworm"]["qemu"]).startswith("cold boot: "), made["images"]
    (again := tmp_path / "again").mkdir()
    done, records = run_sample(again, "--racker-engines=qemu", "--racker-images=debian-bookworm", "-k", "root_user")
    assert done.returncode == 0 and [r["outcome"] for r in records] == ["pass"], done.stdout + done.stderr
    warm = next(r for r in image_records(again) if r["engine"] == "qemu")
    assert warm["restored_from"] == snapshot.id, warm


DESTRUCTIVE_PROJECT = """
import os

import pytest


def seen(host, test):
    with open(os.environ["SEEN"], "a") as log:
        log.write(f"{test} {host.backend.name}\\n")


def test_a_first(host):
    seen(host, "a_first")
    host.run("echo before-the-failure")


def test_b_shares(host):
    seen(host, "b_shares")


@pytest.mark.destructive
def test_c_destroys(host):
    seen(host, "c_destroys")
    host.run_expect([0], "rm /etc/debian_version && systemctl stop ssh")


def test_d_sees_it_whole(host):
    seen(host, "d_sees_it_whole")
    assert host.file("/etc/debian_version").exists
    assert host.service("ssh").is_running


@pytest.mark.racker(fresh=True)
def test_e_fresh(host):
    seen(host, "e_fresh")


def test_f_fails(host, racker_host):
    seen(host, "f_fails")
    racker_host(user="nobody").run("echo in-the-failing-test")
    assert host.run("echo failing-check; false").rc == 0
"""


def _run_project(project: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[tuple[str, str]]]:
    seen = project / "seen.txt"
    seen.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-v", *args],
        cwd=project,
        env=_env({"SEEN": str(seen)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, [tuple(line.split()) for line in seen.read_text().splitlines()]  # type: ignore[misc]


def test_destructive_and_fresh_tests_get_machines_of_their_own(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nracker_images = debian-bookworm\n")
    (tmp_path / "test_destructive.py").write_text(DESTRUCTIVE_PROJECT)
    done, seen = _run_project(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    outcomes = dict(re.findall(r"::test_(\w+)\[debian-bookworm\] (PASSED|FAILED)", done.stdout))
    assert outcomes == {**dict.fromkeys(["a_first", "b_shares", "c_destroys", "d_sees_it_whole", "e_fresh"], "PASSED"), "f_fails": "FAILED"}
    # The others share the module's machine (pytest may run them first: it groups tests by machine),
    # which the destructive test never touched.
    machine = dict(seen)
    shared = machine["a_first"]
    assert machine["b_shares"] == machine["d_sees_it_whole"] == machine["f_fails"] == shared
    assert len({shared, machine["c_destroys"], machine["e_fresh"]}) == 3
    # The failure report shows the failing test's commands (of every user), not those of the tests before it.
    report = done.stdout[done.stdout.index("test_f_fails") :]
    assert "failing-check" in report and "in-the-failing-test" in report
    assert "before-the-failure" not in done.stdout and "debian_version" not in report
    assert machines.all_states("nspawn") == []

    # racker_machine_scope = function: a machine per test.
    done, seen = _run_project(tmp_path, "-o", "racker_machine_scope=function", "-k", "a_first or b_shares or d_sees")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len({name for _test, name in seen}) == 3
    assert machines.all_states("nspawn") == []


def test_attach_to_a_machine_that_is_not_running_is_a_usage_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "racker.checks", "--racker-attach=no-such-vm"]
    done = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--racker-attach: no running machine or VM named 'no-such-vm'" in done.stderr


def test_a_bad_retry_count_is_a_usage_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "racker.checks", "--racker-retries=-1"]
    done = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--racker-retries must be a whole number, 0 or more, not '-1'" in done.stderr


def test_a_harness_errors_hint_reaches_the_results_log(tmp_path: Path) -> None:
    """A racker error's hint (a boot timeout's console tail, say) is in the report and the results."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_hint.py").write_text(
        "from racker.errors import VMError\n\n\ndef test_boot():\n"
        "    raise VMError('VM x did not become ready', hint='last console lines:\\nracker-console-tail')\n"
    )
    results = tmp_path / "results.jsonl"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--racker-results={results}", str(tmp_path)]
    done = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    (record,) = read_tests(results)
    assert record["outcome"] == "error" and "did not become ready" in record["message"], record
    assert "racker: hint" in record["log"] and "racker-console-tail" in record["log"], record["log"]


def test_harness_errors_are_retried_on_a_new_machine_and_a_pass_then_is_flaky(tmp_path: Path) -> None:
    boot, lose = tmp_path / "boot-timeouts", tmp_path / "lost-machines"
    boot.mkdir(), lose.mkdir()
    faults = {"SAMPLE_RETRIES": str(tmp_path), "SAMPLE_BOOT_TIMEOUT_ONCE": str(boot), "SAMPLE_LOSE_MACHINE_ONCE": str(lose)}
    done, records = run_sample(tmp_path, "--racker-images=debian-bookworm", "-k", "test_retries", env=faults)
    assert done.returncode == 0, done.stdout[-5000:]
    result = {r["check"]: r for r in records}
    assert {r["outcome"] for r in records} == {"flaky"}, records
    assert "2 flaky" in done.stdout, done.stdout[-2000:]

    # A machine's boot timed out: the test ran on a new machine, whose name it wrote down.
    booted = result["test_boots"]
    [first] = booted["attempts"]
    assert first["when"] == "setup" and "did not become ready within 0.3s" in first["message"], first
    timed_out = re.search(r"machine '([\w.-]+)'", first["message"]).group(1)  # type: ignore[union-attr]
    assert timed_out not in (tmp_path / "machines").read_text().split(), "the retry reused the machine that timed out"
    # Both attempts' evidence, beside the results: the timed-out boot's console, and the pass's logs.
    assert set(first["evidence"]) >= {"console.log", "nspawn.log"}
    assert set(booted["evidence"]) >= {"console.log", "commands.txt"} and {"journal.export", "journal.txt"} & set(booted["evidence"])
    for path in [*first["evidence"].values(), *booted["evidence"].values()]:
        assert path.startswith("evidence/") and (tmp_path / path).is_file(), path
    assert "attempt-1" in first["evidence"]["console.log"] and "attempt-2" in booted["evidence"]["console.log"]
    assert "systemd" in (tmp_path / booted["evidence"]["console.log"]).read_text()

    # The machine died under a test: the lost channel is the harness's, retried on a new machine.
    lost = result["test_loses_its_machine_once"]
    [first] = lost["attempts"]
    assert first["when"] == "call" and "is gone" in first["message"], first
    assert "console.log" in first["evidence"] and (tmp_path / first["evidence"]["console.log"]).is_file()
    assert machines.all_states("nspawn") == []

    # --racker-retries=0: no retry, and the harness's errors stand.
    again = tmp_path / "again"
    for directory in (again, again / "boot", again / "lose"):
        directory.mkdir()
    faults = {
        "SAMPLE_RETRIES": str(again),
        "SAMPLE_BOOT_TIMEOUT_ONCE": str(again / "boot"),
        "SAMPLE_LOSE_MACHINE_ONCE": str(again / "lose"),
    }
    done, records = run_sample(again, "--racker-images=debian-bookworm", "-k", "test_retries", "--racker-retries=0", env=faults)
    assert done.returncode == 1
    assert {r["check"]: r["outcome"] for r in records} == {"test_boots": "error", "test_loses_its_machine_once": "error"}
    assert not any("attempts" in r for r in records)
    assert all("console.log" in r["evidence"] for r in records), records


def test_destructive_tests_have_a_machine_each_whatever_their_parameters(tmp_path: Path) -> None:
    # pytest-testinfra's own test_supervisor[…] are two such tests: the second found the
    # supervisor the first had stopped, on the machine the two shared.
    done, records = run_sample(tmp_path, "--racker-images=debian-bookworm", "-k", "test_damages", env={"SAMPLE_DESTRUCTIVE": "1"})
    assert done.returncode == 0, done.stdout[-5000:]
    assert [r["outcome"] for r in records] == ["pass", "pass"]
