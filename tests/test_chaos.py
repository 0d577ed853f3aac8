"""kill -9 at fixed points of each operation, then gc: nothing may be left, and the next command works.

The short version of bench/chaos.py (which kills at random points, 50 rounds):
each kill lands a fixed time after an event of the operation (mmdebstrap
building, promote staging or writing its output, nspawn or QEMU started), in a
private store seeded by hard links from the shared one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _load_chaos():
    path = Path(__file__).resolve().parent.parent / "bench" / "chaos.py"
    spec = importlib.util.spec_from_file_location("racker_bench_chaos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """One private store for the module: the cached disk and `tiny` are built once."""
    lab = chaos.Lab(tmp_path_factory.mktemp("chaos"))
    try:
        lab.seed()
        yield lab
    finally:
        lab.close()


# First, while `tiny` is unbuilt: the pull rounds' next `racker pull tiny` then needs no build.
def test_eight_parallel_pulls_build_once(lab) -> None:
    outcome = chaos.parallel_pulls(lab, "tiny", count=8)
    assert (outcome["builds"], outcome["succeeded"], outcome["digests"]) == (1, 8, 1), outcome
    assert outcome["failures"] == [], outcome
    assert outcome["leftovers"] == [], "left behind:\n" + "\n".join(outcome["leftovers"])


def test_four_parallel_starts_of_one_name_start_one_machine(lab) -> None:
    outcome = chaos.parallel_starts(lab, count=4)
    assert outcome["exit_statuses"] == [0, 125, 125, 125], outcome
    assert outcome["running"] == [lab.names[-1]], outcome
    assert outcome["failures"] == [], outcome
    assert outcome["leftovers"] == [], "left behind:\n" + "\n".join(outcome["leftovers"])


def test_one_name_claimed_by_four_processes_at_once_goes_to_one(lab) -> None:
    """What `racker start --name` does first, 200 times in step: the four-start test above, made likely."""
    outcome = chaos.parallel_claims(lab, processes=4, names=200)
    assert outcome["failures"] == [], outcome


# (operation, event, seconds after it): where each kill lands.
KILLS = [
    pytest.param("pull", "building", 2.0, id="pull-during-mmdebstrap"),
    pytest.param("pull", "", 0.6, id="pull-as-it-starts"),
    pytest.param("run", "nspawn", 0.0, id="run-while-booting"),
    pytest.param("run", "booted", 0.5, id="run-while-the-command-runs"),
    pytest.param("promote", "staging", 0.3, id="promote-while-staging"),
    pytest.param("promote", "writing", 0.0, id="promote-while-writing-the-output"),  # promote writes its output in well under a second
    # One VM round: QEMU boots are the cost. Its first start also builds the cached disk.
    pytest.param("vm", "qemu", 3.0, id="vm-start-while-qemu-boots", marks=pytest.mark.qemu),
]


@pytest.mark.parametrize(("op", "trigger", "delay"), KILLS)
def test_kill_9_then_gc_leaves_nothing(lab, op: str, trigger: str, delay: float) -> None:
    number = len(lab.names) + 1
    result = chaos.run_round(lab, number, chaos.OPS[op], delay, trigger=trigger, timeout=240)
    assert not result.completed, f"{op} finished before the kill: the kill point is too late ({result.killed_at}s)"
    context = f"killed at {result.killed_at}s with {result.at_kill or 'nothing in the store yet'}; gc said {result.gc}"
    assert result.leftovers == [], "left behind:\n" + "\n".join(result.leftovers) + "\n" + context
    assert result.failures == [], "failed:\n" + "\n".join(result.failures) + "\n" + context
