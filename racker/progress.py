"""Timed, nested steps: progress on a terminal, quiet in CI, timings kept for reports."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from racker import settings

# (dotted step name, seconds) for every step finished in this process.
TIMINGS: list[tuple[str, float]] = []
_stack: list[str] = []


def interactive() -> bool:
    """Progress is shown only to a person: a terminal on stderr and not CI."""
    asked = settings.PROGRESS.get()
    if asked is not None:
        return asked
    return not os.environ.get("CI") and sys.stderr.isatty()


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


class Meter:
    """Bytes done of a total, drawn as one rewritten line on a terminal (at most 5 times a second), nothing elsewhere."""

    def __init__(self, title: str, total: int | None, done: int = 0) -> None:
        self.title, self.total, self.done = title, total, done
        self.shown = interactive()
        self.started = time.monotonic()
        self.drawn = 0.0

    def add(self, count: int) -> None:
        self.done += count
        if self.shown and time.monotonic() - self.drawn >= 0.2:
            self.draw()

    def draw(self) -> None:
        self.drawn = time.monotonic()
        rate = self.done / max(self.drawn - self.started, 1e-3) / 1e6
        of = f"/{self.total / 1e6:.1f}" if self.total else ""
        percent = f"{100 * self.done // self.total:3d}% " if self.total else ""
        line = f"{'  ' * len(_stack)}{self.title} {percent}{self.done / 1e6:.1f}{of} MB {rate:.1f} MB/s"
        print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)  # \033[K: clear what a longer line left

    def close(self) -> None:
        if self.shown:
            self.draw()
            print(file=sys.stderr, flush=True)


@contextlib.contextmanager
def meter(title: str, total: int | None, done: int = 0) -> Iterator[Meter]:
    """A Meter for the block: `add(n)` as bytes arrive; the line is finished however the block ends."""
    bar = Meter(title, total, done)
    try:
        yield bar
    finally:
        bar.close()
