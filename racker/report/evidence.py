"""A failed test's evidence: what its machine's logs said, kept as files beside the results.

A worker gathers it from the machine before the machine goes (`from_guest`, or a failed
boot's error carries its console); the results writer puts each file under

    <results dir>/evidence/<cell>/attempt-<n>/<file>

each file cut to its last EVIDENCE_FILE_LIMIT bytes and all of them to TOTAL_LIMIT, and
names them in the test's record, relative to the results file, for the report to link.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from racker.errors import RackerError
from racker.machines import EVIDENCE_FILE_LIMIT, read_capped

# What the evidence of one results file may take in all; the files past it are left out.
TOTAL_LIMIT = 50_000_000
DIRECTORY = "evidence"

# The journal in journalctl's export format where the image's journalctl has it, else as text.
JOURNAL_COMMANDS = (["journalctl", "--boot", "--output=export", "--no-pager"], ["journalctl", "--boot", "--no-pager"])
# cloud-init's own logs (those `cloud-init collect-logs` packs) and its status, where it is installed.
CLOUD_INIT_FILES = ("/var/log/cloud-init.log", "/var/log/cloud-init-output.log")


def cap(text: str, limit: int = EVIDENCE_FILE_LIMIT) -> str:
    """The text, or its last `limit` characters with a line saying so."""
    return text if len(text) <= limit else f"[… the first {len(text) - limit} characters left out …]\n{text[-limit:]}"


def commands_text(results: Iterable) -> str:
    """testinfra CommandResults as a transcript: each command, its status and its output."""
    return "".join(
        f"$ {r.command.decode(errors='replace') if isinstance(r.command, bytes) else r.command}\n"
        f"--- exit status {r.rc}\n--- stdout\n{r.stdout}--- stderr\n{r.stderr}\n"
        for r in results
    )


def from_guest(machine, commands: Iterable = ()) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """What a running machine or VM shows: its console, its journal, cloud-init's logs, and the
    commands the test ran. A log the guest cannot give is left out (a note says why)."""
    console = getattr(machine, "console_log", None)
    found = {"console.log": read_capped(console)} if console is not None else {}
    transcript = commands_text(commands)
    if transcript:
        found["commands.txt"] = transcript
    notes = []
    try:
        for argv in JOURNAL_COMMANDS:
            journal = machine.run(argv, timeout=60)
            if journal.succeeded and journal.stdout:
                found["journal.export" if "--output=export" in argv else "journal.txt"] = cap(journal.stdout)
                break
        else:
            notes.append(f"no journal: {journal.stderr.strip()[:300]}")
        for path in CLOUD_INIT_FILES:
            log = machine.run(["tail", f"--bytes={EVIDENCE_FILE_LIMIT}", path], timeout=30)
            if log.succeeded:
                found[Path(path).name] = log.stdout
        status = machine.run(["cloud-init", "status", "--long"], timeout=30)
        if status.returncode != 127 and (status.stdout or status.stderr):
            found["cloud-init-status.txt"] = status.stdout + status.stderr
    except RackerError as error:  # the guest is gone or unreachable: what was had so far is kept
        notes.append(f"the guest could not be asked for more: {error}")
    if notes:
        found["notes.txt"] = "\n".join(notes) + "\n"
    return {name: text for name, text in found.items() if text}


def cell_directory(nodeid: str) -> str:
    """A directory name of the test's own: readable, and unique for its node id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid.split("::", 1)[-1]).strip("_.")[:80]
    return f"{readable}-{hashlib.sha256(nodeid.encode()).hexdigest()[:8]}"


class Writer:
    """Writes evidence files beside a results file, within TOTAL_LIMIT in all."""

    def __init__(self, results: Path, total_limit: int = TOTAL_LIMIT) -> None:
        self.base = results.parent
        self.total_limit = total_limit
        self.written = 0

    def write(self, nodeid: str, attempt: int, files: dict[str, str]) -> dict[str, str]:
        """Each file as evidence of the test's attempt: file name -> path relative to the results;
        a file past the total limit is named with no path ("")."""
        directory = Path(DIRECTORY) / cell_directory(nodeid) / f"attempt-{attempt}"
        paths = {}
        for name, text in sorted(files.items()):
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "file"
            data = cap(text).encode()
            if self.written + len(data) > self.total_limit:
                paths[name] = ""
                continue
            (self.base / directory).mkdir(parents=True, exist_ok=True)
            (self.base / directory / safe).write_bytes(data)
            self.written += len(data)
            paths[name] = str(directory / safe)
        return paths
