"""Wall time of `racker nightly` on the four catalogue images, split by stage.

The images are built, prepared and promoted first (not timed), so the night
measures what it does every night after the first: refresh (a pull that finds
every recipe unchanged), the nspawn checks, the qemu checks, the report. Where
the qemu time goes: each VM's boot split and each check's duration, from the
results. Prints JSON.

    python bench/bench_nightly.py [--workers auto] [--engine all]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from racker import images, matrix, nightly, prepare, promote

IMAGES = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie"]
GOAL_S = 120


def warm(engines: list[str]) -> None:
    """Everything a night finds ready after the first one: images, prepared images, cached disks."""
    for name in IMAGES:
        image = images.pull(name)
        if "qemu" in engines:
            promote.cached_disk(prepare.prepare(image), "bios")


def where_the_time_goes(results: list[Path]) -> dict:
    """Per engine: the sum of test durations (setup included: the boot) and each image's boot split."""
    out: dict = {}
    for path in results:
        for record in map(json.loads, path.read_text().splitlines()):
            engine = out.setdefault(record.get("engine") or "", {"tests_s": 0.0, "slowest": [], "boot": {}, "failed": []})
            if record.get("kind") == "test":
                engine["tests_s"] = round(engine["tests_s"] + record["duration"], 1)
                engine["slowest"].append((record["duration"], record["nodeid"]))
                if record["outcome"] in ("fail", "error"):
                    engine["failed"].append(f"{record['nodeid']}: {record['message'][:300]}")
            elif record.get("kind") == "image" and record.get("boot"):
                engine["boot"][record["image"]] = record["boot"]
    for engine in out.values():
        engine["slowest"] = [f"{d:.1f}s {n}" for d, n in sorted(engine["slowest"], reverse=True)[:5]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--engine", default="all")
    args = parser.parse_args()
    engines = matrix.engine_names(args.engine)
    warm(engines)
    with tempfile.TemporaryDirectory(prefix="racker-bench-nightly-") as tmp:
        started = time.monotonic()
        night = nightly.run(IMAGES, Path(tmp), engines, workers=args.workers)
        wall = time.monotonic() - started
        detail = where_the_time_goes(night.results)
    assert night.report is not None
    print(
        json.dumps(
            {
                "benchmark": f"racker nightly {' '.join(IMAGES)} --engine {args.engine} -n {args.workers} (images built)",
                "wall_s": round(wall, 1),
                "stages_s": {stage: round(seconds, 1) for stage, seconds in night.timings.items()},
                "counts": night.report["counts"],
                "failed": nightly.failed(night.report),
                "where_the_time_goes": detail,
                "goal": {"wall_max_s": GOAL_S},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
