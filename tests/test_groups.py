"""Unit tests of what a group and a private network accept (no machine, no bridge)."""

from __future__ import annotations

import pytest

from racker.errors import MachineError
from racker.machines import named_networks
from racker.pytest import groups

# It makes networks, which test_multi's and test_vm_network's "nothing left" checks of the host's rk*
# links would see: every test that makes networks runs on one worker, one at a time.
pytestmark = pytest.mark.xdist_group("named-networks")


def test_a_group_spec_names_images_and_engines() -> None:
    assert groups.parse({"server": "debian-bookworm", "client": {"image": "debian-trixie"}}) == {
        "server": ("debian-bookworm", "nspawn"),
        "client": ("debian-trixie", "nspawn"),
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"a": "x", "A": "y"}, "two machines are named 'a' and 'A': one name each"),
        ({"a_b": "x"}, "'a_b' is not a valid host name"),
        ({"-a": "x"}, "'-a' is not a valid host name"),
        ({"a..b": "x"}, "'a..b' is not a valid host name"),
        ({"a" * 64: "x"}, f"{'a' * 64!r} is not a valid host name"),
        ({"a": ""}, "machine 'a' names no image"),
        ({"a": {"image": "x", "engine": "docker"}}, "machine 'a': engine 'docker' cannot join a group"),
    ],
)
def test_bad_group_specs_are_one_line(spec, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MachineError) as raised:
        groups.parse(spec)
    assert str(raised.value) == message


def test_host_names_are_dns_labels() -> None:
    for good in ("server", "web-1", "a.b", "X9"):
        assert named_networks.check_hostname(good) == good


@pytest.mark.parametrize("name", ["nat", "private", "none", "Upper", "", "a/b", "x" * 64])
def test_network_names_are_not_modes_nor_paths(name: str) -> None:
    with pytest.raises(MachineError):
        named_networks.check_network_name(name)


def test_an_unknown_network_is_one_line(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RACKER_NETWORK_DIR", str(tmp_path))
    with pytest.raises(MachineError, match=r"^no network named 'nosuch'$"):
        named_networks.for_mode("nosuch")
    assert named_networks.for_mode("nat").mode == "nat"
