"""Refresh asks each upstream what it holds now, acquires again only what moved, and keeps the
stored image when an upstream fails: against real upstreams on 127.0.0.1 that the tests move
(a registry behind a proxy that can lie or hang, an HTTPS server whose tarball and SHA256SUMS
change, a local apt repository whose InRelease a throw-away key signs)."""

from __future__ import annotations

import json
import lzma
import time
from pathlib import Path

import pytest
from upstreams import AptRepository, RegistryProxy, publish_tarball, push, tiny_image

from conftest import StaticServer, racker
from racker import errors, images, store
from racker.cli import EXIT_RACKER_FAILED

pytestmark = pytest.mark.slow

# --- a registry behind a proxy the test controls (tests/upstreams.py) ---------------------------


def _ref(name: str) -> dict:
    return json.loads(store.ref_path(name).read_text())


def test_a_moved_tag_is_pulled_again_and_an_unmoved_one_not(private_store: dict, proxied_registry: RegistryProxy, tmp_path: Path) -> None:
    real = proxied_registry.upstream
    name = f"docker://{proxied_registry.address}/refresh/app:latest"
    push(tiny_image("night-one", tmp_path, b"night one\n"), f"docker://{real}/refresh/app:latest")

    # Night 1: pulled; the upstream state (the tag's manifest digest) is stored with the image.
    first = racker("pull", name)
    assert first.returncode == 0, first.stderr
    one = store.lookup(name)
    assert one is not None and (one.rootfs / "payload").read_bytes() == b"night one\n"
    state_one = one.manifest["upstream"]["state"]
    assert state_one.startswith("sha256:") and one.manifest["upstream"]["checked"]

    # Nothing moved: one manifest request, no blob, the image untouched but its check recorded.
    proxied_registry.requests.clear()
    time.sleep(1.1)  # the check's time has whole seconds
    again = racker("pull", "--refresh", name)
    assert again.returncode == 0, again.stderr
    assert proxied_registry.blob_gets() == [], proxied_registry.requests
    assert [m for m, p in proxied_registry.requests if "/manifests/" in p] == ["GET"], proxied_registry.requests
    same = store.lookup(name)
    assert same is not None and same.digest == one.digest and same.created == one.created
    assert same.manifest["upstream"]["checked"] > one.manifest["upstream"]["checked"]
    listed = racker("images", "--json")
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == name]
    assert row["built"] == one.created and row["checked"] == same.manifest["upstream"]["checked"]

    # The tag moves: the refresh copies exactly the manifest it saw, and the digest changes.
    push(tiny_image("night-two", tmp_path, b"night two\n"), f"docker://{real}/refresh/app:latest")
    proxied_registry.requests.clear()
    moved = racker("pull", "--refresh", name)
    assert moved.returncode == 0, moved.stderr
    two = store.lookup(name)
    assert two is not None and two.digest != one.digest and (two.rootfs / "payload").read_bytes() == b"night two\n"
    assert two.manifest["upstream"]["state"] != state_one and proxied_registry.blob_gets()

    # A plain pull keeps its offline fast path: nothing asked.
    proxied_registry.requests.clear()
    assert racker("pull", name).returncode == 0 and proxied_registry.requests == []


