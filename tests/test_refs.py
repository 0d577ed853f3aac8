"""Image references: one parser, one canonical form."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from racker.errors import BadReference, UnknownImage
from racker.store import catalog, refs


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("debian-bookworm", "debian-bookworm"),
        ("bootstrap:debian/bookworm", "bootstrap:debian/bookworm"),
        ("docker://debian", "docker://docker.io/library/debian:latest"),
        ("docker://debian:bookworm-slim", "docker://docker.io/library/debian:bookworm-slim"),
        ("docker://quay.io/centos/centos:stream9", "docker://quay.io/centos/centos:stream9"),
        ("docker://127.0.0.1:5000/library/debian:bookworm", "docker://127.0.0.1:5000/library/debian:bookworm"),
        ("docker://localhost/app", "docker://localhost/app:latest"),
        ("docker://myorg/app:1.0", "docker://docker.io/myorg/app:1.0"),
        ("https://example.org/root.tar.xz", "https://example.org/root.tar.xz"),
        ("file:/srv/disk.qcow2", "file:/srv/disk.qcow2"),
        ("vagrant:debian/bullseye64", "vagrant:debian/bullseye64"),
        ("vagrant:generic/debian12@4.3.12#provider=libvirt", "vagrant:generic/debian12@4.3.12#provider=libvirt"),
        ("file:/srv/vm.box#provider=virtualbox", "file:/srv/vm.box#provider=virtualbox"),
        # a remote Dockerfile: the target is a URL, with ':' and '#' of its own
        (
            "dockerfile:git+https://host:8443/org/repo.git:/sub/Dockerfile#v1.0",
            "dockerfile:git+https://host:8443/org/repo.git:/sub/Dockerfile#v1.0",
        ),
        ("dockerfile:git://host/repo.git:/Dockerfile", "dockerfile:git://host/repo.git:/Dockerfile"),
        ("dockerfile:https://host/path/Dockerfile", "dockerfile:https://host/path/Dockerfile"),
        # prepared to boot as a VM: what prepare names them, and `racker images` lists
        ("debian-bookworm+vm", "debian-bookworm+vm"),
        ("bootstrap:debian/bookworm+vm", "bootstrap:debian/bookworm+vm"),
        ("docker://debian+vm", "docker://docker.io/library/debian:latest+vm"),
    ],
)
def test_canonical_form(text: str, canonical: str) -> None:
    assert str(refs.parse(text)) == canonical
    assert str(refs.parse(canonical)) == canonical  # canonical is a fixed point


def test_a_local_file_is_named_by_its_absolute_path(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    assert str(refs.parse("file:disk.qcow2")) == f"file:{tmp_path}/disk.qcow2"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Debian Bookworm",
        "ftp://x/y",
        "bootstrap:fedora/40",
        "bootstrap:",
        "docker://UPPER/case",
        "docker://debian:bad tag",
        "docker://a//b",
        "+vm",
        "debian-bookworm+vm+vm",
        "bootstrap:fedora/40+vm",
        "vagrant:debian",
        "vagrant:../etc/passwd",
        "vagrant:a/b#sha256=00",
        "vagrant:a/b@",
    ],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(BadReference):
        refs.parse(text)


@given(st.text(max_size=80))
def test_parser_never_fails_other_than_bad_reference(text: str) -> None:
    try:
        ref = refs.parse(text)
    except BadReference:
        return
    assert str(refs.parse(str(ref))) == str(ref)


def test_catalogue_holds_the_debian_images() -> None:
    names = set(catalog.entries())
    assert {"debian-bullseye", "debian-bookworm", "debian-trixie", "debian-sid"} <= names
    for name in names:
        entry = catalog.get(name)
        assert refs.parse(entry.source).scheme != "catalog"


def test_unknown_image_names_the_closest() -> None:
    with pytest.raises(UnknownImage, match="did you mean debian-bookworm"):
        catalog.get("debian-bookwrom")


def test_a_long_run_of_prepared_suffixes_is_one_bad_reference() -> None:
    with pytest.raises(BadReference, match="prepared twice"):
        refs.parse("debian-bookworm" + "+vm" * 5000)
