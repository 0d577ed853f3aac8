"""Container images have no init: `racker run` gives them one first (NAME+boot, the original
untouched), and `racker run --no-boot` runs a command in them directly, as docker run does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import passes_checks, racker
from racker import store
from racker.sources import export

pytestmark = pytest.mark.slow


@pytest.fixture
def slim(private_store: dict, share_image) -> store.StoredImage:  # type: ignore[no-untyped-def]
    """Debian's minbase variant: apt, but no systemd, sshd or D-Bus (like Docker Hub's debian).
    Bootstrapped once in the shared store (the tests here are about what comes after a pull)."""
    (Path(private_store["RACKER_CATALOG"]) / "slim.toml").write_text(
        'source = "bootstrap:debian/bookworm"\nvariant = "minbase"\npackages = []\n'
    )
    share_image("slim")
    image = store.lookup("slim")
    assert image is not None and not image.manifest["distro"]["systemd"]
    return image


def test_an_image_without_an_init_is_given_one_once_and_passes_the_checks(slim: store.StoredImage, registry: str, tmp_path: Path) -> None:
    export.push(slim, f"docker://{registry}/library/debian:slim")
    reference = f"docker://{registry}/library/debian:slim"
    passes_checks(reference)
    pulled = store.lookup(reference)
    booted = store.lookup(reference + "+boot")
    assert pulled is not None and booted is not None
    assert store.tree_digest(pulled.rootfs) == pulled.digest == slim.digest, "the pulled image itself is untouched"
    assert booted.manifest["prepared"]["for"] == "boot" and "systemd" in booted.manifest["prepared"]["packages"]
    assert booted.manifest["distro"]["systemd"]
    again = racker("--debug", "run", reference, "--", "true")
    assert again.returncode == 0 and "apt-get" not in again.stderr, "prepared once, then reused"
    listed = racker("images").stdout
    assert reference + "+boot" in listed
    # The same filesystem from another source is prepared already: the prepared image is shared.
    archive = tmp_path / "slim.tar"
    export.export(slim, archive, "docker-archive")
    other = racker("--debug", "run", f"docker-archive:{archive}", "--", "true")
    assert other.returncode == 0 and "apt-get" not in other.stderr, "the same digest is prepared once, whatever its source"
    twin = store.lookup(f"docker-archive:{archive}+boot")
    assert twin is not None and twin.digest == booted.digest and twin.manifest["prepared"]["from"] == f"docker-archive:{archive}"
    assert racker("rmi", reference + "+boot").returncode == 0
    assert store.lookup(f"docker-archive:{archive}+boot") is not None, "removing one name keeps the image the other names"


def test_no_boot_runs_the_command_directly_with_the_image_config(slim: store.StoredImage) -> None:
    with store.workdir("test") as work:
        subprocess.run(["cp", "-al", str(slim.rootfs), str(work / "rootfs")], check=True)
        config = {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ['echo "$GREETING from $(pwd) as $(id -un), pid $$"; touch /written; exit 3'],
            "Env": ["GREETING=hello world"],
            "WorkingDir": "/tmp",
            "User": "nobody",
        }
        store.commit("app", work / "rootfs", source="test:", recipe="1", manifest={"config": config})
    ran = racker("run", "--no-boot", "app")
    assert ran.returncode == 3, ran.stderr
    said, _, pid = ran.stdout.strip().rpartition(", pid ")
    assert said == "hello world from /tmp as nobody" and pid != "1", ran.stdout
    init = racker("run", "--no-boot", "app", "--", "cat", "/proc/1/comm")
    assert init.returncode == 0 and "systemd" not in init.stdout, "no init runs: nspawn's stub is PID 1"
    explicit = racker("run", "--no-boot", "app", "--", "sh", "-c", "test -e /written && echo kept || echo gone")
    assert explicit.stdout.strip() == "gone", "writes go to a tmpfs overlay, never the store"
    image = store.lookup("app")
    assert image is not None and store.tree_digest(image.rootfs) == image.digest
    assert store.lookup("app+boot") is None, "--no-boot prepares nothing"
