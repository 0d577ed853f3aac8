"""Which of tonight's cells can keep an earlier night's result: a night costs only what changed.

A cell (image × engine × check) is a function of its inputs, and its key is their digest:

- the image's digest (the stored image the engine prepares and boots);
- the check's code: its test module and the guest helpers it calls (fingerprint.code_digest,
  so a comment or a docstring changes nothing);
- racker's version: its version number and the digest of its own code (a checkout between
  releases counts as another racker);
- the engine's versions: systemd-nspawn's, or QEMU's and its firmware's, and QEMU's accelerator.

Each cell of a report carries its key and the date it ran (`ran`). Tonight, a previous cell
whose key is tonight's again, that ran no longer than `max_age` ago and whose result was not
the harness's fault (an error is never a function of the inputs) is carried over: the plugin
deselects its tests (--racker-reuse) and the nightly copies its result, marked `reused` with
the date it ran. An image whose every cell is carried over is not booted at all.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from racker import __version__, store
from racker.cpu import accel
from racker.fingerprint import code_digest
from racker.report import facts

MAX_AGE = dt.timedelta(days=7)
# Outcomes worth carrying over: what the check said of the image. An error is the harness's.
KEPT = ("pass", "fail", "skip", "flaky")
PACKAGE = Path(__file__).parent.parent  # racker/
CHECKS = PACKAGE / "checks"
FIRMWARE = ("/usr/share/seabios/bios-256k.bin", "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@functools.cache
def racker_version() -> str:
    """racker's version and the digest of its code, the checks left out (they are each cell's own input)."""
    files = sorted(p for p in PACKAGE.rglob("*.py") if CHECKS not in p.parents)
    code = [[str(p.relative_to(PACKAGE)), code_digest(str(p))] for p in files]
    # Which check modules there are: a new one has no earlier cells, so tonight must run.
    return f"{__version__}+{_digest([code, sorted(p.name for p in CHECKS.glob('*.py'))])}"


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


@functools.cache
def engine_inputs(engine: str) -> dict[str, str]:
    """What of the host an engine's results depend on: its tools' versions (and QEMU's firmware and accelerator)."""
    if engine == "nspawn":
        return {"nspawn": facts.tool_version("nspawn")}
    if engine == "qemu":
        return {
            "qemu": facts.tool_version("qemu"),
            "firmware": _digest({path: _file_digest(path) for path in FIRMWARE}),
            "accel": accel.without_probing(),
        }
    return {}


def check_module(nodeid: str) -> str:
    """The file name of the check module a test comes from: 'test_vm.py' of '…/racker/checks/test_vm.py::test_x[img]'."""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


@functools.cache
def check_code(module: str) -> str:
    """The digest of a check module's code and of the guest helpers it uses ("" for a module not among racker's checks)."""
    path = CHECKS / module
    if not module.endswith(".py") or not path.is_file():
        return ""
    return _digest([code_digest(str(path)), code_digest(str(CHECKS / "guest.py"))])


def inputs(digest: str, engine: str, nodeid: str) -> dict[str, Any]:
    """Everything a cell's result depends on."""
    module = check_module(nodeid)
    return {
        "image": digest,
        "check": [module, check_code(module)],
        "racker": racker_version(),
        "engine": [engine, engine_inputs(engine)],
    }


def key(digest: str, engine: str, nodeid: str) -> str:
    """A cell's key: equal exactly when its inputs are."""
    return _digest(inputs(digest, engine, nodeid))


def why_not(cell: dict[str, Any], tonight_key: str, now: str, max_age: dt.timedelta = MAX_AGE) -> str:
    """Why an earlier cell cannot be carried over tonight ("" if it can)."""
    if not cell.get("key"):
        return "no key (a report from before reuse)"
    if cell["key"] != tonight_key:
        return "an input changed"
    if cell.get("outcome") not in KEPT:
        return f"its result was {cell.get('outcome')}"
    ran, current = store.parse_time(cell.get("ran") or ""), store.parse_time(now)
    if ran is None or current is None:
        return "no date it ran"
    if current - ran >= max_age or max_age <= dt.timedelta(0):
        return f"older than {max_age}"
    return ""


def carried(
    previous: dict[str, Any] | None,
    digests: dict[str, str],
    engines: list[str],
    now: str,
    max_age: dt.timedelta = MAX_AGE,
) -> list[dict[str, Any]]:
    """The previous report's cells that tonight keeps: of tonight's images (`digests`: name -> digest) and engines."""
    if previous is None:
        return []
    kept = []
    for cell in previous.get("cells", []):
        digest = digests.get(cell.get("image", ""))
        if digest is None or cell.get("engine") not in engines or not cell.get("nodeids"):
            continue
        if not why_not(cell, key(digest, cell["engine"], cell["nodeids"][0]), now, max_age):
            kept.append(cell)
    return kept


def records(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """A carried-over cell as tonight's test records, one per test it had, saying when it ran."""
    ran = cell["ran"]
    return [
        {
            "kind": "test", "image": cell["image"], "engine": cell["engine"], "check": cell["check"], "nodeid": nodeid,
            "outcome": cell["outcome"], "duration": 0.0, "message": cell.get("message", ""), "log": cell.get("log", ""),
            "properties": {}, "key": cell["key"], "ran": ran, "reused": ran,
        }
        for nodeid in cell["nodeids"]
    ]  # fmt: skip
