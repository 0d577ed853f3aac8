"""Test results as JSON lines, one record per test, for reports and scripts.

Four outcomes: pass, fail, skip, and error. An error is the harness's fault
(the machine never booted, a tool crashed), kept apart from a failing check
so that a report never blames a distribution for it.

    {"image": "debian-bookworm", "engine": "nspawn", "check": "test_hostname",
     "nodeid": "...", "outcome": "pass", "duration": 0.02, "message": "",
     "properties": {}}

`properties` holds what the test recorded with pytest's record_property
(the boot time split, say), JSON values as they were given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import pytest


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    return str(report.longrepr or "")[:2000]


class ResultStream:
    """A pytest plugin object: collects each test's phases, writes one line when it ends."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] = open(path, "w")  # noqa: SIM115 - closed at session end
        self.pending: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        record = self.pending.setdefault(
            report.nodeid,
            {
                "image": props.get("racker_image"),
                "engine": props.get("racker_engine"),
                "check": report.nodeid.split("::")[-1].split("[")[0],
                "nodeid": report.nodeid,
                "outcome": "pass",
                "duration": 0.0,
                "message": "",
                "properties": {},
            },
        )
        record["properties"].update((k, v) for k, v in report.user_properties if not k.startswith("racker_"))
        record["duration"] = round(record["duration"] + report.duration, 3)
        if report.failed:
            harness = report.when != "call" or props.get("racker_outcome") == "error"
            if record["outcome"] == "pass" or not harness:
                record["outcome"] = "error" if harness else "fail"
                record["message"] = _message(report)
        elif report.skipped and record["outcome"] == "pass":
            record["outcome"] = "skip"
            record["message"] = _message(report)
        if report.when not in ("setup", "call"):  # teardown, or a crashed worker's report
            self.file.write(json.dumps(self.pending.pop(report.nodeid)) + "\n")
            self.file.flush()

    def pytest_sessionfinish(self) -> None:
        for record in self.pending.values():
            self.file.write(json.dumps(record) + "\n")
        self.pending.clear()
        self.file.close()
