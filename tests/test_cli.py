"""The command line: every listed image name is accepted, options are never a command, disks are told from images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, racker, racker_here
from racker import images, store
from racker.errors import RackerError
from racker.sources import bootstrap
from racker.store import refs

LOCAL_NAMES = {
    # name: recipe (a scheme name's recipe is what its source says: pull finds it built and builds nothing)
    "bootstrap:debian/bookworm": bootstrap.recipe(refs.parse("bootstrap:debian/bookworm")),
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


@pytest.mark.root  # share_image: hard links into the shared store
def test_every_listed_name_resolves_to_itself(every_kind_of_name: dict[str, str]) -> None:
    found = {name: _found(name) for name in every_kind_of_name}
    assert found == {name: (name, digest, digest) for name, digest in every_kind_of_name.items()}


@pytest.mark.root  # share_image: hard links into the shared store
def test_rmi_removes_every_listed_name(private_store: dict[str, str], every_kind_of_name: dict[str, str]) -> None:
    for name, digest in every_kind_of_name.items():
        result = racker("rmi", name, env=private_store)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"removed {name} {digest}"]
    assert store.images() == []


def test_a_missing_prepared_image_says_what_prepares_it(private_store: dict[str, str]) -> None:
    result = racker_here("run", "debian-bookworm+vm", "--", "true")
    assert result.returncode == 125
    assert result.stderr.splitlines() == [
        "racker: error: image 'debian-bookworm+vm' is not in the store",
        "it is prepared by: racker promote debian-bookworm (or racker vm start debian-bookworm)",
    ]
    assert not Path(private_store["RACKER_HOME"], "refs").exists() or not any(Path(private_store["RACKER_HOME"], "refs").iterdir())


# -- vm start: a disk file or an image --------------------------------------


@pytest.mark.root  # share_image: hard links into the shared store
def test_what_vm_start_boots(private_store: dict[str, str], share_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from racker.cli.vm import disk_or_image

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
        "file:disk.qcow2": tmp_path / "disk.qcow2",  # file: paths are made absolute when parsed
        "file:/srv/vm.img": Path("/srv/vm.img"),
        "./nope.qcow2": Path("nope.qcow2"),
        "/srv/vm.img": Path("/srv/vm.img"),
        "bookworm.qcow2": Path("bookworm.qcow2"),
        "rootfs.ext4": Path("rootfs.ext4"),
        "mydisk": Path("mydisk"),
    }


@pytest.mark.root  # share_image: hard links into the shared store
def test_every_listed_name_is_an_image_to_vm_start(every_kind_of_name: dict[str, str]) -> None:
    from racker.cli.vm import disk_or_image

    assert {name: disk_or_image(name) for name in every_kind_of_name} == dict.fromkeys(every_kind_of_name)


def test_vm_start_of_a_missing_disk_is_one_line(private_store: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path is the current directory's
    for target in ["./nope.qcow2", "file:nope.qcow2"]:
        result = racker_here("vm", "start", target)
        assert result.returncode == 125
        assert result.stderr.splitlines() == [f"racker: error: no disk file {tmp_path / 'nope.qcow2'}"]


def test_vm_start_of_a_scheme_reference_pulls_the_image(private_store: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """bootstrap:debian/bookworm holds a `/` but is an image: vm start pulls it (here: no mmdebstrap, so it cannot)."""
    monkeypatch.setenv("RACKER_PATH", "/nonexistent")
    result = racker_here("vm", "start", "bootstrap:debian/bookworm")
    assert result.returncode == 125
    # The bootstrap's first tool: gpgv verifies the archive's InRelease (its date) before mmdebstrap runs.
    assert result.stderr.splitlines()[0] == "racker: error: gpgv is not installed"


# -- options between IMAGE and -- are options, never the command --------------


def _parsed(*argv: str) -> dict[str, object]:
    from racker import cli

    args = cli.parse(list(argv))
    return {k: v for k, v in vars(args).items() if k in ("image", "target", "name", "tty", "root", "memory", "timeout", "command")}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "img", "--name", "x", "--", "true"], {"image": "img", "name": "x", "command": ["true"]}),
        (["run", "img", "-t", "--timeout", "5", "--", "tty"], {"image": "img", "tty": True, "timeout": 5.0, "command": ["tty"]}),
        (["run", "--name", "x", "img", "--", "ls", "-la"], {"image": "img", "name": "x", "command": ["ls", "-la"]}),
        (["run", "img", "ls", "-la", "--", "x"], {"image": "img", "name": None, "command": ["ls", "-la", "--", "x"]}),
        (["run", "img"], {"image": "img", "name": None, "command": []}),
        (["run", "img", "--", "--version"], {"image": "img", "name": None, "command": ["--version"]}),
        (["run", "img", "--name", "x", "--", "-v"], {"image": "img", "name": "x", "command": ["-v"]}),
        (["exec", "box", "--", "--", "x"], {"name": "box", "command": ["--", "x"]}),  # the command's own --
        (["exec", "box", "-t", "--", "bash"], {"name": "box", "tty": True, "command": ["bash"]}),
        (["exec", "box", "ls", "-la"], {"name": "box", "tty": None, "command": ["ls", "-la"]}),
        (["vm", "run", "img", "--memory", "512", "--root", "--", "id"], {"target": "img", "memory": 512, "root": True, "command": ["id"]}),
        (["vm", "ssh", "vm1", "--root", "--", "id"], {"name": "vm1", "root": True, "command": ["id"]}),
        (["vm", "ssh", "vm1"], {"name": "vm1", "root": False, "command": []}),
    ],
)
def test_words_between_the_image_and_the_separator_are_options(argv: list[str], expected: dict[str, object]) -> None:
    parsed = _parsed(*argv)
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "word", "what"),
    [
        (["run", "img", "--name", "x"], "--name", "the image"),
        (["exec", "box", "-t"], "-t", "the machine's name"),
        (["vm", "run", "img", "--root", "id"], "--root", "the disk or image"),
        (["vm", "ssh", "vm1", "--root"], "--root", "the VM's name"),
    ],
)
def test_an_option_after_the_image_without_a_separator_is_one_error(argv: list[str], word: str, what: str) -> None:
    result = racker_here(*argv)
    assert result.returncode == 125
    lines = result.stderr.splitlines()
    assert lines[0] == f"racker: error: {word!r} follows {what}: put options before {what}, or the command after --"
    assert len(lines) == 2 and lines[1].startswith(f"racker {argv[0]} ")  # the usage, as the hint


def test_a_word_between_the_image_and_the_separator_that_is_no_option_is_one_error() -> None:
    """The real command, in a process of its own (the cases above run the CLI in this process)."""
    result = racker("run", "img", "--name", "x", "foo", "--", "true")
    assert result.returncode == 125
    assert result.stderr.splitlines() == [
        "racker: error: only options may come between the image and --, not 'foo'",
        "racker run [OPTIONS] IMAGE [-- COMMAND ...]",
    ]


@pytest.mark.slow
@pytest.mark.root
def test_run_with_options_after_the_image_boots_with_them(private_store: dict[str, str], share_image) -> None:
    share_image("debian-bookworm")
    name = f"cli-options-{os.getpid()}"
    result = racker("run", "debian-bookworm", "--name", name, "--", "hostname", env=private_store, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name}\n"


def test_check_table_has_a_column_per_image_and_engine_and_the_worst_outcome_of_a_parametrised_check() -> None:
    from racker.report import check_table

    def record(check: str, engine: str, outcome: str) -> dict:
        return {"image": "debian-sid", "engine": engine, "check": check, "outcome": outcome}

    rows, header = check_table(
        [
            record("test_root_writable", "nspawn", "skip"),
            record("test_root_writable", "qemu", "pass"),
            record("test_profile_requirements_met", "qemu", "skip"),
            record("test_profile_requirements_met", "qemu", "fail"),
            record("test_profile_requirements_met", "nspawn", "skip"),
        ]
    )
    assert header == ["CHECK", "debian-sid/nspawn", "debian-sid/qemu"]
    assert rows == [["profile_requirements_met", "skip", "fail"], ["root_writable", "skip", "pass"]]


def test_a_catalogue_image_built_from_other_apt_sources_is_not_served_as_current(private_store: dict[str, str]) -> None:
    """A bootstrap's recipe holds its apt sources (a security suite added builds the image again):
    an image stored under the catalogue file's recipe alone, as before, is stale, not present."""
    from racker.sources import recipe_for
    from racker.store import catalog

    entry = catalog.get("tiny")
    current = recipe_for(refs.parse(entry.source), entry)
    assert "-security" in current, "bookworm's security suite is part of what the image is built from"
    stale = _commit("tiny", catalog.recipe_of(catalog.find_file("tiny").read_bytes()), text="before")  # type: ignore[union-attr]
    assert images._present_catalog_image("tiny") is None, f"served {stale.recipe!r}"
    fresh = _commit("tiny", current, text="after")
    assert images._present_catalog_image("tiny") == fresh


def test_a_command_s_start_imports_neither_pytest_nor_jinja2() -> None:
    """Each racker command is a new Python: pytest and jinja2 took half its start (0.23 s) before
    the report's modules imported them only where used."""
    probe = "import sys; from racker import cli; cli.parse(['images']); print(sorted({'pytest', 'jinja2'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
