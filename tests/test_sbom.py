"""Every image carries its package manifest, read from its own package databases (dpkg, apk,
pacman; rpm where the host has rpm), and `racker sbom` writes it as SPDX 2.3 or CycloneDX 1.6
JSON that the formats' published JSON schemas accept: CycloneDX's as cyclonedx-python-lib ships it,
SPDX's from the SPDX spec (tests/schemas: spdx-tools ships none), plus spdx-tools' parser and validator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import racker
from racker import store
from racker.store import packages

DPKG_STATUS = """\
Package: bash
Essential: yes
Status: install ok installed
Priority: required
Architecture: amd64
Version: 5.2.15-2+b2
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.

Package: libgcc-s1
Status: install ok installed
Architecture: amd64
Source: gcc-12 (12.2.0-14)
Version: 12.2.0-14

Package: removed-but-configured
Status: deinstall ok config-files
Architecture: all
Version: 1.0

Package: libc6
Status: install ok installed
Architecture: i386
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u4
"""

APK_INSTALLED = """\
C:Q1abc=
P:musl
V:1.2.4-r2
A:x86_64
o:musl

C:Q1def=
P:busybox-binsh
V:1.36.1-r15
A:x86_64
o:busybox
"""

PACMAN_DESC = "%NAME%\nzstd\n\n%VERSION%\n1.5.5-1\n\n%BASE%\nzstd\n\n%ARCH%\nx86_64\n\n"


def _tree(root: Path) -> Path:
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(DPKG_STATUS)
    (root / "lib/apk/db").mkdir(parents=True)
    (root / "lib/apk/db/installed").write_text(APK_INSTALLED)
    (root / "var/lib/pacman/local/zstd-1.5.5-1").mkdir(parents=True)
    (root / "var/lib/pacman/local/zstd-1.5.5-1/desc").write_text(PACMAN_DESC)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    return root


def test_each_database_is_read_as_the_image_lists_it(tmp_path: Path) -> None:
    found = packages.read(_tree(tmp_path / "rootfs"))
    assert [(p["manager"], p["name"], p["version"], p["arch"], p["source"]) for p in found] == [
        ("apk", "busybox-binsh", "1.36.1-r15", "x86_64", "busybox"),
        ("apk", "musl", "1.2.4-r2", "x86_64", "musl"),
        ("dpkg", "bash", "5.2.15-2+b2", "amd64", "bash"),
        ("dpkg", "libc6", "2.36-9+deb12u4", "i386", "glibc"),
        ("dpkg", "libgcc-s1", "12.2.0-14", "amd64", "gcc-12"),  # only what is installed, not config-files
        ("pacman", "zstd", "1.5.5-1", "x86_64", "zstd"),
    ]


def test_a_database_behind_an_image_link_is_not_read(tmp_path: Path) -> None:
    """An image whose var/lib/dpkg (or the status file) links to a host directory lists nothing from it."""
    host = _tree(tmp_path / "host")
    for link in ("var/lib/dpkg", "var/lib/dpkg/status", "var"):
        root = tmp_path / link.replace("/", "-")
        target = root / link
        target.parent.mkdir(parents=True)
        os.symlink(host / link, target)
        assert packages.dpkg(root) == [], link
    absolute = tmp_path / "absolute"
    (absolute / "var/lib").mkdir(parents=True)
    os.symlink("/../" + str(host / "var/lib/dpkg"), absolute / "var/lib/dpkg")
    assert packages.dpkg(absolute) == []


def _committed(tmp_path: Path, name: str) -> store.StoredImage:
    with store.locked(f"image-{name}"), store.workdir("test") as work:
        rootfs = _tree(work / "rootfs")
        return store.commit(name, rootfs, source="test", recipe="test", manifest={"distro": {"id": "debian"}})


def test_the_manifest_is_stored_at_commit(private_store: dict, tmp_path: Path) -> None:
    image = _committed(tmp_path, "with-packages")
    assert image.manifest["packages"] == packages.read(image.rootfs)
    on_disk = json.loads((image.path / "manifest.json").read_text())
    assert {(p["name"], p["version"]) for p in on_disk["packages"]} >= {("bash", "5.2.15-2+b2"), ("zstd", "1.5.5-1")}


def _valid_cyclonedx(text: str) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert error is None, error


SPDX_SCHEMA = Path(__file__).parent / "schemas" / "spdx-2.3.schema.json"  # the published one: schemas/README.md


def _valid_spdx(path: Path) -> object:
    """Valid by SPDX 2.3's published JSON schema, and by spdx-tools' parser and validator."""
    import jsonschema
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    schema = json.loads(SPDX_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(json.loads(path.read_text())), key=str)
    assert errors == [], [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
    document = parse_file(str(path))
    problems = validate_full_spdx_document(document)
    assert problems == [], [p.validation_message for p in problems]
    return document


@pytest.mark.slow  # CycloneDX's and SPDX's own validators, several racker processes
def test_sbom_writes_documents_the_formats_accept(private_store: dict, tmp_path: Path) -> None:
    _committed(tmp_path, "with-packages")
    made = racker("sbom", "with-packages", "--format", "cyclonedx-json")
    assert made.returncode == 0, made.stderr
    _valid_cyclonedx(made.stdout)
    bom = json.loads(made.stdout)
    assert {c["purl"] for c in bom["components"]} >= {
        "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64&distro=debian",
        "pkg:apk/debian/musl@1.2.4-r2?arch=x86_64&distro=debian",
    }
    assert racker("sbom", "with-packages", "--format", "cyclonedx-json").stdout == made.stdout  # the same image, the same SBOM

    out = tmp_path / "sbom.spdx.json"
    made = racker("sbom", "with-packages", "--format", "spdx-json", "-o", str(out))
    assert made.returncode == 0, made.stderr
    document = _valid_spdx(out)
    versions = {p.name: p.version for p in document.packages}  # type: ignore[attr-defined]
    assert versions["bash"] == "5.2.15-2+b2" and versions["libgcc-s1"] == "12.2.0-14" and "removed-but-configured" not in versions

    missing = racker("sbom", "nope", "--format", "spdx-json")
    assert missing.returncode == 125 and missing.stderr.startswith("racker: error: unknown image 'nope'")
    absent = racker("sbom", "tiny", "--format", "spdx-json")
    assert absent.returncode == 125 and absent.stderr.splitlines()[0] == "racker: error: image 'tiny' is not in the store"


@pytest.mark.slow
@pytest.mark.root  # share_image: hard links into the shared store; racker run boots nothing but needs nspawn
def test_a_catalogue_image_lists_what_dpkg_query_reports_inside_it(share_image, tmp_path: Path) -> None:
    image = share_image("debian-bookworm")
    inside = racker("run", "--no-boot", "debian-bookworm", "dpkg-query", "-W", "-f", "${Package}\\t${Version}\\t${Architecture}\\n")
    assert inside.returncode == 0, inside.stderr
    reported = {tuple(line.split("\t")) for line in inside.stdout.splitlines() if line}
    assert "bash" in {name for name, *_ in reported}

    # Stored with the image at commit: a copy of the catalogue image committed as another name.
    copy = racker("import", "bookworm-copy", str(image.rootfs))
    assert copy.returncode == 0, copy.stderr
    stored = store.lookup("bookworm-copy")
    assert stored is not None
    listed = {(p["name"], p["version"], p["arch"]) for p in stored.manifest["packages"] if p["manager"] == "dpkg"}
    assert listed == reported
    bash = next(p for p in stored.manifest["packages"] if p["name"] == "bash")
    assert bash["source"] == "bash" and bash["arch"] == "amd64"

    for form in ("cyclonedx-json", "spdx-json"):
        out = tmp_path / f"sbom.{form}.json"
        made = racker("sbom", "debian-bookworm", "--format", form, "-o", str(out))
        assert made.returncode == 0, made.stderr
        if form == "cyclonedx-json":
            _valid_cyclonedx(out.read_text())
            assert len(json.loads(out.read_text())["components"]) == len(reported)
        else:
            _valid_spdx(out)
