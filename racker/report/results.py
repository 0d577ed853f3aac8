"""Test results as JSON lines, one record per test, for reports and scripts.

Five outcomes: pass, fail, skip, error and flaky. An error is the harness's fault
(the machine never booted, a tool crashed), kept apart from a failing check
so that a report never blames a distribution for it. The plugin retries a test
the harness failed on a new machine (--racker-retries); one that passed only
then is flaky, and its record lists the failed attempts before it:

    "attempts": [{"outcome": "error", "when": "setup", "message": "...", "evidence": {...}}]

A failed, errored or flaky test keeps its evidence (console, journal, cloud-init's
logs, the commands it ran) in files beside the results (racker.report.evidence), named
relative to the results file, per attempt:

    "evidence": {"console.log": "evidence/<cell>/attempt-2/console.log", ...}

    {"kind": "test", "image": "debian-bookworm", "engine": "nspawn", "check": "test_hostname",
     "nodeid": "...", "outcome": "pass", "duration": 0.02, "message": "", "log": "",
     "properties": {}}

`properties` holds what the test recorded with pytest's record_property
(the boot time split, say), JSON values as they were given.

Beside the tests, so that a report can be built from the results alone on
another machine: one "run" record (the host, and the matrix the run was asked
for) and "image" records (what each booted image is: digest, versions, boot
times), the latest of them for an image and engine saying the most.

    {"kind": "run", "host": {...}, "planned": [["debian-bookworm", "nspawn"]], ...}
    {"kind": "image", "image": "debian-bookworm", "engine": "nspawn", "digest": "sha256:...", ...}

Records of one image and engine merge (merge_facts), except that a VM restored
from a snapshot (`restored_from` set) never overwrites what a cold boot of the
night recorded: its boot times are those of the snapshot's boot, maybe nights ago.

Older results have no "kind": they hold tests only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # pytest itself is imported by the runs that write results, not by the commands that read them
    import pytest

from racker.report import evidence

# A failure's log (its traceback, the commands it ran, the machine's journal) is kept up to this size.
LOG_LIMIT = 64_000
FACTS_PROPERTY = "racker_facts"


def kind(record: dict) -> str:
    return record.get("kind", "test")


def booted_cold(facts: dict) -> bool:
    """Whether these facts are a VM's real boot (a first boot, or --racker-cold), not a restore."""
    return "restored_from" in facts and not facts["restored_from"]


def merge_facts(known: dict, new: dict) -> dict:
    """What the records of one image and engine say together: the later record wins, but a
    restored VM's facts only fill in what a cold boot's left out."""
    if booted_cold(known) and new.get("restored_from"):
        return {**new, **known}
    return {**known, **new}


def message_of(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    return str(report.longrepr or "")[:2000]


def _log(report: pytest.TestReport) -> str:
    """The failure's traceback and the sections attached to it (captured output, commands, journal)."""
    parts = [report.longreprtext, *(f"--- {title}\n{content}" for title, content in report.sections)]
    text = "\n".join(part for part in parts if part)
    if len(text) > LOG_LIMIT:
        text = text[: LOG_LIMIT // 4] + f"\n[… {len(text) - LOG_LIMIT} characters left out …]\n" + text[-(LOG_LIMIT * 3 // 4) :]
    return text


class ResultStream:
    """A pytest plugin object: collects each test's phases, writes one line when it ends."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.evidence = evidence.Writer(Path(path))
        self.file: IO[str] = open(path, "w")  # noqa: SIM115 - closed at session end
        self.pending: dict[str, dict] = {}
        self.facts: dict[tuple[str, str], dict] = {}

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def _image_facts(self, props: dict) -> None:
        """Write what a worker learnt about an image: sent as JSON in a teardown report's properties
        when first known or changed (so that JUnit XML carries it too)."""
        try:
            facts = json.loads(props.get(FACTS_PROPERTY) or "null")
        except json.JSONDecodeError:
            return
        if not isinstance(facts, dict) or not props.get("racker_image"):
            return
        key = (props["racker_image"], props.get("racker_engine") or "")
        merged = merge_facts(self.facts.get(key, {}), facts)
        if merged != self.facts.get(key):
            self.facts[key] = merged
            self.write({"kind": "image", "image": key[0], "engine": key[1], **merged})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        self._image_facts(props)
        record = self.pending.setdefault(
            report.nodeid,
            {
                "kind": "test",
                "image": props.get("racker_image"),
                "engine": props.get("racker_engine"),
                "check": report.nodeid.split("::")[-1].split("[")[0],
                "nodeid": report.nodeid,
                "outcome": "pass",
                "duration": 0.0,
                "message": "",
                "log": "",
                "properties": {},
            },
        )
        record["properties"].update((k, v) for k, v in report.user_properties if not k.startswith("racker_"))
        record["duration"] = round(record["duration"] + report.duration, 3)
        if report.failed:
            harness = report.when != "call" or props.get("racker_outcome") == "error"
            if record["outcome"] == "pass" or not harness:
                record["outcome"] = "error" if harness else "fail"
                record["message"] = message_of(report)
                record["log"] = _log(report)
        elif report.skipped and record["outcome"] == "pass":
            record["outcome"] = "skip"
            record["message"] = message_of(report)
        attempt = getattr(report, "racker_attempt", 1)
        files = getattr(report, "racker_evidence", None)
        if files:
            record.setdefault("evidence", {}).update(self.evidence.write(report.nodeid, attempt, files))
        for number, failed in enumerate(getattr(report, "racker_attempts", None) or [], start=1):
            kept = {**failed, "evidence": self.evidence.write(report.nodeid, number, failed.get("evidence") or {})}
            record.setdefault("attempts", []).append(kept)
        if report.when not in ("setup", "call"):  # teardown, or a crashed worker's report
            record = self.pending.pop(report.nodeid)
            if record["outcome"] == "pass" and record.get("attempts"):
                record["outcome"] = "flaky"
                record["message"] = f"passed on attempt {len(record['attempts']) + 1}, after: {record['attempts'][0]['message']}"
            self.write(record)

    def pytest_sessionfinish(self) -> None:
        for record in self.pending.values():
            self.write(record)
        self.pending.clear()
        self.file.close()


def read_tests(path: str | Path) -> list[dict]:
    """The test records of a results file (run and image records left out)."""
    with open(path) as handle:
        return [r for r in map(json.loads, filter(str.strip, handle)) if kind(r) == "test"]
