"""The nightly job: refresh the images, run the checks on every engine, write the report.

    racker nightly -o DIR [--previous DIR] [--shard K/N] [IMAGES…]

Stages, each timed (progress.TIMINGS): refresh (images.refresh: ask each image's
upstream, acquire again only what moved; an upstream not reached keeps the stored
image, recorded stale in upstream.json with when it was last reached), then one
pytest run per engine (nspawn first: its answers come in seconds, the VMs' in
minutes), then the report, which carries the history of the last nights forward
from --previous's. Each
engine writes its own results file into DIR, named after the shard too, so
that the files of N shards gathered into one directory never overwrite each
other. A shard stops before the report: the job that gathers every shard's
results makes it (`racker report`), and names the images of a shard that
never came back.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from racker import files, images, progress, report, store
from racker.errors import RackerError
from racker.pytest import matrix
from racker.report import changes, facts, history, results, reuse
from racker.report.shards import Shard
from racker.store import catalog, sbom


class NightlyError(RackerError):
    """A stage of the nightly job stopped without results (not a failing check: pytest itself)."""


@dataclass
class Night:
    results: list[Path]  # the results files this run wrote
    report: dict[str, Any] | None  # None for a shard
    timings: dict[str, float]  # seconds per stage
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)  # per image: what its refresh found (refreshed())


# Beside the results: what each image's refresh found, for the report (per shard, like the results).
UPSTREAM_FILE = "upstream{shard}.json"


def refreshed(done: images.Refreshed) -> dict[str, Any]:
    """An image's refresh as the report reads it: whether its upstream moved, and if it could not be
    reached (or did not hold), `stale` with the error line and when it was last reached."""
    image = done.image
    record: dict[str, Any] = {
        "image": done.name,
        "moved": done.moved,
        "digest": image.digest if image else "",
        "built": image.created if image else "",
        "checked": ((image.manifest.get("upstream") or {}).get("checked") or "") if image else "",
        "stale": done.stale,
        "packages": changes.versions(sbom.of(image)) if image else {},
    }
    if done.stale:
        progress.warn(f"{done.error}; the night goes on with the stored image, last reached {done.last_reached}")
        record.update(last_reached=done.last_reached, error=str(done.error))
    return record


def default_images() -> list[str]:
    """The images of a night without names: the catalogue's default set, and the entries marked
    `nightly = true` (catalog.nightly_set)."""
    return catalog.nightly_set()


def results_name(engine: str, shard: Shard | None) -> str:
    return f"results-{engine}" + (f"-{shard.index}of{shard.total}" if shard else "") + ".jsonl"


def run(
    names: list[str],
    output: Path,
    engines: list[str],
    *,
    previous: Path | None = None,
    workers: str | None = "auto",
    shard: Shard | None = None,
    window: int = history.WINDOW,
    offline: bool = False,
    full: bool = False,
    max_age: dt.timedelta = reuse.MAX_AGE,
) -> Night:
    """offline: test the stored images as they are (pull's fast path), asking no upstream.
    full: run every cell; else a cell whose inputs are those of a cell of the previous report
    that ran less than `max_age` ago keeps that result (racker.report.reuse)."""
    planned = sorted(set(names or default_images()))
    # Every name is resolved (a typo fails every shard alike); only this shard's are pulled.
    stored = sorted(images.resolve(name).name for name in planned)
    # A bad --previous fails now, not after an hour of checks.
    before = report.load_previous(previous) if previous is not None else None
    started = store.now()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NightlyError(f"cannot write into {output}: {error.strerror or error}") from None
    timings: dict[str, float] = {}
    mine = shard.select(stored) if shard else stored
    upstream: dict[str, dict[str, Any]] = {}
    with progress.step(f"{'pulling' if offline else 'refreshing'} {len(mine)} images"):
        for name in mine:
            if offline:
                image = images.pull(name)
                upstream[name] = {"image": name, "moved": None, "digest": image.digest, "built": image.created, "stale": False}
                upstream[name]["packages"] = changes.versions(sbom.of(image))
            else:
                upstream[name] = refreshed(images.refresh(name))
    timings["refresh"] = progress.TIMINGS[-1][1]
    store.write_json(output / UPSTREAM_FILE.format(shard=f"-{shard.index}of{shard.total}" if shard else ""), upstream)
    written = []
    for engine in engines:
        path = output / results_name(engine, shard)
        digests = {name: record["digest"] for name, record in upstream.items() if record.get("digest")}
        kept = [] if full else reuse.carried(before, digests, [engine], started, max_age)
        with progress.step(f"{engine} checks" + (f" ({len(kept)} cells reused)" if kept else "")):
            if kept and _all_kept(before, kept, mine, engine):
                # Nothing to run: no pytest, no boot; the results say so themselves.
                whole = [[name, engine] for name in stored]  # the whole matrix, as the plugin's run record plans it
                run_record = {"kind": "run", "started": started, "host": facts.host(), "planned": whole}
                path.write_text(json.dumps(run_record | _shard_fields(shard, mine)) + "\n")
                status = 0
            else:
                listed = output / f".reuse-{engine}.json"
                store.write_json(listed, [[c["image"], c["engine"], c["check"]] for c in kept])
                try:
                    slice_of = str(shard) if shard else None
                    status = matrix.run(stored, [engine], path, workers=workers, quiet=True, shard=slice_of, reuse=listed)
                finally:
                    listed.unlink(missing_ok=True)
            if status in matrix.RAN and path.exists():
                _complete(path, before, kept, digests, engine)
        timings[engine] = progress.TIMINGS[-1][1]
        if status == 2:
            raise KeyboardInterrupt  # pytest caught the Ctrl-C; stop the night as racker stops
        if status not in matrix.RAN or not path.exists():
            raise NightlyError(
                f"the {engine} checks stopped without results (pytest exit status {status})",
                hint="run them alone to see why: racker check IMAGE --engine " + engine,
            )
        written.append(path)
    if shard is not None:
        return Night(written, None, timings, upstream)
    with progress.step("report"):
        made = report.make(written, output, previous, window)
    timings["report"] = progress.TIMINGS[-1][1]
    return Night(written, made, timings, upstream)


def _shard_fields(shard: Shard | None, mine: list[str]) -> dict[str, Any]:
    return {"shard": str(shard), "images": mine} if shard else {}


def _all_kept(before: dict[str, Any] | None, kept: list[dict[str, Any]], mine: list[str], engine: str) -> bool:
    """Whether every cell the previous report had of this shard's images on `engine` is kept
    (and it had some for each: an image it never tested must run)."""
    earlier = [c for c in (before or {}).get("cells", []) if c["engine"] == engine and c["image"] in mine]
    had = {c["image"] for c in earlier}
    return set(mine) <= had and len(earlier) == len(kept)


def _complete(path: Path, before: dict[str, Any] | None, kept: list[dict[str, Any]], digests: dict[str, str], engine: str) -> None:
    """Tonight's results made whole: each test run tonight gets its key and the date it ran; the
    cells kept from the previous report follow as records marked `reused`, and so do the facts of
    an image that did not boot tonight."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ran = next((r.get("started", "") for r in records if results.kind(r) == "run"), "") or store.now()
    booted = {r["image"] for r in records if results.kind(r) == "image"}
    for record in records:
        if results.kind(record) == "test" and record.get("image") in digests and "key" not in record:
            record.update(key=reuse.key(digests[record["image"]], engine, record["nodeid"]), ran=ran)
    ran_tonight = {(r.get("image"), r.get("check")) for r in records if results.kind(r) == "test"}
    for cell in kept:
        if (cell["image"], cell["check"]) not in ran_tonight:  # tonight's own result wins, should a kept cell have run
            records += reuse.records(cell)
    earlier = (before or {}).get("images", {})
    for image in sorted({c["image"] for c in kept} - booted):
        said = (earlier.get(image) or {}).get(engine) or {}
        if said:
            when = min(c["ran"] for c in kept if c["image"] == image)
            records.append({**said, "kind": "image", "image": image, "engine": engine, "reused": when})
    files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records), mode=None)


def failed(made: dict[str, Any]) -> bool:
    """Whether the night should go red: something regressed against the previous report (every
    failure, with none to compare against), or an image planned got no results."""
    if made["comparison"] is not None:
        return report.regressed(made) or bool(made["missing"])
    return any(cell["outcome"] in report.BAD for cell in made["cells"]) or bool(made["missing"])
