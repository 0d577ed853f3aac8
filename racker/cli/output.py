"""What the commands print for people: tables and JSON."""

from __future__ import annotations

import json
import sys


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    print()
