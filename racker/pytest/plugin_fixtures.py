"""The racker fixtures. plugin.py registers this module after every other plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest
import testinfra

from racker import engines, images, store
from racker.errors import RackerError
from racker.pytest import testinfra_backend
from racker.pytest.targets import Target, chosen_network, machine_scope
from racker.report import facts, results
from racker.store import StoredImage


@pytest.fixture(scope=machine_scope)
def _racker_target(request: pytest.FixtureRequest) -> Target:
    store.narrow_umask()  # before racker writes anything, as the CLI does
    return request.param


@pytest.fixture(scope=machine_scope)
def racker_engine(_racker_target: Target) -> str:
    return _racker_target.engine


# What this worker learnt about each (image, engine), for the results (plugin.py sends it).
FACTS: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope=machine_scope)
def racker_image(_racker_target: Target) -> StoredImage:
    """The image under test, built once for all workers (the store's lock sees to it)."""
    image = images.pull(_racker_target.image)
    FACTS.setdefault((_racker_target.image, _racker_target.engine), {}).update(facts.of_image(image))
    return image


@pytest.fixture(scope=machine_scope)
def racker_machine(request: pytest.FixtureRequest, _racker_target: Target, racker_image: StoredImage) -> Iterator:
    """A booted machine of the image, shared by the tests of a module (or the session)."""
    engine = engines.get(_racker_target.engine)
    if _racker_target.machine:
        yield engine.attach(_racker_target.machine)  # someone else's: left running
        return
    warm = not _racker_target.cold  # cold: a test of it needs a first boot, or --racker-cold
    # A first boot saves the snapshot the image's warm machines restore (plugin.py runs it first).
    seed = _racker_target.cold and not request.config.getoption("--racker-cold")
    with engine.machine_for(racker_image, network_mode=chosen_network(request.config), warm=warm, seed=seed) as machine:
        key = (_racker_target.image, _racker_target.engine)
        # Tonight's first boot tells the boot times: a warm VM restored later does not overwrite them.
        FACTS[key] = results.merge_facts(FACTS.get(key, {}), facts.of_machine(machine))
        yield machine


@pytest.fixture(autouse=True)
def _racker_needs(request: pytest.FixtureRequest) -> None:
    """Skip a test whose needs the image cannot meet (known only once the image is built)."""
    if "_racker_target" not in request.fixturenames:
        return
    needs = [n for mark in request.node.iter_markers("racker") for n in mark.kwargs.get("needs", [])]
    if not needs:
        return
    target: Target = request.getfixturevalue("_racker_target")
    image: StoredImage = request.getfixturevalue("racker_image")
    unmet = engines.get(target.engine).unmet(needs, image)
    if unmet:
        pytest.skip(f"{target.image} on {target.engine} cannot provide: {', '.join(unmet)}")


class HostFixture:
    """The `host` fixture, a plugin of its own: left out when testinfra's --hosts chooses the hosts."""

    @pytest.fixture(scope=machine_scope)
    def host(self, racker_machine) -> testinfra.host.Host:  # type: ignore[no-untyped-def]
        """A pytest-testinfra Host bound to the machine: every testinfra module works against it."""
        return testinfra_backend.host_for(racker_machine)


@pytest.fixture
def racker_host(racker_machine) -> Callable[..., testinfra.host.Host]:  # type: ignore[no-untyped-def]
    """racker_host(user="alice") -> a testinfra Host on this test's machine, running as that user
    (NAME, UID, NAME:GROUP or UID:GID, as docker exec --user) with a login environment."""

    def make(user: str | None = None) -> testinfra.host.Host:
        return testinfra_backend.host_for(racker_machine, user)

    return make


@pytest.fixture
def racker_machines() -> Iterator[Callable[..., dict[str, testinfra.host.Host]]]:
    """racker_machines({"server": "debian-bookworm", "client": "debian-trixie"}) -> {name: testinfra Host}:
    machines booted at once on a private network of their own, where each resolves the others by
    these names; `.machine` of each host is racker's machine. Stopped, network and all, after the test."""
    from racker.pytest import groups

    started: list[groups.Group] = []

    def make(spec: Mapping[str, object], *, boot_timeout: float | None = None) -> dict[str, testinfra.host.Host]:
        group = groups.Group(spec, boot_timeout=boot_timeout)
        started.append(group)
        group.start()
        hosts = {}
        for name, machine in group.items():
            hosts[name] = testinfra_backend.host_for(machine)
            hosts[name].machine = machine
        return hosts

    yield make
    for group in reversed(started):
        group.stop()


@pytest.fixture
def racker_group(request: pytest.FixtureRequest, racker_machines) -> dict[str, testinfra.host.Host]:  # type: ignore[no-untyped-def]
    """The machines `@pytest.mark.racker_machines(server="debian-bookworm", client=…)` names, as racker_machines gives them."""
    mark = request.node.get_closest_marker("racker_machines")
    if mark is None or not mark.kwargs:
        raise pytest.UsageError(f"{request.node.nodeid}: racker_group needs @pytest.mark.racker_machines(NAME=IMAGE, …)")
    return racker_machines(mark.kwargs)


__all__ = [
    "HostFixture",
    "RackerError",
    "_racker_needs",
    "_racker_target",
    "racker_engine",
    "racker_group",
    "racker_host",
    "racker_image",
    "racker_machine",
    "racker_machines",
]
