"""Timed, nested steps: progress on a terminal, quiet in CI, timings kept for reports."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

# (dotted step name, seconds) for every step finished in this process.
TIMINGS: list[tuple[str, float]] = []
_stack: list[str] = []


def interactive() -> bool:
    """Progress is shown only to a person: a terminal on stderr and not CI."""
    if os.environ.get("RACKER_PROGRESS") == "1":
        return True
    if os.environ.get("CI") or os.environ.get("RACKER_PROGRESS") == "0":
        return False
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One line to a person on a terminal; nothing for scripts and CI."""
    if interactive():
        print(f"{'  ' * len(_stack)}{message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning is shown everywhere, CI included."""
    print(f"racker: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Announce a step, time it, and say how long it took."""
    say(f"▸ {title}…")
    _stack.append(title)
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        name = ".".join(_stack)
        _stack.pop()
        TIMINGS.append((name, elapsed))
        say(f"✓ {title} ({elapsed:.1f}s)")
