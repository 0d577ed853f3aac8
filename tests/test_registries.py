"""registries.conf as podman reads it: which places an image is pulled from, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from racker.errors import BadReference
from racker.sources import registries
from racker.sources.registries import Source


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registries, "SYSTEM_DIR", tmp_path / "registries.conf.d")

    def write(text: str, *dropins: str) -> None:
        (tmp_path / "registries.conf").write_text(text)
        monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "registries.conf"))
        registries.SYSTEM_DIR.mkdir(exist_ok=True)
        for number, dropin in enumerate(dropins):
            (registries.SYSTEM_DIR / f"{number:02}.conf").write_text(dropin)

    return write


def test_no_table_means_the_registry_itself(conf) -> None:  # type: ignore[no-untyped-def]
    conf("")
    assert registries.sources("quay.io/a/b:1") == [Source("quay.io/a/b:1")]


def test_the_longest_prefix_decides_and_location_rewrites(conf) -> None:  # type: ignore[no-untyped-def]
    conf(
        '[[registry]]\nprefix = "docker.io"\n[[registry.mirror]]\nlocation = "m1:5000"\n'
        '[[registry]]\nprefix = "docker.io/library/debian"\nlocation = "internal/debian"\ninsecure = true\n'
    )
    assert registries.sources("docker.io/library/debian:12") == [Source("internal/debian:12", insecure=True)]
    assert registries.sources("docker.io/library/alpine:3") == [
        Source("m1:5000/library/alpine:3", mirror=True),
        Source("docker.io/library/alpine:3"),
    ]
    assert registries.sources("docker.io/library/debianx:1") == [
        Source("m1:5000/library/debianx:1", mirror=True),
        Source("docker.io/library/debianx:1"),
    ]


def test_digest_only_mirrors_serve_digests_only(conf) -> None:  # type: ignore[no-untyped-def]
    conf('[[registry]]\nprefix = "docker.io"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m1"\n')
    digest = "@sha256:" + "a" * 64
    assert registries.sources("docker.io/x/y:1") == [Source("docker.io/x/y:1")]
    assert registries.sources("docker.io/x/y" + digest)[0] == Source("m1/x/y" + digest, mirror=True)


def test_wildcards_and_dropins_in_order(conf) -> None:  # type: ignore[no-untyped-def]
    conf(
        '[[registry]]\nprefix = "*.example.com"\nblocked = true\n',
        '[[registry]]\nprefix = "*.example.com"\n[[registry.mirror]]\nlocation = "m2"\n',
    )
    assert registries.sources("r.example.com/a:1") == [Source("m2/a:1", mirror=True), Source("r.example.com/a:1")]


def test_blocked_and_broken_files_are_one_error(conf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf('[[registry]]\nprefix = "evil.io"\nblocked = true\n')
    with pytest.raises(BadReference, match="blocked"):
        registries.sources("evil.io/a:1")
    conf("[[registry]\nprefix=")
    with pytest.raises(BadReference, match=r"not valid registries\.conf TOML"):
        registries.sources("evil.io/a:1")
