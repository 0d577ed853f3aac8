"""racker report: results -> report.json, report.md, report.html, and regressions against a previous report.

The fast tests build reports from synthetic results; the slow one runs real
`racker check`s, breaks the image between them, and reads the page in a real
headless Chromium.
"""

from __future__ import annotations

import ast
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT, racker, racker_here
from racker import cli, engines, nightly, report, store
from racker.report import facts, history
from racker.report import html as report_html

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# --- synthetic results -----------------------------------------------------------


def run_record(*planned: tuple[str, str]) -> dict:
    host = {"hostname": "ci-1", "racker": "0.1.0", "qemu": "QEMU emulator version 7.2.22", "nspawn": "systemd 252", "accel": "tcg"}
    return {"kind": "run", "started": "2026-01-01T00:00:00+00:00", "host": host, "planned": [list(p) for p in planned]}


def image_record(image: str, engine: str = "nspawn", **extra: object) -> dict:
    return {
        "kind": "image",
        "image": image,
        "engine": engine,
        "digest": f"sha256:{image.encode().hex():0<64}",
        "source": f"bootstrap:{image}",
    } | extra


def check_record(image: str, check: str, outcome: str = "pass", engine: str = "nspawn", message: str = "", log: str = "") -> dict:
    nodeid = f"test_container.py::{check}[{image}]"
    return {"kind": "test", "image": image, "engine": engine, "check": check, "nodeid": nodeid, "outcome": outcome, "duration": 0.5,
            "message": message, "log": log}  # fmt: skip


