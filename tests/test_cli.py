"""The command line: every listed image name is accepted, options are never a command, disks are told from images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, racker
from racker import images, store
from racker.errors import RackerError

LOCAL_NAMES = {
    # name: recipe (a scheme name's recipe is its source: pull finds it built and builds nothing)
    "bootstrap:debian/bookworm": "bootstrap:debian/bookworm",
    "bootstrap:debian/bookworm+vm": "made here",
    "docker://docker.io/library/debian:latest": "docker://docker.io/library/debian:latest",
    "my-image": "made here",
    "My Image": "made here",  # no reference parses to it; still a name the store holds
}


def _commit(name: str, recipe: str, text: str) -> store.StoredImage:
    """A small image under `name`, as a pull, a prepare or an import would commit it."""
    with store.workdir("test") as work:
        rootfs = work / "rootfs"
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc" / "os-release").write_text("ID=debian\n")
        (rootfs / "file").write_text(text)
        return store.commit(name, rootfs, source=f"test:{name}", recipe=recipe, manifest={})


@pytest.fixture
def every_kind_of_name(private_store: dict[str, str], share_image) -> dict[str, str]:
    """A private store holding a name of every kind `racker images` lists: name -> digest."""
    share_image("debian-bookworm")
    share_image("debian-bookworm", prepared=True)
    for name, recipe in LOCAL_NAMES.items():
        _commit(name, recipe, text=name)
    listed = racker("images", "--json", env=private_store)
    assert listed.returncode == 0, listed.stderr
    names = {i["name"]: i["digest"] for i in json.loads(listed.stdout)}
    assert set(names) == {"debian-bookworm", "debian-bookworm+vm", *LOCAL_NAMES}
    return names


def _found(name: str) -> tuple[str, str, str]:
    """What rmi finds, and what run, promote and vm start pull (built already: nothing is built here)."""
    try:
        image = images.find(name)
        return image.name, image.digest, images.pull(name).digest
    except RackerError as error:
        return (str(error), "", "")


def test_every_listed_name_resolves_to_itself(every_kind_of_name: dict[str, str]) -> None:
    found = {name: _found(name) for name in every_kind_of_name}
    assert found == {name: (name, digest, digest) for name, digest in every_kind_of_name.items()}


def test_rmi_removes_every_listed_name(private_store: dict[str, str], every_kind_of_name: dict[str, str]) -> None:
    for name, digest in every_kind_of_name.items():
        result = racker("rmi", name, env=private_store)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"removed {name} {digest}"]
    assert store.images() == []


def test_a_missing_prepared_image_says_what_prepares_it(private_store: dict[str, str]) -> None:
    result = racker("run", "debian-bookworm+vm", "--", "true", env=private_store)
    assert result.returncode == 125
    assert result.stderr.splitlines() == [
        "racker: error: image 'debian-bookworm+vm' is not in the store",
        "it is prepared by: racker promote debian-bookworm (or racker vm start debian-bookworm)",
    ]
    assert not Path(private_store["RACKER_HOME"], "refs").exists() or not any(Path(private_store["RACKER_HOME"], "refs").iterdir())


# -- vm start: a disk file or an image --------------------------------------


def test_what_vm_start_boots(private_store: dict[str, str], share_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from racker.cli_vm import disk_or_image

    share_image("debian-bookworm", prepared=True)
    monkeypatch.chdir(tmp_path)
    Path("mydisk").write_bytes(b"\0" * 512)
    Path("debian-bookworm").write_bytes(b"\0" * 512)  # a file of an image's name: the name still means the image
    Path("bootstrap:debian").mkdir()
    Path("bootstrap:debian/bookworm").write_bytes(b"\0" * 512)  # likewise for a scheme reference
    decided = {
        target: disk_or_image(target)
        for target in [
            "debian-bookworm",
            "debian-bookworm+vm",
            "bootstrap:debian/bookworm",
            "bootstrap:debian/bookworm+vm",
            "docker://debian:bookworm",
            "no-such-image",  # an image: pulling it names the nearest ones
            "file:disk.qcow2",
            "file:/srv/vm.img",
            "./nope.qcow2",
            "/srv/vm.img",
            "bookworm.qcow2",
            "rootfs.ext4",
            "mydisk",
        ]
    }
    assert decided == {
        "debian-bookworm": None,
        "debian-bookworm+vm": None,
        "bootstrap:debian/bookworm": None,
        "bootstrap:debian/bookworm+vm": None,
        "docker://debian:bookworm": None,
        "no-such-image": None,
        "file:disk.qcow2": Path("disk.qcow2"),
        "file:/srv/vm.img": Path("/srv/vm.img"),
        "./nope.qcow2": Path("nope.qcow2"),
        "/srv/vm.img": Path("/srv/vm.img"),
        "bookworm.qcow2": Path("bookworm.qcow2"),
        "rootfs.ext4": Path("rootfs.ext4"),
        "mydisk": Path("mydisk"),
    }


def test_every_listed_name_is_an_image_to_vm_start(every_kind_of_name: dict[str, str]) -> None:
    from racker.cli_vm import disk_or_image

    assert {name: disk_or_image(name) for name in every_kind_of_name} == dict.fromkeys(every_kind_of_name)


def _racker_in(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """racker run from another directory: this checkout's racker, not whichever one is installed."""
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "racker", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_vm_start_of_a_missing_disk_is_one_line(private_store: dict[str, str], tmp_path: Path) -> None:
    for target in ["./nope.qcow2", "file:nope.qcow2"]:
        result = _racker_in(tmp_path, "vm", "start", target, env=private_store)
        assert result.returncode == 125
        assert result.stderr.splitlines() == [f"racker: error: no disk file {tmp_path / 'nope.qcow2'}"]


def test_vm_start_of_a_scheme_reference_pulls_the_image(private_store: dict[str, str]) -> None:
    """bootstrap:debian/bookworm holds a `/` but is an image: vm start pulls it (here: no mmdebstrap, so it cannot)."""
    result = racker("vm", "start", "bootstrap:debian/bookworm", env={**private_store, "RACKER_PATH": "/nonexistent"})
    assert result.returncode == 125
    assert result.stderr.splitlines()[0] == "racker: error: mmdebstrap is not installed"
