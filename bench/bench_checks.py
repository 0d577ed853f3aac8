"""Wall time of `pytest --pyargs racker.checks -n auto` over the four Debian images.

The images are built first (not timed). The baseline is the same pytest run
with no test selected, which prices pytest and xdist start-up, so the ratio
shows what booting and checking cost on top. Prints JSON.

    python bench/bench_checks.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from racker import images

IMAGES = ["debian-bullseye", "debian-bookworm", "debian-trixie", "debian-sid"]


def pytest_run(*extra: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "racker.checks",
            "-n",
            "auto",
            f"--racker-images={','.join(IMAGES)}",
            *extra,
        ]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
        elapsed = time.monotonic() - started
    if done.returncode not in (0, 5):
        raise SystemExit(done.stdout + done.stderr)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in IMAGES:
        images.pull(name)
    baseline, checks = [], []
    for _ in range(args.rounds):
        baseline.append(pytest_run("-k", "no_test_has_this_name"))
        checks.append(pytest_run())
    print(
        json.dumps(
            {
                "benchmark": "pytest --pyargs racker.checks -n auto over 4 images",
                "rounds": args.rounds,
                "pytest_startup_median_s": round(statistics.median(baseline), 2),
                "checks_median_s": round(statistics.median(checks), 2),
                "ratio": round(statistics.median(checks) / statistics.median(baseline), 2),
                "goal": {"checks_max_s": 30},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
