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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from racker import catalog, history, images, matrix, progress, report, store
from racker.errors import RackerError
from racker.shards import Shard


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
    }
    if done.stale:
        progress.warn(f"{done.error}; the night goes on with the stored image, last reached {done.last_reached}")
        record.update(last_reached=done.last_reached, error=str(done.error))
    return record


def default_images() -> list[str]:
    """The default image set: the catalogue, but for entries with default_set = false."""
    return catalog.default_set()


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
) -> Night:
    """offline: test the stored images as they are (pull's fast path), asking no upstream."""
    planned = sorted(set(names or default_images()))
    # Every name is resolved (a typo fails every shard alike); only this shard's are pulled.
    stored = sorted(images.resolve(name).name for name in planned)
    if previous is not None:
        report.load_previous(previous)  # a bad --previous fails now, not after an hour of checks
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
            else:
                upstream[name] = refreshed(images.refresh(name))
    timings["refresh"] = progress.TIMINGS[-1][1]
    store.write_json(output / UPSTREAM_FILE.format(shard=f"-{shard.index}of{shard.total}" if shard else ""), upstream)
    written = []
    for engine in engines:
        path = output / results_name(engine, shard)
        with progress.step(f"{engine} checks"):
            status = matrix.run(stored, [engine], path, workers=workers, quiet=True, shard=str(shard) if shard else None)
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


def failed(made: dict[str, Any]) -> bool:
    """Whether the night should go red: something regressed against the previous report (every
    failure, with none to compare against), or an image planned got no results."""
    if made["comparison"] is not None:
        return report.regressed(made) or bool(made["missing"])
    return any(cell["outcome"] in report.BAD for cell in made["cells"]) or bool(made["missing"])
