"""When a boot has taken too long: a budget of host CPU, not of wall time alone.

Under TCG a guest boots only as fast as the host runs its emulator. On a
busy host (2 cores, two VMs booting, other work beside them) a cold boot that
takes 60 s alone took 240 s and more, still working when a wall-clock timeout
cut it off (bench/boot_flakes.py counted these as most of the flakes). So the
timeout is `timeout` seconds of one host core for the emulator: at the wall
deadline, a guest that had less than that and is still busy is given more
time, up to WALL_CAP times the timeout. A guest that is idle then (halted,
waiting for what never comes) times out on time, as does one that had its
full share of CPU.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# The most wall time a starved, busy boot is given, in timeouts.
WALL_CAP = 3.0
# Busy: the emulator used at least this share of a core over the last IDLE_WINDOW seconds.
# (A halted guest's emulator uses next to none; one that is working, even on a host
# loaded eight times over, a tenth of a core or more.)
IDLE_WINDOW = 5.0
BUSY_SHARE = 0.05
# How far the deadline moves each time a busy, starved boot is given more time.
EXTENSION = 10.0


class BootClock:
    """`overdue()` says when to give up; `deadline` is when to look again (it moves)."""

    def __init__(
        self, deadline: float, timeout: float, cpu_seconds: Callable[[], float | None], now: Callable[[], float] = time.monotonic
    ) -> None:
        self.deadline = deadline
        self.timeout = timeout
        self.cap = deadline + (WALL_CAP - 1) * timeout
        self.extended = 0.0  # seconds given past the first deadline, for messages
        self._cpu_seconds = cpu_seconds
        self._now = now
        self._samples: deque[tuple[float, float]] = deque()
        self._first_deadline = deadline

    def sample(self) -> None:
        """Note the emulator's CPU time now (called on each turn of the wait loop)."""
        cpu = self._cpu_seconds()
        if cpu is None:
            return
        now = self._now()
        self._samples.append((now, cpu))
        while len(self._samples) > 2 and self._samples[1][0] <= now - IDLE_WINDOW:
            self._samples.popleft()

    def busy(self) -> bool:
        """The emulator used at least BUSY_SHARE of a core over the last IDLE_WINDOW seconds."""
        if len(self._samples) < 2:
            return False
        (t0, cpu0), (t1, cpu1) = self._samples[0], self._samples[-1]
        return t1 > t0 and (cpu1 - cpu0) / (t1 - t0) >= BUSY_SHARE

    def starved(self) -> bool:
        """The emulator had less than `timeout` seconds of one core."""
        cpu = self._cpu_seconds()
        return cpu is not None and cpu < self.timeout

    def overdue(self) -> bool:
        self.sample()
        now = self._now()
        if now <= self.deadline:
            return False
        if now >= self.cap or not (self.starved() and self.busy()):
            if self.extended:
                self.extended = now - self._first_deadline
            return True
        self.deadline = min(now + EXTENSION, self.cap)
        self.extended = self.deadline - self._first_deadline
        return False
