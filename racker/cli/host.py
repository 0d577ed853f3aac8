"""The commands about the host itself: doctor, config and gc."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from racker.cli.options import Verb
from racker.cli.output import print_json, table


def cmd_config(args: argparse.Namespace) -> int:
    from racker import settings

    rows = settings.listing()
    if args.json:
        print_json(rows)
    else:
        table(
            [[r["name"], r["value"] or "(unset)", r["source"] + (" (invalid)" if "error" in r else "")] for r in rows],
            ["SETTING", "VALUE", "FROM"],
        )
        for row in rows:
            if "error" in row:
                print(f"racker: error: {row['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from racker.upkeep import doctor

    costs = doctor.machine_costs()
    if args.fix:
        for line in [*doctor.fix(costs), *doctor.fix_platforms()]:
            print(line, file=sys.stderr if args.json else sys.stdout)
    results = doctor.checks(probe_kvm=not args.no_probe)
    machines_check, limit_lines = doctor.capacity(costs)
    results.append(machines_check)
    if args.json:
        print_json([c.as_json() for c in results])
    else:
        for check in results:
            mark = "ok" if check.ok else ("MISSING" if check.required else "no")
            line = f"{mark:8} {check.name:20} {check.detail}"
            if not check.ok and check.package and check.package not in check.detail:
                line += f"  (apt-get install {check.package})"
            print(line)
        for line in limit_lines:
            print(f"{'':29}{line}")
    return 0 if all(c.ok for c in results if c.required) else 1


def cmd_gc(args: argparse.Namespace) -> int:
    from racker.upkeep import gc

    removed = gc.collect()
    for line in removed:
        print(line)
    if not removed:
        print("nothing to clean up")
    return 0


def add_commands(verb: Verb, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

    p = verb("config", cmd_config, "list every RACKER_* setting: its value and where it came from (environment or default)")
    p.add_argument("--json", action="store_true")

    p = verb("doctor", cmd_doctor, "check the host's prerequisites")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-probe", action="store_true", help="do not boot a probe guest to test KVM")
    p.add_argument(
        "--fix",
        action="store_true",
        help="raise the host limits (sysctl) to hold 200 more machines, register qemu-user's binfmt_misc handlers; says what it changed",
    )

    verb("gc", cmd_gc, "remove what killed racker processes left behind")