def test_a_bad_or_silent_registry_changes_nothing(
    private_store: dict, proxied_registry: RegistryProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = proxied_registry.upstream
    name = f"docker://{proxied_registry.address}/refresh/bad:latest"
    push(tiny_image("kept", tmp_path, b"kept\n"), f"docker://{real}/refresh/bad:latest")
    push(tiny_image("other", tmp_path, b"other\n"), f"docker://{real}/refresh/bad:other")
    assert racker("pull", name).returncode == 0
    kept = _ref(name)
    push(tiny_image("moved", tmp_path, b"moved\n"), f"docker://{real}/refresh/bad:latest")
    monkeypatch.setenv("RACKER_UPSTREAM_TIMEOUT", "2")
    try:
        # The tag moved, but what the registry serves for the digest it named is another manifest.
        proxied_registry.mode = "lie"
        lied = racker("pull", "--refresh", name)
        assert lied.returncode == EXIT_RACKER_FAILED, lied.stderr
        (line,) = lied.stderr.strip().splitlines()
        assert line.startswith(f"racker: error: {name}: ") and "does not match" in line, line
        assert _ref(name) == kept

        # A registry that does not answer in time, or answers 503: a warning, the stored image kept.
        for mode in ("hang", "down"):
            proxied_registry.mode = mode
            started = time.monotonic()
            silent = racker("pull", "--refresh", name)
            assert silent.returncode == 0, silent.stderr
            (line,) = silent.stderr.strip().splitlines()
            assert line.startswith(f"racker: warning: {name}: upstream {name}: ") and "kept the stored image" in line, line
            assert time.monotonic() - started < 20
            assert _ref(name) == kept
    finally:
        proxied_registry.mode = "forward"


# --- an HTTPS server whose tarball and SHA256SUMS change --------------------------------------------


def test_a_tarball_is_downloaded_again_only_when_its_sha256sums_moved(
    private_store: dict, static_server: StaticServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(static_server.ca))
    site = static_server.root / "refresh"
    name = f"{static_server.url}/refresh/root.tar.gz"
    publish_tarball(site, b"night one\n")
    assert racker("pull", name).returncode == 0
    one = store.lookup(name)
    assert one is not None and one.manifest["upstream"]["state"] == "sha256:" + one.manifest["tarball"]["sha256"]

    static_server.reset()
    unmoved = racker("pull", "--refresh", name)
    assert unmoved.returncode == 0, unmoved.stderr
    assert static_server.requests == [("refresh/SHA256SUMS", None)]  # the list only: nothing downloaded
    assert _ref(name)["digest"] == one.digest and _ref(name)["created"] == one.created

    publish_tarball(site, b"night two\n")
    static_server.reset()
    moved = racker("pull", "--refresh", name)
    assert moved.returncode == 0, moved.stderr
    two = store.lookup(name)
    assert two is not None and two.digest != one.digest and (two.rootfs / "payload").read_bytes() == b"night two\n"
    assert ("refresh/root.tar.gz", None) in static_server.requests
    kept = _ref(name)

    # A SHA256SUMS that lacks the file: one error line naming the image and the upstream.
    publish_tarball(site, b"night three\n", listed=False)
    static_server.reset()
    lacking = racker("pull", "--refresh", name)
    assert lacking.returncode == EXIT_RACKER_FAILED
    (line,) = lacking.stderr.strip().splitlines()
    assert line.startswith(f"racker: error: {name}: upstream {name}: ") and "does not list root.tar.gz" in line, line
    assert ("refresh/root.tar.gz", None) not in static_server.requests and _ref(name) == kept

    # A server that does not answer: a warning, the stored image kept.
    monkeypatch.setenv("RACKER_UPSTREAM_TIMEOUT", "1")
    static_server.hang.add("refresh/SHA256SUMS")
    silent = racker("pull", "--refresh", name)
    assert silent.returncode == 0, silent.stderr
    (line,) = silent.stderr.strip().splitlines()
    assert line.startswith(f"racker: warning: {name}: upstream {name}: ") and "timed out" in line, line
    assert _ref(name) == kept
    static_server.reset()


# --- a local apt repository signed with a throw-away key --------------------------------------------


PROBE = [{"name": "racker-probe", "version": "1.0", "arch": "amd64", "source": "racker-probe", "manager": "dpkg"}]


def test_the_archive_state_follows_the_versions_of_the_image_packages(
    private_store: dict, apt_repository: tuple[AptRepository, str]
) -> None:
    from racker.sources import archive

    repo, url = apt_repository
    lines = [f"deb {url} stable main"]
    repo.publish({"racker-probe": "1.0", "racker-other": "2.0"})
    repo.requests.clear()
    night_one = archive.state(lines, repo.keyring, "amd64")  # no package set known: the indexes only
    assert night_one.startswith("stable/main=") and archive.PACKAGES_MARK not in night_one
    assert repo.requests == ["/dists/stable/InRelease"]

    # Nothing moved: the stored state again, from the InRelease alone.
    stored = {"packages": PROBE, "upstream": {"state": night_one}}
    repo.requests.clear()
    assert archive.state(lines, repo.keyring, "amd64", stored) == night_one and repo.index_reads() == []

    # A package the image does not hold gets a new version: the index moved (its signed hash checked
    # as it arrives), the image's versions did not.
    repo.publish({"racker-probe": "1.0", "racker-other": "2.1"})
    repo.requests.clear()
    night_two = archive.state(lines, repo.keyring, "amd64", stored)
    assert repo.index_reads() == ["/dists/stable/main/binary-amd64/Packages.xz"]
    assert archive.PACKAGES_MARK in night_two and not archive.same_state(night_one, night_two)  # night one knew no versions
    repo.publish({"racker-probe": "1.0", "racker-other": "2.2"})
    night_three = archive.state(lines, repo.keyring, "amd64", {"packages": PROBE, "upstream": {"state": night_two}})
    assert night_three != night_two and archive.same_state(night_two, night_three)

    # A package the image holds gets a new version: moved.
    repo.publish({"racker-probe": "1.1", "racker-other": "2.2"})
    night_four = archive.state(lines, repo.keyring, "amd64", {"packages": PROBE, "upstream": {"state": night_three}})
    assert not archive.same_state(night_three, night_four)


def test_an_archive_that_does_not_hold_is_one_error(private_store: dict, apt_repository: tuple[AptRepository, str]) -> None:
    from racker.sources import archive

    repo, url = apt_repository
    lines = [f"deb {url} stable main"]
    repo.publish({"racker-probe": "1.0", "racker-other": "2.0"})
    # A changed line inside the signed text: the signature no longer holds.
    inrelease = repo.root / "dists/stable/InRelease"
    signed = inrelease.read_text()
    inrelease.write_text(signed.replace(" main/binary-amd64/Packages\n", " main/binary-amd64/Packagez\n"))
    with pytest.raises(errors.UpstreamError, match="signature does not verify"):
        archive.state(lines, repo.keyring, "amd64")
    inrelease.write_text(signed)
    # A key the archive is not signed with (the distribution's own keyring).
    with pytest.raises(errors.UpstreamError, match="signature does not verify"):
        archive.state(lines, Path("/usr/share/keyrings/debian-archive-keyring.gpg"), "amd64")
    # Another architecture's index is not in it.
    with pytest.raises(errors.UpstreamError, match="lists no main/binary-arm64/Packages"):
        archive.state(lines, repo.keyring, "arm64")
    # An index whose content is not what the InRelease signed.
    (repo.root / "dists/stable/main/binary-amd64/Packages.xz").write_bytes(lzma.compress(b"Package: racker-probe\nVersion: 9\n"))
    with pytest.raises(errors.UpstreamError, match="does not match its checksum"):
        archive.state(lines, repo.keyring, "amd64", {"packages": PROBE, "upstream": {"state": "stable/main=old"}})


def test_a_bootstrap_image_is_kept_when_its_archive_did_not_move_or_does_not_verify(
    private_store: dict, apt_repository: tuple[AptRepository, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """images.refresh on a bootstrap image whose archive is the local repository (stored by hand from a
    tree whose dpkg database holds racker-probe: no mmdebstrap)."""
    from racker.sources import archive, bootstrap, recipe_for
    from racker.store import refs

    repo, url = apt_repository
    repo.publish({"racker-probe": "1.0", "racker-other": "2.0"})
    monkeypatch.setenv("RACKER_DEBIAN_MIRROR", url)
    monkeypatch.setenv("RACKER_ARCHIVE_KEYRING", str(repo.keyring))
    name = "bootstrap:debian/stable"
    ref = refs.parse(name)
    state = bootstrap.upstream_state(ref, None, {"packages": PROBE, "upstream": {"state": "stable/main=before"}})
    assert archive.PACKAGES_MARK in state
    with store.locked(f"image-{name}"), store.workdir("test") as work:
        (work / "rootfs/etc").mkdir(parents=True)
        (work / "rootfs/etc/os-release").write_text("ID=debian\n")
        (work / "rootfs/var/lib/dpkg").mkdir(parents=True)
        (work / "rootfs/var/lib/dpkg/status").write_text(
            "Package: racker-probe\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\n"
        )
        upstream = {"state": state, "checked": "2026-12-01T00:00:00+00:00", "reached": "2026-12-01T00:00:00+00:00"}
        stored = store.commit(name, work / "rootfs", source=name, recipe=recipe_for(ref), manifest={"upstream": upstream})
    assert [p["name"] for p in stored.manifest["packages"]] == ["racker-probe"]

    done = images.refresh(name)  # nothing moved
    assert not done.moved and done.error is None and done.image is not None and done.image.digest == stored.digest
    assert done.image.manifest["upstream"]["checked"] > upstream["checked"]
    repo.publish({"racker-probe": "1.0", "racker-other": "2.1"})  # moved, but not what the image holds
    done = images.refresh(name)
    assert not done.moved and done.error is None and done.image is not None and done.image.digest == stored.digest
    kept = _ref(name)

    inrelease = repo.root / "dists/stable/InRelease"
    inrelease.write_text(inrelease.read_text().replace("Packages\n", "Packagez\n"))
    done = images.refresh(name)
    assert done.stale and not done.moved and isinstance(done.error, errors.UpstreamError)
    assert str(done.error).startswith(f"{name}: upstream {name}: {url}/dists/stable/InRelease: its signature does not verify")
    assert _ref(name) == kept and done.last_reached == kept["manifest"]["upstream"]["reached"]


def test_the_nightly_goes_on_with_a_stale_image_and_says_so(
    private_store: dict, proxied_registry: RegistryProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nightly's refresh stage (a shard of one, no engines: no checks run) against the registry."""
    from racker import nightly
    from racker.report import shards

    name = f"docker://{proxied_registry.address}/refresh/nightly:latest"
    push(tiny_image("nightly", tmp_path, b"nightly\n"), f"docker://{proxied_registry.upstream}/refresh/nightly:latest")
    assert racker("pull", name).returncode == 0
    built = store.lookup(name)
    assert built is not None
    monkeypatch.setenv("RACKER_UPSTREAM_TIMEOUT", "2")
    proxied_registry.mode = "down"
    try:
        night = nightly.run([name], tmp_path / "night", [], shard=shards.parse("1/1"))
    finally:
        proxied_registry.mode = "forward"
    record = night.upstream[name]
    assert record["stale"] and not record["moved"] and record["digest"] == built.digest
    assert record["last_reached"] == built.manifest["upstream"]["reached"] and name in record["error"]
    assert json.loads((tmp_path / "night" / "upstream-1of1.json").read_text()) == night.upstream
    assert store.lookup(name) == built

    night = nightly.run([name], tmp_path / "night2", [], shard=shards.parse("1/1"))
    record = night.upstream[name]
    assert not record["stale"] and not record["moved"] and "last_reached" not in record and record["checked"] >= built.created


# --- a Vagrant Cloud metadata API whose newest version moves -----------------------------------------


def _vbox(work: Path, payload: bytes, out: Path) -> None:
    """A VirtualBox box (OVF + vmdk) of a small disk holding `payload` (test_boxes' helpers)."""
    from test_boxes import OVF, box, disk, sh

    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    (tree / "payload").write_bytes(payload)
    disk(tree, work / "small.raw", 16 << 20)
    sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", work / "small.raw", work / "box-disk001.vmdk")
    (work / "box.ovf").write_text(OVF.format(disk="box-disk001.vmdk", capacity=16 << 20))
    box(work / "box", "virtualbox", {"box.ovf": work / "box.ovf", "box-disk001.vmdk": work / "box-disk001.vmdk"}, out)


def test_a_vagrant_box_is_fetched_again_only_when_a_newer_version_is_released(
    private_store: dict, static_server: StaticServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_boxes import api, provider

    monkeypatch.setenv("SSL_CERT_FILE", str(static_server.ca))
    monkeypatch.setenv("RACKER_VAGRANT_SERVER", static_server.url)
    served = static_server.root / "refresh-boxes"
    served.mkdir()
    _vbox(tmp_path / "one", b"version one\n", served / "one.box")
    one = provider("virtualbox", f"{static_server.url}/refresh-boxes/one.box", served / "one.box", "sha256")
    api(static_server, "refresh", [{"version": "1.0.0", "status": "active", "providers": [one]}])
    name = "vagrant:racker/refresh"
    assert racker("pull", name).returncode == 0
    first = store.lookup(name)
    assert first is not None and first.manifest["upstream"]["state"].startswith("1.0.0 virtualbox sha256:")

    static_server.reset()
    unmoved = racker("pull", "--refresh", name)
    assert unmoved.returncode == 0, unmoved.stderr
    assert static_server.requests == [("api/v2/box/racker/refresh", None)]
    assert _ref(name)["digest"] == first.digest

    # An unreleased version does not count; a released one does.
    _vbox(tmp_path / "two", b"version two\n", served / "two.box")
    two = provider("virtualbox", f"{static_server.url}/refresh-boxes/two.box", served / "two.box", "sha256")
    versions = [{"version": "1.0.0", "status": "active", "providers": [one]}]
    api(static_server, "refresh", [*versions, {"version": "1.1.0", "status": "unreleased", "providers": [two]}])
    static_server.reset()
    assert racker("pull", "--refresh", name).returncode == 0 and static_server.requests == [("api/v2/box/racker/refresh", None)]
    api(static_server, "refresh", [*versions, {"version": "1.1.0", "status": "active", "providers": [two]}])
    static_server.reset()
    moved = racker("pull", "--refresh", name)
    assert moved.returncode == 0, moved.stderr
    second = store.lookup(name)
    assert second is not None and second.digest != first.digest and second.manifest["box"]["version"] == "1.1.0"
    assert ("refresh-boxes/two.box", None) in static_server.requests
    static_server.reset()
