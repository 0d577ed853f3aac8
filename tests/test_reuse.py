"""A night costs only what changed (racker.report.reuse): a cell's key, and which earlier cells a night keeps.

Unit tests over synthetic reports; the real two nights under nspawn are in tests/test_nightly.py.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from racker import nightly
from racker.report import reuse

NODE = "test_container.py::test_hostname[debian-sid]"
NOW = "2026-02-08T03:00:00+00:00"


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host tools as a fixed pair of versions; every cached input computed again per test."""
    monkeypatch.setattr(reuse.facts, "tool_version", lambda name: f"{name} 1.0")
    monkeypatch.setattr(reuse.accel, "without_probing", lambda: "tcg")
    caches = (reuse.racker_version, reuse.engine_inputs, reuse.check_code)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


def key(digest: str = "sha256:a", engine: str = "nspawn", nodeid: str = NODE) -> str:
    for cached in (reuse.racker_version, reuse.engine_inputs, reuse.check_code):
        getattr(cached, "cache_clear", lambda: None)()
    return reuse.key(digest, engine, nodeid)


def test_the_key_is_stable_and_changes_with_the_image_the_engine_and_the_check_module() -> None:
    assert key() == key()
    assert key("sha256:b") != key()
    assert key(engine="qemu") != key()
    assert key(nodeid="test_vm.py::test_hostname[debian-sid]") != key()
    # Another check of the same module, another image's id: the same inputs (the digest names the image).
    assert key(nodeid="test_container.py::test_hostname[x]") == key()


def test_the_key_changes_with_each_engine_version_the_firmware_and_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    nspawn, qemu = key(), key(engine="qemu")
    monkeypatch.setattr(reuse.facts, "tool_version", lambda name: f"{name} 2.0")
    assert key() != nspawn and key(engine="qemu") != qemu
    monkeypatch.setattr(reuse.facts, "tool_version", lambda name: f"{name} 1.0")
    assert (key(), key(engine="qemu")) == (nspawn, qemu)
    monkeypatch.setattr(reuse.accel, "without_probing", lambda: "kvm")
    assert key(engine="qemu") != qemu and key() == nspawn  # nspawn has no accelerator
    monkeypatch.setattr(reuse.accel, "without_probing", lambda: "tcg")
    monkeypatch.setattr(reuse, "_file_digest", lambda path: "another firmware")
    assert key(engine="qemu") != qemu and key() == nspawn


def test_the_key_changes_with_rackers_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = key()
    monkeypatch.setattr(reuse, "__version__", "9.9.9")
    assert key() != before


