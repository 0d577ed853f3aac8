"""The catalogue is validated: a bad file is one line naming the file and the key, never another image."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import racker, racker_here
from racker.store import catalog, refs

# (file text, what the one error line must say besides the file's path)
BAD_ENTRIES = {
    "unknown-key": ('source = "bootstrap:debian/bookworm"\npakages = ["curl"]\n', ["unknown key 'pakages'", "did you mean 'packages'?"]),
    "no-source": ('description = "no source"\npackages = []\n', ["no 'source'", 'source = "bootstrap:debian/bookworm"']),
    "misspelt-source": ('sorce = "bootstrap:debian/bookworm"\n', ["unknown key 'sorce'", "did you mean 'source'?"]),
    "string-packages": ('source = "bootstrap:debian/bookworm"\npackages = "curl"\n', ["packages must be a list of strings, not a string"]),
    "number-in-packages": ('source = "bootstrap:debian/bookworm"\npackages = ["curl", 3]\n', ["a list of strings", "a number"]),
    "number-variant": ('source = "bootstrap:debian/bookworm"\nvariant = 3\n', ["variant must be a string, not a number"]),
    "list-build-args": ('source = "dockerfile:."\nbuild_args = ["A=1"]\n', ["build_args must be a table of strings, not a list"]),
    "number-build-arg": ('source = "dockerfile:."\nbuild_args = { A = 1 }\n', ["a table of strings", "a table holding a number"]),
    "string-nightly": ('source = "bootstrap:debian/bookworm"\nnightly = "yes"\n', ["nightly must be true or false, not a string"]),
    "bad-toml": ('source = "bootstrap:debian/bookworm\n', ["is not valid TOML", "line 1"]),
    "bad-source": ('source = "bootstrap:fedora/40"\n', ["source: bad bootstrap reference"]),
    "catalogue-source": ('source = "debian-bookworm"\n', ["source 'debian-bookworm' is a catalogue name"]),
}


def _nothing_stored(env: dict[str, str]) -> bool:
    home = Path(env["RACKER_HOME"])
    return not any((home / "refs").glob("*.json")) and not any((home / "images").glob("*")) if home.exists() else True


def _assert_one_line_naming(path: Path, says: list[str], code: int, stderr: str, env: dict[str, str]) -> None:
    assert code == 125, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"racker: error: catalogue file {path}")
    for words in says:
        assert words in lines[0]
    assert _nothing_stored(env)


@pytest.mark.parametrize("verb", ["pull", "check"])
@pytest.mark.parametrize("name", list(BAD_ENTRIES))
def test_a_bad_entry_is_one_line_naming_file_and_key(private_store: dict[str, str], name: str, verb: str) -> None:
    text, says = BAD_ENTRIES[name]
    path = Path(private_store["RACKER_CATALOG"]) / f"{name}.toml"
    path.write_text(text)
    result = racker_here(verb, name)
    _assert_one_line_naming(path, says, result.returncode, result.stderr, private_store)


@pytest.mark.parametrize("verb", ["pull", "check"])
def test_a_bad_entry_is_one_line_from_the_racker_command_too(private_store: dict[str, str], verb: str) -> None:
    """The cases above run the CLI in this process; here the real command, once per verb."""
    text, says = BAD_ENTRIES["unknown-key"]
    path = Path(private_store["RACKER_CATALOG"]) / "unknown-key.toml"
    path.write_text(text)
    result = racker(verb, "unknown-key", env=private_store)
    _assert_one_line_naming(path, says, result.returncode, result.stderr, private_store)


def test_a_bad_entry_is_named_when_the_catalogue_is_listed(private_store: dict[str, str]) -> None:
    """An unknown name reads every file to suggest one: a bad file there is an error too, not skipped."""
    path = Path(private_store["RACKER_CATALOG"]) / "broken.toml"
    path.write_text('source = "bootstrap:debian/bookworm"\npakages = []\n')
    result = racker_here("pull", "tinny")
    assert result.returncode == 125
    assert result.stderr.splitlines() == [f"racker: error: catalogue file {path}: unknown key 'pakages'; did you mean 'packages'?"]


def test_every_key_is_read_as_declared(private_store: dict[str, str]) -> None:
    path = Path(private_store["RACKER_CATALOG"]) / "full.toml"
    path.write_text(
        'description = "d"\nsource = "bootstrap:debian/bookworm"\nvariant = "essential"\n'
        'packages = ["a", "b"]\napt_options = [\'Acquire::Check-Valid-Until "false"\']\n'
    )
    entry = catalog.get("full")
    assert (entry.description, entry.source, entry.packages, entry.apt_options) == (
        "d",
        "bootstrap:debian/bookworm",
        ("a", "b"),
        ('Acquire::Check-Valid-Until "false"',),
    )
    assert entry.options == {"variant": "essential"}


def test_the_nightly_takes_the_default_set_and_what_is_marked_for_it(private_store: dict[str, str]) -> None:
    """`racker nightly` without names: the default set (`--racker-images all`), plus the entries
    marked `nightly = true`, minus those marked `nightly = false`."""
    here = Path(private_store["RACKER_CATALOG"])
    source = 'source = "bootstrap:debian/bookworm"\n'
    (here / "asked-only.toml").write_text(source + "default_set = false\n")
    (here / "nightly-too.toml").write_text(source + "default_set = false\nnightly = true\n")
    (here / "not-nightly.toml").write_text(source + "nightly = false\n")
    assert {"tiny", "not-nightly"} <= set(catalog.default_set())
    assert not {"asked-only", "nightly-too"} & set(catalog.default_set())
    assert {"tiny", "nightly-too"} <= set(catalog.nightly_set())
    assert not {"asked-only", "not-nightly"} & set(catalog.nightly_set())


def test_the_shipped_catalogue_is_valid() -> None:
    for entry in catalog.entries().values():
        assert refs.parse(entry.source).scheme != "catalog"


def test_bootstrapped_releases_keep_their_security_suite_on_the_mirror_s_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from racker.sources import bootstrap

    monkeypatch.setenv("RACKER_DEBIAN_MIRROR", "http://127.0.0.1:3142/deb.debian.org/debian/")
    for entry in catalog.entries().values():
        distro, _, suite = refs.parse(entry.source).target.partition("/")
        lines = bootstrap.sources(distro, suite)
        assert lines[0] == f"deb http://127.0.0.1:3142/deb.debian.org/debian/ {suite} main"
        security = [f"deb http://127.0.0.1:3142/deb.debian.org/debian-security {suite}-security main"]
        # sid has no security suite; bullseye's ended with its LTS (2026-08-31).
        assert lines[1:] == ([] if suite in ("sid", "bullseye") else security), entry.name
