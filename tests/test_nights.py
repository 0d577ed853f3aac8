"""Three nights of `racker nightly` against upstreams on 127.0.0.1 that the test moves between
them (tests/upstreams.py): a registry tag pushed again, a tarball and its SHA256SUMS replaced,
and a local signed apt repository that a catalogue entry's bootstrap uses, where a new package
version appears. Night 1 tests what each upstream holds; night 2 refreshes, tests the moved images
and its report says what changed, package versions included; night 3, with nothing moved, asks
every upstream again and reuses every cell without a boot, marked with the date it ran.

The three upstreams serve one small bootable system (a slim copy of the shared store's
debian-bookworm), and the nights run the nspawn engine only: no VM boots here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from upstreams import AptRepository, RegistryProxy, publish_rootfs_tarball, push, record_package, slim_copy, system_deb

from conftest import StaticServer, racker
from racker import images

pytestmark = [pytest.mark.slow, pytest.mark.root]

PACKAGE = "hello-racker"

# A catalogue entry built by mmdebstrap from the local repository (RACKER_DEBIAN_MIRROR), as the
# catalogue's Debian entries are from Debian's archive: the system .deb (Essential) and one package.
BOOTSTRAP_ENTRY = f"""\
description = "a system bootstrapped from the tests' own signed apt repository"
source = "bootstrap:debian/stable"
variant = "essential"
packages = ["{PACKAGE}"]
"""


def _night(number: int, names: list[str], out: Path, env: dict[str, str]) -> tuple[dict, float]:
    """`racker nightly` on the nspawn engine, given night number-1 as --previous: (report.json, seconds)."""
    previous = ["--previous", str(out / str(number - 1))] if number > 1 else []
    started = time.monotonic()
    done = racker("nightly", *names, "--engine", "nspawn", "-n", "0", "-o", str(out / str(number)), *previous, env=env)
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"night {number}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return json.loads((out / str(number) / "report.json").read_text()), seconds


def _records(directory: Path) -> tuple[list[dict], list[dict]]:
    """(test records, image records) of a night's nspawn results."""
    records = [json.loads(line) for line in (directory / "results-nspawn.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "test"], [r for r in records if r.get("kind") == "image"]


def test_three_nights_against_upstreams_that_move(
    private_store: dict,
    share_image,  # type: ignore[no-untyped-def]
    proxied_registry: RegistryProxy,
    static_server: StaticServer,
    apt_repository: tuple[AptRepository, str],
    tmp_path: Path,
) -> None:
    repo, url = apt_repository
    bookworm = share_image("debian-bookworm")
    system = slim_copy(bookworm.rootfs, tmp_path / "system")
    (Path(private_store["RACKER_CATALOG"]) / "nights-stable.toml").write_text(BOOTSTRAP_ENTRY)
    # The key stays where the test made it, in a directory that is root's alone (as a user's keyring in
    # /root would be): racker must hand mmdebstrap's unprivileged apt a copy it can read.
    env = {"SSL_CERT_FILE": str(static_server.ca), "RACKER_DEBIAN_MIRROR": url, "RACKER_ARCHIVE_KEYRING": str(repo.keyring)}
    registry = f"docker://{proxied_registry.address}/nights/app:latest"
    tarball = f"{static_server.url}/nights/root.tar"
    bootstrap = "nights-stable"
    names = [registry, tarball, bootstrap]

    def publish(version: str) -> None:
        """Every upstream holds `PACKAGE` at `version` now (and the registry and tarball a new payload)."""
        record_package(system, PACKAGE, version)
        (system / "etc/racker-night").write_text(f"{version}\n")
        pushed = images.import_image(f"nights-{version}", system)
        push(pushed, f"docker://{proxied_registry.upstream}/nights/app:latest")
        publish_rootfs_tarball(static_server.root / "nights", system)
        repo.publish({PACKAGE: version})

    started = time.monotonic()
    repo.prebuilt = [system_deb(bookworm.rootfs, tmp_path)]
    publish("1.0")
    print(f"\nupstreams published: {time.monotonic() - started:.1f} s")
    out = tmp_path / "nights"

    # Night 1: each image acquired from its upstream, every cell run.
    one, seconds = _night(1, names, out, env)
    print(f"night 1 ({len(names)} images acquired, every cell run): {seconds:.1f} s")
    assert sorted(one["images"]) == sorted(names) and one["missing"] == []
    assert one["counts"]["pass"] > 0 and not {c["outcome"] for c in one["cells"]} - {"pass", "skip"}, one["cells"]
    assert {name: one["upstream"][name]["packages"][PACKAGE] for name in names} == dict.fromkeys(names, "1.0")
    digests = {name: one["upstream"][name]["digest"] for name in names}

    # The upstreams move: night 2 refreshes, tests the new images, and says what changed.
    started = time.monotonic()
    publish("1.1")
    print(f"upstreams moved: {time.monotonic() - started:.1f} s")
    two, seconds = _night(2, names, out, env)
    print(f"night 2 ({len(names)} images moved, acquired again, every cell run): {seconds:.1f} s")
    for name in names:
        said = two["changes"][name]
        assert (said["moved"], said["digest_changed"]) == (True, True), (name, said)
        assert said["upgraded"] == [[PACKAGE, "1.0", "1.1"]], (name, said)
        assert two["upstream"][name]["digest"] != digests[name]
    tests, booted = _records(out / "2")
    assert {t["image"] for t in tests} == set(names) and not any(t.get("reused") for t in tests)
    assert {b["image"] for b in booted if "boot_seconds" in b} == set(names)  # each booted, tonight's image
    assert not any(c.get("reused") for c in two["cells"])
    assert f"{PACKAGE} 1.0 → 1.1" in (out / "2/report.md").read_text()
    page = (out / "2/report.html").read_text()
    assert f'<span class="package">{PACKAGE} 1.0 → 1.1</span>' in page and 'data-moved="True" data-digest-changed="True"' in page

    # Nothing moves: night 3 still asks every upstream, and reuses every cell without a boot.
    proxied_registry.requests.clear()
    static_server.reset()
    repo.requests.clear()
    three, seconds = _night(3, names, out, env)
    assert [m for m, p in proxied_registry.requests if "/manifests/" in p] and not proxied_registry.blob_gets()
    assert static_server.requests == [("nights/SHA256SUMS", None)]
    assert repo.requests == ["/dists/stable/InRelease"]
    for name in names:
        said = three["changes"][name]
        assert (said["moved"], said["digest_changed"], said["upgraded"], said["added"], said["removed"]) == (False, False, [], [], [])
    ran = {t["nodeid"]: t["ran"] for t in tests}
    tests3, booted3 = _records(out / "3")
    assert sorted(t["nodeid"] for t in tests3) == sorted(ran) and all(t["reused"] == ran[t["nodeid"]] for t in tests3)
    assert booted3 and all("reused" in b for b in booted3)  # no machine booted: night 2's facts, carried
    ran_cells = {(t["image"], t["check"]): t["ran"] for t in tests}
    assert {(c["image"], c["check"]): c.get("reused") for c in three["cells"]} == ran_cells  # each with the date it ran
    assert three["counts"] == two["counts"]
    (night_two,) = {when[:10] for when in ran.values()}
    assert f"reused: ran {night_two}" in (out / "3/report.html").read_text()
    assert f"cells reused, their inputs unchanged: they ran {night_two}." in (out / "3/report.md").read_text()
    print(f"night 3 (nothing moved, {len(names)} images): {seconds:.1f} s")
