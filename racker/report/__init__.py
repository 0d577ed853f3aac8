"""Results -> a compatibility report: report.json, report.md and a static report.html.

    racker report shard-1.jsonl shard-2.jsonl junit.xml -o out/ --previous last-night/

Any number of results files (JSON lines from --racker-results, or JUnit XML)
merge into one matrix of images × checks per engine. A test seen in two files
(a shard given twice, or run again) counts once, the last file's. Images the
runs planned but that have no results (a lost shard) are named, not hidden.
Against a previous report: new failures, fixed checks, new and dropped images;
`regressed` says whether CI should go red; and the history of every cell over the
last nights (racker.report.history), carried forward from that report.
"""

from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from racker import files, store
from racker.errors import ReportError
from racker.report import changes, history, results
from racker.report import html as report_html

FORMAT = "racker-report/1"
# Worst first: a cell run by several tests shows the worst of them.
# flaky: passed only when retried (the plugin's --racker-retries), worse than a pass, not a failure.
SEVERITY = {"error": 4, "fail": 3, "flaky": 2, "pass": 1, "skip": 0}
OUTCOMES = ("pass", "flaky", "fail", "error", "skip")  # in the order a summary names them
BAD = ("fail", "error")
JUNIT_OUTCOMES = {"failure": "fail", "error": "error", "skipped": "skip"}


def check_table(records: list[dict]) -> tuple[list[list[str]], list[str]]:
    """`racker check`'s table: a row per check, a column per image and engine, the worst outcome in each."""
    columns = sorted({(r["image"], r["engine"]) for r in records})
    cells: dict[tuple[str, tuple[str, str]], str] = {}
    for r in records:
        key = (r["check"], (r["image"], r["engine"]))
        if key not in cells or SEVERITY[r["outcome"]] > SEVERITY[cells[key]]:
            cells[key] = r["outcome"]
    checks = sorted({r["check"] for r in records})
    rows = [[check.removeprefix("test_"), *(cells.get((check, column), "-") for column in columns)] for check in checks]
    return rows, ["CHECK", *(f"{image}/{engine}" for image, engine in columns)]


# --- reading ----------------------------------------------------------------


def _read_jsonl(path: Path, text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}:{number}: not a JSON results line ({error.msg})") from None
        if not isinstance(record, dict) or (results.kind(record) == "test" and not {"nodeid", "outcome"} <= set(record)):
            raise ReportError(f"{path}:{number}: not a racker results record", hint="give files written by --racker-results or --junitxml")
        records.append(record)
    return records


def _junit_case(case: ET.Element) -> list[dict]:
    """One <testcase> as a test record (and an image record, if the plugin attached facts to it)."""
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    name = case.get("name", "")
    outcome, message, log = "pass", "", ""
    for child in case:
        if child.tag in JUNIT_OUTCOMES:
            outcome, message, log = JUNIT_OUTCOMES[child.tag], child.get("message", ""), child.text or ""
    record = {
        "kind": "test",
        "image": props.get("racker_image"),
        "engine": props.get("racker_engine"),
        "check": name.split("[")[0],
        "nodeid": f"{case.get('classname', '')}::{name}",
        "outcome": outcome,
        "duration": float(case.get("time") or 0),
        "message": message,
        "log": log,
    }
    found = [record]
    if props.get(results.FACTS_PROPERTY) and record["image"]:
        facts = json.loads(props[results.FACTS_PROPERTY])
        found.insert(0, {"kind": "image", "image": record["image"], "engine": record["engine"], **facts})
    return found


def _read_junit(path: Path, text: str) -> list[dict]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise ReportError(f"{path}: not JUnit XML ({error})") from None
    return [record for case in root.iter("testcase") for record in _junit_case(case)]


def read(path: Path) -> list[dict]:
    """The records of one results file: JSON lines, or JUnit XML (told apart by their first character)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"no results file {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None
    return _read_junit(path, text) if text.lstrip().startswith("<") else _read_jsonl(path, text)


# --- merging ----------------------------------------------------------------


def cell_id(image: str, engine: str, check: str) -> str:
    """A stable HTML anchor for a cell."""
    return "r-" + hashlib.sha1(f"{image}\0{engine}\0{check}".encode()).hexdigest()[:12]


def _evidence(record: dict, results_file: Path) -> dict[str, str]:
    """A test's evidence files ({kind: path}), their paths relative to its results file made whole."""
    found = record.get("evidence")
    if not isinstance(found, dict):
        return {}
    return {str(kind): str(results_file.parent / path) for kind, path in found.items() if isinstance(path, str) and path}


