"""What a racker test runs against (Target), and the settings its machine fixtures read.

Shared by the plugin (which parametrises tests over targets) and its fixtures
(which boot them), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Target:
    """One (image, engine) a test runs against; `fresh` names the one test a machine is for."""

    image: str
    engine: str
    # Machines are cached by Target: one no other test has gets a machine of its own.
    fresh: str = ""
    # A running machine to attach to (--racker-attach) rather than one to boot.
    machine: str = ""
    # A VM booted for real (needs first-boot, or --racker-cold), not restored from a snapshot.
    cold: bool = False


def chosen_network(config: pytest.Config) -> str:
    mode = config.getoption("--racker-network") or config.getini("racker_network")
    if mode not in ("none", "private", "nat", "nat+link-local"):
        raise pytest.UsageError(f"--racker-network: unknown network {mode!r}; known: none, private, nat, nat+link-local")
    return mode


MACHINE_SCOPES = ("function", "module", "session")


def machine_scope(fixture_name: str, config: pytest.Config) -> str:
    scope = config.getini("racker_machine_scope")
    if scope not in MACHINE_SCOPES:
        raise pytest.UsageError(f"racker_machine_scope must be {', '.join(MACHINE_SCOPES)}, not {scope!r}")
    return scope
