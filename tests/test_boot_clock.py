"""racker.vm.boot_clock: a boot's timeout stretches for a busy guest a busy host starves, and only for one."""

from __future__ import annotations

import pytest

from racker.vm import boot_clock
from racker.vm.boot_clock import BootClock


class Emulator:
    """A fake clock and an emulator process using `share` of a core (None: exited)."""

    def __init__(self, share: float) -> None:
        self.now = 0.0
        self.cpu = 0.0
        self.share: float | None = share

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.cpu += seconds * (self.share or 0.0)

    def cpu_seconds(self) -> float | None:
        return None if self.share is None else self.cpu


def given_up_at(emulator: Emulator, timeout: float = 100.0, step: float = 0.5) -> float:
    """When the clock says overdue, ticking the emulator as racker's wait loop samples it."""
    clock = BootClock(timeout, timeout, emulator.cpu_seconds, now=lambda: emulator.now)
    while not clock.overdue():
        emulator.tick(step)
        assert emulator.now < 10 * timeout, "never overdue"
    return emulator.now


def test_a_boot_that_had_its_cpu_times_out_on_time() -> None:
    assert given_up_at(Emulator(share=1.5)) == pytest.approx(100, abs=1)


def test_a_halted_guest_times_out_on_time_even_on_a_busy_host() -> None:
    assert given_up_at(Emulator(share=0.01)) == pytest.approx(100, abs=1)


def test_a_starved_busy_guest_is_given_time_up_to_the_cap() -> None:
    # A quarter of a core: starved (25 CPU-seconds by the deadline), and working.
    assert given_up_at(Emulator(share=0.25)) == pytest.approx(100 * boot_clock.WALL_CAP, abs=1)
    # Half a core: its 100 CPU-seconds are used up at 200 s, before the cap.
    assert given_up_at(Emulator(share=0.5)) == pytest.approx(200, abs=boot_clock.EXTENSION + 1)


def test_a_guest_that_stops_working_is_not_waited_for() -> None:
    emulator = Emulator(share=0.3)
    clock = BootClock(100, 100, emulator.cpu_seconds, now=lambda: emulator.now)
    while emulator.now < 150:
        assert not clock.overdue()
        emulator.tick(0.5)
    assert clock.extended > 0
    emulator.share = 0.0  # halted: waiting for what never comes
    while not clock.overdue():
        emulator.tick(0.5)
    assert emulator.now <= 150 + boot_clock.IDLE_WINDOW + boot_clock.EXTENSION + 1
    assert clock.extended == pytest.approx(emulator.now - 100)


def test_an_emulator_that_is_gone_is_not_waited_for() -> None:
    emulator = Emulator(share=0.2)
    emulator.share = None
    assert given_up_at(emulator) == pytest.approx(100, abs=1)