def _cells(tests: dict[tuple, dict]) -> list[dict]:
    cells: dict[tuple, dict] = {}
    for test in tests.values():
        key = (test["image"], test["engine"] or "", test["check"])
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = {
                "image": key[0], "engine": key[1], "check": key[2], "id": cell_id(*key),
                "outcome": test["outcome"], "message": "", "log": "", "duration": 0.0, "nodeids": [], "evidence": {},
            }  # fmt: skip
        cell["nodeids"].append(test["nodeid"])
        # What the cell's result depends on and when it ran (racker.report.reuse); `reused`: carried over from that night.
        for field in ("key", "ran", "reused"):
            if test.get(field):
                cell[field] = test[field]
        cell["duration"] = round(cell["duration"] + float(test.get("duration") or 0), 3)
        if SEVERITY.get(test["outcome"], 3) >= SEVERITY.get(cell["outcome"], 3):
            cell["outcome"] = test["outcome"]
            cell["message"] = test.get("message") or cell["message"]
            cell["log"] = test.get("log") or cell["log"]
            cell["evidence"] = {**cell["evidence"], **test["evidence"]}  # the worst test's, where two name one kind
        else:
            cell["evidence"] = {**test["evidence"], **cell["evidence"]}
    return [cells[key] for key in sorted(cells)]


def _accelerators(records: list[dict]) -> list[str]:
    """The accelerators the VMs of one results file really ran with (their image records say)."""
    return sorted({r["accel"] for r in records if results.kind(r) == "image" and r.get("accel")})


def build(paths: list[Path]) -> dict[str, Any]:
    """The report of these results files, without a comparison (its history: tonight alone)."""
    runs: list[dict] = []
    facts: dict[tuple[str, str], dict] = {}
    tests: dict[tuple, dict] = {}
    repeated: set[str] = set()
    unplaced = 0
    for path in paths:
        records = read(path)
        for record in records:
            kind = results.kind(record)
            if kind == "run":
                # The host record is written before any VM boots; what they used, their records say.
                runs.append({"file": str(path), **{k: v for k, v in record.items() if k != "kind"}, "accels": _accelerators(records)})
            elif kind == "image":
                key = (record["image"], record.get("engine") or "")
                said = {k: v for k, v in record.items() if k not in ("kind", "image", "engine")}
                facts[key] = results.merge_facts(facts.get(key, {}), said)
            elif kind == "test" and not record.get("image"):
                unplaced += 1  # not a racker-parametrised test: no cell for it
            elif kind == "test":
                key = (record["image"], record.get("engine") or "", record["nodeid"])
                if key in tests:
                    repeated.add(record["nodeid"])
                tests[key] = record | {"evidence": _evidence(record, path)}  # the last file's wins
    cells = _cells(tests)
    pairs = sorted({(c["image"], c["engine"]) for c in cells})
    planned = {tuple(pair) for run in runs for pair in run.get("planned", [])}
    images: dict[str, dict[str, dict]] = {}
    for image, engine in pairs:
        images.setdefault(image, {})[engine] = facts.get((image, engine), {})
    counts = {outcome: sum(c["outcome"] == outcome for c in cells) for outcome in OUTCOMES}
    generated = store.now()
    made = {
        "format": FORMAT,
        "generated": generated,
        "inputs": [str(p) for p in paths],
        "runs": runs,
        "engines": sorted({engine for _image, engine in pairs}),
        "checks": sorted({c["check"] for c in cells}),
        "images": images,
        "cells": cells,
        "counts": counts,
        "missing": [list(pair) for pair in sorted(planned - set(pairs))],
        "repeated": sorted(repeated),
        "unplaced": unplaced,
        "stale": [[image, engine, why] for (image, engine) in pairs if (why := history.stale(facts.get((image, engine), {}), generated))],
        "comparison": None,
    }
    history.carry(made, None)
    return made


# --- laying out -------------------------------------------------------------


def _row_rank(row: dict) -> tuple[int, str]:
    """Failures first, then flaky checks, then the rest by name."""
    present = [c for c in row["cells"] if c is not None]
    if any(c["outcome"] in BAD for c in present):
        return (0, row["check"])
    if any(c["outcome"] == "flaky" or c.get("label") in (history.FLAKY, history.FAILING) for c in present):
        return (1, row["check"])
    return (2, row["check"])


