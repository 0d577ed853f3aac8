import pytest


@pytest.fixture
def os_release(host):
    """A user's own fixture built on racker's `host`."""
    return dict(line.split("=", 1) for line in host.file("/etc/os-release").content_string.splitlines() if "=" in line)
