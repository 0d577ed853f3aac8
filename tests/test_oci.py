"""docker:// images from a real registry on loopback, and exports back out.

The registry (Debian's docker-registry) is started by the tests and seeded
with racker's own bootstrapped Debian image, pushed by racker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, passes_checks, racker
from racker import store
from racker.sources import export

pytestmark = pytest.mark.slow


@pytest.fixture
def seeded(seeded_registry: dict) -> dict[str, str]:
    return seeded_registry


def _blobs() -> set[str]:
    directory = store.home() / "oci-blobs" / "sha256"
    return set(os.listdir(directory)) if directory.is_dir() else set()


def _store_unchanged() -> bool:
    tmp = store.home() / "tmp"
    return store.images() == [] and (not tmp.is_dir() or [p.name for p in tmp.iterdir()] in ([], [".new"]))


def test_pull_from_a_registry_keeps_the_filesystem_and_passes_the_checks(registry: str, seeded: dict, private_store: dict) -> None:
    reference = f"docker://{registry}/library/debian:bookworm"
    pulled = racker("pull", reference, env=private_store)
    assert pulled.returncode == 0, pulled.stderr
    name, digest = pulled.stdout.split()
    assert digest == seeded["digest"], "racker export → registry → racker pull must keep the filesystem digest"
    image = store.lookup(name)
    assert image is not None and image.manifest["oci"]["manifest_digest"] == seeded["manifest"]
    assert store.tree_digest(image.rootfs) == image.digest
    passes_checks(reference, env=private_store)


def test_a_present_image_is_not_fetched_again(registry: str, seeded: dict, private_store: dict) -> None:
    reference = f"docker://{registry}/library/debian:bookworm"
    assert racker("pull", reference, env=private_store).returncode == 0
    offline = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "racker", "--debug", "pull", reference],
        env={**os.environ, **private_store},
        capture_output=True,
        text=True,
    )
    assert offline.returncode == 0, offline.stderr
    assert "run: " not in offline.stderr


def test_layers_are_kept_once_and_shared_between_images(registry: str, seeded: dict, private_store: dict) -> None:
    assert racker("pull", f"docker://{registry}/library/debian:bookworm", env=private_store).returncode == 0
    blobs = _blobs()
    assert len(blobs) == 3, blobs  # layer, config, manifest
    layer = max(blobs, key=lambda b: (store.home() / "oci-blobs/sha256" / b).stat().st_size)
    inode = (store.home() / "oci-blobs/sha256" / layer).stat().st_ino
    copy = racker("--debug", "pull", f"docker://{registry}/library/debian:copy", env=private_store)
    assert copy.returncode == 0, copy.stderr
    assert _blobs() == blobs and (store.home() / "oci-blobs/sha256" / layer).stat().st_ino == inode, "the layer was fetched again"


def test_pinned_by_digest(registry: str, seeded: dict, private_store: dict) -> None:
    pinned = racker("pull", f"docker://{registry}/library/debian@{seeded['manifest']}", env=private_store)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.split()[1] == seeded["digest"]
    wrong = "sha256:" + "0" * 64
    result = racker("pull", f"docker://{registry}/library/debian@{wrong}", env=private_store)
    assert result.returncode == 125 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot pull" in result.stderr


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("library/debian:no-such-tag", "manifest unknown"),
        ("library/nothing:latest", "cannot pull"),
    ],
)
def test_missing_images_are_one_line_and_store_nothing(registry: str, seeded: dict, private_store: dict, target: str, said: str) -> None:
    result = racker("pull", f"docker://{registry}/{target}", env=private_store)
    assert result.returncode == 125, result
    assert len(result.stderr.strip().splitlines()) == 1 and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert _store_unchanged()


def test_an_unreachable_registry_is_one_line(private_store: dict) -> None:
    port = free_port()  # nothing listens there
    result = racker("pull", f"docker://127.0.0.1:{port}/library/debian:bookworm", env=private_store)
    assert result.returncode == 125
    assert result.stderr.startswith("racker: error: cannot pull") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _store_unchanged()


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_writes_what_load_and_import_take(share_image, tmp_path: Path, fmt: str) -> None:
    image = share_image("debian-bookworm")
    out = tmp_path / "out"
    out.mkdir()
    output = out / f"image.{fmt}"
    export.export(image, output, fmt)
    assert [p.name for p in out.iterdir()] == [output.name], "no partial file left beside it"
    if fmt == "rootfs-tar":
        listing = subprocess.run(["tar", "-tvf", str(output)], capture_output=True, text=True, check=True).stdout.splitlines()
        passwd = next(line for line in listing if line.endswith(" ./usr/bin/passwd"))
        assert passwd.startswith("-rwsr-xr-x 0/0 "), "numeric owners and set-uid bits are kept"
        assert any(line.endswith(" ./etc/os-release -> ../usr/lib/os-release") for line in listing)
        return
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"{fmt}:{output}"], capture_output=True, text=True, check=True).stdout)
    assert len(inspected["Layers"]) == 1 and inspected["Architecture"] == "amd64"


def _registries_conf(tmp_path: Path, text: str) -> dict[str, str]:
    conf = tmp_path / "registries.conf"
    conf.write_text(text)
    return {"CONTAINERS_REGISTRIES_CONF": str(conf)}


def test_docker_hub_names_resolve_through_a_configured_mirror(registry: str, seeded: dict, private_store: dict, tmp_path: Path) -> None:
    """As podman would: docker.io's mirrors from CONTAINERS_REGISTRIES_CONF, the first that answers wins."""
    dead = f"127.0.0.1:{free_port()}"
    conf = _registries_conf(
        tmp_path,
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{dead}"\n[[registry.mirror]]\nlocation = "{registry}"\n',
    )
    pulled = racker("pull", "docker://debian:bookworm", env={**private_store, **conf})
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.split() == ["docker://docker.io/library/debian:bookworm", seeded["digest"]]
    image = store.lookup("docker://docker.io/library/debian:bookworm")
    assert image is not None and image.manifest["oci"]["pulled_from"] == f"{registry}/library/debian:bookworm"


def test_a_blocked_registry_is_refused(private_store: dict, tmp_path: Path) -> None:
    conf = _registries_conf(tmp_path, '[[registry]]\nprefix = "docker.io/library/debian"\nblocked = true\n')
    result = racker("pull", "docker://debian:bookworm", env={**private_store, **conf})
    assert result.returncode == 125 and "blocked by registries.conf" in result.stderr, result.stderr
    assert _store_unchanged()
