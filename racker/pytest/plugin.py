"""The racker pytest plugin, loaded through the pytest11 entry point.

    pytest --racker-images=all -n auto
    pytest --pyargs racker.checks --racker-images=debian-bookworm

Tests that use the `host`, `racker_machine` or `racker_image` fixtures are
parametrised over the chosen images (and engines): `test_x[debian-bookworm]`.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest

from racker import engines
from racker.pytest.targets import Target, machine_scope
from racker.report import results, shards
from racker.store.platforms import Platform

# --- options --------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("racker", "racker: boot OS images and test them")
    group.addoption(
        "--racker-images", metavar="NAMES", help="comma-separated image names, or 'all': the catalogue's default set (ini: racker_images)"
    )
    group.addoption(
        "--racker-engines", metavar="NAMES", help=f"comma-separated engines: {', '.join(engines.ENGINES)} (ini: racker_engines)"
    )
    group.addoption(
        "--racker-attach",
        metavar="NAMES",
        help="comma-separated running machines or VMs (racker start, racker vm start) to test instead of booting new ones; "
        "they are left running",
    )
    group.addoption("--racker-results", metavar="FILE", help="write one JSON record per test to FILE (JSON lines)")
    group.addoption(
        "--racker-shard",
        metavar="K/N",
        help="test only the K-th of N slices of the images (a CI runner's share); the results still plan the whole matrix",
    )
    group.addoption("--racker-cold", action="store_true", help="boot every qemu VM cold (default: warm, from the first boot's snapshot)")
    group.addoption(
        "--racker-platforms",
        metavar="PLATFORMS",
        help="comma-separated platforms each image is tested on, e.g. linux/amd64,linux/arm64 (default: the host's; ini: racker_platforms)",
    )
    group.addoption("--racker-network", metavar="MODE", help="nspawn machines' network: none, private or nat (ini: racker_network)")
    group.addoption(
        "--racker-retries",
        metavar="N",
        help="retry a test the harness failed (a boot timeout, a guest that died booting, a lost channel) up to N times "
        "on a new machine; a pass on a retry is flaky; 0: no retries (default 1; ini: racker_retries)",
    )
    group.addoption(
        "--racker-reuse",
        metavar="FILE",
        help="a JSON list of [image, engine, check] cells whose earlier results stand: their tests are deselected (racker nightly)",
    )
    parser.addini("racker_images", "images to test when --racker-images is not given", default="debian-bookworm")
    parser.addini("racker_engines", "engines to test when --racker-engines is not given", default="nspawn")
    parser.addini("racker_platforms", "platforms to test when --racker-platforms is not given (default: the host's)", default="")
    parser.addini("racker_machine_scope", "how long a machine lives: function, module or session", default="module")
    parser.addini("racker_retries", "retries of a test the harness failed, when --racker-retries is not given", default="1")
    parser.addini("racker_network", "nspawn machines' network when --racker-network is not given: none, private or nat", default="private")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def planned_images(config: pytest.Config) -> list[str]:
    """Every image asked for, on each platform asked for, before --racker-shard takes its slice.
    Another platform's image is its own name (debian-bookworm@linux-arm64): its own column of the
    report, and its own test ids."""
    value = config.getoption("--racker-images") or config.getini("racker_images")
    names = _split(value)
    if names == ["all"]:
        from racker.store import catalog

        names = catalog.default_set()
    return sorted({on_platform(name, platform) for name in names for platform in chosen_platforms(config)})


def chosen_platforms(config: pytest.Config) -> list[Platform | None]:
    """The platforms asked for; None is the host's (the default)."""
    from racker.errors import BadReference
    from racker.store import platforms

    value = config.getoption("--racker-platforms", None) or config.getini("racker_platforms")
    try:
        parsed = {platforms.parse(text) for text in _split(value)}
    except BadReference as error:
        raise pytest.UsageError(f"--racker-platforms: {error}") from None
    host = platforms.host()
    return sorted((None if p == host else p for p in parsed), key=lambda p: str(p or "")) or [None]


