"""Wall time of `racker nightly` on the catalogue images: a full night, a night with no change,
and a night where one image changed (issue 23, item 5: a night costs only what changed).

Runs in a store of its own (a temporary RACKER_HOME) whose images, prepared images and cached
disks are hard links into the store given by --from (no rebuild, and that store is never
written): every night is --offline, so only what the bench changes changes.

1. full: every cell runs (images built beforehand, not timed; the VMs' snapshots are made here);
2. no change: --previous the full night: every cell is reused, nothing boots (goal: <= 15 s);
3. one changed: the first image's digest changes (a copy with one file added, committed under
   its name), --previous night 2: that image runs, the others are reused. Its goal is that
   image's own cost + 15 s; the own cost is measured after, as a night of that image alone
   changed once more (so that it, too, prepares, promotes and boots a digest never seen).

    PYTHONPATH=. python bench/bench_nightly.py [--workers auto] [--engine all] [--images debian-bookworm,...] [--from /var/lib/racker-tests]

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

IMAGES = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie"]
GOAL_NO_CHANGE_S = 15
GOAL_OVERHEAD_S = 15


def link_store(source: Path, names: list[str]) -> None:
    """The images, their prepared images and the cached disks of `source`, linked into this store."""
    from racker import store

    for name in names:
        store.link_from(source, name)
        if store.ref_path(f"{name}+vm").name in {p.name for p in (source / "refs").iterdir()}:
            store.link_from(source, f"{name}+vm")
    disks = store.home() / "disks"
    disks.mkdir(parents=True, exist_ok=True)
    for disk in (source / "disks").glob("*.raw"):
        if not (disks / disk.name).exists():
            os.link(disk, disks / disk.name)


def warm(names: list[str], engines: list[str]) -> None:
    """Everything a night finds ready after the first one: images, prepared images, cached disks."""
    from racker import images, prepare, promote

    for name in names:
        image = images.pull(name)
        if "qemu" in engines:
            promote.cached_disk(prepare.prepare(image), "bios")


def change(name: str, stamp: str) -> str:
    """Give `name` another digest: its image with one file added, committed under its name (a stand-in
    for an upstream that moved). The new digest."""
    from racker import proc, store

    original = store.lookup(name)
    assert original is not None
    with store.locked(f"image-{name}"), store.workdir("bench") as work:
        root = work / "rootfs"
        proc.run(["cp", "-al", str(original.rootfs), str(root)], timeout=600)
        (root / "etc" / "racker-bench-stamp").write_text(stamp + "\n")  # a new file: no linked inode is written
        manifest = {k: v for k, v in original.manifest.items() if k not in ("digest", "size", "created", "packages")}
        return store.commit(name, root, source=original.source, recipe=original.recipe, manifest=manifest).digest


def night(names: list[str], directory: Path, engines: list[str], workers: str, previous: Path | None = None, **options: object) -> dict:
    from racker import nightly

    started = time.monotonic()
    done = nightly.run(names, directory, engines, previous=previous, workers=workers, offline=True, **options)  # type: ignore[arg-type]
    wall = time.monotonic() - started
    assert done.report is not None
    cells = done.report["cells"]
    booted = sorted({(r["image"], r["engine"]) for r in _image_records(done.results) if not r.get("reused")})
    return {
        "wall_s": round(wall, 1),
        "stages_s": {stage: round(seconds, 1) for stage, seconds in done.timings.items()},
        "counts": done.report["counts"],
        "cells": len(cells),
        "reused": sum(1 for c in cells if c.get("reused")),
        "booted": [f"{image} ({engine})" for image, engine in booted],
        "failed": nightly.failed(done.report),
    }


def _image_records(results: list[Path]) -> list[dict]:
    return [r for path in results for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "image"]


def main() -> None:
    from racker import settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--engine", default="all")
    parser.add_argument("--images", default=",".join(IMAGES), help="comma-separated; the first is the one that changes")
    parser.add_argument("--from", dest="source", default=str(settings.TEST_HOME.value()))
    args = parser.parse_args()
    names = [n for n in args.images.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="racker-bench-nightly-", dir="/var/tmp") as tmp:
        os.environ["RACKER_HOME"] = str(Path(tmp) / "store")
        from racker.pytest import matrix

        engines = matrix.engine_names(args.engine)
        link_store(Path(args.source), names)
        warm(names, engines)
        out = Path(tmp)
        full = night(names, out / "1", engines, args.workers)
        unchanged = night(names, out / "2", engines, args.workers, previous=out / "1")
        change(names[0], "1")
        one_changed = night(names, out / "3", engines, args.workers, previous=out / "2")
        change(names[0], "2")
        own = night(names[:1], out / "own", engines, args.workers, full=True)
    print(
        json.dumps(
            {
                "benchmark": f"racker nightly {' '.join(names)} --engine {args.engine} -n {args.workers} --offline (images built)",
                "full_night": full,
                "no_change_night": unchanged,
                "one_image_changed_night": one_changed,
                "changed_image_own_cost": own,
                "figures_s": {
                    "full": full["wall_s"],
                    "no_change": unchanged["wall_s"],
                    "one_changed": one_changed["wall_s"],
                    "one_changed_own_cost": own["wall_s"],
                    "one_changed_overhead": round(one_changed["wall_s"] - own["wall_s"], 1),
                },
                "goals_s": {"no_change_max": GOAL_NO_CHANGE_S, "one_changed_overhead_max": GOAL_OVERHEAD_S},
                "met": unchanged["wall_s"] <= GOAL_NO_CHANGE_S and one_changed["wall_s"] - own["wall_s"] <= GOAL_OVERHEAD_S,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
