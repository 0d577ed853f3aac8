"""What a hostile image or a local user gets out of racker: issue 22's figures.

- hostile images x operations tried, and sentinel changes (goal 0): the corpus of
  tests/test_hostile_images.py (the shared prepared debian-bookworm with links at
  every path racker reads, writes or deletes, pointing at a sentinel tree on the
  host), run in a private store;
- sockets probed as an unprivileged user and refused (goal: all), from
  `probe_sockets_as_nobody()`;
- secrets planted and found in output (goal 0), from `plant_secrets()`.

The last two come from other modules: any bench/*.py or tests/test_*.py that
defines the function (returning (probed, refused) and (planted, found), or a dict
with those keys) is imported; without one the figure says "not measured".
Needs root, the shared test store (RACKER_TEST_HOME) and a few minutes.

    python bench/hostile.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def shared(store_home: Path) -> Callable[..., object]:
    """conftest's share_image outside pytest: a shared-store image, linked into this private store."""
    from conftest import SHARED_HOME
    from racker import images, prepare, store

    def share(name: str, *, prepared: bool = False):  # type: ignore[no-untyped-def]
        os.environ["RACKER_HOME"] = str(SHARED_HOME)
        try:
            image = images.pull(name)
            if prepared:
                image = prepare.prepare(image)
        finally:
            os.environ["RACKER_HOME"] = str(store_home)
        return store.link_from(SHARED_HOME, image.name)

    return share


def find_hook(name: str) -> Callable[[], object] | None:
    """The function `name` from whichever bench or test module defines it, else None."""
    for path in sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("tests/test_*.py")]):
        if path.resolve() == Path(__file__).resolve() or f"def {name}(" not in path.read_text(errors="replace"):
            continue
        spec = importlib.util.spec_from_file_location(f"_hook_{path.stem}", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # a module that does not import here is no figure, not a crash
            print(f"{path.name}: {error}", file=sys.stderr)
            continue
        return getattr(module, name, None)
    return None


def hook_figure(name: str, keys: tuple[str, str]) -> dict | str:
    hook = find_hook(name)
    if hook is None:
        return "not measured"
    value = hook()
    if hasattr(value, "targets"):  # socket_probe's Probe: of the sockets of what runs in the store now
        return {"probed": len(value.targets), "refused": len(value.refused)}
    if isinstance(value, dict):
        return {key: value[key] for key in keys}
    first, second = value  # type: ignore[misc]
    return dict(zip(keys, (first, second), strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the three leaf images only, without the extra formats")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import test_hostile_images as corpus

    with tempfile.TemporaryDirectory(prefix="racker-bench-hostile-") as tmp:
        work = Path(tmp)
        os.environ["RACKER_HOME"] = str(work / "store")
        os.environ.setdefault("RACKER_CATALOG", str(ROOT / "images"))
        hostile = corpus.CORPUS[:3] if args.quick else corpus.CORPUS
        found = corpus.run_corpus(shared(work / "store"), work, hostile, more=not args.quick)
    figures = {
        "hostile images": found["images"],
        "operations tried": found["tried"],
        "operations that succeeded inside the image": found["succeeded"],
        "sentinel changes (goal 0)": len(found["changed"]),
        "operations not ending in success or one line": len(found["misbehaved"]),
        "sockets probed as an unprivileged user and refused (goal: all)": hook_figure("probe_sockets_as_nobody", ("probed", "refused")),
        "secrets planted and found in output (goal 0)": hook_figure("plant_secrets", ("planted", "found")),
    }
    if args.json:
        print(json.dumps(dict(figures, changed=found["changed"], misbehaved=found["misbehaved"]), indent=2))
    else:
        for label, value in figures.items():
            print(f"{label}: {value}")
        for line in found["changed"]:
            print(f"  changed by: {line}")
        for line in found["misbehaved"]:
            print(f"  misbehaved: {line.splitlines()[0]}")
    return 1 if found["changed"] else 0


if __name__ == "__main__":
    sys.exit(main())