def on_platform(name: str, platform: Platform | None) -> str:
    """An image's name on `platform`: the name itself for the host's, NAME@OS-ARCH for another."""
    return name if platform is None or "@" in name else f"{name}@{platform.tag}"


def chosen_shard(config: pytest.Config) -> shards.Shard | None:
    value = config.getoption("--racker-shard", None)
    if not value:
        return None
    try:
        return shards.parse(value)
    except shards.BadShard as error:
        raise pytest.UsageError(f"--racker-shard: {error}") from None


def chosen_images(config: pytest.Config) -> list[str]:
    """The images this run tests: this shard's slice of the planned ones."""
    names = planned_images(config)
    shard = chosen_shard(config)
    return shard.select(names) if shard else names


def chosen_engines(config: pytest.Config) -> list[str]:
    names = sorted(set(_split(config.getoption("--racker-engines") or config.getini("racker_engines"))))
    for name in names:
        if name not in engines.ENGINES:
            raise pytest.UsageError(f"--racker-engines: unknown engine {name!r}; known: {', '.join(engines.ENGINES)}")
    return names


def attached(config: pytest.Config) -> list[Target]:
    """The running machines --racker-attach names, as targets; a name nothing runs under is a usage error."""
    targets = []
    for name in _split(config.getoption("--racker-attach") or ""):
        found = engines.running(name)
        if found is None:
            raise pytest.UsageError(f"--racker-attach: no running machine or VM named {name!r} (see racker ps, racker vm ps)")
        engine, image = found
        targets.append(Target(image, engine, machine=name))
    return targets


def chosen_targets(config: pytest.Config) -> list[Target]:
    return attached(config) or [Target(i, e) for i in chosen_images(config) for e in chosen_engines(config)]


def target_id(target: Target, targets: list[Target]) -> str:
    """Ids name the image, and the engine only when there is more than one."""
    return target.image if len({t.engine for t in targets}) == 1 else f"{target.image}-{target.engine}"


# --- configuration --------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "racker(images=[...], engines=[...], needs=[...], fresh=False): where a test runs and what it needs; "
        f"unmet needs skip it; fresh=True gives it a machine of its own. Needs: {', '.join(engines.NEEDS)}",
    )
    config.addinivalue_line("markers", "destructive: the test damages its machine; racker gives it a machine of its own")
    config.addinivalue_line(
        "markers",
        "racker_machines(NAME=IMAGE, ...): the machines the racker_group fixture boots on a private network of their own",
    )
    from racker.pytest import plugin_fixtures

    # Registered now, after every entry-point plugin, so that our `host`
    # fixture overrides pytest-testinfra's whatever order the plugins loaded in.
    config.pluginmanager.register(plugin_fixtures, "racker-fixtures")
    if not config.getoption("hosts", None):
        # With testinfra's --hosts (racker://NAME among them), testinfra's own `host` serves.
        config.pluginmanager.register(plugin_fixtures.HostFixture(), "racker-host")
    chosen_shard(config)  # a bad K/N ends the run here, as a usage error
    chosen_retries(config)  # so does a bad --racker-retries
    reused_cells(config)  # and a --racker-reuse that is not a list of cells
    attached(config)  # a name that runs nothing ends the run here, as a usage error
    path = config.getoption("--racker-results")
    if path and not hasattr(config, "workerinput"):  # the xdist controller (or a lone run) writes it
        config.pluginmanager.register(results.ResultStream(path), "racker-results")


def pytest_sessionstart(session: pytest.Session) -> None:
    stream = session.config.pluginmanager.get_plugin("racker-results")
    if stream is None:
        return
    from racker import store
    from racker.report import facts

    # The whole matrix asked for, every shard's images included: a report merging shards tells an
    # image without results (a lost shard) from one never asked for.
    planned = [[image, engine] for image in planned_images(session.config) for engine in chosen_engines(session.config)]
    shard = chosen_shard(session.config)
    run = {"kind": "run", "started": store.now(), "host": facts.host(), "planned": planned}
    stream.write(run | ({"shard": str(shard), "images": chosen_images(session.config)} if shard else {}))


# --- parametrisation ------------------------------------------------------


