"""Local images: OCI layouts and archives, `docker save` archives, podman/buildah storage,
`racker import` of a root filesystem, and `racker export`/`push` back out: round trips keep the filesystem digest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import passes_checks, racker
from racker import store

pytestmark = pytest.mark.slow


@pytest.fixture
def bookworm(share_image) -> store.StoredImage:  # type: ignore[no-untyped-def]
    return share_image("debian-bookworm")


def _pulled(reference: str) -> tuple[str, str]:
    result = racker("pull", reference)
    assert result.returncode == 0, result.stderr
    name, digest = result.stdout.split()
    return name, digest


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_export_then_pull_an_archive_keeps_the_digest(bookworm: store.StoredImage, tmp_path: Path, fmt: str) -> None:
    archive = tmp_path / f"bookworm.{fmt}.tar"
    exported = racker("export", "debian-bookworm", "-o", str(archive), "--format", fmt)
    assert exported.returncode == 0, exported.stderr
    name, digest = _pulled(f"{fmt}:{archive}")
    assert name == f"{fmt}:{archive}" and digest == bookworm.digest
    # The same unchanged file is not read again; a changed one is.
    again = racker("--debug", "pull", f"{fmt}:{archive}")
    assert "run: " not in again.stderr
    os.utime(archive)
    assert "run: " in racker("--debug", "pull", f"{fmt}:{archive}").stderr
    passes_checks(name)


def test_an_oci_layout_directory_with_a_tag(bookworm: store.StoredImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "b.tar"
    assert racker("export", "debian-bookworm", "-o", str(archive)).returncode == 0
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"oci:{layout}:v1"], check=True)
    # A relative path names the same image as its absolute form (undone after: later tests run this checkout's racker).
    monkeypatch.chdir(tmp_path)
    name, digest = _pulled("oci:layout:v1")
    assert (name, digest) == (f"oci:{layout}:v1", bookworm.digest)
    passes_checks(name)


def test_containers_storage_what_podman_or_buildah_built(bookworm: store.StoredImage, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar"
    assert racker("export", "debian-bookworm", "-o", str(archive)).returncode == 0
    root, runroot = tmp_path / "cs-root", tmp_path / "cs-run"
    buildah = ["buildah", "--root", str(root), "--runroot", str(runroot), "--storage-driver", "vfs"]
    subprocess.run([*buildah, "pull", "--quiet", f"oci-archive:{archive}"], check=True, capture_output=True)
    subprocess.run([*buildah, "tag", "racker/debian-bookworm:latest", "localhost/mine:1"], check=False, capture_output=True)
    images = subprocess.run([*buildah, "images", "--format", "{{.ID}}"], check=True, capture_output=True, text=True).stdout.split()
    subprocess.run([*buildah, "tag", images[0], "localhost/mine:1"], check=True)
    name, digest = _pulled(f"containers-storage:[vfs@{root}+{runroot}]localhost/mine:1")
    assert digest == bookworm.digest
    passes_checks(name)
    subprocess.run([*buildah, "rmi", "--all", "--force"], capture_output=True)


def test_push_then_pull_through_a_registry(bookworm: store.StoredImage, registry: str) -> None:
    pushed = racker("push", "debian-bookworm", f"docker://{registry}/mine/bookworm:pushed")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip().startswith("sha256:")
    assert _pulled(f"docker://{registry}/mine/bookworm:pushed")[1] == bookworm.digest


# -- racker import --------------------------------------------------------------


def test_import_a_directory_and_tarballs_of_it(bookworm: store.StoredImage, tmp_path: Path) -> None:
    imported = racker("import", "from-dir", str(bookworm.rootfs))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split()[1] == bookworm.digest
    assert json.loads(racker("images", "--json").stdout)[1]["name"] == "from-dir" or store.lookup("from-dir") is not None
    rootfs_tar = tmp_path / "rootfs.tar"
    assert racker("export", "debian-bookworm", "-o", str(rootfs_tar), "--format", "rootfs-tar").returncode == 0
    # Each compressor at its fastest level: the reader is the point (xz at its default level took 116 s of CPU here).
    for compress, suffix in ((["gzip", "-1", "-k"], ".gz"), (["zstd", "-q", "-1", "-k"], ".zst"), (["xz", "-0", "-k", "-T0"], ".xz")):
        subprocess.run([*compress, str(rootfs_tar)], check=True)
        name = f"from-tar{suffix.replace('.', '-')}"
        result = racker("import", name, str(rootfs_tar) + suffix)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[1] == bookworm.digest, suffix
    passes_checks("from-tar-zst")


def _hostile(tmp_path: Path) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("etc/os-release")
        data = b"ID=debian\n"
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("../../../../../../tmp/racker-escaped")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    return path


def test_a_hostile_or_broken_tarball_is_one_line_and_stores_nothing(private_store: dict, tmp_path: Path) -> None:
    evil = _hostile(tmp_path)
    result = racker("import", "evil", str(evil))
    assert result.returncode == 125 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "climbs out of the root" in result.stderr
    assert not Path("/tmp/racker-escaped").exists()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(300))
    result = racker("import", "broken", str(broken))
    assert result.returncode == 125 and "not a readable tar archive" in result.stderr, result.stderr
    assert store.images() == []
    assert [p.name for p in (store.home() / "tmp").iterdir()] == [".new"]


@pytest.mark.parametrize(("name", "said"), [("debian-bookworm", "is a catalogue image"), ("x+vm", "cannot name an imported image")])
def test_import_refuses_names_that_mean_something_else(private_store: dict, tmp_path: Path, name: str, said: str) -> None:
    (tmp_path / "root").mkdir()
    result = racker("import", name, str(tmp_path / "root"))
    assert result.returncode == 125 and said in result.stderr, result.stderr
