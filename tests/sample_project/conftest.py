import os
from pathlib import Path

import pytest

from racker import engines


@pytest.fixture
def os_release(host):
    """A user's own fixture built on racker's `host`."""
    return dict(line.split("=", 1) for line in host.file("/etc/os-release").content_string.splitlines() if "=" in line)


# Faults the plugin's tests inject (tests/test_plugin.py), each at most once per image: the
# flag files in the directory the variable names say which images had theirs.
def _first_time(variable: str, image: str) -> bool:
    directory = os.environ.get(variable)
    if not directory:
        return False
    try:
        (Path(directory) / image).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


_nspawn_machine = engines.nspawn_machine


def _nspawn_machine_timing_out_once(image, **kwargs):
    """SAMPLE_BOOT_TIMEOUT_ONCE=DIR: an image's first machine gets 0.3 s to boot, and times out
    (a real boot, a real BootTimeout); every later one boots as usual."""
    machine = _nspawn_machine(image, **kwargs)
    if _first_time("SAMPLE_BOOT_TIMEOUT_ONCE", image.name):
        machine.boot_timeout = 0.3
    return machine


engines.nspawn_machine = _nspawn_machine_timing_out_once


@pytest.fixture
def first_time():
    """first_time(VARIABLE, image) -> whether the fault VARIABLE names is the image's first."""
    return _first_time
