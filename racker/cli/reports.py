"""The commands that run checks and write reports: check, report, nightly."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from racker.cli.options import Verb, add_pull_options, pull_options
from racker.cli.output import table


def cmd_check(args: argparse.Namespace) -> int:
    """Run the built-in compatibility checks (racker.checks) and print a table of results."""
    import tempfile
    from pathlib import Path

    from racker import images
    from racker.pytest import matrix
    from racker.report import check_table
    from racker.report.results import read_tests

    # Build first, with progress, and fail early on a bad name; the checks take the stored names
    # (a platform's included), which need no network and no --insecure again.
    names = [images.pull(name, **pull_options(args)).name for name in args.images]
    with tempfile.TemporaryDirectory(prefix="racker-check-") as tmp:
        results = Path(args.results or os.path.join(tmp, "results.jsonl"))
        options = {"workers": args.workers, "junit": args.junit, "verbose": args.verbose}
        status = matrix.run(names, matrix.engine_names(args.engine), results, **options)
        records = read_tests(results)
    print()
    table(*check_table(records))
    return 0 if status == 0 else 1


def _print_report(made: dict, output: str, previous: str | None) -> None:
    from pathlib import Path

    from racker import report

    counts = made["counts"]
    print(f"{Path(output) / 'report.html'}: " + ", ".join(f"{counts[o]} {o}" for o in report.OUTCOMES))
    reused = sum(1 for cell in made["cells"] if cell.get("reused"))
    if reused:
        print(f"{reused} of {len(made['cells'])} cells reused from earlier nights (their inputs unchanged; --full runs them)")
    if made["missing"]:
        print("no results for: " + ", ".join(f"{image} ({engine})" for image, engine in made["missing"]))
    nights = len(made["history"]["nights"])
    labels = [cell.get("label") for cell in made["cells"]]
    if nights > 1:
        print(f"over the last {nights} nights: {labels.count('FAILING')} cells FAILING, {labels.count('FLAKY')} FLAKY")
    comparison = made["comparison"]
    if comparison:
        print(f"against {previous}: {len(comparison['new_failures'])} new failures, {len(comparison['fixed'])} fixed")
        for cell in comparison["new_failures"]:
            first = cell["message"].splitlines()[0] if cell["message"] else cell["outcome"]
            print(f"  new failure: {cell['image']} ({cell['engine']}) {cell['check']}: {first}")


def cmd_report(args: argparse.Namespace) -> int:
    """Merge results into report.json, report.md and report.html; exit 1 if something regressed
    or a planned image has no results (a lost shard must turn the merge job red)."""
    from pathlib import Path

    from racker import report

    made = report.make([Path(p) for p in args.results], Path(args.output), Path(args.previous) if args.previous else None, args.history)
    _print_report(made, args.output, args.previous)
    return 1 if report.regressed(made) or made["missing"] else 0


# What a cell shows when a check ran more than once there (parametrised): the worst outcome.
def _nights(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of nights >= 1, not {text!r}")
    return int(text)


def _max_age(text: str) -> dt.timedelta:
    """--max-age: a number of days (0: reuse nothing), or hours with an h: 7, 1.5, 12h."""
    hours = text.endswith("h")
    try:
        value = float(text.removesuffix("h"))
    except ValueError:
        value = -1.0
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected days (7) or hours (12h), 0 or more, not {text!r}")
    return dt.timedelta(hours=value) if hours else dt.timedelta(days=value)


def add_history_option(p: argparse.ArgumentParser) -> None:
    from racker.report import history

    p.add_argument(
        "--history",
        type=_nights,
        default=history.WINDOW,
        metavar="N",
        help="nights of history the report keeps, carried from --previous's (default %(default)s)",
    )


def cmd_nightly(args: argparse.Namespace) -> int:
    """Refresh the images, run the checks on every engine, write the report; exit 1 if the night went red."""
    from pathlib import Path

    from racker import nightly
    from racker.pytest import matrix
    from racker.report import shards

    shard = shards.parse(args.shard) if args.shard else None
    night = nightly.run(
        args.images,
        Path(args.output),
        matrix.engine_names(args.engine),
        previous=Path(args.previous) if args.previous else None,
        workers=args.workers,
        shard=shard,
        window=args.history,
        offline=args.offline,
        full=args.full,
        max_age=args.max_age,
    )
    if night.report is None:
        # A shard: its results are half of a report; the job that gathers every shard makes it.
        for path in night.results:
            print(path)
        print(f"shard {shard}: merge every shard's results with: racker report RESULTS… -o DIR")
        return 0
    _print_report(night.report, args.output, args.previous)
    print(f"report: {(Path(args.output) / 'report.html').absolute()}")
    return 1 if nightly.failed(night.report) else 0


def add_commands(verb: Verb, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

    from racker import engines

    p = verb("check", cmd_check, "boot images and run the built-in compatibility checks")
    p.add_argument("images", nargs="+")
    p.add_argument("--engine", default="nspawn", choices=[*engines.ENGINES, "all"], help="where to boot the images (default nspawn)")
    add_pull_options(p)
    p.add_argument("-n", "--workers", help="parallel pytest workers (pytest-xdist), e.g. auto")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML")
    p.add_argument("--results", metavar="FILE", help="also keep the JSON-lines results")
    p.add_argument("-v", "--verbose", action="store_true")

    p = verb("report", cmd_report, "merge results (JSON lines or JUnit XML) into report.json, .md and .html; exit 1 on regressions")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files of one or more runs (shards)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--previous", metavar="DIR|report.json", help="an earlier report to compare against")
    add_history_option(p)

    p = verb(
        "nightly",
        cmd_nightly,
        "refresh the images, run the checks on every engine and write the report into DIR; exit 1 if the night went red",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES", help="default: every catalogue image")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="where the results and report.json, .md and .html go")
    p.add_argument(
        "--previous",
        metavar="DIR|report.json",
        help="an earlier report: exit 1 only on new failures against it (without one: on any failure)",
    )
    from racker import engines

    p.add_argument("--engine", default="all", choices=[*engines.ENGINES, "all"], help="where to boot the images (default %(default)s)")
    p.add_argument("-n", "--workers", default="auto", help="parallel pytest workers (pytest-xdist; default %(default)s, 0: none)")
    p.add_argument(
        "--shard", metavar="K/N", help="run only the K-th of N slices of the images, and write results, not the report (CI: one per runner)"
    )
    p.add_argument("--offline", action="store_true", help="test the stored images as they are: ask no upstream (pull's offline fast path)")
    p.add_argument("--full", action="store_true", help="run every cell, none carried over from --previous")
    p.add_argument(
        "--max-age",
        type=_max_age,
        default=dt.timedelta(days=7),
        metavar="DAYS",
        help="carry over a --previous cell whose inputs are unchanged only if it ran less than this long ago "
        "(days, or hours with h: 12h; default 7; 0: never)",
    )
    add_history_option(p)