def _mark_args(node: pytest.Function | pytest.Metafunc) -> dict:
    merged: dict = {}
    for mark in node.definition.iter_markers("racker") if isinstance(node, pytest.Metafunc) else node.iter_markers("racker"):
        for key, value in mark.kwargs.items():
            if key == "needs":  # a test's needs add to its module's (pytestmark), closest first
                merged.setdefault(key, []).extend(need for need in value if need not in merged[key])
            else:
                merged.setdefault(key, list(value) if isinstance(value, list | tuple) else value)
    return merged


def wants_fresh(node: pytest.Function | pytest.Metafunc) -> bool:
    """A test marked racker(fresh=True) or destructive: it gets a machine no other test sees."""
    definition = node.definition if isinstance(node, pytest.Metafunc) else node
    return bool(_mark_args(node).get("fresh")) or definition.get_closest_marker("destructive") is not None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "_racker_target" not in metafunc.fixturenames:
        return
    config = metafunc.config
    wanted = _mark_args(metafunc)
    unknown = set(wanted.get("needs", [])) - set(engines.NEEDS)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown racker needs {sorted(unknown)}; known: {', '.join(engines.NEEDS)}")
    every = chosen_targets(config)
    fresh = metafunc.definition.nodeid if wants_fresh(metafunc) and not every[0].machine else ""
    cold = "first-boot" in wanted.get("needs", []) or bool(config.getoption("--racker-cold"))
    targets = [
        Target(t.image, t.engine, fresh, t.machine, cold)
        for t in every
        if ("images" not in wanted or t.image in wanted["images"]) and ("engines" not in wanted or t.engine in wanted["engines"])
    ]
    ids = [target_id(t, every) for t in targets]
    metafunc.parametrize("_racker_target", targets, ids=ids, indirect=True, scope=machine_scope("", config))


def reused_cells(config: pytest.Config) -> set[tuple[str, str, str]]:
    """The cells --racker-reuse names, as (image, engine, check)."""
    path = config.getoption("--racker-reuse", None)
    if not path:
        return set()
    try:
        with open(path) as handle:
            listed = json.load(handle)
    except (OSError, ValueError) as error:
        raise pytest.UsageError(f"--racker-reuse: cannot read {path} ({error})") from None
    cells = listed if isinstance(listed, list) else [None]
    if not all(isinstance(c, list) and len(c) == 3 and all(isinstance(w, str) for w in c) for c in cells):
        raise pytest.UsageError(f"--racker-reuse: {path} is not a JSON list of [image, engine, check]")
    return {(image, engine, check) for image, engine, check in cells}


def check_name(item: pytest.Item) -> str:
    """The check a test is a cell of: its function's name, without parameters (as results.py names it)."""
    return item.nodeid.split("::")[-1].split("[")[0]


