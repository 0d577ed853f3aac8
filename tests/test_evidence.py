"""The results' verdicts and evidence files, from test reports as the plugin makes them (no machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from racker.report import evidence, results

NODE = "test_x.py::test_boots[debian-bookworm]"


def report(when: str, outcome: str = "passed", **extra: object) -> pytest.TestReport:
    props = [("racker_image", "debian-bookworm"), ("racker_engine", "nspawn")]
    return pytest.TestReport(NODE, ("test_x.py", 1, "test_boots"), {}, outcome, None, when, user_properties=props, **extra)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_pass_after_a_retry_is_flaky_and_keeps_both_attempts_evidence(tmp_path: Path) -> None:
    stream = results.ResultStream(str(tmp_path / "results.jsonl"))
    first = {
        "outcome": "error",
        "when": "setup",
        "message": "machine 'm1' did not become ready within 0.3s",
        "evidence": {"console.log": "boot…"},
    }
    stream.pytest_runtest_logreport(report("setup", racker_attempt=2))
    stream.pytest_runtest_logreport(report("call", racker_attempt=2, racker_evidence={"journal.txt": "ok", "commands.txt": "$ true"}))
    stream.pytest_runtest_logreport(report("teardown", racker_attempt=2, racker_attempts=[first]))
    stream.pytest_sessionfinish()
    [record] = records(tmp_path / "results.jsonl")
    assert record["outcome"] == "flaky"
    assert "passed on attempt 2" in record["message"] and "did not become ready" in record["message"]
    [kept] = record["attempts"]
    assert (kept["outcome"], kept["when"]) == ("error", "setup")
    assert (tmp_path / kept["evidence"]["console.log"]).read_text() == "boot…"
    assert "attempt-1" in kept["evidence"]["console.log"] and "attempt-2" in record["evidence"]["journal.txt"]
    assert (tmp_path / record["evidence"]["commands.txt"]).read_text() == "$ true"


def test_a_pass_at_the_first_attempt_is_a_pass_with_no_evidence(tmp_path: Path) -> None:
    stream = results.ResultStream(str(tmp_path / "results.jsonl"))
    for when in ("setup", "call", "teardown"):
        stream.pytest_runtest_logreport(report(when))
    stream.pytest_sessionfinish()
    [record] = records(tmp_path / "results.jsonl")
    assert record["outcome"] == "pass" and "evidence" not in record and "attempts" not in record
    assert not (tmp_path / "evidence").exists()


def test_evidence_is_capped_per_file_and_in_all(tmp_path: Path) -> None:
    writer = evidence.Writer(tmp_path / "results.jsonl", total_limit=evidence.EVIDENCE_FILE_LIMIT + 100)
    big = "x" * (evidence.EVIDENCE_FILE_LIMIT + 5000) + "the end"
    paths = writer.write(NODE, 1, {"console.log": big, "journal.txt": "y" * 200, "../escape": "z"})
    kept = (tmp_path / paths["console.log"]).read_text()
    assert kept.endswith("the end") and "characters left out" in kept and len(kept) < evidence.EVIDENCE_FILE_LIMIT + 100
    assert paths["journal.txt"] == "", "past the total limit: named, with no file"
    assert paths["../escape"].startswith("evidence/") and (tmp_path / paths["../escape"]).is_file()
    assert evidence.cell_directory(NODE) != evidence.cell_directory(NODE + "x")
