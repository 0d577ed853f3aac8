"""The results' verdicts and evidence files, from test reports as the plugin makes them (no machine)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from racker.proc import Result
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


def test_the_gathering_s_parts_are_split_at_their_boundary_exactly() -> None:
    said = "noise\n\nB begin a\none\ntwo\n\nB end a 0\n\nB begin b\nno newline\nB end b 3\n\nB begin cut\npart"
    assert evidence.split_parts(said, "B") == {"a": ("one\ntwo\n", 0), "b": ("no newline", 3), "cut": ("part", -1)}


class LocalGuest:
    """A 'machine' whose commands run here, with a journalctl of the test's own first on PATH."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir, self.calls = bin_dir, []

    def run(self, argv, timeout=None):  # type: ignore[no-untyped-def]
        self.calls.append(list(argv))
        env = {**os.environ, "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}
        done = subprocess.run(argv, capture_output=True, env=env, timeout=timeout)
        return Result(list(argv), done.returncode, done.stdout, done.stderr)


# Two journal entries at first, a third after the first gathering: --after-cursor gives only the
# new one. After a reboot (or a snapshot's restore) this boot's journal has no entry c2: --cursor
# seeks to the nearest entry there is, as journalctl does, and --after-cursor gives this boot's.
FAKE_JOURNALCTL = """#!/bin/sh
here="$(dirname "$0")"
entry() { printf '__CURSOR=c%s\\nMESSAGE=entry %s\\n\\n' "$1" "$1"; }
if [ -e "$here/rebooted" ]; then
  case "$*" in *--output=export*) entry 9 ;; *--lines=*) echo "the last lines" ;; esac
  exit 0
fi
case "$*" in
  *--after-cursor=c2*) entry 3 ;;
  *--after-cursor*) exit 1 ;;
  *--cursor=c2*) entry 2; entry 3 ;;
  *--output=export*) entry 1; entry 2; if [ -e "$here/third" ]; then entry 3; fi ;;
  *--lines=*) echo "the last lines" ;;
esac
"""


def guest_with_fake_journal(bin_dir: Path) -> LocalGuest:
    (bin_dir / "journalctl").write_text(FAKE_JOURNALCTL)
    (bin_dir / "journalctl").chmod(0o755)
    return LocalGuest(bin_dir)


def test_a_second_failure_on_one_machine_reads_only_the_journal_s_new_entries(tmp_path: Path) -> None:
    guest = guest_with_fake_journal(tmp_path)
    first = evidence.from_guest(guest)
    assert first["journal.export"] == "__CURSOR=c1\nMESSAGE=entry 1\n\n__CURSOR=c2\nMESSAGE=entry 2\n\n"
    assert first["journal-tail.txt"] == "the last lines\n" and "notes.txt" not in first
    (tmp_path / "third").touch()
    second = evidence.from_guest(guest)
    assert second["journal.export"] == first["journal.export"] + "__CURSOR=c3\nMESSAGE=entry 3\n\n"
    assert len(guest.calls) == 2, "one command a gathering"
    assert guest.calls[1][5] == "c2", "the second asks from the first's last cursor"


def test_a_guest_without_journalctl_gives_a_note_not_an_error(tmp_path: Path) -> None:
    guest = LocalGuest(tmp_path)
    guest.run = lambda argv, timeout=None: LocalGuest.run(guest, [a.replace("command -v journalctl", "false") for a in argv], timeout)  # type: ignore[method-assign]
    found = evidence.from_guest(guest)
    assert "no journal" in found["notes.txt"] and "journal.export" not in found


def test_after_a_reboot_the_last_cursor_is_not_trusted_and_the_whole_journal_is_read(tmp_path: Path) -> None:
    guest = guest_with_fake_journal(tmp_path)
    evidence.from_guest(guest)
    (tmp_path / "rebooted").touch()
    again = evidence.from_guest(guest)
    assert again["journal.export"] == "__CURSOR=c9\nMESSAGE=entry 9\n\n", "the last boot's entries are not this boot's journal"
