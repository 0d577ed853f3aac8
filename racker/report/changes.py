"""What changed since the previous night: per image, and for each check that went bad.

A report keeps, per image, what the nightly's refresh found (`upstream`: whether it moved,
its digest, and its packages as {name: version}: the next night's diff needs nothing else),
and in its history the package changes of each night of the window, per image
({name: [was, now]}, None where absent), so that a check that passed on its last good night
and failed on its first bad one can name the package changes between the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Versions = dict[str, str]
Changed = dict[str, list[str | None]]  # name -> [was, now]; None: not installed


def versions(packages: Iterable[dict[str, str]]) -> Versions:
    """{name: version} of a package manifest (name:arch where one name has several architectures)."""
    listed = list(packages)
    names = [p["name"] for p in listed]
    return {(p["name"] if names.count(p["name"]) == 1 else f"{p['name']}:{p.get('arch', '')}"): p.get("version", "") for p in listed}


def diff(before: Versions, after: Versions) -> Changed:
    """The packages whose version differs (added: was None; removed: now None)."""
    return {
        name: [before.get(name), after.get(name)] for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)
    }


def compose(nights: Iterable[Changed]) -> Changed:
    """The change over several nights: each package's first `was` and last `now`; what came back is no change."""
    total: dict[str, list[str | None]] = {}
    for changed in nights:
        for name, (was, now) in changed.items():
            total[name] = [total[name][0] if name in total else was, now]
    return {name: pair for name, pair in sorted(total.items()) if pair[0] != pair[1]}


def readable(changed: Changed) -> dict[str, list[list[str]]]:
    """Added [name, version], removed [name, version] and upgraded [name, was, now] (a downgrade is an upgrade's kind)."""
    return {
        "added": [[name, now] for name, (was, now) in changed.items() if was is None and now is not None],
        "removed": [[name, was] for name, (was, now) in changed.items() if now is None and was is not None],
        "upgraded": [[name, was, now] for name, (was, now) in changed.items() if was is not None and now is not None],
    }


def of_images(upstream: dict[str, dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per image: whether its upstream moved, whether its digest changed since the previous report
    (None: not known), and its packages added, removed and upgraded since then."""
    before = (previous or {}).get("upstream") or {}
    found = {}
    for image, now in sorted(upstream.items()):
        was = before.get(image)
        changed = diff(was.get("packages") or {}, now.get("packages") or {}) if was and "packages" in was else {}
        found[image] = {
            "moved": now.get("moved"),
            "stale": bool(now.get("stale")),
            "digest": now.get("digest", ""),
            "digest_changed": (was.get("digest") != now.get("digest")) if was else None,
            **readable(changed),
            "changed": changed,
        }
    return found


def carry(report: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Tonight's package changes into report["history"]["packages"] ({night: {image: changes}}),
    the previous history's kept for the nights still in the window."""
    history = report["history"]
    past = (((previous or {}).get("history") or {}).get("packages")) or {}
    nights = set(history["nights"])
    kept = {night: images for night, images in past.items() if night in nights and isinstance(images, dict)}
    tonight = {image: said["changed"] for image, said in report.get("changes", {}).items() if said["changed"]}
    if tonight:
        kept[report["generated"]] = tonight
    history["packages"] = kept


def regressions(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each cell failing tonight that passed before in the window, with its image's package changes
    between its last good night and its first bad one (nights in between included)."""
    per_night = (report.get("history") or {}).get("packages") or {}
    found = []
    for cell in report["cells"]:
        good, bad = cell.get("last_good"), cell.get("first_bad")
        if cell["outcome"] != "fail" or not good or not bad or not good < bad:  # an error is the harness's, not a package's
            continue
        nights = [per_night[n].get(cell["image"], {}) for n in sorted(per_night) if good < n <= bad]
        changed = compose(nights)
        brief = {k: cell[k] for k in ("image", "engine", "check", "id", "outcome")}
        found.append(brief | {"last_good": good, "first_bad": bad, **readable(changed)})
    return found
