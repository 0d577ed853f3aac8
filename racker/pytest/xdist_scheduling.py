"""An xdist scheduler that keeps the tests of one image (and engine) on one worker, and the
tests of one xdist_group mark on one worker too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from racker import files
from racker.pytest.targets import Target


def publish_groups(items: list[pytest.Item], directory: str, worker: str) -> None:
    """Write, for the controller's scheduler, the scope of each collected test that has one: its
    racker target (the image and engine the plugin gave it) or its xdist_group mark. The controller
    sees node ids only. Every worker collects the same tests; each writes its own file."""
    scopes = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("_racker_target") if callspec else None
        mark = item.get_closest_marker("xdist_group")
        if isinstance(target, Target):
            scopes[item.nodeid] = f"racker:{target.image}/{target.engine}"
        elif mark is not None:
            scopes[item.nodeid] = f"group:{mark.args[0] if mark.args else mark.kwargs.get('name', 'default')}"
    path = Path(directory) / f"{worker}.json"
    files.write_atomic(path, json.dumps(scopes), mode=None)  # whole, or not there yet


class ImageScheduling(LoadScopeScheduling):
    """LoadScope scheduling where a racker test's scope is its target id, and another test's
    its xdist_group mark's name.

    A racker test's scope is the target the plugin parametrised it with (its image and
    engine), as the workers publish it: not read from its id, where another test's
    parameter (`test_x[debian-bookworm-sysvinit]`) could look like a target. A test marked
    xdist_group goes with the others of its group (as under --dist loadgroup:
    a module fixture that boots a VM boots it once). Every other test is a scope
    of its own, as under plain `--dist load`.
    """

    def __init__(self, config: pytest.Config, log, targets: list[str], groups_directory: str | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, log)
        # Longest first, so that "debian-sid-qemu" wins over "debian-sid".
        self.targets = sorted(targets, key=len, reverse=True)
        self.groups_directory = groups_directory
        self._groups: dict[str, str] | None = None

    def groups(self) -> dict[str, str]:
        """Node id -> scope, as the workers wrote it once they had collected."""
        if self._groups is None:
            found = sorted(Path(self.groups_directory).glob("*.json")) if self.groups_directory else []
            if not found:
                return {}  # not written yet: asked again next time, never remembered as "no groups"
            self._groups = json.loads(found[0].read_text())
        return self._groups

    def _split_scope(self, nodeid: str) -> str:
        published = self.groups()
        if published:
            return published.get(nodeid, nodeid)
        # No worker has written its scopes (they do before the controller schedules): read the
        # target from the id, as the plugin writes it; another test is a scope of its own.
        if nodeid.endswith("]") and "[" in nodeid:
            params = nodeid[nodeid.rindex("[") + 1 : -1]
            for target in self.targets:
                if params == target or params.startswith(f"{target}-") or params.endswith(f"-{target}") or f"-{target}-" in params:
                    return f"racker:{target}"
        return nodeid