def test_the_key_follows_the_checks_code_not_its_comments_or_docstrings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = tmp_path / "checks"
    shutil.copytree(reuse.CHECKS, checks, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(reuse, "CHECKS", checks)
    monkeypatch.setattr(reuse, "racker_version", lambda: "0.1.0+x")  # racker's own code is another input
    before = key()
    module = checks / "test_container.py"
    text = module.read_text()
    module.write_text(text + "\n# a comment\n")
    reuse.code_digest.cache_clear()
    assert key() == before
    reuse.code_digest.cache_clear()  # the file changed under the same name
    module.write_text(text + "\n\ndef test_new_check():\n    assert True\n")
    assert key() != before
    module.write_text(text)
    reuse.code_digest.cache_clear()
    (checks / "guest.py").write_text((checks / "guest.py").read_text() + "\nEXTRA = 1\n")
    assert key() != before  # the guest helpers the checks call are their code too


def cell(**changes: object) -> dict:
    base = {"image": "debian-sid", "engine": "nspawn", "check": "test_hostname", "nodeids": [NODE], "outcome": "pass",
            "message": "", "log": "", "key": key(), "ran": "2026-02-07T03:00:00+00:00"}  # fmt: skip
    return base | changes


@pytest.mark.parametrize(
    ("changes", "now", "max_age", "why"),
    [
        ({}, NOW, reuse.MAX_AGE, ""),
        ({"outcome": "fail"}, NOW, reuse.MAX_AGE, ""),  # what the check said of the image stands too
        ({"outcome": "skip"}, NOW, reuse.MAX_AGE, ""),
        ({"outcome": "error"}, NOW, reuse.MAX_AGE, "its result was error"),  # the harness's fault: run again
        ({"key": "0000"}, NOW, reuse.MAX_AGE, "an input changed"),
        ({"key": ""}, NOW, reuse.MAX_AGE, "no key (a report from before reuse)"),
        ({"ran": ""}, NOW, reuse.MAX_AGE, "no date it ran"),
        ({}, "2026-02-14T03:00:00+00:00", reuse.MAX_AGE, "older than 7 days, 0:00:00"),  # exactly 7 days
        ({}, "2026-02-14T02:59:59+00:00", reuse.MAX_AGE, ""),
        ({}, NOW, dt.timedelta(0), "older than 0:00:00"),
        ({}, NOW, dt.timedelta(hours=12), "older than 12:00:00"),
    ],
)
def test_an_earlier_cell_is_kept_only_with_its_key_a_result_of_the_check_and_within_the_max_age(
    changes: dict, now: str, max_age: dt.timedelta, why: str
) -> None:
    assert reuse.why_not(cell(**changes), key(), now, max_age) == why


def test_a_night_keeps_the_cells_of_its_images_and_engines_whose_inputs_are_unchanged() -> None:
    other = cell(image="debian-bookworm", nodeids=["test_container.py::test_hostname[debian-bookworm]"], key=key("sha256:b"))
    previous = {"cells": [cell(), cell(check="test_other", outcome="error"), other, cell(engine="qemu")]}
    kept = reuse.carried(previous, {"debian-sid": "sha256:a", "debian-bookworm": "sha256:b"}, ["nspawn"], NOW)
    assert [(c["image"], c["check"]) for c in kept] == [("debian-sid", "test_hostname"), ("debian-bookworm", "test_hostname")]
    # bookworm moved: its cells run again; sid's stay.
    kept = reuse.carried(previous, {"debian-sid": "sha256:a", "debian-bookworm": "sha256:c"}, ["nspawn"], NOW)
    assert [c["image"] for c in kept] == ["debian-sid"]
    assert reuse.carried(None, {"debian-sid": "sha256:a"}, ["nspawn"], NOW) == []
    assert reuse.carried(previous, {}, ["nspawn"], NOW) == []  # an image not planned tonight keeps nothing


def test_a_kept_cell_becomes_tonights_records_saying_when_it_ran() -> None:
    (record,) = reuse.records(cell(outcome="fail", message="boom"))
    assert record["kind"] == "test" and record["nodeid"] == NODE and record["outcome"] == "fail" and record["message"] == "boom"
    assert record["reused"] == record["ran"] == "2026-02-07T03:00:00+00:00" and record["key"] == key()


def test_an_image_is_left_unbooted_only_when_every_earlier_cell_of_it_is_kept() -> None:
    sid, sid2, bookworm = cell(), cell(check="test_other"), cell(image="debian-bookworm")
    before = {"cells": [sid, sid2, bookworm]}
    assert nightly._all_kept(before, [sid, sid2], ["debian-sid"], "nspawn")
    assert not nightly._all_kept(before, [sid], ["debian-sid"], "nspawn")
    assert not nightly._all_kept(before, [sid, sid2], ["debian-sid", "debian-trixie"], "nspawn")  # trixie never ran
    assert nightly._all_kept(before, [sid, sid2, bookworm], ["debian-sid", "debian-bookworm"], "nspawn")


def test_completing_the_results_keys_tonights_tests_and_appends_the_kept_cells_and_their_images_facts(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    tonight = [
        {"kind": "run", "started": NOW, "host": {}, "planned": [["debian-sid", "nspawn"], ["debian-bookworm", "nspawn"]]},
        {"kind": "image", "image": "debian-bookworm", "engine": "nspawn", "digest": "sha256:b"},
        {"kind": "test", "image": "debian-bookworm", "engine": "nspawn", "check": "test_hostname", "outcome": "pass",
         "nodeid": "test_container.py::test_hostname[debian-bookworm]"},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in tonight))
    before = {"images": {"debian-sid": {"nspawn": {"digest": "sha256:a", "kernel": "6.1"}}}}
    nightly._complete(path, before, [cell()], {"debian-sid": "sha256:a", "debian-bookworm": "sha256:b"}, "nspawn")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ran = records[2]
    assert ran["key"] == key("sha256:b") and ran["ran"] == NOW and "reused" not in ran
    assert records[3]["reused"] == "2026-02-07T03:00:00+00:00" and records[3]["image"] == "debian-sid"
    assert records[4] == {"kind": "image", "image": "debian-sid", "engine": "nspawn", "digest": "sha256:a", "kernel": "6.1",
                          "reused": "2026-02-07T03:00:00+00:00"}  # fmt: skip


def test_the_plugin_deselects_the_tests_of_kept_cells_and_refuses_a_bad_list(tmp_path: Path) -> None:
    from test_nightly import collect

    listed = tmp_path / "reuse.json"
    listed.write_text(json.dumps([["debian-sid", "nspawn", "test_x"], ["debian-sid", "qemu", "test_x"]]))
    images = "--racker-images=debian-sid,debian-bookworm"
    done, ids, _runs = collect(tmp_path, images, "--racker-engines=nspawn", f"--racker-reuse={listed}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ids == ["debian-bookworm"] and "1 deselected" in done.stdout
    listed.write_text('{"not": "a list"}')
    done, ids, _runs = collect(tmp_path, "--racker-images=debian-sid", f"--racker-reuse={listed}")
    assert done.returncode == 4 and "--racker-reuse:" in done.stderr and not ids, done.stdout + done.stderr
