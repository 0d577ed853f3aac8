import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("SAMPLE_RETRIES"), reason="the retry tests run only when asked")


def test_boots(host):
    """Its machine's first boot times out when SAMPLE_BOOT_TIMEOUT_ONCE says so (conftest.py)."""
    with Path(os.environ["SAMPLE_RETRIES"], "machines").open("a") as machines:
        machines.write(host.run("hostname").stdout)


def test_loses_its_machine_once(host, racker_machine, first_time):
    """SAMPLE_LOSE_MACHINE_ONCE=DIR: the machine dies under the test, once per image."""
    if first_time("SAMPLE_LOSE_MACHINE_ONCE", racker_machine.image.name):
        os.kill(racker_machine.state.leader, signal.SIGKILL)  # its init: the whole machine goes
        while racker_machine.state.leader and Path(f"/proc/{racker_machine.state.leader}").exists():
            time.sleep(0.05)
    assert host.run("true").rc == 0
