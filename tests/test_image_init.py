"""An image configured to start an init (`CMD ["/sbin/init", …]`) boots with exactly that as PID 1."""

from __future__ import annotations

import pytest

from conftest import SHARED_HOME
from racker import images, store
from racker.machines import nspawn
from racker.machines.nspawn import Machine

pytestmark = [pytest.mark.slow, pytest.mark.root]


def test_configured_init_is_the_entrypoint_and_cmd_of_an_init_only() -> None:
    assert nspawn.configured_init({"config": {"Cmd": ["/sbin/init"]}}) == ["/sbin/init"]
    assert nspawn.configured_init({"config": {"Entrypoint": ["/lib/systemd/systemd"], "Cmd": ["--log-level=info"]}}) == [
        "/lib/systemd/systemd",
        "--log-level=info",
    ]
    assert nspawn.configured_init({"config": {"Cmd": ["bash"]}}) is None
    assert nspawn.configured_init({}) is None


def test_an_image_whose_cmd_is_an_init_boots_that_command_as_pid_1(private_store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RACKER_HOME", str(SHARED_HOME))
    shared = images.pull("debian-bookworm")
    monkeypatch.setenv("RACKER_HOME", private_store["RACKER_HOME"])
    linked = store.link_from(SHARED_HOME, shared.name)
    manifest = dict(linked.manifest, name="with-init", config={"Cmd": ["/sbin/init", "--log-level=notice"]})
    store.write_json(store.ref_path("with-init"), {"digest": linked.digest, "source": "test", "recipe": "", "manifest": manifest})
    image = store.lookup("with-init")
    assert image is not None
    with Machine(image) as booted:
        pid1 = booted.run_expect([0], ["cat", "/proc/1/cmdline"]).stdout_bytes.split(b"\0")
        assert pid1 == [b"/sbin/init", b"--log-level=notice", b""], pid1  # exactly the image's command
        assert booted.run_expect([0], ["systemctl", "is-system-running", "--wait"]).stdout.strip() == "running"
    with Machine(linked) as plain:
        pid1 = plain.run_expect([0], ["cat", "/proc/1/cmdline"]).stdout_bytes.split(b"\0")
        assert pid1[1:2] != [b"--log-level=notice"], "without a configured init, nspawn --boot picks one"
        assert not [arg for arg in pid1 if b"systemd.mask" in arg], pid1
        # The units that act on a host disk (none in a container) are masked at run time instead.
        for unit in nspawn.HOST_DISK_UNITS:
            assert plain.run_expect([0, 1], ["systemctl", "is-enabled", unit]).stdout.strip() == "masked-runtime"
