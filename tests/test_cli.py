"""The command line: every listed image name is accepted, options are never a command, disks are told from images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import racker
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
