"""What testinfra users pay for racker: host.run("true") against nsenter itself, and a fresh
machine per test against one machine per module.

1. On one booted machine, rounds alternate `nsenter ... -- true` (the bare transport)
   and `host.run("true")` through racker's testinfra backend (as root, and as a user).
2. A 20-test file (each test runs `true`) under pytest, once with the module's
   machine shared and once with racker_machine_scope = function.

Prints the medians and their ratios as JSON.

    python bench/bench_host.py [--rounds 50] [--tests 20] [--image debian-bookworm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import racker  # registers the racker:// backend with testinfra
from racker import images, prepare, proc
from racker.machines import nspawn
from racker.pytest.testinfra_backend import host_for

ROOT = Path(__file__).resolve().parent.parent


def timed(call) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    call()
    return time.monotonic() - started


def run_latency(image: str, rounds: int) -> dict:
    with nspawn.Machine(prepare.bootable(images.pull(image))) as machine:
        machine.run_expect([0], ["useradd", "--create-home", "bench"])
        assert machine.state is not None
        namespaces = ["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd"]
        bare = ["nsenter", f"--target={machine.state.leader}", *namespaces, "--", "true"]
        root, user = host_for(machine), host_for(machine, "bench")
        user.run("true")  # resolves the user once, as a test's first command does
        sides: dict[str, list[float]] = {"nsenter": [], "racker_root": [], "racker_user": []}
        for _ in range(rounds):
            sides["nsenter"].append(timed(lambda: subprocess.run(bare, check=True, env=proc.BASE_ENV)))
            sides["racker_root"].append(timed(lambda: root.run("true")))
            sides["racker_user"].append(timed(lambda: user.run("true")))
    medians = {k: statistics.median(v) for k, v in sides.items()}
    return {
        "nsenter_median_ms": round(medians["nsenter"] * 1000, 2),
        "host_run_median_ms": round(medians["racker_root"] * 1000, 2),
        "host_run_as_user_median_ms": round(medians["racker_user"] * 1000, 2),
        "ratio": round(medians["racker_root"] / medians["nsenter"], 3),
        "ratio_as_user": round(medians["racker_user"] / medians["nsenter"], 3),
    }


def pytest_seconds(project: Path, image: str, *options: str) -> float:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", f"--racker-images={image}", *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    subprocess.run(argv, cwd=project, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def fresh_cost(image: str, tests: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_many.py").write_text(
            "".join(f"def test_{i}(host):\n    assert host.run('true').rc == 0\n\n\n" for i in range(tests))
        )
        pytest_seconds(project, image, "-k", "test_0")  # warm: imports, page cache
        shared = pytest_seconds(project, image)
        fresh = pytest_seconds(project, image, "-o", "racker_machine_scope=function")
    return {
        "tests": tests,
        "one_machine_per_module_s": round(shared, 2),
        "fresh_machine_per_test_s": round(fresh, 2),
        "fresh_cost_per_test_s": round((fresh - shared) / tests, 3),
        "ratio": round(fresh / shared, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--image", default="debian-bookworm")
    args = parser.parse_args()
    result = {
        "benchmark": "host.run('true') vs nsenter; fresh machine per test vs one per module",
        "image": args.image,
        "rounds": args.rounds,
        "racker": racker.__version__,
        "host_run": run_latency(args.image, args.rounds),
        "fresh_machines": fresh_cost(args.image, args.tests),
        # The bare side execs `true` alone; host.run adds env -i and /bin/sh -c (as docker exec sh -c does).
        "goal": {"host_run_ratio_max": 4.0, "fresh_cost_per_test_max_s": 2.0},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