def write_results(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHECKS = ["test_hostname_is_set", "test_sshd_is_installed_and_enabled", "test_system_reaches_running"]


def night(tmp_path: Path, name: str, outcomes: dict[tuple[str, str], str], images: list[str]) -> Path:
    """One run's results: every check passes on every image unless `outcomes` says otherwise."""
    records: list[dict] = [run_record(*((i, "nspawn") for i in images))]
    for image in images:
        records.append(image_record(image, systemd="252 (252.39-1)", boot={"userspace": 0.8, "total": 0.8}, boot_seconds=1.0))
        for check in CHECKS:
            outcome = outcomes.get((image, check), "pass")
            message = f"expected {check} to pass on {image}" if outcome in ("fail", "error") else ""
            records.append(check_record(image, check, outcome, message=message, log=f"log of {check} on {image}" if message else ""))
    return write_results(tmp_path / f"{name}.jsonl", records)


# --- building ----------------------------------------------------------------


def test_a_report_is_a_matrix_of_cells_with_the_images_facts(tmp_path: Path) -> None:
    results = night(tmp_path, "one", {("debian-sid", "test_system_reaches_running"): "fail"}, ["debian-bookworm", "debian-sid"])
    made = report.make([results], tmp_path / "out")
    cells = {(c["image"], c["engine"], c["check"]): c for c in made["cells"]}
    assert len(cells) == 6
    failed = cells[("debian-sid", "nspawn", "test_system_reaches_running")]
    assert (failed["outcome"], failed["message"]) == ("fail", "expected test_system_reaches_running to pass on debian-sid")
    assert failed["log"] == "log of test_system_reaches_running on debian-sid"
    assert made["counts"] == {"pass": 5, "flaky": 0, "fail": 1, "error": 0, "skip": 0}
    assert made["images"]["debian-sid"]["nspawn"]["systemd"] == "252 (252.39-1)"
    assert made["runs"][0]["host"]["qemu"] == "QEMU emulator version 7.2.22"
    assert made["comparison"] is None and not report.regressed(made)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["cells"] == made["cells"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    # A row per check, a column per image; the checks that passed everywhere on one line.
    assert "| check | debian-bookworm | debian-sid |" in markdown
    assert "| system reaches running | ✅ pass | ❌ **fail** · FAILING since " in markdown
    assert "✅ 2 checks pass on every image: hostname is set, sshd is installed and enabled." in markdown
    assert "userspace 0.8s; up after 1.0s" in markdown
    assert "QEMU accelerator: TCG" in markdown


def test_a_cell_shows_the_worst_of_its_tests_and_a_test_without_an_image_has_no_cell(tmp_path: Path) -> None:
    records = [
        dict(check_record("debian-sid", "test_x", "error", message="machine never booted"), nodeid="other.py::test_x[debian-sid]"),
        check_record("debian-sid", "test_x", "pass"),
        dict(check_record("debian-sid", "test_y", "pass"), nodeid="a.py::test_y[debian-sid]"),
        dict(check_record("debian-sid", "test_y", "skip"), nodeid="b.py::test_y[debian-sid]"),
        dict(check_record("debian-sid", "test_z"), image=None),
    ]
    made = report.build([write_results(tmp_path / "r.jsonl", records)])
    outcomes = {c["check"]: (c["outcome"], c["message"]) for c in made["cells"]}
    assert outcomes == {"test_x": ("error", "machine never booted"), "test_y": ("pass", "")}
    assert made["unplaced"] == 1


def test_shards_merge_and_a_missing_or_repeated_shard_is_named(tmp_path: Path) -> None:
    images = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie"]
    planned = [(i, "nspawn") for i in images]
    shards = []
    for number, image in enumerate(images, 1):
        records = [run_record(*planned), image_record(image), *(check_record(image, c) for c in CHECKS)]
        shards.append(write_results(tmp_path / f"shard-{number}.jsonl", records))
    # Shard 3 (debian-sid) was lost; shard 1 was uploaded twice.
    made = report.make([shards[0], shards[1], shards[0], shards[3]], tmp_path / "out")
    assert made["missing"] == [["debian-sid", "nspawn"]]
    assert sorted(made["images"]) == ["debian-bookworm", "debian-bullseye", "debian-trixie"]
    assert made["counts"]["pass"] == 3 * len(CHECKS), "a repeated shard counts once"
    assert made["repeated"] == sorted(f"test_container.py::{c}[debian-bookworm]" for c in CHECKS)
    assert "**No results** for: debian-sid (nspawn)." in (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    assert '<th class="image missing" data-image="debian-sid">' in page


def test_junit_xml_is_read_with_the_facts_the_plugin_attached(tmp_path: Path) -> None:
    facts_json = json.dumps({"digest": "sha256:abc", "kernel": "6.1.0-18-amd64"}).replace('"', "&quot;")
    junit = tmp_path / "junit.xml"
    junit.write_text(f"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2">
<testcase classname="test_container" name="test_hostname_is_set[debian-sid]" time="0.1">
  <properties><property name="racker_image" value="debian-sid"/><property name="racker_engine" value="qemu"/>
  <property name="racker_facts" value="{facts_json}"/></properties></testcase>
<testcase classname="test_container" name="test_root_rw[debian-sid]" time="0.2">
  <properties><property name="racker_image" value="debian-sid"/><property name="racker_engine" value="qemu"/></properties>
  <failure message="AssertionError: expected / to be writable">traceback here</failure></testcase>
</testsuite></testsuites>""")
    made = report.build([junit])
    assert {(c["check"], c["outcome"], c["message"], c["log"]) for c in made["cells"]} == {
        ("test_hostname_is_set", "pass", "", ""),
        ("test_root_rw", "fail", "AssertionError: expected / to be writable", "traceback here"),
    }
    assert made["images"] == {"debian-sid": {"qemu": {"digest": "sha256:abc", "kernel": "6.1.0-18-amd64"}}}


# --- comparing ---------------------------------------------------------------


def test_regressions_come_first_and_fail_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = night(
        tmp_path, "before", {("debian-sid", "test_hostname_is_set"): "fail", ("debian-sid", "test_system_reaches_running"): "fail"},
        ["debian-bookworm", "debian-sid", "debian-bullseye"],
    )  # fmt: skip
    assert cli.main(["report", str(before), "-o", str(tmp_path / "before")]) == 0
    failing = {
        ("debian-bookworm", "test_sshd_is_installed_and_enabled"): "fail",  # new: a regression
        ("debian-sid", "test_system_reaches_running"): "fail",  # failed before too
        ("debian-trixie", "test_hostname_is_set"): "fail",  # a new image's
    }
    after = night(tmp_path, "after", failing, ["debian-bookworm", "debian-sid", "debian-trixie"])
    status = cli.main(["report", str(after), "-o", str(tmp_path / "after"), "--previous", str(tmp_path / "before")])
    printed = capsys.readouterr().out
    assert status == 1, printed
    assert "new failure: debian-bookworm (nspawn) test_sshd_is_installed_and_enabled: expected" in printed
    comparison = json.loads((tmp_path / "after" / "report.json").read_text())["comparison"]
    assert [(c["image"], c["check"], c["was"], c["outcome"]) for c in comparison["new_failures"]] == [
        ("debian-bookworm", "test_sshd_is_installed_and_enabled", "pass", "fail")
    ], "a failure in a new image is no regression; one failing before is not new"
    assert [(c["image"], c["check"]) for c in comparison["fixed"]] == [("debian-sid", "test_hostname_is_set")]
    assert comparison["still_failing"] == 1
    assert comparison["new_images"] == [["debian-trixie", "nspawn"]]
    assert comparison["dropped_images"] == [["debian-bullseye", "nspawn", "not run"]]
    markdown = (tmp_path / "after" / "report.md").read_text()
    assert markdown.index("### New failures (1)") < markdown.index("### Fixed (1)") < markdown.index("New images: debian-trixie")
    # The same results again: nothing regressed, the command passes; report.json also serves as --previous.
    assert cli.main(["report", str(after), "-o", str(tmp_path / "again"), "--previous", str(tmp_path / "after" / "report.json")]) == 0


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"kind": "test", "nodeid": "x", "outcome": "pass"}\nnot json\n')
    good = night(tmp_path, "good", {}, ["debian-sid"])
    cases = [
        ([str(tmp_path / "absent.jsonl")], "no results file"),
        ([str(garbage)], "garbage.jsonl:2: not a JSON results line"),
        ([str(good), "--previous", str(tmp_path / "nowhere")], "no previous report at"),
        ([str(good), "--previous", str(good)], "cannot read the previous report"),
    ]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": report.FORMAT, "cells": [], "history": {"nights": "x"}}))
    cases.append(([str(good), "--previous", str(broken)], "the previous report's history is not a racker history"))
    done = racker("report", str(good), "-o", str(good))
    assert done.returncode == 125 and done.stderr.startswith(f"racker: error: cannot write the report into {good}"), done.stderr
    for args, message in cases:  # in this process: the real command ran just above
        done = racker_here("report", *args, "-o", str(tmp_path / "out"))
        assert done.returncode == 125, done.stderr
        first = done.stderr.splitlines()[0]
        assert first.startswith("racker: error: ") and message in first, done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists(), "nothing is written for bad input"


# --- history across nights ------------------------------------------------------


def test_three_nights_tell_flaky_from_failing_with_last_good_and_first_bad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Night 1 all pass; night 2 two cells fail; night 3 one of them passes again (a flip: FLAKY),
    the other still fails (pass → fail → fail: FAILING, last good night 1, first bad night 2)."""
    images = ["debian-bookworm", "debian-sid"]
    flip, broke = ("debian-sid", "test_hostname_is_set"), ("debian-bookworm", "test_system_reaches_running")
    nights = [{}, {flip: "fail", broke: "fail"}, {broke: "fail"}]
    previous: list[str] = []
    for number, outcomes in enumerate(nights, 1):
        monkeypatch.setattr(store, "now", lambda number=number: f"2026-01-0{number}T03:00:00+00:00")
        results = night(tmp_path, f"night-{number}", outcomes, images)
        argv = ["report", str(results), "-o", str(tmp_path / f"report-{number}"), *previous]
        assert cli.main(argv) in (0, 1)
        previous = ["--previous", str(tmp_path / f"report-{number}")]
    made = json.loads((tmp_path / "report-3" / "report.json").read_text())
    assert made["history"]["nights"] == [f"2026-01-0{n}T03:00:00+00:00" for n in (1, 2, 3)]
    cells = {(c["image"], c["check"]): c for c in made["cells"]}
    assert (cells[flip]["strip"], cells[flip]["label"]) == (["pass", "fail", "pass"], "FLAKY")
    assert cells[flip]["last_good"] == "2026-01-03T03:00:00+00:00" and cells[flip]["first_bad"] == "2026-01-02T03:00:00+00:00"
    assert (cells[broke]["strip"], cells[broke]["label"]) == (["pass", "fail", "fail"], "FAILING")
    assert (cells[broke]["last_good"], cells[broke]["first_bad"]) == ("2026-01-01T03:00:00+00:00", "2026-01-02T03:00:00+00:00")
    steady = cells[("debian-sid", "test_system_reaches_running")]
    assert (steady["label"], steady["first_bad"]) == ("PASSING", None)

    page = (tmp_path / "report-3" / "report.html").read_text()
    failing = next(a for tag, a in Dom(page).elements if tag == "td" and a.get("data-check") == broke[1] and a["data-image"] == broke[0])
    assert failing["data-label"] == "FAILING"
    assert "last good 2026-01-01 · first bad 2026-01-02" in page
    markdown = (tmp_path / "report-3" / "report.md").read_text()
    assert "❌ **fail** · FAILING since 2026-01-02" in markdown
    assert markdown.index("system reaches running") < markdown.index("hostname is set"), "failing rows come first"

    # A window of 2 nights forgets night 1: the failing cell has no good night left in it.
    monkeypatch.setattr(store, "now", lambda: "2026-01-04T03:00:00+00:00")
    results = night(tmp_path, "night-4", {broke: "fail"}, images)
    assert (
        cli.main(["report", str(results), "-o", str(tmp_path / "report-4"), "--previous", str(tmp_path / "report-3"), "--history", "2"])
        == 0
    )
    made = json.loads((tmp_path / "report-4" / "report.json").read_text())
    assert len(made["history"]["nights"]) == 2
    cells = {(c["image"], c["check"]): c for c in made["cells"]}
    assert (cells[broke]["strip"], cells[broke]["label"], cells[broke]["last_good"]) == (["fail", "fail"], "FAILING", None)
    assert cells[flip]["label"] == "PASSING", "its failure left the window"


@pytest.mark.parametrize(
    ("strip", "label"),
    [
        (["pass", "pass", "pass"], "PASSING"),
        (["fail", "fail", "fail"], "FAILING"),
        (["pass", None, "skip", "error"], "FAILING"),
        (["fail", "pass", "fail"], "FLAKY"),
        (["pass", "pass", "flaky"], "FLAKY"),
        (["skip", None, "skip"], ""),
    ],
)
def test_a_cells_verdict(strip: list[str | None], label: str) -> None:
    assert history.verdict(strip, [f"n{i}" for i in range(len(strip))])["label"] == label


def test_an_image_not_refreshed_is_marked_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "now", lambda: "2026-01-10T03:00:00+00:00")
    records = [
        run_record(),
        image_record("debian-sid", stale=True, last_checked="2026-01-10T01:00:00+00:00"),  # the refresh says so
        image_record("debian-trixie", last_checked="2026-01-05T03:00:00+00:00"),  # old: the refresh never asked upstream since
        image_record("debian-bookworm", last_checked="2026-01-10T02:00:00+00:00"),
        *(check_record(image, "test_hostname_is_set") for image in ("debian-sid", "debian-trixie", "debian-bookworm")),
    ]
    made = report.make([write_results(tmp_path / "r.jsonl", records)], tmp_path / "out")
    assert made["stale"] == [
        ["debian-sid", "nspawn", "not refreshed (last checked 2026-01-10T01:00:00+00:00)"],
        ["debian-trixie", "nspawn", "not refreshed (last checked 2026-01-05T03:00:00+00:00)"],
    ]
    page = (tmp_path / "out" / "report.html").read_text()
    assert '<th class="image" data-image="debian-sid">debian-sid <span class="stale"' in page
    assert '<th class="image" data-image="debian-bookworm">debian-bookworm</th>' in page
    assert "| check | debian-bookworm | debian-sid (stale) | debian-trixie (stale) |" not in (tmp_path / "out" / "report.md").read_text()
    assert "debian-sid (stale), debian-trixie (stale)" in (tmp_path / "out" / "report.md").read_text()


# --- tonight's truth -----------------------------------------------------------------


def test_the_nights_cold_boot_is_shown_not_a_warm_clones_restore(tmp_path: Path) -> None:
    """The first-boot VM reports first, the warm clones restored from an earlier night's snapshot
    after it: their facts fill in, never overwrite, the cold boot's."""
    host = run_record(("debian-sid", "qemu"))
    host["host"]["accel"] = "unknown"  # written before any VM booted: the host record cannot know
    cold = image_record("debian-sid", "qemu", accel="tcg", restored_from="", boot={"kernel": 2.1, "userspace": 30.0, "total": 32.1},
                        boot_seconds=48.0)  # fmt: skip
    warm = cold | {"restored_from": "snap-0104", "boot": {"kernel": 1.9, "userspace": 20.0, "total": 21.9}, "boot_seconds": 4.0}
    checks = [check_record("debian-sid", c, engine="qemu") for c in CHECKS]
    made = report.make([write_results(tmp_path / "r.jsonl", [host, cold, *checks[:1], warm, *checks[1:]])], tmp_path / "out")
    facts_shown = made["images"]["debian-sid"]["qemu"]
    assert (facts_shown["restored_from"], facts_shown["boot_seconds"], facts_shown["boot"]["total"]) == ("", 48.0, 32.1)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "cold boot: kernel 2.1s + userspace 30.0s = 32.1s; up after 48.0s" in markdown
    # The host line says what the VMs used, not what the host record could not know.
    assert "QEMU accelerator: TCG" in markdown and "not probed" not in markdown

    # A night whose VMs were all restored says so, rather than passing an old boot off as tonight's.
    made = report.make([write_results(tmp_path / "w.jsonl", [host, warm, *checks])], tmp_path / "warm")
    assert "restored from snapshot snap-0104, no cold boot tonight (the snapshot's boot: kernel 1.9s" in report_html.boot(
        made["images"]["debian-sid"]["qemu"]
    )
    nspawn_only = run_record(("debian-sid", "nspawn"))
    nspawn_only["host"]["accel"] = "unknown"
    assert "no VM booted" in report_html.host_line(nspawn_only)


# --- the page is text, never markup ------------------------------------------------------


def test_names_messages_outcomes_and_evidence_paths_are_escaped(tmp_path: Path) -> None:
    hostile = "test_<script>alert(1)</script>"
    records = [
        run_record(("debian-sid", "nspawn")),
        image_record("debian-sid", source="<script>alert(2)</script>"),
        check_record("debian-sid", hostile, "fail", message="<script>alert(3)</script>", log="</pre><script>alert(4)</script>"),
        dict(check_record("debian-sid", "test_y", "<img src=x onerror=alert(5)>")),
        dict(check_record("debian-sid", "test_z", "flaky"), evidence={"console": "javascript:alert(6)", "journal": "ev/a b.journal"}),
    ]
    report.make([write_results(tmp_path / "r.jsonl", records)], tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>alert" not in page and "<img" not in page
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page and "&lt;/pre&gt;&lt;script&gt;alert(4)" in page
    # Evidence paths are relative to the results file; the page links them from its own directory.
    assert 'href="../javascript%3Aalert%286%29"' in page and 'href="../ev/a%20b.journal"' in page
    assert report_html.evidence_links({"console": "javascript:alert(6)"}) == [("console", "./javascript%3Aalert%286%29")]
    assert page.count("<script>") == 1, "only the page's own script"
    assert "<script>" not in (tmp_path / "out" / "report.md").read_text()


# --- facts -------------------------------------------------------------------


def test_boot_time_split_and_guest_facts_are_parsed() -> None:
    line = "Startup finished in 1.202s (firmware) + 512ms (loader) + 2.5s (kernel) + 1min 3.250s (userspace) = 1min 7.464s"
    assert facts.boot_split(line) == {"firmware": 1.202, "loader": 0.512, "kernel": 2.5, "userspace": 63.25, "total": 67.464}
    assert facts.boot_split("Bootup is not yet finished (org.freedesktop.systemd1.Manager.FinishTimestampMonotonic=0).") == {}
    guest = facts.parse_guest(
        "kernel=6.1.0-18-cloud-amd64\nrunning_kernel=6.1.0-18-cloud-amd64\nsystemd=systemd 252 (252.22-1~deb12u1)\n"
        "cloud_init=/usr/bin/cloud-init 22.4.2\nos=Debian GNU/Linux 12 (bookworm)\n"
        "boot=Startup finished in 2.1s (kernel) + 9.9s (userspace) = 12.0s\n"
        "cloud_init_start=3000000\ncloud_init_end=10500000\nroot=2040373248 800000000\n"
    )
    assert guest == {
        "kernel": "6.1.0-18-cloud-amd64", "running_kernel": "6.1.0-18-cloud-amd64", "systemd": "252 (252.22-1~deb12u1)",
        "cloud_init": "22.4.2", "os": "Debian GNU/Linux 12 (bookworm)",
        "boot": {"kernel": 2.1, "userspace": 9.9, "total": 12.0, "cloud-init": 7.5},
        "root_bytes": 2040373248, "root_used_bytes": 800000000,
    }  # fmt: skip


# --- the page, in a real browser ---------------------------------------------------


class Dom(HTMLParser):
    """A page as Chromium left it: each element's attributes, and the text inside each element with an id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag not in VOID:
            self._open.append(attributes.get("id"))
            if attributes.get("id"):
                self.text.setdefault(attributes["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in filter(None, self._open):
            self.text[element_id] += data

    def cells(self) -> dict[tuple[str, str, str], tuple[str, str]]:
        """(image, engine, check) -> (outcome, class) of every matrix cell."""
        return {
            (a["data-image"], a["data-engine"], a["data-check"]): (a["data-outcome"], a["class"])
            for tag, a in self.elements
            if tag == "td" and "data-outcome" in a
        }


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium (Debian's package); --no-sandbox because the tests run as root."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: run install.sh (apt-get install chromium)"
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage", *args, page.as_uri()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def rendered(page: Path, screenshot: Path) -> Dom:
    """The page's DOM after Chromium loaded it (and ran its script), and a screenshot of it kept at `screenshot`."""
    dumped = chromium(page, "--dump-dom")
    assert dumped.returncode == 0 and "</html>" in dumped.stdout, dumped.stderr[-2000:]
    shot = chromium(page, f"--screenshot={screenshot}", "--window-size=1280,1600")
    assert shot.returncode == 0, shot.stderr[-2000:]
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1280, 1600)
    assert len(png) > 20_000, f"the screenshot is nearly empty ({len(png)} bytes): did the page render?"
    return Dom(dumped.stdout)


@pytest.mark.slow  # starts chromium
def test_the_page_renders_the_matrix_and_the_regression_in_chromium(tmp_path: Path) -> None:
    images = ["debian-bookworm", "debian-sid"]
    before = night(tmp_path, "before", {}, images)
    report.make([before], tmp_path / "before")
    after = night(
        tmp_path, "after", {("debian-sid", "test_hostname_is_set"): "fail", ("debian-sid", "test_system_reaches_running"): "skip"}, images
    )
    made = report.make([after], tmp_path / "after", tmp_path / "before")
    dom = rendered(tmp_path / "after" / "report.html", tmp_path / "report.png")
    cells = dom.cells()
    assert len(cells) == 6
    assert cells[("debian-sid", "nspawn", "test_hostname_is_set")] == ("fail", "cell fail regressed")
    assert cells[("debian-sid", "nspawn", "test_system_reaches_running")] == ("skip", "cell skip")
    assert cells[("debian-bookworm", "nspawn", "test_hostname_is_set")] == ("pass", "cell pass")
    assert "expected test_hostname_is_set to pass on debian-sid" in dom.text["new-failures"]
    failure = next(c for c in made["cells"] if c["outcome"] == "fail")
    assert "log of test_hostname_is_set on debian-sid" in dom.text[failure["id"]]
    assert ("a", {"href": f"#{failure['id']}"}) in dom.elements, "the cell links to its failure"


@pytest.mark.slow
def test_a_real_regression_fails_the_report_and_shows_in_chromium(tmp_path: Path, share_image) -> None:
    """Two real nights of `racker check` on one image; between them, an update masks its sshd."""
    intact, broken = tmp_path / "intact", tmp_path / "broken"
    # Hard-linked copies of the shared image's rootfs: only read (by the import), and the
    # masking symlink is made in the copy's own /etc/systemd/system.
    subprocess.run(["cp", "-al", str(share_image("debian-bookworm").rootfs), str(intact)], check=True)
    subprocess.run(["cp", "-al", str(intact), str(broken)], check=True)
    (broken / "etc/systemd/system/ssh.service").symlink_to("/dev/null")
    # The reports are built where no store is: from the results alone.
    elsewhere = {"RACKER_HOME": str(tmp_path / "no-store")}
    try:
        assert racker("import", "lab", str(intact)).returncode == 0
        first = racker("check", "lab", "--results", str(tmp_path / "night-1.jsonl"))
        assert first.returncode == 0, first.stdout + first.stderr
        made = racker("report", str(tmp_path / "night-1.jsonl"), "-o", str(tmp_path / "night-1"), env=elsewhere)
        assert made.returncode == 0, made.stdout + made.stderr

        assert racker("import", "lab", str(broken)).returncode == 0
        second = racker("check", "lab", "--results", str(tmp_path / "night-2.jsonl"))
        assert second.returncode == 1, second.stdout + second.stderr
        night_2 = ["report", str(tmp_path / "night-2.jsonl"), "-o", str(tmp_path / "night-2"), "--previous", str(tmp_path / "night-1")]
        made = racker(*night_2, env=elsewhere)
    finally:
        shutil.rmtree(intact)
        shutil.rmtree(broken)
    assert made.returncode == 1, made.stdout + made.stderr
    assert "new failure: lab (nspawn) test_sshd_is_installed_and_enabled: AssertionError: expected the ssh service to be" in made.stdout
    written = json.loads((tmp_path / "night-2" / "report.json").read_text())
    regression = next(c for c in written["comparison"]["new_failures"] if c["check"] == "test_sshd_is_installed_and_enabled")
    assert regression["was"] == "pass" and "ssh" in regression["message"]
    facts = written["images"]["lab"]["nspawn"]
    assert facts["digest"].startswith("sha256:") and facts["systemd"].startswith("252 ") and facts["boot"]["userspace"] > 0
    assert facts["digest"] != json.loads((tmp_path / "night-1" / "report.json").read_text())["images"]["lab"]["nspawn"]["digest"]
    assert written["runs"][0]["host"]["nspawn"].startswith("systemd ") and written["runs"][0]["host"]["accel"] in ("kvm", "tcg", "unknown")

    dom = rendered(tmp_path / "night-2" / "report.html", tmp_path / "report.png")
    cells = dom.cells()
    assert cells[("lab", "nspawn", "test_sshd_is_installed_and_enabled")] == ("fail", "cell fail regressed")
    assert cells[("lab", "nspawn", "test_hostname_is_set")] == ("pass", "cell pass")
    assert regression["message"].splitlines()[0] in dom.text["new-failures"]
    # The failure's log holds what the plugin attached: the machine's journal.
    assert "racker: journal of lab-" in dom.text[regression["id"]]


# --- the page fits a laptop's screen ---------------------------------------------------


def _needs(decorators: list[ast.expr]) -> list[str]:
    """The needs named by racker(needs=[...]) marks among these decorators (or a pytestmark's value)."""
    found = []
    for node in decorators:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "racker":
            found += [need for k in node.keywords if k.arg == "needs" for need in ast.literal_eval(k.value)]
    return found


def builtin_checks() -> list[tuple[str, list[str]]]:
    """racker's own checks (racker/checks/test_*.py), each with the needs its marks name."""
    checks = []
    for module in sorted((ROOT / "racker" / "checks").glob("test_*.py")):
        tree = ast.parse(module.read_text())
        marked = [n.value for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)]
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                checks.append((node.name, _needs(marked) + _needs(node.decorator_list)))
    return checks


BOOT_SPLIT = {"firmware": 1.2, "loader": 0.5, "kernel": 2.5, "userspace": 30.25, "total": 34.45, "cloud-init": 7.5}


# The nightly's images whose init is not systemd: its systemd-only checks skip on them, on both engines.
OTHER_INITS = {"debian-bookworm-sysvinit", "debian-bookworm-openrc"}


def catalogue_night(tmp_path: Path, name: str, failing: dict[tuple[str, str, str], str]) -> Path:
    """A night of the nightly's 6 images on both engines: every built-in check, skipped where the
    engine (or the image's init) cannot provide what it needs (as the plugin skips it), passing
    unless `failing` says."""
    images = sorted(nightly.default_images())
    records: list[dict] = [run_record(*((i, e) for i in images for e in ("nspawn", "qemu")))]
    for image in images:
        for engine in ("nspawn", "qemu"):
            vm = {"restored_from": "", "accel": "tcg", "disk_bytes": 2_000_000_000} if engine == "qemu" else {}
            records.append(image_record(
                image, engine, source=f"https://cloud.debian.org/images/cloud/{image}/latest/{image}-generic-amd64.tar.xz",
                os="Debian GNU/Linux 12 (bookworm)", kernel="6.1.0-18-cloud-amd64", systemd="252 (252.22-1~deb12u1)",
                cloud_init="22.4.2", boot=BOOT_SPLIT, boot_seconds=48.2, root_bytes=2_040_373_248,
                root_used_bytes=800_000_000, image_bytes=600_000_000, **vm,
            ))  # fmt: skip
            offered = set(engines.get(engine).provides) | (set() if image in OTHER_INITS else {"systemd"})
            for check, needs in builtin_checks():
                unmet = [need for need in needs if need not in offered]
                outcome = "skip" if unmet else failing.get((image, engine, check), "pass")
                message = f"{engine} cannot provide: {', '.join(unmet)}" if unmet else ""
                if outcome in ("fail", "error", "flaky"):
                    message = f"AssertionError: expected {check} to hold on {image}, and it did not, for a long reason " * 3
                records.append(check_record(image, check, outcome, engine=engine, message=message))
    return write_results(tmp_path / f"{name}.jsonl", records)


def measured(page: Path) -> tuple[int, int]:
    """(document.scrollWidth, window.innerWidth) of the page in Chromium at 1366×768."""
    probe = page.with_name("measured.html")
    script = (
        "<script>document.body.setAttribute('data-measured', "
        "document.documentElement.scrollWidth + ' ' + window.innerWidth);</script></body>"
    )
    probe.write_text(page.read_text().replace("</body>", script))
    dumped = chromium(probe, "--dump-dom", *LAPTOP)
    assert dumped.returncode == 0 and "data-measured" in dumped.stdout, dumped.stderr[-2000:]
    body = next(a for tag, a in Dom(dumped.stdout).elements if tag == "body")
    scroll, inner = map(int, body["data-measured"].split())
    return scroll, inner


LAPTOP = ("--window-size=1366,768", "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.mark.slow  # starts chromium
def test_the_catalogue_matrix_fits_a_laptop_screen_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nightly's 6 images × 2 engines × every built-in check, over 10 nights of history with
    failures and flakes: no horizontal scrolling at 1366×768, the checks nspawn cannot run on one line."""
    images = sorted(nightly.default_images())  # what a night takes by default
    assert len(images) == 6 and set(images) > OTHER_INITS
    check_names = [c for c, _needs in builtin_checks()]
    assert len(check_names) > 20
    previous: Path | None = None
    for number in range(1, 11):
        monkeypatch.setattr(store, "now", lambda number=number: f"2026-01-{number:02}T03:00:00+00:00")
        # On systemd images: the systemd-only checks skip on the others.
        failing = {("debian-bookworm", "qemu", check_names[-1]): "fail", ("debian-bullseye", "nspawn", check_names[2]): "error"}
        if number % 2:
            failing[("debian-trixie", "qemu", "test_root_writable")] = "fail"
        if number == 10:
            failing[("debian-sid", "qemu", "test_time_sync_active")] = "flaky"
        results = catalogue_night(tmp_path, f"night-{number}", failing)
        report.make([results], tmp_path / f"report-{number}", previous)
        previous = tmp_path / f"report-{number}"
    page = tmp_path / "report-10" / "report.html"
    scroll, inner = measured(page)
    assert inner == 1366 and scroll <= inner, f"the page is {scroll} px wide in a {inner} px window"
    shot = chromium(page, f"--screenshot={tmp_path / 'laptop.png'}", *LAPTOP)
    assert shot.returncode == 0, shot.stderr[-2000:]
    png = (tmp_path / "laptop.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1366, 768)

    dom = Dom(page.read_text())
    tables = [i for i, (tag, a) in enumerate(dom.elements) if tag == "table" and "data-engine" in a]
    qemu_rows = [a["data-check"] for tag, a in dom.elements[tables[1] :] if tag == "tr" and "data-check" in a]
    # Failures first (a fail), then the flaky rows (flaky tonight; flipping within the window), then the rest by name.
    assert qemu_rows[:3] == [check_names[-1], "test_root_writable", "test_time_sync_active"]
    assert qemu_rows[3:] == sorted(qemu_rows[3:])
    # Skip cells only where an image's init is not systemd: the checks no image can run are one line.
    skipped = [a for tag, a in dom.elements if tag == "td" and a.get("data-outcome") == "skip"]
    assert skipped and {a.get("data-image") for a in skipped} <= OTHER_INITS, skipped[:3]
    assert "cannot apply under nspawn:" in page.read_text()
    markdown = (tmp_path / "report-10" / "report.md").read_text()
    assert f"| check | {' | '.join(images)} |" in markdown
    # The systemd-only checks pass on four images and skip on two: said so, not "on every image".
    assert "checks pass where they ran, skipped on debian-bookworm-openrc, debian-bookworm-sysvinit: " in markdown
    assert "system reaches running" not in next(line for line in markdown.splitlines() if "pass on every image" in line)
    # Short enough for a CI job summary (60 lines for 4 images; each more adds its two rows of facts).
    assert len(markdown.splitlines()) < 60 + 2 * (len(images) - 4) + 4, "short enough for a CI job summary"