def layout(report: dict[str, Any], engine: str) -> dict[str, Any]:
    """One engine's matrix as the pages show it: a row per check, a column per image, failing
    rows first; the checks skipped on every image leave the matrix for one line naming them."""
    by_cell = {(c["image"], c["check"]): c for c in report["cells"] if c["engine"] == engine}
    images = sorted(i for i, engines in report["images"].items() if engine in engines)
    rows, not_applicable, skipped = [], [], []
    for check in report["checks"]:
        cells = [by_cell.get((image, check)) for image in images]
        present = [c for c in cells if c is not None]
        if not present:
            continue
        if all(c["outcome"] == "skip" for c in present):
            cannot = all(f"{engine} cannot provide" in c["message"] for c in present)
            (not_applicable if cannot else skipped).append(check)
            continue
        rows.append({"check": check, "cells": cells})
    rows.sort(key=_row_rank)
    stale = {image: why for image, stale_engine, why in report.get("stale", []) if stale_engine == engine}
    return {
        "engine": engine,
        "images": [{"name": image, "stale": stale.get(image, ""), "facts": report["images"][image][engine]} for image in images],
        "rows": rows,
        "collapsed": [(f"cannot apply under {engine}", not_applicable), ("skipped on every image", skipped)],
        "missing": [image for image, missing_engine in report["missing"] if missing_engine == engine],
    }


# --- comparing --------------------------------------------------------------


def load_previous(path: Path) -> dict[str, Any]:
    """A previous report: its directory or its report.json."""
    target = path / "report.json" if path.is_dir() else path
    try:
        previous = json.loads(target.read_text())
    except FileNotFoundError:
        raise ReportError(f"no previous report at {target}", hint="give the directory of an earlier `racker report -o DIR`") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read the previous report {target}: {error}") from None
    if not isinstance(previous, dict) or previous.get("format") != FORMAT:
        raise ReportError(f"{target} is not a racker report ({FORMAT})")
    return previous


def _brief(cell: dict, was: str) -> dict:
    return {k: cell[k] for k in ("image", "engine", "check", "id", "outcome", "message")} | {"was": was}


def compare(current: dict[str, Any], previous: dict[str, Any], source: str = "") -> dict[str, Any]:
    """What changed since `previous`: new failures first, then fixed checks, new and dropped images."""
    before = {(c["image"], c["engine"], c["check"]): c["outcome"] for c in previous["cells"]}
    before_pairs = {key[:2] for key in before}
    now_pairs = {(c["image"], c["engine"]) for c in current["cells"]}
    new_failures, fixed, still = [], [], 0
    for cell in current["cells"]:
        key = (cell["image"], cell["engine"], cell["check"])
        was = before.get(key, "absent")
        if cell["outcome"] in BAD and key[:2] in before_pairs:
            if was in BAD:
                still += 1
            else:
                new_failures.append(_brief(cell, was))
        elif cell["outcome"] == "pass" and was in BAD:
            fixed.append(_brief(cell, was))
    missing = {tuple(pair) for pair in current["missing"]}
    return {
        "previous": source,
        "previous_generated": previous.get("generated", ""),
        "new_failures": new_failures,
        "fixed": fixed,
        "still_failing": still,
        "new_images": [list(p) for p in sorted(now_pairs - before_pairs)],
        "dropped_images": [[*p, "no results" if p in missing else "not run"] for p in sorted(before_pairs - now_pairs)],
        "regressed": bool(new_failures),
    }


def regressed(report: dict[str, Any]) -> bool:
    return bool(report["comparison"] and report["comparison"]["regressed"])


# --- writing ----------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


MD_MARK = {"pass": "✅", "flaky": "🟡", "fail": "❌", "error": "⚠️", "skip": "➖"}


def _md_cell(cell: dict | None) -> str:
    if cell is None:
        return "-"
    text = f"{MD_MARK.get(cell['outcome'], '')} {cell['outcome']}"
    if cell["outcome"] in BAD:
        text = f"{MD_MARK[cell['outcome']]} **{cell['outcome']}**"
    if cell.get("reused"):
        text += f" · ran {report_html.night(cell['reused'])}"
    if cell.get("label") == history.FAILING:
        text += f" · FAILING since {report_html.night(cell['first_bad'])}"
    elif cell.get("label") == history.FLAKY:
        text += f" · FLAKY, first bad {report_html.night(cell['first_bad'])}" if cell.get("first_bad") else " · FLAKY"
    return text


MD_PACKAGES = 15  # package changes named per image or check; report.json and the page have them all


