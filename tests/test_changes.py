"""The report says what changed (racker.report.changes): per image since the previous night, and for each
check that went from pass to fail, the package changes between its last good night and its first bad one.

Synthetic nights through the real report: results and the refresh's upstream.json written as the nightly does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from racker import report
from racker.report import changes


def test_a_diff_names_packages_added_removed_and_upgraded_with_their_versions() -> None:
    changed = changes.diff({"a": "1", "b": "1", "c": "1"}, {"a": "2", "c": "1", "d": "4"})
    assert changed == {"a": ["1", "2"], "b": ["1", None], "d": [None, "4"]}
    assert changes.readable(changed) == {"added": [["d", "4"]], "removed": [["b", "1"]], "upgraded": [["a", "1", "2"]]}


def test_diffs_of_several_nights_compose_into_one_and_a_package_that_came_back_is_no_change() -> None:
    nights = [{"a": ["1", "2"], "b": ["1", None]}, {"a": ["2", "3"], "b": [None, "1"], "c": [None, "1"]}]
    assert changes.compose(nights) == {"a": ["1", "3"], "c": [None, "1"]}


def test_a_package_of_two_architectures_is_named_with_each() -> None:
    listed = [
        {"name": "libc6", "version": "1", "arch": "amd64"},
        {"name": "libc6", "version": "1", "arch": "i386"},
        {"name": "x", "version": "2"},
    ]
    assert changes.versions(listed) == {"libc6:amd64": "1", "libc6:i386": "1", "x": "2"}


NIGHTS = [
    # (packages, digest, moved, outcome of test_sshd)
    ({"openssh-server": "1:9.2p1-2", "libc6": "2.36-9"}, "sha256:1", True, "pass"),
    ({"openssh-server": "1:9.2p1-2", "libc6": "2.36-9"}, "sha256:1", False, "pass"),
    ({"openssh-server": "1:9.6p1-1", "libc6": "2.36-9", "libwtmpdb0": "0.9-1"}, "sha256:2", True, "fail"),
    ({"openssh-server": "1:9.6p1-1", "libc6": "2.37-1"}, "sha256:3", True, "fail"),
]


def night(directory: Path, number: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    packages, digest, moved, outcome = NIGHTS[number - 1]
    directory.mkdir()
    records = [{"kind": "run", "host": {}, "planned": [["debian-sid", "nspawn"]]}]
    tonight = (("test_sshd", outcome), ("test_x", "pass"))
    records += [{"kind": "test", "image": "debian-sid", "engine": "nspawn", "check": check, "outcome": result, "message": "",
                 "nodeid": f"test_container.py::{check}[debian-sid]"} for check, result in tonight]  # fmt: skip
    results = directory / "results-nspawn.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    upstream = {"debian-sid": {"image": "debian-sid", "moved": moved, "digest": digest, "stale": False, "packages": packages}}
    (directory / "upstream.json").write_text(json.dumps(upstream))
    monkeypatch.setattr(report.store, "now", lambda: f"2026-02-0{number}T03:00:00+00:00")
    previous = directory.parent / str(number - 1) if number > 1 else None
    return report.make([results], directory, previous)


def test_each_night_says_what_changed_of_each_image_and_what_changed_before_a_check_went_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = night(tmp_path / "1", 1, monkeypatch)
    assert first["changes"]["debian-sid"]["digest_changed"] is None and first["regressions"] == []
    second = night(tmp_path / "2", 2, monkeypatch)
    assert second["changes"]["debian-sid"] == {"moved": False, "stale": False, "digest": "sha256:1", "digest_changed": False,
                                               "added": [], "removed": [], "upgraded": []}  # fmt: skip
    third = night(tmp_path / "3", 3, monkeypatch)
    said = third["changes"]["debian-sid"]
    assert (said["moved"], said["digest_changed"]) == (True, True)
    assert (said["added"], said["removed"], said["upgraded"]) == (
        [["libwtmpdb0", "0.9-1"]],
        [],
        [["openssh-server", "1:9.2p1-2", "1:9.6p1-1"]],
    )
    (went_bad,) = third["regressions"]
    assert (went_bad["check"], went_bad["last_good"], went_bad["first_bad"]) == (
        "test_sshd",
        "2026-02-02T03:00:00+00:00",
        "2026-02-03T03:00:00+00:00",
    )
    assert went_bad["upgraded"] == [["openssh-server", "1:9.2p1-2", "1:9.6p1-1"]] and went_bad["added"] == [["libwtmpdb0", "0.9-1"]]
    md = (tmp_path / "3" / "report.md").read_text()
    assert md.index("## Went from pass to fail (1)") < md.index("## What changed since the previous night") < md.index("## nspawn")
    assert (
        "test_sshd: passed 2026-02-02, failed 2026-02-03; packages between: openssh-server 1:9.2p1-2 → 1:9.6p1-1, added libwtmpdb0 0.9-1"
        in md
    )
    assert "- debian-sid: upstream moved, digest changed; openssh-server 1:9.2p1-2 → 1:9.6p1-1, added libwtmpdb0 0.9-1" in md
    html = (tmp_path / "3" / "report.html").read_text()
    assert 'id="regressions"' in html and "openssh-server 1:9.2p1-2 → 1:9.6p1-1" in html

    # Still failing a night later: its changes are still those up to its first bad night, not tonight's.
    fourth = night(tmp_path / "4", 4, monkeypatch)
    (went_bad,) = fourth["regressions"]
    assert went_bad["first_bad"] == "2026-02-03T03:00:00+00:00" and went_bad["upgraded"] == [["openssh-server", "1:9.2p1-2", "1:9.6p1-1"]]
    assert fourth["changes"]["debian-sid"]["upgraded"] == [["libc6", "2.36-9", "2.37-1"]]
    assert fourth["changes"]["debian-sid"]["removed"] == [["libwtmpdb0", "0.9-1"]]
    # Only the nights that changed something keep their diffs; the packages of tonight alone are kept whole.
    assert sorted(fourth["history"]["packages"]) == ["2026-02-03T03:00:00+00:00", "2026-02-04T03:00:00+00:00"]
    assert fourth["upstream"]["debian-sid"]["packages"] == NIGHTS[3][0]


def test_the_package_diffs_leave_with_their_nights_from_the_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for number in (1, 2, 3):
        night(tmp_path / str(number), number, monkeypatch)
    monkeypatch.setattr(report.store, "now", lambda: "2026-02-04T03:00:00+00:00")
    made = report.make([tmp_path / "3" / "results-nspawn.jsonl"], tmp_path / "short", tmp_path / "3", window=1)
    assert made["history"]["nights"] == ["2026-02-04T03:00:00+00:00"] and made["history"]["packages"] == {}
