"""A failed test's evidence: what its machine's logs said, kept as files beside the results.

A worker gathers it from the machine before the machine goes (`from_guest`, or a failed
boot's error carries its console); the results writer puts each file under

    <results dir>/evidence/<cell>/attempt-<n>/<file>

each file cut to its last EVIDENCE_FILE_LIMIT bytes and all of them to TOTAL_LIMIT, and
names them in the test's record, relative to the results file, for the report to link.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from racker.errors import RackerError
from racker.machines import EVIDENCE_FILE_LIMIT, read_capped

# What the evidence of one results file may take in all; the files past it are left out.
TOTAL_LIMIT = 50_000_000
DIRECTORY = "evidence"

# cloud-init's own logs (those `cloud-init collect-logs` packs), and the status files `cloud-init status` reads.
CLOUD_INIT_FILES = (
    "/var/log/cloud-init.log",
    "/var/log/cloud-init-output.log",
    "/run/cloud-init/status.json",
    "/run/cloud-init/result.json",
)
# The lines of the journal a failure report shows inline (the whole journal is an evidence file).
JOURNAL_TAIL_LINES = 200

# Everything from the guest in one command: each command's output between two marker lines
# (a random boundary no log can forge), its exit status in the second. A round trip costs a
# TCG guest seconds, and a bad night fails many checks on one machine. $2, when given, is the
# journal cursor the last gathering on this machine ended at: only what came after is read, if
# this boot's journal still has that entry (a reboot or a snapshot's restore since: all of it).
GATHER = r"""
b="$1"; after="$2"; limit="$3"
run() { name="$1"; shift; printf '\n%s begin %s\n' "$b" "$name"; "$@"; rc=$?; printf '\n%s end %s %s\n' "$b" "$name" "$rc"; return $rc; }
if command -v journalctl >/dev/null 2>&1; then
  { [ -n "$after" ] &&
      [ "$(journalctl --boot --output=export --no-pager --cursor="$after" 2>/dev/null | head -n 1)" = "__CURSOR=$after" ] &&
      run journal.new journalctl --boot --output=export --no-pager --after-cursor="$after" 2>/dev/null; } ||
    run journal.export journalctl --boot --output=export --no-pager 2>/dev/null ||
    run journal.txt journalctl --boot --no-pager 2>&1
  run journal-tail journalctl --boot --no-pager --lines=@TAIL@ 2>&1
fi
for f in @FILES@; do [ -r "$f" ] && run "${f##*/}" tail --bytes="$limit" "$f" 2>&1; done
true
"""


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
    commands the test ran. A log the guest cannot give is left out (a note says why).

    "journal-tail.txt" is the journal's last lines, for the failure report to show inline."""
    console = getattr(machine, "console_log", None)
    found = {"console.log": read_capped(console)} if console is not None else {}
    transcript = commands_text(commands)
    if transcript:
        found["commands.txt"] = transcript
    earlier = getattr(machine, "_racker_journal", None)  # (cursor, export text) of the last gathering here
    boundary = f"racker-evidence-{secrets.token_hex(8)}"
    script = GATHER.replace("@TAIL@", str(JOURNAL_TAIL_LINES)).replace("@FILES@", " ".join(CLOUD_INIT_FILES))
    try:
        said = machine.run(["sh", "-c", script, "sh", boundary, earlier[0] if earlier else "", str(EVIDENCE_FILE_LIMIT)], timeout=120)
    except RackerError as error:  # the guest is gone or unreachable
        return {**found, "notes.txt": f"the guest could not be asked for its logs: {error}\n"}
    parts = split_parts(said.stdout, boundary)
    journal = parts.pop("journal.new", None)
    if journal is not None and earlier is not None and journal[1] == 0:
        parts["journal.export"] = (earlier[1] + journal[0], 0)
    notes = []
    for name in ("journal.export", "journal.txt"):
        text, status = parts.pop(name, ("", 1))
        if status == 0 and text.strip():
            found[name] = cap(text)
            break
    else:
        notes.append("no journal: the image has no journalctl, or it read none")
    if "journal.export" in found:
        cursor = _last_cursor(found["journal.export"])
        if cursor:
            with contextlib.suppress(AttributeError):  # a machine object that takes no attribute: read in full next time
                machine._racker_journal = (cursor, found["journal.export"])
    for name, (text, status) in parts.items():
        if status == 0 and text:
            found["journal-tail.txt" if name == "journal-tail" else name] = text
    if said.returncode != 0:
        notes.append(f"gathering stopped (exit status {said.returncode}): {said.stderr.strip()[:300]}")
    if notes:
        found["notes.txt"] = "\n".join(notes) + "\n"
    return {name: text for name, text in found.items() if text}


def split_parts(output: str, boundary: str) -> dict[str, tuple[str, int]]:
    """GATHER's output as {part: (its text, its command's exit status)}; a part cut off has status -1."""
    parts: dict[str, tuple[str, int]] = {}
    name, lines = None, []
    for line in output.split("\n"):
        if line.startswith(f"{boundary} begin "):
            name, lines = line.removeprefix(f"{boundary} begin "), []
        elif line.startswith(f"{boundary} end ") and name is not None:
            status = line.rsplit(" ", 1)[-1]
            # The end marker's own leading newline ends the output's last line: the join undoes it.
            parts[name] = ("\n".join(lines), int(status) if status.lstrip("-").isdigit() else -1)
            name = None
        elif name is not None:
            lines.append(line)
    if name is not None:
        parts[name] = ("\n".join(lines), -1)
    return parts


def _last_cursor(export: str) -> str | None:
    """The cursor of the export's last entry (each entry has a __CURSOR= field)."""
    at = export.rfind("\n__CURSOR=")
    if at < 0:
        return None
    return export[at + len("\n__CURSOR=") :].split("\n", 1)[0] or None


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