def _md_packages(said: dict) -> str:
    phrases = report_html.package_changes(said)
    more = f", and {len(phrases) - MD_PACKAGES} more" if len(phrases) > MD_PACKAGES else ""
    return _md_escape(", ".join(phrases[:MD_PACKAGES]) + more) if phrases else "no package changed"


def _md_changes(report: dict[str, Any]) -> list[str]:
    """The checks that went from pass to fail with their image's package changes since they last
    passed, then what changed of each image since the previous night."""
    lines = []
    if report.get("regressions"):
        lines += [f"## Went from pass to fail ({len(report['regressions'])})", ""]
        lines += [
            f"- {_md_escape(r['image'])} ({r['engine']}) {_md_escape(r['check'])}: passed {report_html.night(r['last_good'])}, "
            f"failed {report_html.night(r['first_bad'])}; packages between: {_md_packages(r)}"
            for r in report["regressions"]
        ]
        lines.append("")
    if report.get("changes"):
        lines += ["## What changed since the previous night", ""]
        lines += [
            f"- {_md_escape(image)}: {report_html.image_change(said)}; {_md_packages(said)}" for image, said in report["changes"].items()
        ]
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """Short enough for a CI job summary: the checks that did not pass everywhere as table rows,
    the others named on one line."""
    fmt = report_html
    counts = report["counts"]
    lines = [
        "# racker compatibility report",
        "",
        f"Generated {report['generated']}: {', '.join(f'{counts[o]} {o}' for o in OUTCOMES)}.",
        "",
    ]
    lines += _md_changes(report)
    comparison = report["comparison"]
    if comparison:
        lines += [f"## Against {comparison['previous'] or 'the previous report'} ({comparison['previous_generated']})", ""]
        for title, key in (("New failures", "new_failures"), ("Fixed", "fixed")):
            lines += [f"### {title} ({len(comparison[key])})", ""]
            lines += [
                f"- {_md_escape(c['image'])} ({c['engine']}) {_md_escape(c['check'])}: {c['was']} → **{c['outcome']}** "
                + _md_escape(fmt.first_line(c["message"]))
                for c in comparison[key]
            ]
            lines.append("")
        lines += [f"New images: {', '.join(f'{i} ({e})' for i, e in comparison['new_images']) or 'none'}."]
        lines += [f"Dropped images: {', '.join(f'{i} ({e}, {why})' for i, e, why in comparison['dropped_images']) or 'none'}.", ""]
    if report["missing"]:
        lines += [f"**No results** for: {', '.join(f'{i} ({e})' for i, e in report['missing'])}.", ""]
    if report["repeated"]:
        lines += [f"{len(report['repeated'])} tests were reported more than once (a repeated shard?): the last report counts.", ""]
    for engine in report["engines"]:
        matrix = layout(report, engine)
        shown = [row for row in matrix["rows"] if _row_rank(row)[0] < 2]
        passing = [
            row["check"] for row in matrix["rows"] if _row_rank(row)[0] == 2 and not any(c and c["outcome"] == "skip" for c in row["cells"])
        ]
        names = [image["name"] + (" (stale)" if image["stale"] else "") for image in matrix["images"]]
        lines += [f"## {engine}", ""]
        if shown:
            lines += ["| check | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for row in shown:
                lines.append(f"| {_md_escape(fmt.check_label(row['check']))} | " + " | ".join(_md_cell(c) for c in row["cells"]) + " |")
            lines.append("")
        if passing:
            where = "every image" if shown else ", ".join(names)
            lines += [_md_escape(f"✅ {len(passing)} checks pass on {where}: {', '.join(map(fmt.check_label, passing))}."), ""]
        # Passing where they ran, skipped on some images (the systemd-only checks on a sysvinit image):
        # not "on every image". One line per set of images that skipped them.
        partly: dict[tuple[str, ...], list[str]] = {}
        for row in matrix["rows"]:
            skipped_on = tuple(i["name"] for i, c in zip(matrix["images"], row["cells"], strict=True) if c and c["outcome"] == "skip")
            if _row_rank(row)[0] == 2 and skipped_on:
                partly.setdefault(skipped_on, []).append(row["check"])
        for skipped_on, checks in partly.items():
            labels = ", ".join(map(fmt.check_label, checks))
            line = f"✅ {len(checks)} checks pass where they ran, skipped on {', '.join(skipped_on)}: {labels}."
            lines += [_md_escape(line), ""]
        kept = [c for row in matrix["rows"] for c in row["cells"] if c and c.get("reused")]
        if kept:
            dates = ", ".join(sorted({fmt.night(c["reused"]) for c in kept}))
            lines += [f"♻️ {len(kept)} cells reused, their inputs unchanged: they ran {dates}.", ""]
        for title, checks in matrix["collapsed"]:
            if checks:
                lines += [_md_escape(f"➖ {len(checks)} {title}: {', '.join(map(fmt.check_label, checks))}."), ""]
    lines += ["## Images", "", "| image | engine | digest | kernel | systemd | cloud-init | boot |", "|---" * 7 + "|"]
    for image, engines in sorted(report["images"].items()):
        for engine, facts in sorted(engines.items()):
            row = [image, engine, fmt.short_digest(facts.get("digest", "")), *fmt.versions(facts), fmt.boot(facts)]
            lines.append("| " + " | ".join(_md_escape(str(v)) for v in row) + " |")
    lines += ["", "## Hosts", ""]
    lines += [f"- {_md_escape(fmt.host_line(run))}" for run in report["runs"]] or ["- (the results carry no host record)"]
    failures = [c for c in report["cells"] if c["outcome"] in (*BAD, "flaky")]
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""]
        lines += [
            _md_escape(f"- {c['image']} ({c['engine']}) {c['check']}: {c['outcome']}: {fmt.first_line(c['message'])[:300]}")
            for c in failures[:MD_FAILURES]
        ]
        if len(failures) > MD_FAILURES:
            lines.append(f"- … and {len(failures) - MD_FAILURES} more: see report.html")
    return "\n".join(lines) + "\n"


