"""Same inputs, same digest, measured: each catalogue image and its +vm image built twice, in two
fresh private stores one after the other, and their digests compared (issue 23, item 2).

    .venv/bin/python bench/reproducible.py [IMAGE ...] [--keep DIR]

For each image (default: the whole catalogue) store A builds it (`racker pull`) and promotes it to
a raw disk (which prepares NAME+vm), then store B does the same. The table says, per image and per
+vm image, the two digests and whether they are equal, and whether the two raw disks are the same
bytes; where a pair differs, `racker diff`'s listing of the packages and files that differ follows.
Builds run one at a time: a bootstrap and a prepare take minutes each on a small host. When the
archive moved between the two builds the row says so: those were not the same inputs.

Exit status 1 if any pair that had the same inputs differs.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATALOGUE = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie"]


def racker(home: Path, *args: str) -> None:
    """This checkout's racker command line in the store at `home`; a failure ends the bench."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "racker", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "RACKER_HOME": str(home)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(f"  {home.name}: racker {' '.join(args)}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"racker {' '.join(args)} in {home} failed:\n{done.stderr}")


def manifest(home: Path, name: str) -> dict:
    from racker import store

    return json.loads((home / "refs" / store.ref_path(name).name).read_text())["manifest"]


def build(home: Path, name: str) -> Path:
    """NAME and NAME+vm in the store at `home`; returns the raw disk promoted from NAME+vm."""
    racker(home, "pull", name)
    disk = home / "disk.raw"
    racker(home, "promote", name, "--output", str(disk))
    return disk


def differences(home_a: Path, home_b: Path, name: str) -> list[str]:
    """`racker diff`'s listing of the image `name` in store A against store B."""
    from racker import images
    from racker.store import diff

    os.environ["RACKER_HOME"] = str(home_a)
    a = images.find(name)
    os.environ["RACKER_HOME"] = str(home_b)
    b = images.find(name)  # each keeps the path it was found at
    return diff.lines(f"A:{name}", f"B:{name}", diff.images(a, b))


def compare(name: str, work: Path) -> list[dict]:
    home_a, home_b = work / f"{name}-a", work / f"{name}-b"
    print(f"{name}:", file=sys.stderr)
    disk_a = build(home_a, name)
    disk_b = build(home_b, name)
    same_disk = filecmp.cmp(disk_a, disk_b, shallow=False)
    rows = []
    for image in (name, f"{name}+vm"):
        a, b = manifest(home_a, image), manifest(home_b, image)
        upstream_a, upstream_b = (a.get("upstream") or {}).get("state"), (b.get("upstream") or {}).get("state")
        row = {"image": image, "a": a["digest"], "b": b["digest"], "equal": a["digest"] == b["digest"]}
        row["same_inputs"] = upstream_a == upstream_b if image == name else rows[0]["same_inputs"]
        row["disk_equal"] = same_disk if image != name else None
        row["diff"] = [] if row["equal"] else differences(home_a, home_b, image)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'image':<22} {'digest store A':<20} {'digest store B':<20} {'equal?':<7} raw disk equal?"]
    for row in rows:
        equal = "yes" if row["equal"] else ("NO" if row["same_inputs"] else "moved")
        disk = "" if row["disk_equal"] is None else ("yes" if row["disk_equal"] else "NO")
        lines.append(f"{row['image']:<22} {row['a'][7:26]:<20} {row['b'][7:26]:<20} {equal:<7} {disk}")
    for row in rows:
        if row["diff"]:
            lines += ["", f"racker diff A:{row['image']} B:{row['image']}:", *row["diff"][:200]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", default=CATALOGUE, help="catalogue images (default: all)")
    parser.add_argument("--keep", type=Path, help="build the stores in DIR and leave them there (default: a temporary directory)")
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="racker-reproducible-", dir="/var/tmp") as tmp:
        work = args.keep or Path(tmp)
        for name in args.images:
            rows += compare(name, work)
    print(table(rows))
    return 1 if any(not row["equal"] and row["same_inputs"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
