"""A report's history: the outcome of every cell over the last N nights, carried in report.json.

No database: each report holds the window of nights before it (its own
`history`), so tonight's history is last night's plus tonight, trimmed to N.
A report from before histories existed counts as one night.

Each cell gets a verdict, as TestGrid gives one:

- PASSING: no bad night (fail, error, flaky) in the window;
- FAILING: it went bad once and stayed bad up to tonight (or was bad all along);
- FLAKY: anything else in between: it flipped back, or a night passed only on a retry.

and the last good night (the latest pass) and the first bad night (of tonight's bad
streak; for a cell good tonight, the first bad night in the window). Skipped and
absent nights say nothing either way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from racker import store
from racker.errors import ReportError

WINDOW = 10
GOOD = ("pass",)
BAD = ("fail", "error")
PASSING, FLAKY, FAILING = "PASSING", "FLAKY", "FAILING"
# An image whose upstream was last asked longer ago than this was not refreshed tonight.
STALE_AFTER = dt.timedelta(hours=36)


def key(image: str, engine: str, check: str) -> str:
    return f"{image} {engine} {check}"


def _past(previous: dict[str, Any] | None) -> dict[str, Any]:
    if previous is None:
        return {"nights": [], "cells": {}}
    if previous.get("history"):
        past = previous["history"]
        nights, cells = past.get("nights") if isinstance(past, dict) else None, past.get("cells") if isinstance(past, dict) else None
        if not (isinstance(nights, list) and isinstance(cells, dict) and all(isinstance(s, list) for s in cells.values())):
            raise ReportError("the previous report's history is not a racker history (nights and cells)")
        return past
    # A report made before histories: it is one night.
    cells = {key(c["image"], c["engine"], c["check"]): [c["outcome"]] for c in previous["cells"]}
    return {"nights": [previous.get("generated", "")], "cells": cells}


def verdict(strip: list[str | None], nights: list[str]) -> dict[str, Any]:
    """PASSING, FLAKY or FAILING ("" with no pass or failure in the window), the last good and first bad nights."""
    seen = [(night, outcome) for night, outcome in zip(nights, strip, strict=True) if outcome not in (None, "skip")]
    bad = [i for i, (_night, outcome) in enumerate(seen) if outcome not in GOOD]
    good = [i for i, (_night, outcome) in enumerate(seen) if outcome in GOOD]
    last_good = seen[good[-1]][0] if good else None
    if not seen:
        return {"label": "", "last_good": None, "first_bad": None}
    if not bad:
        return {"label": PASSING, "last_good": last_good, "first_bad": None}
    # Tonight's bad streak: the bad nights after the last good one.
    streak = [i for i in bad if not good or i > good[-1]]
    tonight_bad = bool(streak) and streak[-1] == len(seen) - 1
    first_bad = seen[streak[0]][0] if tonight_bad else seen[bad[0]][0]
    steady = tonight_bad and all(seen[i][1] in BAD for i in streak) and len(streak) == len(bad)
    return {"label": FAILING if steady else FLAKY, "last_good": last_good, "first_bad": first_bad}


def carry(report: dict[str, Any], previous: dict[str, Any] | None, window: int = WINDOW) -> None:
    """Set report["history"] (the last `window` nights, tonight's included) and each cell's strip and verdict."""
    past = _past(previous)
    nights = [*past["nights"], report["generated"]]
    tonight = {key(c["image"], c["engine"], c["check"]): c["outcome"] for c in report["cells"]}
    cells: dict[str, list[str | None]] = {}
    for name in sorted(set(past["cells"]) | set(tonight)):
        before = list(past["cells"].get(name, []))
        before = [None] * (len(past["nights"]) - len(before)) + before[-len(past["nights"]) :] if past["nights"] else []
        strip = [*before, tonight.get(name)][-window:]
        if any(outcome is not None for outcome in strip):  # a cell gone for the whole window is forgotten
            cells[name] = strip
    nights = nights[-window:]
    report["history"] = {"window": window, "nights": nights, "cells": cells}
    for cell in report["cells"]:
        strip = cells[key(cell["image"], cell["engine"], cell["check"])]
        cell["strip"] = strip
        cell.update(verdict(strip, nights))


def stale(facts: dict[str, Any], generated: str) -> str:
    """Why an image counts as not refreshed tonight ("" if it was): its record says so
    (`stale`), or its upstream was last checked long before the report."""
    checked = facts.get("last_checked") or ""
    if facts.get("stale"):
        return f"not refreshed (last checked {checked})" if checked else "not refreshed"
    when, now = store.parse_time(checked), store.parse_time(generated)
    if when and now and now - when > STALE_AFTER:
        return f"not refreshed (last checked {checked})"
    return ""