MD_FAILURES = 30  # a job summary names this many failures; the page has them all


def _relink(report: dict[str, Any], directory: Path) -> None:
    """Evidence paths relative to the report's directory, where its page links them from."""
    for cell in report["cells"]:
        cell["evidence"] = {kind: os.path.relpath(path, directory) for kind, path in cell["evidence"].items()}


def write(report: dict[str, Any], directory: Path) -> list[Path]:
    """report.json, report.md and report.html in `directory`, each written whole or not at all."""
    engines = sorted(set(report["engines"]) | {e for _i, e in report["missing"]})
    failures = sorted(
        (c for c in report["cells"] if c["outcome"] in (*BAD, "flaky")),
        key=lambda c: (-SEVERITY.get(c["outcome"], 3), c["image"], c["engine"], c["check"]),
    )
    outputs = {
        "report.json": json.dumps(report, indent=1, sort_keys=True) + "\n",
        "report.md": markdown(report),
        "report.html": report_html.render(report, [layout(report, e) for e in engines], failures),
    }
    written = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in outputs.items():
            path = directory / name
            files.write_atomic(path, text, mode=None)
            written.append(path)
    except OSError as error:
        raise ReportError(f"cannot write the report into {directory}: {error.strerror or error}") from None
    return written


def upstream_beside(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """What the nightly's refresh found of each image (nightly.UPSTREAM_FILE, a file per shard),
    read from beside the results files; {} where there is none."""
    found: dict[str, dict[str, Any]] = {}
    for directory in sorted({path.parent for path in paths}):
        for path in sorted(directory.glob("upstream*.json")):
            try:
                said = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ReportError(f"cannot read {path}: {error}") from None
            if isinstance(said, dict):
                found.update({image: record for image, record in said.items() if isinstance(record, dict)})
    return found


def _what_changed(report: dict[str, Any], before: dict[str, Any] | None, upstream: dict[str, dict[str, Any]]) -> None:
    """Per image, what changed since the previous report; per failing check, the package changes
    since it last passed (racker.report.changes). The packages are kept for the next night's diff."""
    keep = ("moved", "stale", "digest", "packages")
    report["upstream"] = {image: {k: record[k] for k in keep if k in record} for image, record in sorted(upstream.items())}
    report["changes"] = changes.of_images(upstream, before)
    changes.carry(report, before)
    for said in report["changes"].values():
        said.pop("changed")
    report["regressions"] = changes.regressions(report)


def make(paths: list[Path], directory: Path, previous: Path | None = None, window: int = history.WINDOW) -> dict[str, Any]:
    """Build, compare and carry the history forward (the previous report is read before anything
    is written: it may be in `directory`), and write."""
    report = build(paths)
    before = load_previous(previous) if previous is not None else None
    if before is not None:
        report["comparison"] = compare(report, before, str(previous))
    history.carry(report, before, window)
    _what_changed(report, before, upstream_beside(paths))
    _relink(report, directory)
    write(report, directory)
    return report
