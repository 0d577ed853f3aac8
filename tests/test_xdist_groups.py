"""racker's xdist scheduler honours xdist_group marks: a group's tests run on one worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # starts pytest-xdist workers

GROUPED = """\
import pytest

pytestmark = pytest.mark.xdist_group("{group}")


@pytest.mark.parametrize("n", range(4))
def test_in_group(n):
    pass
"""


def test_tests_of_one_xdist_group_go_to_one_worker(tmp_path: Path) -> None:
    # Two modules in group "a", one in "b": twelve tests that plain load scheduling would spread.
    for name, group in (("test_a1.py", "a"), ("test_a2.py", "a"), ("test_b.py", "b")):
        (tmp_path / name).write_text(GROUPED.format(group=group))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-v", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    placed = re.findall(r"^\[(gw\d+)\] .*(test_\w+)\.py::", done.stdout, re.MULTILINE)
    workers: dict[str, set[str]] = {}
    for worker, module in placed:
        workers.setdefault(module[len("test_") :][0], set()).add(worker)
    assert len(placed) == 12, done.stdout
    assert all(len(found) == 1 for found in workers.values()), workers
