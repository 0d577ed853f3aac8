import os

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("SAMPLE_FAIL"), reason="the deliberately failing check runs only when asked")


def test_nginx_is_installed(host):
    assert host.package("nginx").is_installed, "expected nginx to be installed"