def _deselect_reused(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the tests of cells whose earlier results stand: an image none of whose tests are
    left is never booted."""
    reused = reused_cells(config)
    if not reused:
        return
    kept, dropped = [], []
    for item in items:
        target = _target_of(item)
        cell = (target.image, target.engine, check_name(item)) if target else None
        (dropped if cell in reused else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks we add
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _deselect_reused(config, items)
    for item in items:
        target = _target_of(item)
        if target is None:
            continue
        item.user_properties += [("racker_image", target.image), ("racker_engine", target.engine)]
        # For --dist loadgroup (where pytest and xdist agree on it): one image, one worker.
        item.add_marker(pytest.mark.xdist_group(f"racker-{target.image}-{target.engine}"))
        unmet = engines.get(target.engine).unmet(_mark_args(item).get("needs", []))
        if unmet:
            item.add_marker(pytest.mark.skip(reason=f"{target.engine} cannot provide: {', '.join(unmet)}"))
        elif target.machine and wants_fresh(item):
            item.add_marker(pytest.mark.skip(reason=f"needs a machine of its own, and {target.machine} is attached"))
    # A first boot saves the snapshot its image's warm VMs restore (plugin_fixtures): the
    # modules that boot one run first, so that the warm VMs find it and do not boot as well.
    seeding = {item.module for item in items if getattr(_target_of(item), "cold", False)}
    items.sort(key=lambda item: getattr(item, "module", None) not in seeding)


def _target_of(item: pytest.Item) -> Target | None:
    callspec = getattr(item, "callspec", None)
    target = callspec.params.get("_racker_target") if callspec else None
    return target if isinstance(target, Target) else None


def _dist_chosen(config: pytest.Config) -> bool:
    words = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split(), *config.getini("addopts")]
    return any(w in ("--dist", "-d", "--distload") or w.startswith("--dist=") for w in words)


def target_ids(config: pytest.Config) -> list[str]:
    targets = chosen_targets(config)
    return [target_id(t, targets) for t in targets]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # type: ignore[no-untyped-def]
    """Under -n, send every test of one image to one worker, so each machine boots once.

    Our own scheduler rather than xdist's loadgroup: loadgroup relies on
    rewriting node ids, which pytest >= 9.2 no longer allows. An explicit
    --dist wins.
    """
    if _dist_chosen(config):
        return None
    from racker.pytest.xdist_scheduling import ImageScheduling

    return ImageScheduling(config, log, target_ids(config), _groups_directory(config))


# Where the xdist workers write which xdist_group each test is in, for ImageScheduling to read:
# the controller never collects, and pytest >= 9.2 lets no one put the group into the node id.
_GROUPS = pytest.StashKey[str]()


def _groups_directory(config: pytest.Config) -> str:
    if _GROUPS not in config.stash:
        import tempfile

        config.stash[_GROUPS] = tempfile.mkdtemp(prefix="racker-xdist-groups-")
    return config.stash[_GROUPS]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # type: ignore[no-untyped-def]
    node.workerinput["racker_groups"] = _groups_directory(node.config)


# tryfirst: written before xdist's own pytest_collection_finish sends the collection to the
# controller, whose scheduler reads the file as soon as it has every worker's collection (marks are
# all added by then: pytest_collection_modifyitems came before).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    directory = getattr(session.config, "workerinput", {}).get("racker_groups")
    if directory:
        from racker.pytest.xdist_scheduling import publish_groups

        publish_groups(session.items, directory, session.config.workerinput["workerid"])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _GROUPS in config.stash:
        import shutil

        shutil.rmtree(config.stash[_GROUPS], ignore_errors=True)


# --- reports --------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A failure report shows the commands of its own test, not those of the tests before it.
    backend = sys.modules.get("racker.pytest.testinfra_backend")
    if backend is not None:
        backend.HISTORY.clear()


# The facts last sent for each (image, engine), so that each is sent once, or again when it grows.
_SENT_FACTS: dict[tuple[str, str], dict] = {}


def _send_facts(item: pytest.Item, report: pytest.TestReport) -> None:
    """Attach what the worker knows about the test's image to a teardown report: the controller
    writes it into the results, and junitxml into its properties."""
    fixtures = sys.modules.get("racker.pytest.plugin_fixtures")
    target = getattr(getattr(item, "callspec", None), "params", {}).get("_racker_target")
    if fixtures is None or not isinstance(target, Target):
        return
    key = (target.image, target.engine)
    known = fixtures.FACTS.get(key)
    if known and known != _SENT_FACTS.get(key):
        _SENT_FACTS[key] = dict(known)
        report.user_properties.append((results.FACTS_PROPERTY, json.dumps(known, sort_keys=True)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown":
        _send_facts(item, report)
    # A retry's evidence is kept even when it passes: a flaky cell shows both attempts.
    retried = item.stash.get(ATTEMPT, 1) > 1 and report.when == "call"
    if not report.failed and not retried:
        return
    from racker.errors import RackerError
    from racker.report import evidence

    error = call.excinfo.value if call.excinfo is not None else None
    if report.failed and isinstance(error, RackerError):
        # The harness failed, not the check: never blame the distribution for it.
        report.user_properties.append(("racker_outcome", "error"))
        report.racker_retryable = error.retryable  # type: ignore[attr-defined]
        if error.hint:  # a boot timeout's console tail, say: in the results' log too
            report.sections.append(("racker: hint", error.hint))
        if error.evidence:  # a failed boot's console
            report.racker_evidence = {name: evidence.cap(text) for name, text in error.evidence.items()}  # type: ignore[attr-defined]
    machine = getattr(item, "funcargs", {}).get("racker_machine")
    if machine is None or report.when != "call":
        return
    backend = sys.modules.get("racker.pytest.testinfra_backend")
    commands = list(backend.HISTORY) if backend is not None else []
    gathered = evidence.from_guest(machine, commands)
    tail = gathered.pop("journal-tail.txt", "")
    if report.failed:
        for result in commands:
            report.sections.append(
                (
                    f"racker: command ({result.rc})",
                    f"$ {result.command.decode(errors='replace')}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}",
                )
            )
        report.sections.append((f"racker: journal of {machine.name}", tail or gathered.get("notes.txt", "no journal")))
    # Into the results' evidence directory (results.py), where the report links it.
    report.racker_evidence = {**gathered, **getattr(report, "racker_evidence", {})}  # type: ignore[attr-defined]


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):  # type: ignore[no-untyped-def]
    """A test that passed only on a retry is flaky, not passed (its results record says so too)."""
    if report.when == "call" and report.passed and getattr(report, "racker_attempt", 1) > 1:
        return "flaky", "f", ("FLAKY", {"yellow": True})
    return None


# --- retries --------------------------------------------------------------

# Which attempt at the test is running (1, then 2 on a retry): its reports say so.
ATTEMPT = pytest.StashKey[int]()


def chosen_retries(config: pytest.Config) -> int:
    value = config.getoption("--racker-retries", None)
    value = config.getini("racker_retries") if value is None else value
    try:
        retries = int(value)
    except ValueError:
        retries = -1
    if retries < 0:
        raise pytest.UsageError(f"--racker-retries must be a whole number, 0 or more, not {value!r}")
    return retries


def discard_machine(item: pytest.Item) -> None:
    """Stop the machine the test's fixtures hold (and the fixtures built on it, `host` among
    them), so that the next test to ask for one boots a new one."""
    fixturedefs = item._fixtureinfo.name2fixturedefs.get("racker_machine")  # type: ignore[attr-defined]
    if fixturedefs:
        # finish() reads only the request's node; the test's own request is gone after its teardown.
        fixturedefs[-1].finish(SimpleNamespace(node=item))  # type: ignore[arg-type]


def _retryable(reports: list[pytest.TestReport]) -> bool:
    """Whether the harness failed the test (setting it up or running it) in a way a new machine
    may not repeat: a boot timeout, a guest that died booting, a lost channel; never a check."""
    return any(r.failed and r.when in ("setup", "call") and getattr(r, "racker_retryable", False) for r in reports)


def _attempt(reports: list[pytest.TestReport]) -> dict:
    """What a failed attempt leaves for the results: how it failed, and its evidence."""
    failed = next(r for r in reports if r.failed)
    files: dict[str, str] = {}
    for report in reports:
        files.update(getattr(report, "racker_evidence", {}))
    return {"outcome": "error", "when": failed.when, "message": results.message_of(failed), "evidence": files}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Run a racker test; when the harness failed it (results.py: an error, not a failure), once
    more (--racker-retries) on a new machine. Only the last attempt's reports are logged; they
    carry the earlier attempts, and a pass after a retry is `flaky`."""
    target = _target_of(item)
    retries = chosen_retries(item.config)
    if target is None or target.machine or retries == 0:  # an attached machine cannot be replaced
        return None
    from _pytest.runner import runtestprotocol

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    earlier: list[dict] = []
    attempt = 1
    while True:
        item.stash[ATTEMPT] = attempt
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if attempt > retries or not _retryable(reports):
            break
        earlier.append(_attempt(reports))
        discard_machine(item)
        attempt += 1
    for report in reports:
        report.racker_attempt = attempt  # type: ignore[attr-defined]
    if earlier:
        reports[-1].racker_attempts = earlier  # type: ignore[attr-defined]
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A test marked fresh (or destructive) leaves no machine behind for another: with other
    parameters of its own, its tests share one Target, and so would share one machine."""
    target = _target_of(item)
    if target is not None and target.fresh:
        discard_machine(item)
