"""An xdist scheduler that keeps the tests of one image (and engine) on one worker."""

from __future__ import annotations

import pytest
from xdist.scheduler import LoadScopeScheduling


class ImageScheduling(LoadScopeScheduling):
    """LoadScope scheduling where a racker test's scope is its target id.

    A racker test's id names its target: `test_x[debian-bookworm]`, or
    `test_x[debian-bookworm-nspawn]` with several engines. Every other test
    is a scope of its own, as under plain `--dist load`.
    """

    def __init__(self, config: pytest.Config, log, targets: list[str]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, log)
        # Longest first, so that "debian-sid-qemu" wins over "debian-sid".
        self.targets = sorted(targets, key=len, reverse=True)

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.endswith("]") and "[" in nodeid:
            params = nodeid[nodeid.rindex("[") + 1 : -1]
            for target in self.targets:
                if params == target or params.startswith(f"{target}-") or params.endswith(f"-{target}") or f"-{target}-" in params:
                    return f"racker:{target}"
        return nodeid
