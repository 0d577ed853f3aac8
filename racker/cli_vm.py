"""The `promote` and `vm` commands (issue 4). Commands return an exit status; only cli.py exits."""

from __future__ import annotations

from collections.abc import Callable

import argparse

Verb = Callable[..., argparse.ArgumentParser]


def add_commands(verb: Verb, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands: verb(name, func, help) -> parser."""
