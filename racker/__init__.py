"""racker: boot OS images under systemd-nspawn and QEMU, and test that they work.

After `import racker`, testinfra knows racker's backend (`testinfra.get_host("racker://NAME")`,
`py.test --hosts=racker://NAME`), and `racker.host(IMAGE)` boots a machine for a script:

    with racker.host("debian-bookworm") as host:
        host.run("true")
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

BACKEND = ("racker", "racker.pytest.testinfra_backend.RackerBackend")


def register_backend(backends: dict) -> None:
    backends.setdefault(*BACKEND)


class _RegisteringLoader(importlib.abc.Loader):
    """testinfra.backend's own loader, then racker added to the module's table."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        register_backend(module.BACKENDS)


class _RegisterWhenImported:
    """Adds racker to testinfra's table of backends when testinfra loads it, so that
    `import racker` (which every CLI call does) does not pay for importing testinfra.
    The loader is wrapped, not patched: pytest's assertion rewriter is one loader
    shared by every module it rewrites."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "testinfra.backend":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


if "testinfra.backend" in sys.modules:
    register_backend(sys.modules["testinfra.backend"].BACKENDS)
else:
    sys.meta_path.insert(0, _RegisterWhenImported())


def __getattr__(name: str) -> Any:
    # racker.host(IMAGE): loaded on first use, with testinfra.
    if name == "host":
        from racker.pytest.testinfra_backend import booted_host

        return booted_host
    raise AttributeError(f"module 'racker' has no attribute {name!r}")
