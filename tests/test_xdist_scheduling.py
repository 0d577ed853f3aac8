"""The scheduler's scopes: a racker test goes with the others of its target, a marked test with
its xdist_group, any other test alone, whatever its parameters look like."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("xdist", reason="the scheduler is pytest-xdist's; tox -e unit runs without it, pytest -n auto with it")

from racker.pytest.targets import Target
from racker.pytest.xdist_scheduling import ImageScheduling, publish_groups


@dataclass
class CallSpec:
    params: dict


@dataclass
class Item:
    nodeid: str
    params: dict = field(default_factory=dict)
    group: str | None = None

    @property
    def callspec(self) -> CallSpec | None:
        return CallSpec(self.params) if self.params else None

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return pytest.mark.xdist_group(self.group).mark if name == "xdist_group" and self.group else None


def scheduler(directory: Path | None, targets: list[str]) -> ImageScheduling:
    made = ImageScheduling.__new__(ImageScheduling)  # only the scoping, without xdist's controller
    made.targets = sorted(targets, key=len, reverse=True)
    made.groups_directory = str(directory) if directory else None
    made._groups = None
    return made


ITEMS = [
    Item("checks/test_a.py::test_sshd[debian-bookworm]", {"_racker_target": Target("debian-bookworm", "nspawn")}),
    Item("checks/test_b.py::test_root[debian-bookworm]", {"_racker_target": Target("debian-bookworm", "nspawn")}),
    Item("checks/test_a.py::test_sshd[debian-sid]", {"_racker_target": Target("debian-sid", "nspawn")}),
    # Not racker tests: a parameter that only looks like a target, a group, a plain test.
    Item("tests/test_inits.py::test_boots[debian-bookworm-sysvinit]", {"name": "debian-bookworm-sysvinit"}),
    Item("tests/test_vm_warm.py::test_clones", group="warm-vms"),
    Item("tests/test_ssh_master.py::test_master", group="warm-vms"),
    Item("tests/test_cli.py::test_help"),
]


def test_published_scopes_keep_a_target_together_and_a_look_alike_parameter_alone(tmp_path: Path) -> None:
    publish_groups(ITEMS, str(tmp_path), "gw0")  # type: ignore[arg-type]
    scope = scheduler(tmp_path, ["debian-bookworm", "debian-sid"])._split_scope
    assert scope(ITEMS[0].nodeid) == scope(ITEMS[1].nodeid) == "racker:debian-bookworm/nspawn"
    assert scope(ITEMS[2].nodeid) == "racker:debian-sid/nspawn"
    assert scope(ITEMS[3].nodeid) == ITEMS[3].nodeid
    assert scope(ITEMS[4].nodeid) == scope(ITEMS[5].nodeid) == "group:warm-vms"
    assert scope(ITEMS[6].nodeid) == ITEMS[6].nodeid


def test_before_any_worker_published_the_target_is_read_from_the_id() -> None:
    scope = scheduler(None, ["debian-bookworm", "debian-bookworm-qemu"])._split_scope
    assert scope("checks/test_a.py::test_sshd[debian-bookworm-qemu]") == "racker:debian-bookworm-qemu"
    assert scope("checks/test_a.py::test_sshd[debian-bookworm]") == "racker:debian-bookworm"
    assert scope("tests/test_cli.py::test_help") == "tests/test_cli.py::test_help"
