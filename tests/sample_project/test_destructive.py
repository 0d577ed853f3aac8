import os

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("SAMPLE_DESTRUCTIVE"), reason="the destructive tests run only when asked")


# As pytest-testinfra's own test_supervisor: parametrised, each stops a service it expects running.
@pytest.mark.destructive
@pytest.mark.parametrize("turn", [1, 2])
def test_damages_its_machine(host, turn):
    assert not host.file("/etc/damaged-by-a-test").exists, "a machine another destructive test had"
    assert host.service("ssh").is_running
    host.run_expect([0], "touch /etc/damaged-by-a-test && systemctl stop ssh")
